"""The CUDA kernels of `cuda/*.cu`: compiled by NVRTC through CuPy on first use, launched on torch's stream.

A `Kernels` object is one source's kernels for one device; `kernels(name, grid, block, *args)` launches one
with ints (as int32), floats (as fp32) and tensors or None (as pointers). The argument block that
cuLaunchKernel reads (an array of pointers to the values) is built once per (kernel, grid, block), at its
first launch; a later launch only writes the new addresses and numbers into it. (CuPy's own launcher
packs every argument into new objects at every call.) The CPU emulation of the tests subclasses
`Kernels`, so the same packing runs there.
"""
from __future__ import annotations

import ctypes
import functools
import re
import site
import sys
import warnings
from pathlib import Path

import torch

# Passed to cupy.RawModule; CuPy adds CUPY_NVRTC_OPTIONS and -arch=sm_XX for the device (the tests compile
# with all of them, so they build what runs).
NVRTC_OPTIONS = ("-std=c++17",)
CUPY_NVRTC_OPTIONS = ("-ftz=true", "--device-as-default-execution-space")
# cuda/ of a checkout (or an editable install), else the copy a wheel installs as data files under the
# environment's prefix, or under the user base for `pip install --user`
_CUDA_DIRS = [Path(__file__).resolve().parents[2] / "cuda",
              *(Path(base) / "share" / "rwkv_lm" / "cuda" for base in (sys.prefix, site.USER_BASE) if base)]

_warned: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def source(name: str) -> Path:
    """The path of cuda/<name> where it is installed (the checkout's path when it is nowhere)."""
    return next((d / name for d in _CUDA_DIRS if (d / name).exists()), _CUDA_DIRS[0] / name)


def read_source(path: Path, seen: set | None = None) -> str:
    """What NVRTC compiles for `path`: its text with each `#include "file"` of the same folder replaced by that
    file's text (once), so that CuPy's kernel cache, keyed by the text, sees a change in any of them."""
    seen = {path} if seen is None else seen
    out = []
    for line in path.read_text().splitlines(keepends=True):
        included = re.match(r'\s*#include\s+"([^"]+)"', line)
        if not included:
            out.append(line)
        elif (path.parent / included[1]) not in seen:
            seen.add(path.parent / included[1])
            out.append(read_source(path.parent / included[1], seen))
    return "".join(out)


@functools.cache
def cupy():
    """The cupy module, or None (with one warning) where it cannot be imported."""
    try:
        import cupy as module
    except Exception as e:  # not installed, or its CUDA libraries failed to load
        warn_once(f"rwkv_lm: CuPy is unavailable ({e}); the CUDA kernels fall back to torch ops "
                  "(pip install 'rwkv-lm[cuda]')")
        return None
    return module


def available() -> bool:
    """True when a CUDA device and CuPy are present; the kernels themselves compile on first use."""
    return torch.cuda.is_available() and cupy() is not None


class Launch:
    """One kernel at one grid and block size with its argument block, refilled at each call."""

    def __init__(self, start, args):
        self.start = start  # start(address of the argument block)
        self.values = [ctypes.c_float() if isinstance(x, float) else ctypes.c_int() if isinstance(x, int)
                       else ctypes.c_void_p() for x in args]
        self.params = (ctypes.c_void_p * len(args))(*(ctypes.addressof(v) for v in self.values))
        self.address = ctypes.addressof(self.params)

    def __call__(self, args):
        for slot, x in zip(self.values, args, strict=True):
            slot.value = x.data_ptr() if isinstance(x, torch.Tensor) else x
        self.start(self.address)


class Kernels:
    """Launches kernels by name; subclasses say how one starts (`starter`)."""

    def __init__(self):
        self._launches: dict[tuple, Launch] = {}

    def __call__(self, name: str, grid: tuple[int, ...], block: int, *args):
        key = (name, grid, block)
        launch = self._launches.get(key)
        if launch is None:
            launch = self._launches[key] = Launch(self.starter(name, (*grid, 1, 1)[:3], block), args)
        launch(args)

    def starter(self, name: str, grid: tuple[int, int, int], block: int):
        """A function of the argument block's address that launches `name` on (grid, block)."""
        raise NotImplementedError


class CupyKernels(Kernels):
    """The kernels `names` (C++ instantiations, e.g. `step_mix<bf16_t>`) of one source, compiled for one
    device; launched with cuLaunchKernel on torch's current stream (so CUDA graphs capture them)."""

    def __init__(self, path: Path, names: list[str], device: int):
        super().__init__()
        cp = cupy()
        self.device = device
        with cp.cuda.Device(device):
            module = cp.RawModule(code=read_source(path), options=NVRTC_OPTIONS, name_expressions=names)
            # compiled here: get_function gives a RawKernel, .kernel its Function for this device (.ptr: CUfunction)
            self.functions = {name: module.get_function(name).kernel for name in names}

    def starter(self, name, grid, block):
        cp, pointer, device = cupy(), self.functions[name].ptr, self.device
        launch_kernel, current_device = cp.cuda.driver.launchKernel, cp.cuda.runtime.getDevice

        def start(address):
            stream = torch.cuda.current_stream(device).cuda_stream
            if current_device() == device:
                launch_kernel(pointer, *grid, block, 1, 1, 0, stream, address, 0)
            else:
                with cp.cuda.Device(device):
                    launch_kernel(pointer, *grid, block, 1, 1, 0, stream, address, 0)

        return start
