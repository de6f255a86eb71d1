"""The World tokenizer: the official trie's ids on multilingual text, exact token bytes, clear errors."""
import os

import pytest

from rwkv_lm.tokenizer import load_tokenizer

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "今天是美好的一天。日本語のテキスト、한국어 텍스트, Ελληνικά, русский, العربية, हिन्दी",
    "emoji 🎉👨‍👩‍👧‍👦🏳️‍🌈 and flags 🇯🇵, skin tones 👍🏽",
    "def f(x):\n\treturn {'a': x ** 2}  # comment\r\n    if x != 0: pass\n",
    "\x00\x01\x7f control \x1b[31m escape \ufeff bom \ufffd replacement",
    " " * 300 + "\n" * 40 + "trailing",
    "User: hi\n\nAssistant: Hello!\n\nUser: 你好\n\nAssistant:",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 beyond the BMP: 𠀀𠀁 \U0010fffd",
    "a",
    "",
]


@pytest.fixture(scope="module")
def trie():
    rwkv = pytest.importorskip("rwkv", reason="the rwkv pip package is a test dependency")
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    return TRIE_TOKENIZER(os.path.join(os.path.dirname(rwkv.__file__), "rwkv_vocab_v20230424.txt"))


@pytest.mark.parametrize("text", TEXTS, ids=lambda t: repr(t[:12]))
def test_ids_match_official_trie(world, trie, text):
    ids = world.encode(text)
    assert ids == trie.encode(text)
    assert world.decode(ids) == text
    assert world.decode_bytes(ids) == text.encode("utf-8")


def test_random_unicode_matches_official_trie(world, trie):
    import random

    rng = random.Random(0)
    ranges = [(0x20, 0x7E), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF)]
    for _ in range(200):
        text = "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(1, 80)))
        assert world.encode(text) == trie.encode(text), repr(text)


def test_token_bytes_hold_partial_characters(world, trie):
    # the vocabulary has tokens that are a piece of a UTF-8 character; decode must not mangle them
    partial = [i for i in range(1, world.vocab_size) if _invalid_utf8(world.token_bytes(i))]
    assert len(partial) > 100
    for i in partial[:50] + [1, 11, 65529]:
        assert world.token_bytes(i) == trie.idx2token[i]
    ch = "你".encode("utf-8")
    ids = [ch[0] + 1, ch[1] + 1, ch[2] + 1]  # ids 1..256 are the single bytes
    assert world.decode(ids) == "你"
    assert world.decode(ids[:2]) == "\ufffd", "an incomplete character decodes to one replacement mark"


def test_every_token_holds_the_official_bytes(world, trie):
    assert [world.token_bytes(i) for i in range(1, world.vocab_size)] == [trie.idx2token[i] for i in range(1, world.vocab_size)]


def _invalid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_loader_spec_and_size():
    tok = load_tokenizer("world")
    assert tok.spec == "world" and tok.vocab_size == 65530
    assert tok.token_bytes(0) == b"", "token 0 ends a document and decodes to nothing"


def test_the_encoder_is_made_on_the_first_encode_and_shared():
    """Its trie takes 230 MB: a tokenizer that only decodes (a model run on token ids) never makes it, and every
    WorldTokenizer (one a loaded model) shares the one made."""
    from rwkv_lm.tokenizer.world import WorldTokenizer, _encoder

    _encoder.cache_clear()
    tok = WorldTokenizer()
    assert tok.decode([1, 2, 3]) == "\x00\x01\x02" and tok.vocab_size == 65530
    assert _encoder.cache_info().currsize == 0
    assert tok.encode("Hello") == WorldTokenizer().encode("Hello")
    assert _encoder.cache_info().currsize == 1 and _encoder.cache_info().misses == 1


def test_bad_input_is_a_value_error(world):
    with pytest.raises(ValueError, match="surrogate"):
        world.encode("abc \ud800 def")
    with pytest.raises(ValueError, match="outside the World vocabulary"):
        world.decode([65530])
    with pytest.raises(ValueError, match="takes a str"):
        world.encode(b"bytes")
