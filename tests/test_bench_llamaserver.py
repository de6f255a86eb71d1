"""bench/bench_llamaserver.py: its one client (streams, the follow-up turn) against `rwkv-lm serve` on a tiny model,
which needs no llama.cpp; and the whole --quick run beside llama-server where that is built. No timing is checked."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import bench_llamaserver as bench  # noqa: E402
import llamacpp  # noqa: E402

import rwkv_lm  # noqa: E402
from rwkv_lm.testing import random_model  # noqa: E402


@pytest.fixture(scope="module")
def our_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    checkpoint = rwkv_lm.save(random_model(bench.SHAPES["tiny"]), tmp / "bench.safetensors", tokenizer="world")
    server = bench.Server.rwkv_lm(checkpoint, threads=1, max_batch=4, log=tmp / "server.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_streams_round_gets_fixed_length_answers(our_server, world):
    prompts = [world.encode(f"{i}. the words of a prompt") for i in range(4)]
    run = bench.streams_round(our_server.url, prompts, 6)
    assert run.tokens == 24 and len(run.ttft_s) == 4 and run.wall_s > 0


def test_follow_up_turn_reads_the_answer_back_and_hits_our_cache(our_server, world):
    turn1 = world.encode("A conversation of some length, told in the words of a first turn. " * 4)
    message = world.encode("And a second message.")
    turn = bench.follow_up_round(our_server.url, turn1, message, 8, 0, world)
    # the answer's ids came back from the logprobs (else turn 2 would not extend turn 1 and nothing would be cached)
    assert turn.cached_tokens >= len(turn1), turn
    assert turn.ttft_s > 0 and turn.first_ttft_s > 0
    # the send comes after the call (the client's own work on the ids between), the first text after both
    assert 0 < turn.sent_ttft_s < turn.ttft_s


def test_answer_ids_from_our_logprobs_shape(world):
    ids = world.encode("héllo wörld 🎉")
    text_or_bytes = []
    for i in ids:
        data = world.token_bytes(i)
        try:
            text_or_bytes.append(data.decode("utf-8"))
        except UnicodeDecodeError:
            text_or_bytes.append("bytes:" + "".join(f"\\x{b:02x}" for b in data))
    assert any(t.startswith("bytes:") for t in text_or_bytes), "the case of a token that is not whole UTF-8"
    assert bench.answer_ids({"tokens": text_or_bytes}, world) == ids


@pytest.mark.skipif(llamacpp.built(llamacpp.SERVER) is None,
                    reason=f"llama-server is not built in {llamacpp.CACHE} (python bench/llamacpp.py --server)")
def test_bench_llamaserver_quick_run_prints_both_servers():
    done = subprocess.run([sys.executable, "bench/bench_llamaserver.py", "--quick"], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| f")]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [("fp32", "rwkv_lm"), ("f32", "llama.cpp")], done.stdout
    assert sum(line.startswith(("- PASS", "- FAIL")) for line in done.stdout.splitlines()) == 2, done.stdout
