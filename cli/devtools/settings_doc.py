"""Regenerate the settings reference: `python -m kvpool.cli.devtools.settings_doc docs/settings.md`."""

from __future__ import annotations

import sys
from pathlib import Path

from kvpool.cachenode.core.settings import replace_reference


def update(doc: Path) -> None:
    doc.write_text(replace_reference(doc.read_text()))


if __name__ == "__main__":
    update(Path(sys.argv[1]))
