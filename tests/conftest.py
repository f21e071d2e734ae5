"""Shared fixtures: the services the tests run against, and the recovery-site storage backends.

Services are session-scoped and started on first use, so a run that needs none of them starts none.
"""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from azure.storage.blob import BlobServiceClient
from services import AzuriteProcess, ServiceStartError

from sites.storage.azure import AzureBlobStorage
from sites.storage.base import RecoveryStorage
from sites.storage.local import LocalDirectoryStorage


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
