"""Install llama.cpp for the `gguf` method, with no compiler run: llama-cpp-python's bindings
(built with LLAMA_BUILD=OFF: its Python package alone), llama.cpp's CPU libraries prebuilt
(`muthuishere-modelnexus`: upstream llama.cpp b9371, every CPU backend variant, chosen at run
time), and from the same llama-cpp-python source release, llama.cpp's converter scripts with
their gguf-py into `<venv>/share/llama.cpp/`.

The bindings' release vendors llama.cpp b9445; b9371's structs and functions are the same (every
declared symbol present, every struct layout equal). A from-source build of llama-cpp-python
takes 780 CPU-seconds here (13.7 min on one free core), which CI cannot afford.

    python scripts/install_llama_cpp.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

BINDINGS = "llama-cpp-python==0.3.24"
LIBRARIES = "muthuishere-modelnexus==0.2.1"
TOOLS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/")
TOOLS_DIR = Path(sys.prefix) / "share" / "llama.cpp"


def pip(*args: str, **env: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *args], check=True, env=os.environ | env)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", BINDINGS, "-d", tmp],
            check=True,
        )
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        pip(str(sdist), CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF")
        with tarfile.open(sdist) as tar:
            root = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
            members = [m for m in tar.getmembers() if m.name.startswith(tuple(root + t for t in TOOLS))]
            tar.extractall(tmp, members=members, filter="data")
        shutil.rmtree(TOOLS_DIR, ignore_errors=True)
        shutil.copytree(Path(tmp) / root, TOOLS_DIR)
    pip(LIBRARIES, "diskcache")
    print(f"llama.cpp: bindings {BINDINGS}, libraries {LIBRARIES}, converter in {TOOLS_DIR}")


if __name__ == "__main__":
    main()
