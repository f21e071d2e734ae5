"""Shared fixtures: the services the tests run against, the databases, and the recovery-site storage
backends. Every fixture more than one test module uses lives here (a test module imports none from another).

Services are session-scoped and started on first use, so a run that needs none of them starts none.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from azure.storage.blob import BlobServiceClient
from sqlalchemy.engine import Engine, make_url
from sqlmodel import Session

from models.db import dispose_engines, get_engine, init_db
from sites.guest import GuestBuildError, GuestImage, build_guest
from sites.localservices import AzuriteProcess, ServiceStartError
from sites.storage.azure import AzureBlobStorage
from sites.storage.base import RecoveryStorage
from sites.storage.local import LocalDirectoryStorage

# The suite's services are plain text (the machine's Redis and PostgreSQL, Azurite over http): allowed in
# this process and every subprocess inheriting its environment, as an operator would allow it, explicitly.
# Deployments of the tests pass it to their workers themselves (sites/deployment.py); tests/test_tls.py
# runs a TLS deployment and checks that plain text is refused without it.
os.environ["ASR_INSECURE_TRANSPORT"] = "1"
# (Read at call time, like every setting: before any test module imports worker.py.)
# No test reads or writes the user's own ~/.asr (its SQLite database, keys, beat's schedule): a test that
# reaches the default database without choosing one gets this session's private home, never a database another
# checkout or release upgraded (CI failed so: test_api_trust read a home database at another revision).
os.environ["ASR_HOME"] = tempfile.mkdtemp(prefix="asr-test-home-")
atexit.register(shutil.rmtree, os.environ["ASR_HOME"], ignore_errors=True)


# ---- parallel runs (pytest-xdist) ---------------------------------------------------------------------
def _shares_module_fixtures(path: Path) -> bool:
    return 'scope="module"' in path.read_text()


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`make test` runs the tests in several worker processes (`-n`). Each test goes to whichever worker is
    free, except that the tests of a module with a module-scoped fixture (one deployment, one installed venv,
    one benchmark run) all go to one worker, in file order: the fixture is built once, as in a serial run,
    and a test that reads what an earlier one left in it still finds it. Session fixtures (Azurite) are
    per worker. (xdist's own `--dist loadgroup` marks cannot do this with pytest 9: their node ids stay
    ungrouped.) Larger groups are handed out first."""
    from xdist.scheduler import LoadScopeScheduling

    shared: dict[str, bool] = {}

    class ModuleFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            if module not in shared:
                path = config.rootpath / module
                shared[module] = path.suffix == ".py" and path.is_file() and _shares_module_fixtures(path)
            return module if shared[module] else nodeid

    return ModuleFixtureScheduling(config, log)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In a worker of a parallel run, the modules with `slow` tests first (a stable sort, each module's tests
    in their order): the longest tests start early instead of running last while the other workers idle."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        slow_modules = {item.nodeid.split("::", 1)[0] for item in items if item.get_closest_marker("slow")}
        items.sort(key=lambda item: item.nodeid.split("::", 1)[0] not in slow_modules)


# ---- where the suite's CPU goes ------------------------------------------------------------------
CPU_REPORT_ENV = "ASR_TEST_CPU_REPORT"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[object]:
    """With ASR_TEST_CPU_REPORT=FILE, a line per test appended to FILE: the CPU seconds of this process and of
    the processes it started and reaped (workers, beat, Redis, QEMU, the asr CLI), and the wall seconds. The
    suite is CPU-bound on two cores, so this, not --durations, says which tests cost the run its time."""
    report = os.environ.get(CPU_REPORT_ENV)
    if not report:
        return (yield)
    before, started = os.times(), time.monotonic()
    try:
        return (yield)
    finally:
        after = os.times()
        own = after.user + after.system - before.user - before.system
        children = (after.children_user + after.children_system - before.children_user - before.children_system)
        with open(report, "a") as out:
            out.write(f"{own + children:.2f}\t{own:.2f}\t{children:.2f}\t{time.monotonic() - started:.2f}\t"
                      f"{item.nodeid}\n")


