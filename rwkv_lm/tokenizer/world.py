"""The RWKV World tokenizer (`rwkv_vocab_v20230424`): greedy longest match over UTF-8 bytes.

Encoding runs in `pyrwkv-tokenizer` (Rust, ships the vocabulary, gives the same ids as the official
pure-Python trie); decoding is ours, from the same vocabulary file, because a streaming decoder needs the
exact bytes of each token and a token may hold part of a UTF-8 character.
"""
from __future__ import annotations

import ast
from collections.abc import Iterable
from functools import cache
from pathlib import Path

import pyrwkv_tokenizer

VOCAB_FILE = Path(pyrwkv_tokenizer.__file__).with_name("rwkv_vocab_v20230424.txt")


@cache
def _vocab_bytes() -> tuple[bytes, ...]:
    """Token id -> bytes; id 0 (end of document) decodes to nothing."""
    table = [b""]
    for line_no, line in enumerate(VOCAB_FILE.read_text(encoding="utf-8").splitlines(), 1):
        # each line: `<id> <Python literal of the token, str or bytes> <length in bytes>`
        idx, rest = line.split(" ", 1)
        literal, length = rest.rsplit(" ", 1)
        if "\\" in literal:  # escapes (840 lines): Python's own parser
            token = ast.literal_eval(literal)
            token = token.encode("utf-8") if isinstance(token, str) else token
        else:  # the text between the quotes is the token (a bytes literal without escapes is ASCII): 0.1 s in all, not 0.5
            token = literal[2:-1].encode("ascii") if literal[0] == "b" else literal[1:-1].encode("utf-8")
        if int(idx) != len(table) or len(token) != int(length):
            raise RuntimeError(f"{VOCAB_FILE}:{line_no}: unexpected entry; reinstall pyrwkv-tokenizer")
        table.append(token)
    return tuple(table)


@cache
def _encoder() -> pyrwkv_tokenizer.WorldTokenizer:
    """The encoder, made on the first encode and shared by every WorldTokenizer: its trie takes 230 MB and 0.2 s,
    which a model run on token ids (every load of a World model attaches a WorldTokenizer) and a decoder never need."""
    return pyrwkv_tokenizer.WorldTokenizer(str(VOCAB_FILE))


class WorldTokenizer:
    """The 65530-token multilingual vocabulary of the RWKV World / G1 models."""

    spec = "world"

    @property
    def vocab_size(self) -> int:
        return len(_vocab_bytes())

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"encode takes a str, got {type(text).__name__}")
        try:
            return _encoder().encode(text)
        except UnicodeEncodeError as e:
            raise ValueError(f"text holds a character that has no UTF-8 form ({e.reason} at index {e.start}); "
                             "remove lone surrogates before encoding") from None

    def token_bytes(self, token_id: int) -> bytes:
        table = _vocab_bytes()
        if not 0 <= token_id < len(table):
            raise ValueError(f"token id {token_id} is outside the World vocabulary [0, {len(table)})")
        return table[token_id]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return b"".join(self.token_bytes(int(i)) for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")
