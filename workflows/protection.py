"""Transitional names of the protection workflows (now job kinds in workflows/kinds/); removed once every
caller imports the kinds directly."""
from workflows.items import ItemView, item_status, load_item  # noqa: F401
from workflows.kinds.delta_replication import start as start_delta_replication  # noqa: F401
from workflows.kinds.disable_protection import start as disable_protection  # noqa: F401
from workflows.kinds.enable_protection import start as enable_protection  # noqa: F401
from workflows.kinds.initial_replication import start as start_initial_replication  # noqa: F401
from workflows.kinds.resynchronize import start as start_resync  # noqa: F401
from workflows.scheduler import run_scheduler  # noqa: F401

ENABLE_PROTECTION = "enable_protection"
INITIAL_REPLICATION = "initial_replication"
DELTA_REPLICATION = "delta_replication"
RESYNCHRONIZE = "resynchronize"
DISABLE_PROTECTION = "disable_protection"
