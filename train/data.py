"""Training data: text or chat files -> tokens (cached as a memmap) -> windows of ctx_len + 1 tokens.

Sources are the embedded corpora ("shakespeare", "chatterbot" or "chatterbot:TOPIC"), text files (`.txt`: one document;
`.jsonl`: {"text": ...} per line), chat files (`.jsonl`: {"messages": [{"role", "content"}, ...]} per
line) and RWKV-LM's binidx (`name.bin` + `name.idx`, already tokens). Documents are joined with token 0
between them. Training windows start at random offsets drawn from (seed, sample index), and the index
follows the global step, so a resumed or multi-process run reads exactly the windows a single
uninterrupted run reads.
"""
from __future__ import annotations

import hashlib
import json
import struct
from itertools import count
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from rwkv_lm.chat_template import ROLES, render_chat
from rwkv_lm.files import atomic_write
from rwkv_lm.tokenizer import load_tokenizer, train_bpe

from . import corpus

DOC_END = 0  # token 0 ends every document
IGNORE = -100  # target of a position without loss (cross_entropy's ignore_index)


class DataError(ValueError):
    """Unusable training data, with the file (and line) at fault and what to do."""


# ---- reading sources ------------------------------------------------------------------------------

def _jsonl(path: Path):
    """(line number, object) for every non-blank line of a JSONL file."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None


def _existing(source: str) -> Path:
    path = Path(source)
    if not path.is_file():
        raise DataError(f"{source}: no such file; give a .txt, .jsonl or binidx (.bin/.idx) file, "
                        f"or an embedded corpus: {', '.join(corpus.NAMES)}")
    if path.stat().st_size == 0:
        raise DataError(f"{source}: the file is empty")
    return path


def read_texts(source: str) -> list[str]:
    """The documents of a text source: the embedded "shakespeare", a .txt file, or {"text"} JSONL."""
    if source == "shakespeare":
        return corpus.shakespeare()
    path = _existing(source)
    if path.suffix == ".jsonl":
        texts = []
        for n, obj in _jsonl(path):
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise DataError(f'{path}:{n}: expected an object with a "text" string, got {json.dumps(obj)[:80]}')
            texts.append(obj["text"])
        return texts
    return [path.read_text(encoding="utf-8", errors="replace")]


def read_conversations(source: str) -> list[list[dict]]:
    """The conversations of a chat source: the embedded "chatterbot" or {"messages": [...]} JSONL."""
    if corpus.is_chatterbot(source):
        return corpus.chatterbot(source.partition(":")[2] or None)
    path = _existing(source)
    if path.suffix != ".jsonl":
        raise DataError(f'{path}: chat data must be JSONL, one {{"messages": [{{"role": ..., "content": ...}}, ...]}} per line')
    conversations = []
    for n, obj in _jsonl(path):
        messages = obj.get("messages") if isinstance(obj, dict) else None
        if not isinstance(messages, list) or not messages:
            raise DataError(f'{path}:{n}: expected an object with a non-empty "messages" list, got {json.dumps(obj)[:80]}')
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(f'{path}:{n}: each message needs "role" (one of {", ".join(ROLES)}) and a "content" '
                                f"string, got {json.dumps(m)[:80]}")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{path}:{n}: the conversation has no assistant message, so nothing to learn from")
        conversations.append(messages)
    return conversations


def read_binidx(source: str) -> np.ndarray:
    """The tokens of a Megatron/RWKV-LM binidx pair (`.idx` header + flat `.bin`), memory-mapped."""
    prefix = source[:-4] if source.endswith((".bin", ".idx")) else source
    idx, bin_ = Path(prefix + ".idx"), Path(prefix + ".bin")
    for p in (idx, bin_):
        _existing(str(p))
    dtypes = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float64, 8: np.uint16}
    with open(idx, "rb") as f:
        magic, version, code = f.read(9), f.read(8), f.read(1)
        if magic != b"MMIDIDX\x00\x00" or len(version) < 8 or struct.unpack("<Q", version)[0] != 1:
            raise DataError(f"{idx}: not a binidx index (expected magic MMIDIDX and version 1)")
        if code[0] not in (1, 2, 3, 4, 5, 8):
            raise DataError(f"{idx}: dtype code {code[0]} is not an integer token type")
        n_seq, _n_doc = struct.unpack("<QQ", f.read(16))
        sizes = np.frombuffer(f.read(4 * n_seq), dtype=np.int32)
    dtype = np.dtype(dtypes[code[0]])
    n_tokens = int(sizes.sum(dtype=np.int64))
    if bin_.stat().st_size < n_tokens * dtype.itemsize:
        raise DataError(f"{bin_}: holds {bin_.stat().st_size // dtype.itemsize} tokens, its .idx says {n_tokens}; "
                        "the file is truncated")
    return np.memmap(bin_, dtype=dtype, mode="r", shape=(n_tokens,))


# ---- tokenizing, with a cache -----------------------------------------------------------------------

def _token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def encode_texts(texts: list[str], tokenizer) -> np.ndarray:
    """Documents -> one token stream, token 0 after each."""
    ids = []
    for text in texts:
        ids += tokenizer.encode(text)
        ids.append(DOC_END)
    return np.asarray(ids, dtype=_token_dtype(tokenizer.vocab_size))


def encode_conversations(conversations: list[list[dict]], tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Conversations -> (tokens, loss mask): the mask is True on assistant-reply tokens only."""
    ids, mask = [], []
    for messages in conversations:
        for text, is_reply in render_chat(messages):
            piece = tokenizer.encode(text)
            ids += piece
            mask += [is_reply] * len(piece)
        ids.append(DOC_END)
        mask.append(False)
    return np.asarray(ids, dtype=_token_dtype(tokenizer.vocab_size)), np.asarray(mask, dtype=bool)


