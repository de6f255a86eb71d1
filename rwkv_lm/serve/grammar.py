"""Constrained output: a grammar decides which tokens each row may draw next (llguidance underneath).

A `Grammar` is lark text in llguidance's dialect, where JSON schemas enter as `%json {...}`; a `Matcher`
follows one row through it; `fill_masks` writes the allowed tokens of many rows as bits ([B, ceil(V/32)]
int32, in Rust threads that do not hold the GIL, so it can run while the model steps); `sampling.sample` sets
the logits of every other token to -inf before it draws.

llguidance was picked over xgrammar and outlines-core by bench/grammar_engines.py (bench/RESULTS.md,
"Constrained output"): all three take the World vocabulary's byte tokens and our BPE's; llguidance compiles a
schema in about 1 ms where outlines-core takes 0.1-0.5 s (a regex over the whole vocabulary), handles
recursive schemas and lark (which tool calls need), and has no dependencies, where xgrammar (the fastest
mask) pulls transformers and triton into a CPU install.
"""
from __future__ import annotations

import json
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import llguidance
import llguidance.numpy as llnp  # (not llguidance.torch: its import pulls in torch._dynamo, 2.4 s of every start)
import torch

from ..tokenizer import END_OF_TEXT_ID

# JSON as json.dumps writes it on one line: no newline can end a chat turn early, no run of spaces wastes tokens
JSON_STYLE = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


class GrammarError(ValueError):
    """A grammar or schema that cannot be compiled; the message says why."""


@dataclass(frozen=True)
class Grammar:
    """A lark grammar for llguidance: `start` is the text the row must produce (after an optional lead the
    caller strips, see `text`)."""

    rules: str  # lark rules, `start: ...` among them

    @classmethod
    def json_schema(cls, schema: dict | bool) -> "Grammar":
        """Text that parses as JSON and validates against `schema` (a JSON schema as a dict)."""
        if isinstance(schema, bool) or not isinstance(schema, dict):
            raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
        return cls(f"start: {json_rule(schema)}\n")

    @classmethod
    def json_object(cls) -> "Grammar":
        """Any JSON object (OpenAI's response_format {"type": "json_object"})."""
        return cls.json_schema({"type": "object"})

    def text(self, lead: str = "") -> str:
        """The grammar as llguidance takes it; `lead`: characters that may come first (the space a chat template
        puts after its cue, which the engine strips)."""
        if not lead:
            return llguidance.LLMatcher.grammar_from_lark(self.rules)
        body = self.rules.replace("start:", "constrained_body:", 1)
        return llguidance.LLMatcher.grammar_from_lark(f"start: {json.dumps(lead)}? constrained_body\n{body}")


def json_rule(schema: dict) -> str:
    """A lark expression for JSON that validates against `schema`, written on one line (JSON_STYLE)."""
    schema = {**schema, "x-guidance": {**JSON_STYLE, **schema.get("x-guidance", {})}}
    return f"%json {json.dumps(schema)}"


_vocabularies: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> {n_vocab: LLTokenizer}
_vocabularies_lock = threading.Lock()


def vocabulary(tokenizer, n_vocab: int) -> llguidance.LLTokenizer:
    """llguidance's view of a tokenizer (the bytes of each of the model's `n_vocab` ids), built once per
    tokenizer: 0.3-1.2 s for the World vocabulary. Ids beyond the tokenizer's and id 0 (end of text) are
    special: a grammar never produces them, and 0 is allowed once the grammar is complete."""
    with _vocabularies_lock:
        per_size = _vocabularies.setdefault(tokenizer, {})
        if n_vocab not in per_size:
            per_size[n_vocab] = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Tokens(tokenizer, n_vocab)),
                                                       n_vocab=n_vocab)
        return per_size[n_vocab]


class _Tokens:
    """What llguidance.TokenizerWrapper reads from a tokenizer."""

    eos_token_id, bos_token_id = END_OF_TEXT_ID, None

    def __init__(self, tokenizer, n_vocab: int):
        own = tokenizer.vocab_size
        self.tokens = [b"" if i == END_OF_TEXT_ID or i >= own else tokenizer.token_bytes(i) for i in range(n_vocab)]
        self.special_token_ids = [END_OF_TEXT_ID, *range(own, n_vocab)]
        self._encode = tokenizer.encode

    def __call__(self, text: str | bytes) -> list[int]:
        return self._encode(text.decode("utf-8", "replace") if isinstance(text, bytes) else text)


class Matcher:
    """Where one row stands in its grammar."""

    def __init__(self, grammar: Grammar, tokenizer, n_vocab: int, lead: str = ""):
        try:
            text = grammar.text(lead)
        except ValueError as e:
            raise GrammarError(f"the grammar does not compile: {e}") from None
        self.ll = llguidance.LLMatcher(vocabulary(tokenizer, n_vocab), text, log_level=0)
        if self.ll.is_error():
            raise GrammarError(f"the grammar does not compile: {self.ll.get_error()}")

    def consume(self, token: int) -> None:
        """Advance past a drawn token (which the mask allowed: anything else is a bug, not bad input)."""
        if not self.ll.consume_token(token):
            raise RuntimeError(f"token {token} was drawn against the grammar: {self.ll.get_error()}")

    @property
    def complete(self) -> bool:
        """Nothing may follow: the row ends here."""
        return self.ll.is_stopped()


_executor = llguidance.LLExecutor()


def new_masks(rows: int, n_vocab: int) -> torch.Tensor:
    """An all-allowed bitmask [rows, ceil(n_vocab / 32)] int32."""
    return torch.full(llnp.get_bitmask_shape(rows, n_vocab), -1, dtype=torch.int32)


def fill_masks(matchers: list[tuple[Matcher, int]], masks: torch.Tensor) -> None:
    """Write each matcher's allowed tokens into its row of `masks` (rows not named are left as they are)."""
    if matchers:
        llnp.fill_next_token_bitmask_par(_executor, [(m.ll, row) for m, row in matchers], masks.numpy())


_helper = ThreadPoolExecutor(1, thread_name_prefix="rwkv_lm-grammar")  # one for every engine: its work is short


class MaskFiller:
    """The masks of a batch's constrained rows: those of the rows already decoding are computed in a helper
    thread while the model steps (`start`), those of rows that just read their prompt afterwards (`apply`)."""

    def __init__(self, n_vocab: int):
        self.n_vocab = n_vocab

    def start(self, matchers: list[Matcher | None]) -> Future:
        """A future of the masks [len(matchers), W] (None where no row is constrained)."""
        rows = [(m, i) for i, m in enumerate(matchers) if m is not None]
        if not rows:
            done: Future = Future()
            done.set_result(None)
            return done
        masks = new_masks(len(matchers), self.n_vocab)
        return _helper.submit(lambda: (fill_masks(rows, masks), masks)[1])

    def finish(self, early: torch.Tensor | None, matchers: list[Matcher | None]) -> torch.Tensor | None:
        """The masks [len(matchers), W] of every row (None if no row is constrained); `early` holds those of the
        first rows, from `start`."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        n_early = 0 if early is None else early.shape[0]
        if n_early == len(matchers):  # no row joined since `start`: its masks are all of them
            return early
        masks = new_masks(len(matchers), self.n_vocab)
        if early is not None:
            masks[:n_early] = early
        fill_masks([(matchers[i], i) for i in rows if i >= n_early], masks)
        return masks
