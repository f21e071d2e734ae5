"""The tracker service's process: `python -m sites.trackerd --socket-dir DIR --disk NAME=PATH [...] [--sync]`.

A module of its own, outside `sites.host`: run as `-m sites.host.trackerservice`, the module would be imported
once by its package (sites.host imports it for the host driver) and run a second time as __main__."""
from __future__ import annotations

import sys

from sites.host.trackerservice import main

if __name__ == "__main__":
    sys.exit(main())