def _source_key(source: str, chat: bool) -> str:
    """What the cached tokens of a source depend on: the rendered text of chats and of embedded corpora
    (cheap to make, and it changes with the template), the identity of other files."""
    if chat or source in corpus.NAMES or corpus.is_chatterbot(source):
        content = [render_chat(c) for c in read_conversations(source)] if chat else read_texts(source)
        return f"{source}:{hashlib.sha256(json.dumps(content).encode()).hexdigest()}"
    st = _existing(source).stat()
    return f"{Path(source).resolve()}:{st.st_size}:{st.st_mtime_ns}"


def _cached(path: Path, build) -> np.ndarray:
    """np.load(path) memory-mapped, after building and writing it atomically if it is not there yet."""
    if not path.exists():
        def write(tmp):
            with open(tmp, "wb") as f:  # a file object: np.save would add ".npy" to a path
                np.save(f, build())

        atomic_write(path, write)
    return np.load(path, mmap_mode="r")


def embedded_tokenizer(vocab_size: int, cache_dir: Path):
    """A byte-level BPE trained on the embedded corpora (cached: training takes a few seconds)."""
    path = cache_dir / f"tokenizer-embedded-{vocab_size}.json"
    if not path.exists():
        texts = corpus.shakespeare() + ["".join(t for t, _ in render_chat(c)) for c in corpus.chatterbot()]
        tokenizer = train_bpe(texts, vocab_size)
        atomic_write(path, lambda tmp: Path(tmp).write_text(tokenizer.spec, encoding="utf-8"))
    return load_tokenizer(path)


# A fine-tune config names a base model that a pre-training run makes; a fresh clone has none yet.
NO_BASE_MODEL = ("pre-train it first (train/README.md, \"The demo's default models\"), or start from the demo's "
                 "model: --model.init_from demo/models/rwkv7.safetensors --data.tokenizer demo/models/rwkv7.safetensors")


