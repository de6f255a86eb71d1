"""The model files other tools use, each in its own module: GGUF (llama.cpp), Hugging Face folders in the
fla-hub layout, and names of models on the Hugging Face Hub. checkpoint.py reads and writes models through
these; they see plain tensors under our names and a config, never a model."""
from __future__ import annotations


def read(kind: str, path):
    """(tensors under our names, config dict, metadata) of a file of `kind` ("gguf" or "hf")."""
    if kind == "gguf":
        from .gguf import read_gguf

        return read_gguf(path)
    from .hf import read_hf

    return read_hf(path)


# what `rwkv-lm convert` writes: ours (safetensors + config), the official .pth, GGUF, a Hugging Face folder
OUTPUT_SUFFIXES = {".safetensors": "ours", ".pth": "official", ".gguf": "gguf"}
OUTPUT_FORMATS = ("ours", "official", "gguf", "hf")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")  # the keys of gguf.TYPES, without importing gguf


def output_format(path, fmt: str | None = None) -> str:
    """The format to write at `path`: `fmt` if given, else named by the suffix (a folder, or a path ending in
    "/", is a Hugging Face folder); an output no rule names is an error, not a guess."""
    from pathlib import Path

    from ..files import CheckpointError

    if fmt is not None:
        if fmt not in OUTPUT_FORMATS:
            raise CheckpointError(f"unknown output format {fmt!r}; known: {', '.join(OUTPUT_FORMATS)}")
        return fmt
    text = str(path)
    if text.endswith(("/", "\\")) or Path(text).is_dir():
        return "hf"
    suffix = Path(text).suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise CheckpointError(f"{path}: cannot tell which format to write from the name; end it in "
                              f"{', '.join(OUTPUT_SUFFIXES)} or '/' (a Hugging Face folder), or pass --format "
                              f"({', '.join(OUTPUT_FORMATS)})")
    return OUTPUT_SUFFIXES[suffix]
