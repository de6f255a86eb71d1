"""The grammar module alone: schemas compile over the World vocabulary and a BPE, a masked draw always stays
inside the grammar."""
import json

import jsonschema
import pytest
import torch

from rwkv_lm.sampling import forbid, unpack_bitmask
from rwkv_lm.serve.grammar import Grammar, GrammarError, Matcher, fill_masks, new_masks
from rwkv_lm.tokenizer import train_bpe

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0, "maximum": 200},
    "mood": {"enum": ["happy", "sad", "calm"]}, "ok": {"type": "boolean"},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
    "required": ["name", "age", "mood", "ok", "tags"], "additionalProperties": False}


def draw_constrained(matcher, tokenizer, n_vocab, generator, max_tokens=400):
    """Random logits, masked, drawn at temperature 1 until the grammar ends -> the text."""
    masks, ids = new_masks(1, n_vocab), []
    for _ in range(max_tokens):
        fill_masks([(matcher, 0)], masks)
        logits = torch.randn(1, n_vocab, generator=generator)
        forbid(logits, masks)
        token = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
        if token == 0:
            break
        matcher.consume(token)
        ids.append(token)
        if matcher.complete:
            break
    return tokenizer.decode(ids)


@pytest.mark.parametrize("lead", ["", " "])
def test_random_draws_validate_against_the_schema_world(world, lead):
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        text = draw_constrained(Matcher(Grammar.json_schema(SCHEMA), world, 65536, lead=lead), world, 65536, generator)
        assert "\n" not in text
        jsonschema.validate(json.loads(text), SCHEMA)  # json.loads takes a leading space


def test_random_draws_validate_against_the_schema_bpe():
    bpe = train_bpe([json.dumps(SCHEMA), "hello world, the quick brown fox"] * 10, 400)
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        text = draw_constrained(Matcher(Grammar.json_schema(SCHEMA), bpe, 512, lead=""), bpe, 512, generator)
        jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_takes_any_object_only(world):
    matcher = Matcher(Grammar.json_object(), world, 65536)
    masks = new_masks(1, 65536)
    fill_masks([(matcher, 0)], masks)
    ok = unpack_bitmask(masks, 65536)[0]
    assert ok[world.encode("{")[0]] and not ok[world.encode("[")[0]] and not ok[world.encode("hello")[0]]
    assert not ok[0] and not ok[65535]  # the end only once complete; ids beyond the vocabulary never


def test_bad_schema_is_a_grammar_error(world):
    with pytest.raises(GrammarError):
        Matcher(Grammar.json_schema({"type": "no-such-type"}), world, 65536)
    with pytest.raises(GrammarError):
        Grammar.json_schema(["not", "a", "schema"])

