"""Build kvpool's compiled KV copy extension into the package: connector/_kvcopy*.so.

    .venv/bin/python csrc/build.py        # scripts/install.sh runs this after torch is installed

It compiles against the torch already in this environment (torch.utils.cpp_extension), never in an
isolated build environment that would download another torch. The C++ CPU kernels are always built;
the CUDA kernels too when this torch is a CUDA build and a CUDA toolkit (nvcc) is found
(KVPOOL_CSRC_CUDA=0 leaves them out, =1 makes their absence an error). The .so is ignored by git;
without it kvpool runs on the pure-torch reference (kvpool.connector.kvcopy).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _find_cuda_home() -> None:
    """Point torch at a CUDA toolkit that has its headers: torch takes the parent of the nvcc on
    PATH, which is wrong where nvcc is a wrapper script (e.g. /usr/local/bin/nvcc)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    for nvcc in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        root = Path(nvcc).resolve().parent.parent if nvcc else None
        if root and (root / "include" / "cuda_runtime_api.h").is_file():
            os.environ["CUDA_HOME"] = str(root)
            return


def _build(with_cuda: bool) -> None:
    import torch
    from setuptools import setup
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = ["bindings.cpp", "kvcopy_cpu.cpp"]
    kwargs: dict = {
        "extra_compile_args": {"cxx": ["-O3", "-g0", "-fopenmp"], "nvcc": ["-O3"]},
        # at::parallel_for is an OpenMP region compiled into this module: it needs -fopenmp to run
        # on torch's threads, and links the libgomp torch already loaded.
        "extra_link_args": ["-fopenmp"],
        "depends": ["kvcopy.h"],
    }
    if with_cuda:
        sources.append("kvcopy_cuda.cu")
        extension = CUDAExtension("_kvcopy", sources, define_macros=[("KVPOOL_WITH_CUDA", None)], **kwargs)
    else:
        extension = CppExtension("_kvcopy", sources, **kwargs)
    kind = "C++ and CUDA" if with_cuda else "C++"
    print(f"csrc: building _kvcopy ({kind} kernels) against torch {torch.__version__}", flush=True)
    os.chdir(HERE)
    setup(
        name="kvpool-kvcopy",
        packages=[],
        py_modules=[],
        ext_modules=[extension],
        cmdclass={"build_ext": BuildExtension},
        # --force: always relink (ninja recompiles only what changed), so a .so of the other
        # variant or of another torch is never kept as "up to date"
        script_args=[
            "--quiet",
            "build_ext",
            "--force",
            "--build-lib",
            str(ROOT / "connector"),
            "--build-temp",
            str(ROOT / "build" / ("csrc-cuda" if with_cuda else "csrc-cpu")),
        ],
    )


def main() -> int:
    _find_cuda_home()
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    wanted = os.environ.get("KVPOOL_CSRC_CUDA", "auto")
    can_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if wanted == "1" and not can_cuda:
        print(
            f"csrc: KVPOOL_CSRC_CUDA=1 but torch {torch.__version__} has no CUDA or no toolkit was found",
            file=sys.stderr,
        )
        return 1
    if can_cuda and wanted != "0":
        try:
            _build(with_cuda=True)
            return _report()
        except (Exception, SystemExit) as exc:  # setuptools reports a failed compile as SystemExit
            if wanted == "1":
                raise
            print(f"csrc: the CUDA build failed ({exc}); building the C++ kernels only", file=sys.stderr)
    _build(with_cuda=False)
    return _report()


def _report() -> int:
    built = sorted((ROOT / "connector").glob("_kvcopy*.so"))
    print(f"csrc: wrote {', '.join(str(p.relative_to(ROOT)) for p in built)}")
    return 0 if built else 1


if __name__ == "__main__":
    sys.exit(main())