def resolve_tokenizer(spec: str, vocab_size: int, cache_dir: Path):
    """"embedded" (BPE of `vocab_size` on the embedded corpora), "world", a tokenizer.json, or a model
    (file, Hugging Face folder or hub name) whose tokenizer is used (fine-tuning keeps the base model's tokenizer)."""
    if spec == "embedded":
        return embedded_tokenizer(vocab_size, cache_dir)
    if spec.endswith((".safetensors", ".pth", ".gguf")) or spec.startswith("hf:") or Path(spec).is_dir():
        from rwkv_lm.checkpoint import open_model

        if not spec.startswith("hf:") and not Path(spec).exists():  # (a hub name is looked up by open_model)
            raise DataError(f"data.tokenizer {spec}: no such model file; {NO_BASE_MODEL}")
        tokenizer = open_model(spec)[0].tokenizer
        if tokenizer is None:
            raise DataError(f"{spec}: the checkpoint carries no tokenizer; pass data.tokenizer explicitly")
        return tokenizer
    try:
        return load_tokenizer(spec)
    except ValueError as e:
        raise DataError(str(e)) from None


# ---- datasets -------------------------------------------------------------------------------------

def _targets(tokens: np.ndarray, mask: np.ndarray | None, start: int, n: int):
    x = torch.from_numpy(tokens[start:start + n + 1].astype(np.int64))
    y = x[1:].clone()
    if mask is not None:
        y[~torch.from_numpy(mask[start + 1:start + n + 1].copy())] = IGNORE
    return x[:-1], y


class RandomWindows(IterableDataset):
    """Endless (x, y) windows of ctx_len tokens at random offsets; sample i's offset depends on (seed, i) only.

    A process yields the samples of its share of each global batch, from batch `first_batch` on:
    sample = batch * batch_size * world_size + rank * batch_size + j.
    """

    def __init__(self, tokens, mask, ctx_len: int, batch_size: int, seed: int,
                 first_batch: int = 0, rank: int = 0, world_size: int = 1):
        self.tokens, self.mask, self.ctx_len, self.batch_size, self.seed = tokens, mask, ctx_len, batch_size, seed
        self.first_batch, self.rank, self.world_size = first_batch, rank, world_size

    def window(self, index: int):
        start = int(np.random.default_rng((self.seed, index)).integers(0, len(self.tokens) - self.ctx_len))
        return _targets(self.tokens, self.mask, start, self.ctx_len)

    def __iter__(self):
        per_batch = self.batch_size * self.world_size
        for batch in count(self.first_batch):
            for j in range(self.batch_size):
                yield self.window(batch * per_batch + self.rank * self.batch_size + j)


