"""Suite-wide settings.

The repository root has a folder named `operator` (the package kvpool.operator). A Python started
with the root as its working directory and `-m` or `-c` would put the root on sys.path and shadow
the standard library's `operator`; PYTHONSAFEPATH keeps every subprocess the tests start safe.
"""

from __future__ import annotations

import os

os.environ.setdefault("PYTHONSAFEPATH", "1")
