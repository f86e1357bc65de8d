"""Render the settings reference in docs/settings.md from the registry, one table per group.

Regenerate: `python -m kvpool.cli.devtools.settings_doc docs/settings.md` (a test keeps the file
current). Only the block between the BEGIN and END markers is written; the prose around it is kept.
"""

from __future__ import annotations

import sys
from pathlib import Path

from kvpool.cachenode.core.settings import CLIENT, GROUPS, SETTINGS_LIST, Setting

BEGIN = "<!-- BEGIN GENERATED SETTINGS REFERENCE -->"
END = "<!-- END GENERATED SETTINGS REFERENCE -->"


def _cell(value: str) -> str:
    return value.replace("|", "\\|").replace("\n", " ")


def _default_text(s: Setting) -> str:
    if s.secret or s.default in (None, ""):
        return "—"
    if isinstance(s.default, bool):
        return "on" if s.default else "off"
    others = "".join(f" ({command}: `{value}`)" for command, value in s.command_defaults)
    return f"`{s.default}`{others}"


def _readers(s: Setting) -> str:
    names = []
    if s.commands:
        names.append(", ".join(f"`kvpool {c}`" for c in sorted(s.commands)))
    if CLIENT in s.readers:
        names.append("clients")
    return "; ".join(names)


def render_reference() -> str:
    """The generated block: one table per group."""
    out = [BEGIN, ""]
    for group, title in GROUPS.items():
        out += [
            f"### {title}",
            "",
            "| flag | env | type | default | read by | meaning |",
            "|---|---|---|---|---|---|",
        ]
        for s in (s for s in SETTINGS_LIST if s.group == group):
            flag = s.flag if s.flag else "—"
            if s.negatable:
                flag = f"{s.flag} / --no-{s.flag[2:]}"
            flag_cell = f"`{flag}`" if flag != "—" else flag
            out.append(
                f"| {flag_cell} | `{s.env}` | {s.kind} | {_default_text(s)} | {_readers(s)} | {_cell(s.help)} |"
            )
        out.append("")
    out.append(END)
    return "\n".join(out)


def replace_reference(doc: str) -> str:
    """`doc` with its generated block replaced by a fresh rendering."""
    start, end = doc.index(BEGIN), doc.index(END) + len(END)
    return doc[:start] + render_reference() + doc[end:]


def update(doc: Path) -> None:
    doc.write_text(replace_reference(doc.read_text()))


if __name__ == "__main__":
    update(Path(sys.argv[1]))
