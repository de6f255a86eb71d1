"""Serving on several replicas (issue 22): `rwkv-lm serve --replicas 2` (Ray Serve, one thread per replica)
against one replica with two threads and one with one thread, on the same 2-core machine; and, on the two
replicas, follow-up turns routed by conversation (affinity) against routed at random.

Random weights of the 0.1B shape (12 layers, width 768, vocab 65536; `--shape small`: 6 layers, width 512),
fp32, CPU, the World tokenizer; the
checkpoint lives in a temporary directory. Each run: `--conversations` concurrent chats of `--turns` turns
through the official `openai` client (async, streaming), each turn waiting for the one before; the first user
message has ~`--first-tokens` tokens, later ones ~40, replies `--max-tokens` tokens (greedy, the chat template's
end of turn may end one sooner), so a conversation reaches ~1,000 tokens by its last turn. Every run's texts
are its own (a number in each message), so no run finds another's states in a cache.

- tokens/s: completion tokens of all turns / wall time of the run.
- TTFT: from sending a request to its first text; "follow-up": turns 2 and later.
- Random routing: each request carries a fresh random `X-Session-Id`, which the affinity router hashes like
  any key: a uniformly random replica per request, the same deployment otherwise.

    python bench/bench_cluster.py                  # the table (about a quarter of an hour on two cores)
    python bench/bench_cluster.py --quick          # a smoke run: tiny model, 4 conversations of 2 turns
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench_cpu import machine  # noqa: E402
from bench_serve import SHAPES, WORDS  # noqa: E402

from rwkv_lm import RWKVConfig, save  # noqa: E402
from rwkv_lm.testing import random_model  # noqa: E402

# "small": a quarter of the 0.1B shape's work per token, for a machine too busy to run the 0.1B in time
SHAPES = {**SHAPES, "small": RWKVConfig(vocab_size=65536, n_layer=6, n_embd=512)}


@dataclass
class Run:
    wall_s: float = 0.0
    tokens: int = 0
    first_ttft: list[float] = field(default_factory=list)
    followup_ttft: list[float] = field(default_factory=list)
    followup_prompt: int = 0
    followup_cached: int = 0

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


async def converse(client, i: int, tag: str, args, run: Run, random_routing: bool):
    rng = random.Random(f"{tag}-{i}")
    messages = [{"role": "user", "content": f"Note {tag}-{i}. " + text(rng, args.first_tokens)}]
    for turn in range(args.turns):
        headers = {"x-session-id": uuid.uuid4().hex} if random_routing else {}
        sent = time.perf_counter()
        first, reply, usage = None, [], None
        stream = await client.chat.completions.create(model="bench", messages=messages, max_tokens=args.max_tokens,
                                                      temperature=0, stream=True, extra_headers=headers,
                                                      stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter() - sent
                reply.append(chunk.choices[0].delta.content)
        run.tokens += usage.completion_tokens
        if turn == 0:
            run.first_ttft.append(first)
        else:
            run.followup_ttft.append(first)
            run.followup_prompt += usage.prompt_tokens
            run.followup_cached += usage.prompt_tokens_details.cached_tokens
        messages += [{"role": "assistant", "content": "".join(reply).strip() or "."},
                     {"role": "user", "content": text(rng, 40) + "?"}]


async def workload(url: str, tag: str, args, random_routing: bool = False) -> Run:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)
    run = Run()
    start = time.perf_counter()
    await asyncio.gather(*(converse(client, i, tag, args, run, random_routing) for i in range(args.conversations)))
    run.wall_s = time.perf_counter() - start
    await client.close()
    return run


def warm_up(url: str, replicas: int) -> None:
    """One short request to each replica: the first request of a process pays for loading code."""
    import openai

    from rwkv_lm.serve.routing import rendezvous

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    for rank in range(replicas):
        session = next(f"warm-{i}" for i in range(1000) if rendezvous(f"session:warm-{i}", list(range(replicas))) == rank)
        client.chat.completions.create(model="bench", messages=[{"role": "user", "content": "Hello"}], max_tokens=4,
                                       extra_headers={"x-session-id": session})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, proc=None, timeout_s: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up in {timeout_s} s")


def single_server(model: Path, threads: int, args, tags: list[str]) -> list[Run]:
    """A plain `rwkv-lm serve` with `threads` torch threads; one run per tag."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "rwkv_lm.cli", "serve", "--model", str(model), "--port", str(port),
                             "--model-name", "bench"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_up(url, proc)
        warm_up(url, 1)
        return [asyncio.run(workload(url, tag, args)) for tag in tags]
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def two_replicas(model: Path, args, tags: list[str]) -> list[tuple[Run, Run]]:
    """`--replicas 2` (one CPU, one thread each); per tag, (affinity, random routing), interleaved."""
    import ray
    from ray import serve

    from rwkv_lm.serve.cluster import ClusterOptions, build_app

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(ClusterOptions(model=str(model), replicas=2, replica_cpus=1, model_name="bench")),
                  name="rwkv_lm", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        wait_up(url)
        warm_up(url, 2)
        return [(asyncio.run(workload(url, tag + "a", args)), asyncio.run(workload(url, tag + "r", args, True)))
                for tag in tags]
    finally:
        serve.shutdown()
        ray.shutdown()


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def p90(xs: list[float]) -> float:
    return sorted(xs)[int(0.9 * (len(xs) - 1))] if xs else float("nan")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--conversations", type=int, default=32)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--first-tokens", type=int, default=700, help="words in the first user message (~1 token each)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--shape", choices=sorted(SHAPES), default="0.1B")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--routing-only", action="store_true", help="only the two replicas, affinity against random")
    args = p.parse_args()
    shape = args.shape
    if args.quick:
        shape, args.conversations, args.turns, args.first_tokens, args.max_tokens = "tiny", 4, 2, 100, 8

    print(f"machine: {machine()}")
    tags = [f"round{r}" for r in range(args.rounds)]
    with tempfile.TemporaryDirectory() as tmp:
        model = save(random_model(SHAPES[shape], seed=0), Path(tmp) / "bench.safetensors", tokenizer="world")
        replicas = two_replicas(model, args, tags)
        rows = [("2 replicas x 1 thread, affinity", [a for a, _ in replicas]),
                ("2 replicas x 1 thread, random routing", [r for _, r in replicas])]
        if not args.routing_only:
            rows += [("1 replica x 2 threads", single_server(model, 2, args, tags)),
                     ("1 replica x 1 thread", single_server(model, 1, args, tags))]
    print(f"\n{args.conversations} conversations x {args.turns} turns, first message ~{args.first_tokens} tokens, "
          f"replies <= {args.max_tokens} tokens, {shape} fp32; best round by tokens/s, TTFT over all rounds\n")
    print("| setup | tokens/s | TTFT turn 1 median | follow-up TTFT median | mean | p90 | follow-up prompt tokens cached |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    followup = {}
    for name, runs in rows:
        ttft_first = [t for r in runs for t in r.first_ttft]
        ttft_next = [t for r in runs for t in r.followup_ttft]
        cached = sum(r.followup_cached for r in runs) / max(1, sum(r.followup_prompt for r in runs))
        followup[name] = ttft_next
        print(f"| {name} | {max(r.tok_s for r in runs):.1f} | {median(ttft_first):.2f} s | {median(ttft_next):.2f} s "
              f"| {statistics.mean(ttft_next):.2f} s | {p90(ttft_next):.2f} s | {cached:.0%} |")
    affinity, spread = followup[rows[0][0]], followup[rows[1][0]]
    print(f"\nfollow-up TTFT, affinity / random routing: median {median(affinity) / median(spread):.2f}, "
          f"mean {statistics.mean(affinity) / statistics.mean(spread):.2f}, p90 {p90(affinity) / p90(spread):.2f} "
          "(goal <= 0.33)")
    print(f"command: python bench/bench_cluster.py {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
