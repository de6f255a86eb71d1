"""llama.cpp's CPU tools, built once from the source in the llama-cpp-python sdist and cached outside the repo.

`build()` returns the folder holding rwkv-greedy (our llamacpp_greedy.cpp linked against libllama) and, when
asked, llama-bench or llama-server, building them the first time: by default llama.cpp's library only; llama-bench
adds its common library; llama-server (asked for by the serving bench only, never by `make test`) adds the server,
its HTTP library and the multimodal library it links, about as much again. `built()` returns the folder only if
they are already there; `greedy()` runs rwkv-greedy. The tests and benches that run llama.cpp beside us use these.
`python bench/llamacpp.py [--bench] [--server]` builds (rwkv-greedy; with --bench llama-bench too, with --server
llama-server too) and prints the folder.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from rwkv_lm.ops.cpu_kernels import cpu_flags

# the sdist whose vendor/llama.cpp we build: pinned, so the cache key names one llama.cpp
LLAMA_CPP_PYTHON = "0.3.36"
# what the tests need; what bench_llamacpp.py needs; what bench_llamaserver.py needs
GREEDY, BENCH, SERVER = ("rwkv-greedy",), ("rwkv-greedy", "llama-bench"), ("rwkv-greedy", "llama-server")
GREEDY_SOURCE = Path(__file__).with_name("llamacpp_greedy.cpp")
CACHE = Path(os.environ.get("RWKV_LM_CACHE", Path.home() / ".cache" / "rwkv_lm")) / "llama.cpp" / LLAMA_CPP_PYTHON

# Only the CPU backend and the tools we run; nothing that reaches the network (a prebuilt web UI would come from
# a hub bucket: llama-server is built without one); static libraries, so the bin folder stands alone. The server's
# folder is configured in only when llama-server is asked for (the option changes no compile flags, so switching
# it reconfigures without rebuilding the library).
CMAKE_OPTIONS = [
    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF",
]
# llama.cpp repacks Q8_0 and Q4_0 weights by default, on CPUs with AMX-INT8 into its AMX buffer, whose matmul
# (ggml_backend_amx_mul_mat) crashes with SIGSEGV on our RWKV-7 GGUFs of the 0.1B shape: llama-bench, llama-server
# and a library call alike (seen on a 2-core Xeon with AMX, 2026-12-04; llama.cpp issue #20824, closed without a
# fix; our small LoRAs kept f32 as llama-quantize keeps them crash too). There the tools run with repacking off
# (`--repack 0`, `--no-repack`): llama.cpp's AVX-512 kernels, the fastest llama.cpp that runs there.
AMX_CRASH = "amx_int8" in cpu_flags()


def built(targets=GREEDY) -> Path | None:
    """The bin folder if every one of `targets` is built in it, else None (builds nothing)."""
    bin_dir = CACHE / "bin"
    return bin_dir if all(_is_current(bin_dir, t) for t in targets) else None


def _is_current(bin_dir: Path, target: str) -> bool:
    """Whether `target` is built; rwkv-greedy only from the llamacpp_greedy.cpp there is now (its source's hash
    beside it), so a changed oracle is rebuilt, not run stale from the cache."""
    if target != "rwkv-greedy":
        return (bin_dir / target).is_file()
    stamp = bin_dir / ".rwkv-greedy.sha256"
    return (bin_dir / target).is_file() and stamp.is_file() and stamp.read_text() == _greedy_hash()


def _greedy_hash() -> str:
    return hashlib.sha256(GREEDY_SOURCE.read_bytes()).hexdigest()


def build(targets=GREEDY, jobs: int | None = None, log=sys.stderr) -> Path:
    """Build `targets` (under `nice`) unless cached; return the bin folder. rwkv-greedy needs llama.cpp's library
    only (what `make test` builds); llama-bench adds its common library, about as much again."""
    if (bin_dir := built(targets)) is not None:
        return bin_dir
    src = _source()
    build_dir = CACHE / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    jobs = str(jobs or os.cpu_count() or 2)
    server = ["-DLLAMA_BUILD_SERVER=ON"] if "llama-server" in targets else []  # the later -D wins
    _run(["cmake", "-S", str(src), "-B", str(build_dir), *generator, *CMAKE_OPTIONS, *server], log)
    bin_dir = CACHE / "bin"
    bin_dir.mkdir(exist_ok=True)
    for target in (t for t in targets if not _is_current(bin_dir, t)):
        # each binary is made beside its place and renamed into it: a half-made one never looks built
        tmp = bin_dir / f".{target}.tmp"
        if target == "rwkv-greedy":
            source_hash = _greedy_hash()  # (of the source compiled: one edited during the build is built next time)
            _run(["nice", "cmake", "--build", str(build_dir), "-j", jobs, "--target", "llama"], log)
            libs = [build_dir / "src" / "libllama.a"] + [build_dir / "ggml" / "src" / f"libggml{part}.a"
                                                         for part in ("", "-cpu", "-base")]
            _run(["nice", os.environ.get("CXX", "c++"), "-O2", "-std=c++17", str(GREEDY_SOURCE),
                  "-I", str(src / "include"), "-I", str(src / "ggml" / "include"), *map(str, libs),
                  "-fopenmp", "-lpthread", "-ldl", "-lm", "-o", str(tmp)], log)
        else:
            _run(["nice", "cmake", "--build", str(build_dir), "-j", jobs, "--target", target], log)
            shutil.copy2(build_dir / "bin" / target, tmp)
        os.replace(tmp, bin_dir / target)
        if target == "rwkv-greedy":
            (bin_dir / ".rwkv-greedy.sha256").write_text(source_hash)
    return bin_dir


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


def greedy(model: str | os.PathLike, prompt: list[int], n: int, *, threads: int = 1,
           logits_out: str | os.PathLike | None = None) -> list[int]:
    """The first `n` greedy token ids llama.cpp generates on `model` after the ids `prompt` (rwkv-greedy: never
    stops at end of text); with logits_out, the logits of each step go there as n x n_vocab float32."""
    done = subprocess.run([str(build() / "rwkv-greedy"), str(model), str(n), str(threads), str(logits_out or "-"),
                           *map(str, prompt)], capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"rwkv-greedy failed ({done.returncode}) on {model}: {done.stderr[-3000:]}")
    return [int(t) for t in done.stdout.split()]


def ours_greedy(model, prompt: list[int], n: int) -> list[int]:
    """The first `n` greedy token ids of one of our models after the ids `prompt` (the same loop as rwkv-greedy's)."""
    import torch

    tokens = []
    with torch.no_grad():
        logits, state = model(torch.tensor([prompt]), last_only=True)
        for _ in range(n):
            tokens.append(int(logits[0, -1].argmax()))
            logits, state = model(torch.tensor([[tokens[-1]]]), state)
    return tokens


if __name__ == "__main__":
    print(build(tuple(dict.fromkeys(GREEDY + BENCH * ("--bench" in sys.argv) + SERVER * ("--server" in sys.argv)))))
