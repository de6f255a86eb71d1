"""What every file format of the package shares: one error type that names the file and what is wrong with it,
atomic writes (a crash never leaves half a file), telling the containers apart, and reading a tagged
safetensors file (ours: a `format` entry in its metadata says what it holds)."""
from __future__ import annotations

import os
import pickle
import zipfile
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open


class CheckpointError(ValueError):
    """A file that cannot be loaded (a model, a state, an adapter), with the reason."""


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call write(tmp_path), then move the finished file over `path` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp (and some writers) make it private; give the usual mode
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def file_kind(path: Path) -> str:
    """"pth" (a PyTorch zip), "gguf" or "safetensors", from the first bytes; else a CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:2] == b"PK":
        return "pth"
    if head[:4] == b"GGUF":
        return "gguf"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    raise CheckpointError(f"{path}: not a model checkpoint (not a safetensors file, a PyTorch .pth zip or GGUF); "
                          "pass a file written by rwkv_lm.save, an official RWKV-7 .pth, a GGUF file or a "
                          "Hugging Face folder")


def read_pth(path) -> dict[str, torch.Tensor]:
    """The tensors of a `.pth` state dict, opened with weights_only=True (no code in the file runs)."""
    path = Path(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to load: the file holds pickled objects other than tensors, which could "
                              f"run code. Only plain state dicts are accepted ({str(e).splitlines()[0]})") from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint; it is truncated or corrupt "
                              f"({str(e).splitlines()[0]})") from None
    if isinstance(sd, dict) and "state_dict" in sd and ("rwkv_lm" in sd or "pytorch-lightning_version" in sd):
        raise CheckpointError(f"{path}: a training checkpoint (Lightning's .ckpt), not a model or state file; "
                              f"export it first: python -m train export {path} OUT.safetensors")
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: holds a {type(sd).__name__}, not a state dict of tensors")
    return sd


def read_tagged(path, fmt: str, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a safetensors file whose metadata says format `fmt`; else a CheckpointError
    saying the file is not `what` (e.g. "a state file; write one with ...")."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot be read as safetensors; it is truncated or corrupt ({e})") from None
    if meta.get("format") != fmt:
        raise CheckpointError(f"{path}: not {what}")
    return tensors, meta
