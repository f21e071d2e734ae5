"""The real services the tests run against; they live in the product (the demo starts them too)."""
from sites.localservices import (  # noqa: F401
    AZURITE_ACCOUNT,
    AZURITE_ACCOUNT_KEY,
    AZURITE_BLOB,
    LOCALHOST,
    REPO_ROOT,
    AzuriteProcess,
    ServiceStartError,
    _log_tail,
    free_port,
    port_answers,
)
