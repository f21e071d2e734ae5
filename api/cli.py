"""The `asr` command line."""
from __future__ import annotations

import json
import sys
from contextlib import ExitStack
from pathlib import Path

import click

from datapath.errors import DataPathError

DISK_FORMATS = click.Choice(["raw", "vhd"])


def _fail(message: str, code: int = 2):
    click.echo(f"asr: error: {message}", err=True)
    sys.exit(code)


class _Group(click.Group):
    """Turns the data path's own errors into one readable line and exit status 2, not a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (DataPathError, FileExistsError, FileNotFoundError, ValueError) as exc:
            _fail(str(exc))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="site-recovery-engine")
def main():
    """Site Recovery Engine: disaster recovery of virtual machines to a recovery site."""


@main.group(cls=_Group)
def disk():
    """Work with disk images (raw and fixed VHD): create, convert, checksum, sync, verify.

    Raw and VHD images mix freely; a VHD's footer is never part of the compared or copied content."""


def _size_option(value: str) -> int:
    from datapath.disk import parse_size

    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _format_for(path: Path, fmt: str | None) -> str:
    if fmt:
        return fmt
    return "vhd" if path.suffix.lower() == ".vhd" else "raw"


@disk.command("create")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--size", required=True, help="Virtual size, e.g. 64M, 10G (VHD: a whole number of MiB).")
@click.option("--format", "fmt", type=DISK_FORMATS, default=None,
              help="Image format; default from the extension (.vhd) else raw.")
def disk_create(path: Path, size: str, fmt: str | None):
    """Create an empty (sparse, all-zero) disk image at PATH."""
    from datapath.disk import create_disk, format_size

    nbytes = _size_option(size)
    fmt = _format_for(path, fmt)
    create_disk(path, nbytes, fmt)
    click.echo(f"created {path} ({fmt}, {format_size(nbytes)})")


@disk.command("convert")
@click.argument("src", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("dst", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=DISK_FORMATS, required=True, help="Format of DST.")
def disk_convert(src: Path, dst: Path, fmt: str):
    """Copy SRC into a new image DST of the given format; holes and zero chunks stay sparse."""
    from datapath.copy import copy_disk
    from datapath.disk import create_disk, open_disk

    with open_disk(src) as source:
        create_disk(dst, source.size, fmt)
        try:
            with open_disk(dst, writable=True) as target:
                result = copy_disk(source, target, target_is_zero=True)
                target.flush()
        except BaseException:
            dst.unlink(missing_ok=True)  # a half-written image must not pass for a converted one
            raise
    click.echo(f"converted {src} -> {dst} ({fmt}): {result.bytes_written} bytes written, "
               f"root {result.manifest.root_hex}")


@disk.command("manifest")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--chunk-size", default="1M", show_default=True, help="Fixed chunk size.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest (hashes included) as JSON.")
def disk_manifest(path: Path, chunk_size: str, as_json: bool):
    """Chunk checksums (mmh3 128-bit per fixed-size chunk) and their root."""
    from datapath.disk import open_disk
    from datapath.manifest import compute_manifest

    with open_disk(path) as source:
        manifest = compute_manifest(source, _size_option(chunk_size))
    if as_json:
        click.echo(json.dumps(json.loads(manifest.to_json()) | {"path": str(path)}))
    else:
        click.echo(f"chunk size  {manifest.chunk_size}\nchunks      {manifest.chunk_count}\n"
                   f"root        {manifest.root_hex}")


@disk.command("sync")
@click.argument("src", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("dst", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=DISK_FORMATS, default=None,
              help="Format of DST when it has to be created (default from its extension).")
@click.option("--chunk-size", default="1M", show_default=True, help="Coarse chunk size compared first.")
@click.option("--block-size", default="4K", show_default=True,
              help="Small block size compared inside the chunks that differ.")
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
def disk_sync(src: Path, dst: Path, fmt: str | None, chunk_size: str, block_size: str, as_json: bool):
    """Make DST's content equal to SRC's, sending only the blocks that differ.

    DST is created (same size) when it does not exist. bytes_sent counts disk data written to DST;
    hash_bytes the checksums the two sides exchanged."""
    from datapath.disk import create_disk, open_disk
    from datapath.resync import sync_disks

    with ExitStack() as stack:
        source = stack.enter_context(open_disk(src))
        if not dst.exists():
            create_disk(dst, source.size, _format_for(dst, fmt))
        target = stack.enter_context(open_disk(dst, writable=True))
        result = sync_disks(source, target, chunk_size=_size_option(chunk_size),
                            block_size=_size_option(block_size))
    stats = {
        "bytes_sent": result.bytes_sent,
        "hash_bytes": result.hash_bytes,
        "chunks_compared": result.chunks_compared,
        "chunks_sent": result.chunks_sent,
        "blocks_sent": result.blocks_sent,
        "seconds": round(result.seconds, 6),
    }
    if as_json:
        click.echo(json.dumps(stats))
    else:
        click.echo(" ".join(f"{k}={v}" for k, v in stats.items()))


@disk.command("verify")
@click.argument("a", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("b", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def disk_verify(a: Path, b: Path):
    """Exit 0 when the contents of A and B are equal, 1 with the first differing offset otherwise."""
    from datapath.compare import first_difference
    from datapath.disk import open_disk
    from datapath.errors import SizeMismatchError

    with open_disk(a) as left, open_disk(b) as right:
        if left.size != right.size:
            click.echo(f"differ: sizes {left.size} and {right.size}")
            sys.exit(1)
        try:
            offset = first_difference(left, right)
        except SizeMismatchError as exc:
            click.echo(f"differ: {exc}")
            sys.exit(1)
    if offset is None:
        click.echo(f"equal ({left.size} bytes)")
        return
    click.echo(f"differ at offset {offset}")
    sys.exit(1)


# The modules of the operator's verbs (their shared plumbing is api/cli_service.py, cli_output.py,
# cli_parsing.py and cli_progress.py) and of the process launchers.
COMMAND_MODULES = ("api.cli_fabric", "api.cli_vms", "api.cli_policies", "api.cli_protection", "api.cli_failover",
                   "api.cli_plans", "api.cli_jobs", "api.cli_apikeys", "api.cli_processes", "api.cli_db",
                   "api.cli_manage", "api.cli_certs", "api.cli_keys", "api.cli_alerts",
                   "api.cli_broker")


def _register_commands():
    # Each module of COMMAND_MODULES adds its commands to `main` when imported; they import this module,
    # hence here and not at the top.
    import importlib

    from api.demo import demo

    main.add_command(demo)
    for module in COMMAND_MODULES:
        importlib.import_module(module)


_register_commands()

if __name__ == "__main__":
    main()
