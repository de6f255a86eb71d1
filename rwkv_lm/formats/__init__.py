"""The model files other tools use, each in its own module: GGUF (llama.cpp), Hugging Face folders in the
fla-hub layout, and names of models on the Hugging Face Hub. checkpoint.py's reader dispatches here."""
from __future__ import annotations


def read(kind: str, path):
    """(tensors under our names, config dict, metadata) of a file of `kind` ("gguf" or "hf")."""
    if kind == "gguf":
        from .gguf import read_gguf

        return read_gguf(path)
    from .hf import read_hf

    return read_hf(path)


def export_gguf(model, path, *, type: str = "f32", tokenizer=None):
    """Write an RWKV-7 as GGUF for llama.cpp (see rwkv_lm.formats.gguf)."""
    from .gguf import export_gguf as write

    return write(model, path, type=type, tokenizer=tokenizer)


def export_hf(model, folder, *, dtype=None, tokenizer=None):
    """Write an RWKV-7 as an fla-hub Hugging Face folder (see rwkv_lm.formats.hf)."""
    import torch

    from .hf import export_hf as write

    return write(model, folder, dtype=dtype or torch.float32, tokenizer=tokenizer)
