"""Byte-level BPE through Hugging Face `tokenizers`: train one on text, or load any tokenizer.json."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

END_OF_TEXT_ID = 0  # the token that ends a document, in RWKV's vocabularies and in ours
END_OF_TEXT = "<|endoftext|>"  # its text in our BPE vocabularies (trained with it as the first special token)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-ins for the 256 byte values, reversed."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    stand_ins, extra = {}, 0
    for byte in range(256):
        if byte in keep:
            stand_ins[chr(byte)] = byte
        else:
            stand_ins[chr(256 + extra)] = byte
            extra += 1
    return stand_ins


class BPETokenizer:
    """A `tokenizers.Tokenizer` behind the package's tokenizer interface."""

    def __init__(self, hf: Tokenizer):
        self.hf = hf
        self.vocab_size = hf.get_vocab_size()
        self._byte_level = "ByteLevel" in hf.to_str()
        self._byte_of = _byte_decoder()
        self._token_bytes: dict[int, bytes] = {}

    @classmethod
    def from_file(cls, path: str | Path) -> "BPETokenizer":
        return cls(Tokenizer.from_file(str(path)))

    @classmethod
    def from_str(cls, text: str) -> "BPETokenizer":
        return cls(Tokenizer.from_str(text))

    @property
    def spec(self) -> str:
        """What a checkpoint stores to bring this tokenizer back: the tokenizer.json text."""
        return self.hf.to_str()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes of one token (a byte-level token may hold part of a UTF-8 character)."""
        cached = self._token_bytes.get(token_id)
        if cached is None:
            piece = self.hf.id_to_token(token_id) or ""
            if self._byte_level and all(ch in self._byte_of for ch in piece):
                cached = bytes(self._byte_of[ch] for ch in piece)
            else:
                cached = self.hf.decode([token_id], skip_special_tokens=False).encode("utf-8")
            self._token_bytes[token_id] = cached
        return cached

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return b"".join(self.token_bytes(i) for i in ids)


def train_bpe(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> BPETokenizer:
    """Train a byte-level BPE on an iterable of texts; id 0 is `<|endoftext|>`."""
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return BPETokenizer(hf)
