"""The CR reference in docs/operator.md, generated from the CRD schema so the two cannot drift.

Regenerate with `python -m kvpool.cli.devtools.crd_reference crds/kvcachepools.yaml docs/operator.md`.
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any

import yaml

BEGIN = "<!-- BEGIN GENERATED CR REFERENCE -->"
END = "<!-- END GENERATED CR REFERENCE -->"


def _type(node: dict[str, Any]) -> str:
    if node.get("x-kubernetes-int-or-string"):
        return "int or string"
    if node.get("type") == "array":
        return f"[]{_type(node.get('items') or {})}"
    if node.get("type") == "object" and isinstance(node.get("additionalProperties"), dict):
        return f"map[string]{_type(node['additionalProperties'])}"
    return node.get("type", "any")


def _constraints(node: dict[str, Any]) -> str:
    parts = []
    for key, label in (
        ("minimum", "≥"),
        ("maximum", "≤"),
        ("multipleOf", "multiple of"),
        ("maxLength", "max length"),
    ):
        if key in node:
            parts.append(f"{label} {node[key]}")
    if "enum" in node:
        parts.append("one of " + ", ".join(f"`{v}`" for v in node["enum"]))
    if "pattern" in node:
        parts.append(f"pattern `{node['pattern']}`")
    for rule in node.get("x-kubernetes-validations", []):
        parts.append(f"rule: {rule['message']}")
    return "; ".join(parts).replace("|", "\\|")


def _rows(node: dict[str, Any], path: str) -> list[str]:
    rows = []
    required = set(node.get("required", []))
    for key, sub in (node.get("properties") or {}).items():
        here = f"{path}.{key}"
        default = f"`{json.dumps(sub['default'])}`" if "default" in sub else ""
        req = " (required)" if key in required else ""
        desc = (sub.get("description") or "").replace("\n", " ").replace("|", "\\|")
        rows.append(f"| `{here}`{req} | {_type(sub)} | {default} | {desc} | {_constraints(sub)} |")
        if sub.get("type") == "object":
            rows += _rows(sub, here)
        elif sub.get("type") == "array" and (sub.get("items") or {}).get("type") == "object":
            rows += _rows(sub["items"], f"{here}[]")
    return rows


def render(crd: dict[str, Any]) -> str:
    root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    out = [BEGIN, ""]
    for part in ("spec", "status"):
        out += [
            f"#### `{part}`",
            "",
            "| field | type | default | description | validation |",
            "|---|---|---|---|---|",
        ]
        out += _rows(root["properties"][part], part)
        out.append("")
    out.append(END)
    return "\n".join(out)


def update(crd_path: pathlib.Path, doc_path: pathlib.Path) -> str:
    """The doc with its generated block replaced by a fresh rendering."""
    text = doc_path.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    return text[:start] + render(yaml.safe_load(crd_path.read_text())) + text[end:]


if __name__ == "__main__":
    crd_file, doc_file = map(pathlib.Path, sys.argv[1:3])
    doc_file.write_text(update(crd_file, doc_file))
