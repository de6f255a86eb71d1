"""Tokenizers behind one interface: `encode(text) -> ids`, `decode(ids) -> str`, `token_bytes(id) -> bytes`,
`vocab_size`, and `spec` (what a checkpoint stores to bring the tokenizer back)."""
from __future__ import annotations

from pathlib import Path

from .bpe import END_OF_TEXT, END_OF_TEXT_ID, BPETokenizer, train_bpe


def load_tokenizer(spec: str | Path):
    """A tokenizer from a spec: "world", a tokenizer.json path, or tokenizer.json text (as stored in checkpoints)."""
    spec_str = str(spec)
    if spec_str == "world":
        from .world import WorldTokenizer

        return WorldTokenizer()
    if spec_str.lstrip().startswith("{"):
        return BPETokenizer.from_str(spec_str)
    path = Path(spec_str)
    if not path.is_file():
        raise ValueError(f"tokenizer {spec_str!r}: not 'world' and no such file; pass 'world' or a tokenizer.json path")
    try:
        return BPETokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise ValueError(f"{path}: not a Hugging Face tokenizer.json ({e})") from None


__all__ = ["BPETokenizer", "END_OF_TEXT", "END_OF_TEXT_ID", "load_tokenizer", "train_bpe"]
