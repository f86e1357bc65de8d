"""Build kvpool's compiled KV copy extension into the package: connector/_kvcopy*.so.

    .venv/bin/python csrc/build.py        # scripts/install.sh runs this after torch is installed

It compiles against the torch already in this environment (torch.utils.cpp_extension), never in an
isolated build environment that would download another torch. The C++ CPU kernels are always built;
the CUDA kernels too when this torch is a CUDA build and a CUDA toolkit (nvcc) is found
(KVPOOL_CSRC_CUDA=0 leaves them out). Where CUDA is asked for — KVPOOL_CSRC_CUDA=1 or `--cuda`, as
`scripts/install.sh cuda` and `scripts/gpu-check.sh` do — the build exits non-zero, with the reason,
when the CUDA kernels cannot be built or their build fails, or the module built lacks them: it never
falls back to a C++-only build then. The .so is ignored by git; without it kvpool runs on the
pure-torch reference (kvpool.connector.kvcopy).

    .venv/bin/python csrc/build.py --cuda  # the CUDA kernels or an error (= KVPOOL_CSRC_CUDA=1)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
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


def cuda_support() -> str | None:
    """None when the CUDA kernels can be built here, else why not (call after _find_cuda_home)."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build (no CUDA); install a CUDA torch (scripts/install.sh cuda)"
    if CUDA_HOME is None:
        return "no CUDA toolkit was found (nvcc and its headers: set CUDA_HOME, or put nvcc on PATH)"
    return None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    wanted = os.environ.get("KVPOOL_CSRC_CUDA", "auto")
    for arg in args:
        if arg not in ("--cuda", "--no-cuda"):
            print(
                f"usage: {Path(__file__).name} [--cuda | --no-cuda]  (unknown argument {arg!r})",
                file=sys.stderr,
            )
            return 2
        wanted = "1" if arg == "--cuda" else "0"
    _find_cuda_home()
    why_not = cuda_support()
    if wanted == "1" and why_not is not None:
        print(f"csrc: error: the CUDA kernels were asked for but cannot be built: {why_not}", file=sys.stderr)
        return 1
    if why_not is None and wanted != "0":
        try:
            _build(with_cuda=True)
            return _report(with_cuda=True)
        except (Exception, SystemExit) as exc:  # setuptools reports a failed compile as SystemExit
            if wanted == "1":
                print(
                    f"csrc: error: the CUDA build failed ({exc}); CUDA was asked for, so no C++-only"
                    " module is built in its place (the compiler's output is above)",
                    file=sys.stderr,
                )
                return 1
            print(f"csrc: the CUDA build failed ({exc}); building the C++ kernels only", file=sys.stderr)
    _build(with_cuda=False)
    return _report(with_cuda=False)


def _report(with_cuda: bool) -> int:
    built = sorted((ROOT / "connector").glob("_kvcopy*.so"))
    print(f"csrc: wrote {', '.join(str(p.relative_to(ROOT)) for p in built)}")
    if not built:
        return 1
    if with_cuda and not _has_cuda_kernels(
        ROOT / "connector" / f"_kvcopy{sysconfig.get_config_var('EXT_SUFFIX')}"
    ):
        print("csrc: error: the module built has no CUDA kernels (cuda_built() is false)", file=sys.stderr)
        return 1
    return 0


def _has_cuda_kernels(path: Path) -> bool:
    """Load the built module in a fresh Python (after torch, as kvpool does) and ask it."""
    code = (
        "import importlib.util, sys, torch\n"
        "spec = importlib.util.spec_from_file_location('_kvcopy', sys.argv[1])\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "sys.exit(0 if module.cuda_built() else 3)\n"
    )
    done = subprocess.run([sys.executable, "-P", "-c", code, str(path)], capture_output=True, text=True)
    if done.returncode not in (0, 3):
        print(f"csrc: could not load {path.name}: {done.stderr.strip()[-2000:]}", file=sys.stderr)
    return done.returncode == 0


if __name__ == "__main__":
    sys.exit(main())
