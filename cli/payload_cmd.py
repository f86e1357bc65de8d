"""`kvpool payload DEST`: the vLLM connector as files another Python can import (the webhook's init container).

vLLM images run their own Python (3.11 to 3.14 for vLLM 0.32) with vLLM's requirements, not kvpool's. The payload is
kvpool's pure-Python `connector` with the client side of `cachenode` (its `core`, `rpc` and
`client` layers: no server, tier or dev-tool module, docs/architecture.md) plus the few compiled packages the
connector imports that vLLM 0.32 does not require (`EXTRA_DEPENDENCIES`), unpacked from wheels for
every supported CPython side by side (their extension modules carry the interpreter's ABI tag, so
each Python loads its own). The compiled KV-copy extension stays out: it is built for one Python and
one torch, and the connector copies with plain torch without it. Put DEST on `PYTHONPATH`.
"""

from __future__ import annotations

import importlib
import json
import pathlib
import shutil
import zipfile
from importlib import metadata

import click

from .options import option

PACKAGES = ("kvpool.cachenode.core", "kvpool.cachenode.rpc", "kvpool.cachenode.client", "kvpool.connector")
"""Copied whole, with the `__init__.py` of every package above them (`kvpool.cachenode`)."""
EXTRA_DEPENDENCIES = ("xxhash",)
"""What the connector path imports beyond vLLM 0.32's own requirements (grpcio, protobuf, numpy,
blake3, prometheus-client, torch come with vLLM); tests/payload checks this against vLLM's metadata.
vLLM's requirements allow a grpcio and protobuf older than kvpool's generated code accepts (1.85.1,
7.35.1), so an image resolved long ago may refuse the connector (docs/install.md says so)."""
PYTHONS = ("3.11", "3.12", "3.13", "3.14")
"""The CPythons vLLM 0.32 installs on (its Requires-Python; tests/payload checks)."""
DEFAULT_WHEELS = "/opt/kvpool/payload-wheels"
MANIFEST = "kvpool-payload.json"
_SOURCE_SUFFIXES = (".py", ".proto", ".pyi")


def _package_dir(name: str) -> pathlib.Path:
    return pathlib.Path(next(iter(importlib.import_module(name).__path__)))


def source_files() -> dict[str, pathlib.Path]:
    """Payload path (`kvpool/...`) → source file, for every file the payload carries."""
    files: dict[str, pathlib.Path] = {}
    for name in PACKAGES:
        parts = name.split(".")
        for depth in range(2, len(parts)):  # the packages above it (`kvpool` is a namespace)
            parent = ".".join(parts[:depth])
            files[f"{parent.replace('.', '/')}/__init__.py"] = _package_dir(parent) / "__init__.py"
        source = _package_dir(name)
        for path in sorted(source.rglob("*")):
            if "__pycache__" in path.parts or not path.is_file() or path.suffix not in _SOURCE_SUFFIXES:
                continue
            files[str(pathlib.PurePosixPath(*parts, *path.relative_to(source).parts))] = path
    return files


def _unpack(wheel: pathlib.Path, dest: pathlib.Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.infolist():
            target = (dest / member.filename).resolve()
            if not target.is_relative_to(dest.resolve()):
                raise click.ClickException(f"{wheel.name}: {member.filename} points outside the payload")
        archive.extractall(dest)


def build(dest: pathlib.Path, wheels: pathlib.Path) -> dict[str, object]:
    """Write the payload into `dest` (replacing an earlier one); returns its manifest."""
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    missing = [d for d in EXTRA_DEPENDENCIES if not any(w.name.lower().startswith(d + "-") for w in found)]
    if missing:
        raise click.ClickException(
            f"no wheels for {', '.join(missing)} in {wheels}: the kvpool image carries them "
            f"(Dockerfile); elsewhere pass --wheels DIR with `pip download` wheels for CPython {', '.join(PYTHONS)}"
        )
    dest.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(dest / "kvpool", ignore_errors=True)
    files = source_files()
    for relative, source in files.items():
        (dest / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest / relative)
    for wheel in found:
        _unpack(wheel, dest)
    manifest = {
        "kvpool": metadata.version("kvpool"),
        "packages": list(PACKAGES),
        "wheels": [w.name for w in found],
        "files": len(files),
    }
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


@click.command("payload")
@click.argument("dest", type=click.Path(file_okay=False, path_type=pathlib.Path))
@option(
    "--wheels",
    type=click.Path(file_okay=False, path_type=pathlib.Path),
    default=DEFAULT_WHEELS,
    show_default=True,
    help="Directory of wheels of the extra dependencies, one per supported CPython.",
)
def payload(dest: pathlib.Path, wheels: pathlib.Path) -> None:
    """Copy the vLLM connector into DEST for another Python (put DEST on PYTHONPATH)."""
    manifest = build(dest, wheels)
    click.echo(
        f"kvpool {manifest['kvpool']} connector payload in {dest}: {manifest['files']} files, "
        f"wheels {', '.join(manifest['wheels'])}"  # type: ignore[arg-type]
    )