# ---- test outcomes, for fixtures -----------------------------------------------------------------
@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[pytest.TestReport]:
    """Each phase's report as `item.rep_setup`, `item.rep_call`, `item.rep_teardown` (pytest's documented recipe),
    which a fixture's teardown reads: the browser keeps a screenshot of a failed test's page
    (tests/test_console_browser.py)."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


# ---- services -----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzuriteProcess]:
    """Azurite's blob service on 127.0.0.1, for the whole session."""
    process = AzuriteProcess(tmp_path_factory.mktemp("azurite"))
    try:
        process.start()
    except ServiceStartError as error:
        pytest.fail(str(error), pytrace=False)
    yield process
    process.stop()


# ---- the real test guest ------------------------------------------------------------------------
GUEST_FOLDER = Path(os.environ.get("ASR_TEST_GUEST_DIR") or Path(__file__).resolve().parents[1] / ".tools" / "guest")
"""Where `make guest` builds the test guest; a session builds it there too when it is missing or out of date.
ASR_TEST_GUEST_DIR points the tests at another folder (a clone whose guest differs from the one in a shared
.tools, say)."""


@pytest.fixture(scope="session")
def test_guest() -> GuestImage:
    """The test guest (sites/guest), built from Debian packages on first use and cached in .tools/guest."""
    try:
        return build_guest(GUEST_FOLDER, log=lambda line: None)
    except GuestBuildError as error:
        pytest.fail(f"cannot build the test guest: {error}", pytrace=False)


# ---- databases ------------------------------------------------------------------------------------
POSTGRES_URL = os.environ.get("ASR_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="module")
def postgres_admin() -> Iterator[Engine]:
    """An engine on the test PostgreSQL (ASR_TEST_POSTGRES_URL) that creates and drops schemas; its `url`
    is the server's."""
    admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    try:
        with admin.connect():
            pass
    except sa.exc.OperationalError as error:
        pytest.fail(
            f"PostgreSQL at {POSTGRES_URL} is not reachable ({error.orig}): start it (Debian: "
            f"pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start) or point "
            f"ASR_TEST_POSTGRES_URL at one",
            pytrace=False,
        )
    yield admin
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database: a SQLite file, or a PostgreSQL schema of the test's own."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'asr.db'}"
        dispose_engines()
        return
    admin: Engine = request.getfixturevalue("postgres_admin")
    schema = f"asr_test_{uuid.uuid4().hex[:16]}"
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        dispose_engines()
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))


@pytest.fixture
def engine(db_url: str) -> Engine:
    return init_db(get_engine(db_url))


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    with Session(engine, expire_on_commit=False) as session:
        yield session


# ---- recovery-site storage ----------------------------------------------------------------------
def fresh_container_name() -> str:
    return f"test-{uuid.uuid4().hex[:24]}"


@pytest.fixture
def azure_storage(azurite: AzuriteProcess) -> Iterator[AzureBlobStorage]:
    """An AzureBlobStorage on a container of its own, deleted afterwards."""
    container = fresh_container_name()
    storage = AzureBlobStorage(container, connection_string=azurite.connection_string())
    yield storage
    storage.close()
    with BlobServiceClient.from_connection_string(azurite.connection_string()) as service:
        service.delete_container(container)


@pytest.fixture
def local_storage(tmp_path: Path) -> Iterator[LocalDirectoryStorage]:
    storage = LocalDirectoryStorage(tmp_path / "recovery-site")
    yield storage
    storage.close()


@pytest.fixture(params=[
    pytest.param("local", id="local"),
    pytest.param("azure", id="azure", marks=pytest.mark.azure),
])
def storage(request: pytest.FixtureRequest) -> RecoveryStorage:
    """Each backend in turn, so a test taking `storage` runs on both."""
    return request.getfixturevalue(f"{request.param}_storage")
