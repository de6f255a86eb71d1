"""Which grammar engine constrains our tokenizers best: llguidance, xgrammar, outlines-core, each over the RWKV
World vocabulary (65,536 ids, byte tokens) and a byte-level HF BPE. Per engine: building its view of the
vocabulary, compiling a JSON schema, the mean time to compute one row's token mask along a valid JSON text,
and whether every token of that text is allowed (and id 0, the end, only at its end).

    PYTHONPATH=$PWD python bench/grammar_engines.py    (a library that is not installed is skipped)
"""
from __future__ import annotations

import json
import time

import torch

from rwkv_lm.tokenizer import load_tokenizer, train_bpe

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
    "mood": {"enum": ["happy", "sad", "calm"]},
    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
    "home": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
             "required": ["city"], "additionalProperties": False}},
    "required": ["name", "age", "mood", "tags", "home"], "additionalProperties": False}
TEXT = json.dumps({"name": "Ada Lovelace, née Byron", "age": 36, "mood": "calm", "tags": ["math", "poetry", "見"],
                   "home": {"city": "London"}}, ensure_ascii=False)


def vocab(tok, n_vocab):
    return [tok.token_bytes(i) if i < tok.vocab_size else b"" for i in range(n_vocab)]


def run_llguidance(tok, n_vocab, ids):
    import llguidance
    import llguidance.torch as lt

    t0 = time.perf_counter()
    tokens = vocab(tok, n_vocab)

    class Wrapped:  # what llguidance.TokenizerWrapper reads
        eos_token_id, bos_token_id, special_token_ids = 0, None, [0, *range(tok.vocab_size, n_vocab)]

        def __init__(self):
            self.tokens = tokens

        def __call__(self, text):
            return tok.encode(text.decode("utf-8", "replace") if isinstance(text, bytes) else text)

    lltok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Wrapped()), n_vocab=n_vocab)
    t1 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
    matcher = llguidance.LLMatcher(lltok, grammar)
    assert not matcher.is_error(), matcher.get_error()
    t2 = time.perf_counter()
    mask = lt.allocate_token_bitmask(1, n_vocab)

    def allowed(t):
        return bool((mask[0, t // 32] >> (t % 32)) & 1)

    return t1 - t0, t2 - t1, walk(ids, lambda: lt.fill_next_token_bitmask(matcher, mask), allowed,
                                 lambda t: matcher.consume_token(t))


def run_xgrammar(tok, n_vocab, ids):
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo(vocab(tok, n_vocab), vocab_type=xgr.VocabType.RAW, vocab_size=n_vocab, stop_token_ids=[0])
    compiler = xgr.GrammarCompiler(info)
    t1 = time.perf_counter()
    matcher = xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(SCHEMA)))
    t2 = time.perf_counter()
    mask = xgr.allocate_token_bitmask(1, n_vocab)

    def allowed(t):
        return bool((mask[0, t // 32] >> (t % 32)) & 1)

    return t1 - t0, t2 - t1, walk(ids, lambda: matcher.fill_next_token_bitmask(mask), allowed, matcher.accept_token)


def run_outlines(tok, n_vocab, ids):
    import outlines_core as oc
    import outlines_core.kernels.torch as ot

    t0 = time.perf_counter()
    table: dict = {}
    for i, b in enumerate(vocab(tok, n_vocab)):
        if i and b:
            table.setdefault(b, []).append(i)
    voc = oc.Vocabulary(0, table)
    t1 = time.perf_counter()
    guide = oc.Guide(oc.Index(oc.json_schema.build_regex_from_schema(json.dumps(SCHEMA)), voc))
    t2 = time.perf_counter()
    mask = ot.allocate_token_bitmask(n_vocab)

    def allowed(t):
        return bool((mask[0, t // 32] >> (t % 32)) & 1)

    return t1 - t0, t2 - t1, walk(ids, lambda: ot.fill_next_token_bitmask(guide, mask), allowed, guide.advance)


def walk(ids, fill, allowed, consume):
    """Mean seconds per mask along `ids` (then the end), and whether each token was allowed."""
    ok, spent = True, 0.0
    for t in [*ids, 0]:
        start = time.perf_counter()
        fill()
        spent += time.perf_counter() - start
        ok &= allowed(t)
        if t != 0:
            consume(t)
    return spent / (len(ids) + 1), ok


def main():
    world = load_tokenizer("world")
    bpe = train_bpe([TEXT, "The quick brown fox jumps over the lazy dog. " * 50, json.dumps(SCHEMA)] * 20, 1000)
    print("| engine | tokenizer | vocab view s | compile s | mask us/token | valid text accepted |")
    print("|---|---|---|---|---|---|")
    for tname, tok, n_vocab in [("world", world, 65536), ("bpe-1000", bpe, 1000)]:
        ids = tok.encode(TEXT)
        for name, run in [("llguidance", run_llguidance), ("xgrammar", run_xgrammar), ("outlines-core", run_outlines)]:
            try:
                view_s, compile_s, (mask_s, ok) = run(tok, n_vocab, ids)
            except ImportError as e:
                print(f"| {name} | {tname} | not installed ({e.name}) | | | |")
                continue
            except Exception as e:  # noqa: BLE001  (a library that cannot take the vocabulary: say so)
                print(f"| {name} | {tname} | failed: {type(e).__name__}: {str(e)[:80]} | | | |")
                continue
            print(f"| {name} | {tname} | {view_s:.2f} | {compile_s:.3f} | {mask_s * 1e6:.0f} | {ok} |")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