class FixedWindows(Dataset):
    """Up to `limit` consecutive, non-overlapping windows: the same validation set every time."""

    def __init__(self, tokens, mask, ctx_len: int, limit: int):
        self.tokens, self.mask, self.ctx_len = tokens, mask, ctx_len
        self.n = min(limit, (len(tokens) - 1) // ctx_len)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return _targets(self.tokens, self.mask, i * self.ctx_len, self.ctx_len)


class TokenData(L.LightningDataModule):
    """Text or chat data for the trainer.

    Args:
        train: sources: "shakespeare" / "chatterbot" / "chatterbot:TOPIC" (embedded), .txt / .jsonl files, or binidx (.bin/.idx).
        val: validation sources; when empty, the last `val_fraction` of the training tokens is held out.
        chat: read the sources as conversations and train on assistant replies only.
        tokenizer: "embedded" (a BPE of `vocab_size` tokens trained on the embedded corpora), "world",
            a tokenizer.json path, or a .safetensors checkpoint whose tokenizer to use.
        batch_size: windows per device and step (the global batch is batch_size x devices x nodes).
        val_windows: how many windows of the validation split to evaluate.
        cache_dir: where tokenizers and token memmaps are kept between runs.
    """

    def __init__(self, train: list[str] = ["shakespeare"], val: list[str] = [], chat: bool = False,
                 tokenizer: str = "embedded", vocab_size: int = 4096, ctx_len: int = 256, batch_size: int = 8,
                 val_fraction: float = 0.05, val_windows: int = 32, seed: int = 0, cache_dir: str = "runs/cache"):
        super().__init__()
        if not train:
            raise DataError("data.train is empty: name at least one source")
        if ctx_len < 1 or batch_size < 1 or not 0 < val_fraction < 1:
            raise DataError("data.ctx_len and data.batch_size must be >= 1, and 0 < data.val_fraction < 1")
        self.sources, self.val_sources, self.chat = list(train), list(val), chat
        self.ctx_len, self.batch_size, self.val_fraction, self.val_windows, self.seed = ctx_len, batch_size, val_fraction, val_windows, seed
        self.cache_dir = Path(cache_dir)
        self.tokenizer = resolve_tokenizer(tokenizer, vocab_size, self.cache_dir)
        self.vocab_size = self.tokenizer.vocab_size

    def _load_source(self, source: str):
        """(tokens, loss mask or None) of one source, tokenized once and cached."""
        if not self.chat and (source.endswith((".bin", ".idx")) or Path(source + ".idx").is_file()):
            tokens, mask = read_binidx(source), None
            seen = tokens[:1 << 20]  # binidx files can be huge: check the start, not every token
        else:
            tokens, mask = self._tokenize(source)
            seen = tokens
        if len(seen) and int(seen.max()) >= self.vocab_size:
            raise DataError(f"{source}: token id {int(seen.max())} is outside the tokenizer's vocabulary of "
                            f"{self.vocab_size}; the data was tokenized with another tokenizer")
        return tokens, mask

    def _tokenize(self, source: str):
        """(tokens, mask or None) of a text or chat source, from the cache when this content was seen before."""
        key = hashlib.sha256(f"{_source_key(source, self.chat)}|{self.chat}|{self.tokenizer.spec}".encode()).hexdigest()[:16]
        path = self.cache_dir / f"tokens-{Path(source).stem}-{key}.npy"
        if self.chat:  # one file, two rows: tokens and mask
            both = _cached(path, lambda: np.stack(encode_conversations(read_conversations(source), self.tokenizer)))
            tokens, mask = both[0], both[1] != 0
        else:
            tokens, mask = _cached(path, lambda: encode_texts(read_texts(source), self.tokenizer)), None
        return tokens, mask

    def _load(self, sources: list[str]):
        parts = [self._load_source(source) for source in sources]
        if len(parts) == 1:
            return parts[0]
        return np.concatenate([t for t, _ in parts]), (np.concatenate([m for _, m in parts]) if self.chat else None)

    def prepare_data(self):
        self._load(self.sources + self.val_sources)  # tokenizes once, on one process, before the others read the cache

    def setup(self, stage=None):
        tokens, mask = self._load(self.sources)
        if self.val_sources:
            val_tokens, val_mask = self._load(self.val_sources)
        else:
            cut = int(len(tokens) * (1 - self.val_fraction))
            tokens, mask, val_tokens, val_mask = tokens[:cut], None if mask is None else mask[:cut], tokens[cut:], None if mask is None else mask[cut:]
        for name, t in (("training", tokens), ("validation", val_tokens)):
            if len(t) <= self.ctx_len:
                raise DataError(f"the {name} data has {len(t)} tokens, fewer than one window of ctx_len + 1 = "
                                f"{self.ctx_len + 1}; give more text or lower data.ctx_len")
        self.train_tokens, self.train_mask, self.val_tokens, self.val_mask = tokens, mask, val_tokens, val_mask
        # bytes of text per loss-carrying token on the validation split, to report loss in bits per byte
        lengths = np.array([len(self.tokenizer.token_bytes(i)) for i in range(self.vocab_size)])
        lengths[DOC_END] = 0
        counted = np.asarray(val_tokens if val_mask is None else val_tokens[val_mask], dtype=np.int64)
        self.val_bytes_per_token = float(lengths[counted].sum()) / max(1, len(counted))

    def train_dataloader(self):
        trainer = self.trainer
        first_batch = trainer.global_step * trainer.accumulate_grad_batches if trainer else 0
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        windows = RandomWindows(self.train_tokens, self.train_mask, self.ctx_len, self.batch_size, self.seed, first_batch, rank, world)
        return DataLoader(windows, batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(FixedWindows(self.val_tokens, self.val_mask, self.ctx_len, self.val_windows), batch_size=self.batch_size)

    def tokens_per_step(self) -> int:
        trainer = self.trainer
        return self.batch_size * self.ctx_len * trainer.world_size * trainer.accumulate_grad_batches
