"""llama.cpp's CPU tools, built once from the source in the llama-cpp-python sdist and cached outside the repo.

`build()` returns the folder holding llama-server, llama-bench and llama-simple (building them the first time,
a few minutes on 2 cores); `built()` returns it only if they are already there. The tests and benches that run
llama.cpp beside us both use these. `python bench/llamacpp.py` builds and prints the folder.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

# the sdist whose vendor/llama.cpp we build: pinned, so the cache key names one llama.cpp
LLAMA_CPP_PYTHON = "0.3.36"
TARGETS = ("llama-server", "llama-bench", "llama-simple")
CACHE = Path(os.environ.get("RWKV_LM_CACHE", Path.home() / ".cache" / "rwkv_lm")) / "llama.cpp" / LLAMA_CPP_PYTHON

# Only the CPU backend and the tools we run; nothing that reaches the network (the server's prebuilt web UI
# comes from a hub bucket), static binaries so the bin folder stands alone.
CMAKE_OPTIONS = [
    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF",
]


def built() -> Path | None:
    """The bin folder if every target is built, else None (builds nothing)."""
    bin_dir = CACHE / "bin"
    return bin_dir if all((bin_dir / t).is_file() for t in TARGETS) else None


def build(jobs: int | None = None, log=sys.stderr) -> Path:
    """Build the targets (under `nice`) unless cached; return the bin folder."""
    if (bin_dir := built()) is not None:
        return bin_dir
    src = _source()
    build_dir = CACHE / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    jobs = jobs or os.cpu_count() or 2
    _run(["cmake", "-S", str(src), "-B", str(build_dir), *generator, *CMAKE_OPTIONS], log)
    _run(["nice", "cmake", "--build", str(build_dir), "-j", str(jobs), "--target", *TARGETS], log)
    # copy into a fresh folder and rename it into place: a half-copied bin folder never looks built
    staging = Path(tempfile.mkdtemp(dir=CACHE, prefix="bin."))
    for target in TARGETS:
        shutil.copy2(build_dir / "bin" / target, staging / target)
    shutil.rmtree(CACHE / "bin", ignore_errors=True)
    staging.rename(CACHE / "bin")
    return CACHE / "bin"


def _source() -> Path:
    """vendor/llama.cpp of the pinned sdist, downloaded with pip and unpacked once."""
    src = CACHE / "src"
    if (src / "CMakeLists.txt").is_file():
        return src
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        _run([sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps",
              f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", tmp], sys.stderr)
        (sdist,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(Path(tmp) / "llama.cpp", members=[m for m in members if m.name], filter="data")
        shutil.rmtree(src, ignore_errors=True)
        (Path(tmp) / "llama.cpp").rename(src)
    return src


def _run(cmd: list[str], log) -> None:
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        log.write(done.stdout[-4000:])
        raise RuntimeError(f"llama.cpp build step failed ({done.returncode}): {' '.join(cmd)}")


if __name__ == "__main__":
    print(build())
