"""The replica choice of `rwkv-lm serve --replicas N` (rwkv_lm.serve.routing), without Ray: which key a request
gets, that a conversation's turns share it, that keys spread and stay put when another replica goes, and the
fall back to the least loaded replica over the queue threshold; and the flags of `rwkv-lm serve --replicas`."""
import json
from collections import Counter

import pytest

from rwkv_lm.cli import main
from rwkv_lm.serve.routing import Route, affinity_key, choose, rendezvous

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def chat_key(messages, headers=None, **fields):
    return affinity_key(CHAT, json.dumps({"messages": messages, **fields}).encode(), headers or {})


def test_the_turns_of_a_conversation_share_a_key_and_conversations_differ():
    first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    later = first + [{"role": "assistant", "content": "Hi."}, {"role": "user", "content": "How are you?"}]
    assert chat_key(first) == chat_key(later) is not None
    assert chat_key([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Bonjour"}]) != chat_key(first)


def test_a_named_session_comes_before_the_prompt():
    messages = [{"role": "user", "content": "Hello!"}]
    assert chat_key(messages, {"x-session-id": "s1"}) == chat_key([{"role": "user", "content": "x"}], {"x-session-id": "s1"})
    assert chat_key(messages, {"x-session-id": "s1"}, user="u") == "session:s1"
    assert chat_key(messages, prompt_cache_key="k", user="u") == "prompt_cache_key:k"
    assert chat_key(messages, user="u") == "user:u"


def test_completions_key_on_the_prompts_beginning():
    long_prompt = "word " * 100
    key = affinity_key(COMPLETIONS, json.dumps({"prompt": long_prompt}).encode(), {})
    assert key == affinity_key(COMPLETIONS, json.dumps({"prompt": [long_prompt + " and more"]}).encode(), {})


def test_requests_that_name_no_conversation_have_no_key():
    assert affinity_key("/v1/models", b"", {}) is None
    assert affinity_key(CHAT, b"{not json", {}) is None
    assert affinity_key(CHAT, json.dumps({"messages": [{"role": "system", "content": "x"}]}).encode(), {}) is None
    assert affinity_key(CHAT, json.dumps({"messages": "hello"}).encode(), {}) is None


def test_rendezvous_spreads_keys_and_a_lost_replica_moves_only_its_own():
    keys = [f"conversation {i}" for i in range(3000)]
    before = {k: rendezvous(k, [0, 1, 2]) for k in keys}
    shares = Counter(before.values())
    assert all(800 < n < 1200 for n in shares.values()), shares
    after = {k: rendezvous(k, [0, 2]) for k in keys}
    assert all(after[k] == before[k] for k in keys if before[k] != 1)


def test_choose_keeps_affinity_until_the_queue_threshold():
    key = "session:a"
    home = rendezvous(key, [0, 1])
    other = 1 - home
    assert choose(Route(key), {home: 3, other: 0}, queue_threshold=4) == [[home], [other]]
    assert choose(Route(key), {home: None, other: 0}, queue_threshold=4) == [[home], [other]]
    assert choose(Route(key), {home: 4, other: 0}, queue_threshold=4) == [[0, 1]]  # the least loaded of all
    assert choose(Route(key), {home: 4, other: 4}, queue_threshold=4) == [[home], [other]]  # none is better off
    assert choose(Route(), {0: 1, 1: 0}, queue_threshold=4) == [[0, 1]]
    assert choose(None, {0: 1, 1: 0}, queue_threshold=4) == [[0, 1]]


def test_choose_answers_a_rank_asked_for_or_any_when_it_is_gone():
    assert choose(Route(rank=1), {0: 9, 1: 0}, queue_threshold=4) == [[1]]
    assert choose(Route(rank=2), {0: 9, 1: 0}, queue_threshold=4) == [[0, 1]]


@pytest.mark.parametrize("argv, message", [
    (["--replica-cpus", "2"], "go with --replicas 2 or more"),
    (["--ray-address", "auto"], "go with --replicas 2 or more"),
    (["--replicas", "0"], "--replicas must be >= 1"),
    (["--replicas", "2", "--replica-cpus", "0"], "--replica-cpus must be > 0"),
], ids=["cpus-without-replicas", "address-without-replicas", "no-replicas", "zero-cpus"])
def test_replica_flags_are_checked_before_anything_starts(tmp_path, capsys, argv, message):
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"")  # never read: the flags are refused first
    assert main(["serve", "--model", str(model), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err, err
