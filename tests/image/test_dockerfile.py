"""The Dockerfile, linted with hadolint and checked for what the image must be. No container engine
runs here, so the image is linted, not built; a real build is part of a cluster run."""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess

import pytest

from kvpool.cli import payload_cmd
from kvpool.operator import naming, settings
from kvpool.operator.builders import statefulset

from ..operator_.test_builders import OWNER

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def stages() -> list[list[str]]:
    """Instructions (continuation lines joined) per stage."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    out: list[list[str]] = [[]]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("FROM ") and out[-1] and any(i.startswith("FROM ") for i in out[-1]):
            out.append([])
        out[-1].append(line)
    return out


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint") or str(
        pathlib.Path(__import__("sys").executable).with_name("hadolint")
    )
    out = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_image_shape() -> None:
    build, final = stages()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", DOCKERFILE.read_text(), re.M)
    assert base and re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base.group(1)), (
        "the base image is pinned to an exact version"
    )
    assert [i for i in build if i.startswith("FROM ")] == ["FROM ${PYTHON_IMAGE} AS build"]
    assert final[0] == "FROM ${PYTHON_IMAGE}"
    text = " ".join(final)
    assert not re.search(r"\b(gcc|g\+\+|build-essential|clang|apt-get install)\b", text), (
        "no compilers in the final stage"
    )
    assert "COPY --from=build" in text
    user = [i for i in final if i.startswith("USER ")]
    assert user and user[-1].split()[1].split(":")[0] not in ("0", "root")
    assert any(i.startswith("HEALTHCHECK ") for i in final)
    exposed = {int(p) for i in final if i.startswith("EXPOSE ") for p in i.split()[1:]}
    assert exposed >= {7400, 7401, 7402, 7410, 7411, 7420, 7421, 8080, 8081, 9443}  # DESIGN.md §1 + metrics
    assert "torch" not in text and "csrc" not in " ".join(build)  # nodes, agents, the operator use no torch


def test_payload_wheels_cover_every_supported_python() -> None:
    build = " ".join(stages()[0])
    versions = re.search(r"for version in ([0-9. ]+);", build)
    assert versions and tuple(versions.group(1).split()) == payload_cmd.PYTHONS
    for dependency in payload_cmd.EXTRA_DEPENDENCIES:
        assert re.search(rf"PAYLOAD_DEPENDENCIES=\"[^\"]*\b{dependency}==", build), dependency


@pytest.mark.parametrize(
    ("image", "version"),
    [
        ("registry:5000/kvpool", None),
        ("registry:5000/kvpool:1.2.3", "1.2.3"),
        ("ghcr.io/kvpool/kvpool:0.1.0", "0.1.0"),
        ("kvpool", None),
        ("kvpool@sha256:" + "a" * 64, None),
        ("kvpool:1.0@sha256:" + "b" * 64, "1.0"),
        ("kvpool:" + "x" * 100, "x" * 63),
        ("kvpool:v1.0-.", "v1.0"),
        ("localhost:5000/a/b:_tag", "tag"),
    ],
)
def test_version_label_is_valid_for_any_image_reference(image: str, version: str | None) -> None:
    assert naming.image_version(image) == version
    s = settings.parse("pool", "ns", {"image": image})
    labels = statefulset.build(OWNER, s, "h")["spec"]["template"]["metadata"]["labels"]
    assert labels.get("app.kubernetes.io/version") == version
    assert all(len(v) <= 63 and LABEL_VALUE.match(v) for v in labels.values())


def test_default_image_is_this_versions_tag() -> None:
    assert (
        settings.DEFAULT_IMAGE.endswith(":" + naming.VERSION_TAG)
        and "placeholder" not in settings.DEFAULT_IMAGE
    )
