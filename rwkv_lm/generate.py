"""Text generation: prefill the prompt in parallel mode (in chunks, so memory stays bounded), then one
model step per token, sampling with `SamplingParams`, streaming text that never splits a UTF-8 character.

Works for any model with the package's interface: `model(tokens [B, T], state, last_only=True)`,
`model.step(tokens [B], state)`, `model.init_state(B)`, and a state with `select` / `cat` for batches.
"""
from __future__ import annotations

import codecs
from collections.abc import Callable, Iterator, Sequence

import torch

from .sampling import SamplingParams, make_generator, resolve, sample, update_counts

PREFILL_CHUNK = 512  # tokens per parallel-mode call: long prompts cost memory for one chunk, not for all
END_OF_TEXT = 0  # the token that ends a document in RWKV vocabularies


def _device(model) -> torch.device:
    return next(model.parameters()).device


def check_tokenizer(model, tokenizer) -> None:
    """A ValueError unless every id of `tokenizer` is a valid input of `model`."""
    if tokenizer is None:
        raise ValueError("no tokenizer: pass one (e.g. rwkv_lm.tokenizer.load_tokenizer('world')), "
                         "or load a checkpoint that carries one")
    vocab = model.config.vocab_size
    if tokenizer.vocab_size > vocab:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {vocab}; "
                         "use the tokenizer the model was trained with (for official RWKV World models: 'world')")


def prefill(model, tokens: Sequence[int], state=None, chunk_len: int = PREFILL_CHUNK):
    """Feed one row of tokens in parallel mode, chunk by chunk -> (logits [1, V] after the last token, state)."""
    if len(tokens) == 0:
        raise ValueError("nothing to feed: the prompt encodes to no tokens")
    ids = torch.as_tensor(tokens, dtype=torch.long, device=_device(model)).view(1, -1)
    with torch.no_grad():
        for start in range(0, ids.shape[1], chunk_len):
            logits, state = model(ids[:, start:start + chunk_len], state, last_only=True)
    return logits[:, -1], state


class Decoding:
    """Sample a token, hand it out, feed it when asked for the next one.

    Iterating yields next tokens [B]; after the loop stops (or is broken out of), `state` holds every
    token but the last one yielded, which the caller feeds or keeps as pending. `rows` narrows the batch.
    """

    def __init__(self, model, logits, state, params: SamplingParams, *, banned: tuple[int, ...] = ()):
        self.model, self.logits, self.state, self.params, self.banned = model, logits, state, params, banned
        self.generator = make_generator(params, logits.device)
        self.counts = None

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Continue with some batch rows only (indices into the current batch)."""
        self.tokens, self.logits, self.state = self.tokens[rows], self.logits[rows], self.state.select(rows)
        if self.counts is not None:
            self.counts = self.counts[rows]

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(self.params.max_tokens):
            self.tokens = sample(self.logits, self.params, counts=self.counts, banned=self.banned, generator=self.generator)
            self.counts = update_counts(self.counts, self.tokens, self.params, self.logits.shape[-1])
            yield self.tokens
            if i + 1 < self.params.max_tokens:
                with torch.no_grad():
                    self.logits, self.state = self.model.step(self.tokens, self.state)


class TextStream:
    """Token ids in, text out: whole UTF-8 characters only, and nothing of a stop string.

    Text that might be the start of a stop string is held back until it is known not to be one.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.held = ""
        self.stop_hit: str | None = None  # the stop string that ended the text

    @property
    def stopped(self) -> bool:
        return self.stop_hit is not None

    def push(self, token_id: int) -> str:
        """The text that is safe to show after one more token ('' while a character or stop string is open)."""
        self.held += self.utf8.decode(self.tokenizer.token_bytes(token_id))
        return self._release(final=False)

    def finish(self) -> str:
        """Whatever is still held once generation has ended."""
        self.held += self.utf8.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        hits = [(i, s) for i, s in ((self.held.find(s), s) for s in self.stop) if i >= 0]
        if hits:
            end, self.stop_hit = min(hits)
            out, self.held = self.held[:end], ""
            return out
        keep = 0 if final else max((n for s in self.stop for n in range(1, len(s)) if self.held.endswith(s[:n])), default=0)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out


def generate(model, tokenizer, prompt: str, params: SamplingParams | None = None, **overrides) -> Iterator[str]:
    """Stream the completion of `prompt` as text pieces; breaking out of the loop stops the work at once.

    Ends after `max_tokens`, at a stop string, or at token 0 (end of document).
    """
    params = resolve(params, overrides)
    check_tokenizer(model, tokenizer)
    if not isinstance(prompt, str) or not prompt:
        raise ValueError("prompt must be a non-empty string")
    return _stream(model, tokenizer, tokenizer.encode(prompt), params)


def _stream(model, tokenizer, tokens, params):
    logits, state = prefill(model, tokens)
    text = TextStream(tokenizer, params.stop)
    for token in Decoding(model, logits, state, params):
        token = int(token)
        if token == END_OF_TEXT:
            break
        piece = text.push(token)
        if piece:
            yield piece
        if text.stopped:
            return
    piece = text.finish()
    if piece:
        yield piece


def complete(model, tokenizer, prompt: str, params: SamplingParams | None = None,
             callback: Callable[[str], None] | None = None, **overrides) -> str:
    """The whole completion as one string; `callback(piece)` sees each piece as it comes (as `rwkv`'s PIPELINE)."""
    pieces = []
    for piece in generate(model, tokenizer, prompt, params, **overrides):
        if callback is not None:
            callback(piece)
        pieces.append(piece)
    return "".join(pieces)


def generate_batch(model, tokenizer, prompts: Sequence[str], params: SamplingParams | None = None, **overrides) -> list[str]:
    """Complete several prompts of any lengths in one batch; greedy rows equal their single-prompt results.

    Each prompt is prefilled alone (no padding enters any state), then all rows decode together;
    finished rows leave the batch.
    """
    params = resolve(params, overrides)
    check_tokenizer(model, tokenizer)
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty strings")
    rows = [prefill(model, tokenizer.encode(p)) for p in prompts]
    logits = torch.cat([logits for logits, _ in rows])
    state = type(rows[0][1]).cat([state for _, state in rows])

    texts = [TextStream(tokenizer, params.stop) for _ in prompts]
    outputs = [[] for _ in prompts]
    active = list(range(len(prompts)))  # batch position -> prompt index
    decoding = Decoding(model, logits, state, params)
    for tokens in decoding:
        keep = []
        for pos, token in enumerate(tokens.tolist()):
            i = active[pos]
            if token != END_OF_TEXT:
                outputs[i].append(texts[i].push(token))
            if token != END_OF_TEXT and not texts[i].stopped:
                keep.append(pos)
        if not keep:
            break
        if len(keep) < len(active):
            decoding.keep_rows(torch.tensor(keep, device=tokens.device))
            active = [active[pos] for pos in keep]
    return ["".join(out) + text.finish() for out, text in zip(outputs, texts)]
