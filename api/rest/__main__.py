"""`python -m api.rest --write-openapi docs/openapi.json`: write the OpenAPI document kept in docs/."""
from __future__ import annotations

import argparse
from pathlib import Path

from api import rest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m api.rest", description=rest.__doc__.split("\n\n")[0])
    parser.add_argument("--write-openapi", metavar="PATH", type=Path, required=True,
                        help="write the OpenAPI document to PATH (docs/openapi.json in the repository)")
    args = parser.parse_args(argv)
    args.write_openapi.write_text(rest.openapi_text())
    print(f"wrote {args.write_openapi}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
