"""Fill a folder with the Python 3.12 wheels an offline CUDA host needs to run quantorder, at the
exact versions installed in this environment (the ones the tests ran with).

The host is assumed to have torch with CUDA, numpy and the packages in HOST_HAS already; every
other package that quantorder's runtime needs (transformers, peft, GPTQModel, dvc, hydra, ...) is
downloaded as a cp312 manylinux wheel, or built into a wheel here where only an sdist exists.
Compiled sdist-only packages (pypcre) travel as sdists and build on the host. llama.cpp (algo=gguf)
travels as llama-cpp-python's bindings built into a wheel here (no native code), the prebuilt
libraries' wheel trimmed to what loads, and its converter scripts in `llama.cpp-tools.tgz`.

Usage (with the project's venv):
    python scripts/gpu_wheelhouse.py .gpu-wheels [--with-mlflow] [--cuda 130] [--part-mib 60]
Files past --part-mib go to `.gpu-wheels-2`, `-3`, ... (a device call carries at most 64 MiB).
On the host, after each part is copied into one folder (/tmp/wheels):
    pip install --no-deps --no-index --no-build-isolation --target /tmp/site /tmp/wheels/*.whl /tmp/wheels/*.tar.gz .
    tar xzf /tmp/wheels/llama.cpp-tools.tgz -C /tmp/site
    export PYTHONPATH=$PWD/src:/tmp/site PATH=/tmp/site/bin:$PATH   (docs/gpu.md: why one pip call)
    export QUANTORDER_LLAMA_CPP_TOOLS=/tmp/site/llama.cpp
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
import zipfile
from pathlib import Path

ROOTS = [
    "transformers", "peft", "optimum", "accelerate", "gguf", "safetensors", "tokenizers", "dvc", "hydra-core",
    "gptqmodel", "bitsandbytes", "torchao", "threadpoolctl", "device-smi", "pypcre", "tokenicer", "logbar", "defuser",
    "dill", "filelock",
    "sympy",  # pinned: the embedded default's data and calibration text are built from its source
    "pytest",  # to run the GPU tests (pytest -m gpu) on the host
]  # fmt: skip
# Present on a CUDA PyTorch image (and large): never carried.
HOST_HAS = {"torch", "triton", "numpy", "setuptools", "pip", "wheel", "mpmath", "scipy", "jinja2"}
HOST_HAS_PREFIXES = ("nvidia-", "cuda-")
NOT_NEEDED = {"datasets", "hf-xet"}  # hub downloads only; the embedded default builds its data locally
LEAVES = {"gptqmodel"}  # installed without its metadata's requirements (see Makefile); ROOTS lists its needs
COMPILED_SDISTS = {"pypcre"}  # no manylinux wheel: built on the host
# bitsandbytes ships a native library per CUDA release (40+ MB in all); the host needs its own only
NATIVE_LIBS = re.compile(r"bitsandbytes/libbitsandbytes_(cuda\d+|rocm\d+|xpu\d*)\.so$")
# llama.cpp's libraries (modelnexus): the ones llama_cpp_runtime loads, and the CPU backends of x86
# servers (x64 is the fallback any x86-64 CPU runs); not the tools' libraries or the symlinked copies
LLAMA_CPP_LIBS = re.compile(
    r"native/linux-x86_64/(libggml-base\.so\.0|libggml\.so\.0|libllama\.so|"
    r"libggml-cpu-(x64|haswell|skylakex|icelake|sapphirerapids|zen4)\.so)$"
)
PLATFORM = [
    "--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:",
    "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
    "--platform", "manylinux_2_24_x86_64", "--platform", "manylinux_2_28_x86_64", "--platform", "any",
]  # fmt: skip


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: list[str]) -> dict[str, str]:
    """name -> installed version for `roots` and everything they require (no extras)."""
    found: dict[str, str] = {}
    stack = list(roots)
    while stack:
        name = normalize(stack.pop())
        if name in found or name in HOST_HAS | NOT_NEEDED or name.startswith(HOST_HAS_PREFIXES):
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # an optional or platform-specific requirement not installed here
        found[name] = dist.version
        for req in [] if name in LEAVES else dist.requires or []:
            if "extra ==" not in req:
                stack.append(re.match(r"[A-Za-z0-9_.\-]+", req).group(0))
    return found


def gpu_extra() -> dict[str, str]:
    """name -> pinned version of the project's `gpu` extra (CUDA-only, so not installed here; no
    requirements of their own beyond torch and triton, which the host has)."""
    extra = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    pins = [req.split("==") for req in extra["project"]["optional-dependencies"]["gpu"]]
    return {normalize(name): version for name, version in pins}


def keep_one_cuda(wheel: Path, cuda: str) -> None:
    """Drop from a bitsandbytes wheel every native library but the CPU one and the CUDA `cuda` one
    (e.g. "130" for CUDA 13.0)."""
    keep_only(wheel, lambda n: not NATIVE_LIBS.search(n) or n.endswith(f"_cuda{cuda}.so"))


def keep_only(wheel: Path, keep) -> None:
    """Rewrite `wheel` with the members `keep(name)` accepts, RECORD included."""
    with zipfile.ZipFile(wheel) as src:
        drop = {n for n in src.namelist() if not keep(n)}
        stripped = wheel.with_suffix(".tmp")
        with zipfile.ZipFile(stripped, "w", zipfile.ZIP_DEFLATED) as dst:
            for item in src.infolist():
                if item.filename in drop:
                    continue
                data = src.read(item)
                if item.filename.endswith(".dist-info/RECORD"):
                    rows = data.decode().splitlines(keepends=True)
                    data = "".join(r for r in rows if r.split(",")[0] not in drop).encode()
                dst.writestr(item, data)
    stripped.replace(wheel)


def add_llama_cpp(dest: Path) -> None:
    """llama.cpp for algo=gguf: the bindings as a wheel, the libraries trimmed, the converter scripts."""
    from quantorder.llama_cpp_runtime import TOOLS_DIR

    sys.path.insert(0, str(Path(__file__).parent))
    from install_llama_cpp import BINDINGS, LIBRARIES

    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-binary", ":all:", BINDINGS, "-w", tmp],
            env=os.environ | {"CMAKE_ARGS": "-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF"},
            capture_output=True,
            text=True,
        )
        if done.returncode:
            sys.exit(f"error: could not build {BINDINGS}: {done.stderr.strip()[-500:]}")
        for wheel in Path(tmp).glob("*.whl"):
            shutil.move(wheel, dest / wheel.name)
    if pip("download", *PLATFORM, "-d", str(dest), LIBRARIES).returncode:
        sys.exit(f"error: could not fetch {LIBRARIES}")
    for wheel in dest.glob("muthuishere_modelnexus-*.whl"):
        keep_only(wheel, lambda n: "/native/" not in n or bool(LLAMA_CPP_LIBS.search(n)))
    with tarfile.open(dest / "llama.cpp-tools.tgz", "w:gz") as tar:
        tar.add(TOOLS_DIR, arcname="llama.cpp", filter=lambda t: None if "__pycache__" in t.name else t)


def split_into_parts(dest: Path, part_bytes: int) -> list[Path]:
    """Move files, largest first, from `dest` into `dest-2`, `dest-3`, ... until no folder holds
    more than `part_bytes`. The folders, `dest` first."""
    parts = [dest]
    files = sorted(dest.iterdir(), key=lambda p: p.stat().st_size)
    held = sum(p.stat().st_size for p in files)
    while held > part_bytes:
        part = dest.with_name(f"{dest.name}-{len(parts) + 1}")
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir()
        moved = 0
        for f in sorted(files, key=lambda p: -p.stat().st_size):
            size = f.stat().st_size
            if moved + size <= part_bytes and held > part_bytes:
                shutil.move(f, part / f.name)
                files.remove(f)
                moved, held = moved + size, held - size
        if not moved:
            sys.exit(f"error: {files[-1].name} alone is over {part_bytes / 2**20:.0f} MiB (--part-mib)")
        parts.append(part)
    return parts


def pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args, "-q", "--no-deps"], capture_output=True, text=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dest", type=Path)
    parser.add_argument("--cuda", default="130", help="the host's CUDA release for bitsandbytes (torch.version.cuda)")
    parser.add_argument("--with-mlflow", action="store_true", help="also carry mlflow (large); else disable tracking")
    parser.add_argument("--part-mib", type=float, default=60, help="most MiB per folder (one device call's carry)")
    args = parser.parse_args()
    args.dest.mkdir(parents=True, exist_ok=True)
    wanted = closure(ROOTS + (["mlflow"] if args.with_mlflow else []))
    wanted.update(gpu_extra())
    with tempfile.TemporaryDirectory() as sdists:
        for name, version in sorted(wanted.items()):
            spec = f"{name}=={version}"
            if name in COMPILED_SDISTS:
                done = pip("download", f"--no-binary={name}", "-d", str(args.dest), spec)
            else:
                done = pip("download", *PLATFORM, "-d", str(args.dest), spec)
                if done.returncode:  # pure-Python sdist only: build the wheel here
                    done = pip("download", f"--no-binary={name}", "-d", sdists, spec)
            if done.returncode:
                sys.exit(f"error: could not fetch {spec}: {done.stderr.strip().splitlines()[-1]}")
        built = list(Path(sdists).iterdir())
        if built and pip("wheel", "-w", str(args.dest), *map(str, built)).returncode:
            sys.exit(f"error: could not build wheels from {[p.name for p in built]}")
    for wheel in args.dest.glob("bitsandbytes-*.whl"):
        keep_one_cuda(wheel, args.cuda)
    add_llama_cpp(args.dest)
    for part in split_into_parts(args.dest, int(args.part_mib * 2**20)):
        files = list(part.iterdir())
        print(f"{part}: {len(files)} files, {sum(p.stat().st_size for p in files) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
