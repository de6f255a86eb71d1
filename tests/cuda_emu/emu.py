"""The CUDA kernels of cuda/ on the CPU, for tests and dry runs: `build` compiles an entry file of this folder
with g++ against cuda_emu.h, `EmuKernels` launches its kernels through rwkv_lm's own argument packing, and
`eager_capture` stands in for a CUDA graph capture."""
import ctypes
import re
import subprocess
from pathlib import Path

from rwkv_lm.ops import cuda_kernels

EMU_DIR = Path(__file__).parent


def build(entry: str, out_dir: Path) -> ctypes.CDLL:
    """Compile cuda_emu/<entry>.cpp (which includes a source of cuda/) into a library in out_dir, once per
    folder (test modules of one session share the session's)."""
    lib = out_dir / f"{entry}.so"
    out_dir.mkdir(parents=True, exist_ok=True)
    if lib.exists():
        return ctypes.CDLL(str(lib))
    subprocess.run(["g++", "-std=c++20", "-O2", "-shared", "-fPIC", "-Wall", "-Wno-unknown-pragmas",
                    f"-I{cuda_kernels.source('wkv7.cu').parent}", f"-I{EMU_DIR}", str(EMU_DIR / f"{entry}.cpp"),
                    "-o", str(lib)], check=True)
    return ctypes.CDLL(str(lib))


class EmuKernels(cuda_kernels.Kernels):
    """The kernels of an emulation library, called like the compiled ones (`kernels(name, grid, block, *args)`)."""

    def __init__(self, lib, threads_per_row=1):
        super().__init__()
        self.lib, self.threads_per_row = lib, threads_per_row

    def starter(self, name, grid, block):
        entry = getattr(self.lib, re.sub(r"[<>, ]+", "__", name).strip("_"))

        def start(address):
            status = entry(ctypes.c_uint(grid[0]), ctypes.c_uint(grid[1]), ctypes.c_uint(block), ctypes.c_void_p(address))
            assert status == 0, f"{name}: the threads of a block did not all reach the same __syncthreads"

        return start


def eager_capture(captured: list):
    """A stand-in for rwkv_lm.runtime.cuda_graphs.capture_cuda_graph on the CPU: the outputs of one run are the static
    outputs, and a replay runs the step again into them, as a graph would. Appends each capture's bucket (the
    logits' rows) to `captured`."""

    def capture(fn, pool):
        outputs = fn()
        captured.append(outputs[0].shape[0])
        flat = lambda out: [out[0], *out[1].tensors().values()]

        def replay():
            for static, fresh in zip(flat(outputs), flat(fn())):
                static.copy_(fresh)

        return outputs, replay

    return capture
