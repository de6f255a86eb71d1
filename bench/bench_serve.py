"""Serving speed of rwkv_lm.serve (issue 10): many concurrent streams through one Engine, over the Python API
and over HTTP, against the same requests run one after another; and the prefix state cache, hit against miss.

Random weights of the 0.1B shape (12 layers, width 768, vocab 65536), fp32, CPU, through rwkv_lm.runtime.cpu.optimize
(what `rwkv-lm serve` runs), the World tokenizer. One run gives every number and prints them with the command;
it writes nothing (the checkpoint the server loads lives in a temporary directory).

    python bench/bench_serve.py              # the table (a few minutes on two cores)
    python bench/bench_serve.py --quick      # a smoke run: 1 and 16 streams, few tokens, one round

- Throughput: at each level N, N clients each send `--requests` completions one after another (a closed loop),
  every prompt unique in the run (so the cache never answers one), `--max-tokens` tokens each at temperature 1.
  Aggregate tokens/s = tokens generated / wall time from the first submission to the last token. Time to first
  token = from the client's submission (the HTTP request sent) to the first text it receives.
  (a) API: one started Engine, a thread per client reading its Stream; (b) HTTP: `rwkv-lm serve` in a
  subprocess, the `openai` client's async streaming completions (SSE), all clients in one event loop;
  (c) one at a time: the requests of the 16-stream level through the same Engine, each waiting for the last.
- Prefix cache: a prompt of a 2,000-token prefix plus a short suffix, through a fresh Engine each round. The
  first such prompt misses (cold cache), the second finds where it branches from the first and keeps the state
  there, the third and later hit at the branch and read only their suffix. Time to first token is the engine's
  (`Stream.first_token_s`: submission to the first token drawn), one request at a time, nothing else running.
- What agents send (issue 19; `--features-only` runs just these): (d) constrained against free decode: B rows
  of the same prompt, each held to a JSON schema whose string goes on (at least 1,000 characters, so every
  step computes a mask and no row ends early) or free, `--max-tokens` tokens; milliseconds per batched step from the last row's first
  token to the end, through the caller's thread. (e) n=8 continuations of one ~1,000-token prompt (read once,
  the state forked) against 8 separate requests for it, submitted together, no prefix cache; time from
  submission to the last token, and prompt tokens read.
"""
from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench_cpu import machine  # noqa: E402

from rwkv_lm import RWKVConfig, SamplingParams, save  # noqa: E402
from rwkv_lm.runtime.cpu import optimize  # noqa: E402
from rwkv_lm.sampling import RowSampler, sample  # noqa: E402
from rwkv_lm.serve import Engine, Request, StateCache  # noqa: E402
from rwkv_lm.serve.grammar import Grammar  # noqa: E402
from rwkv_lm.testing import random_model  # noqa: E402
from rwkv_lm.tokenizer import load_tokenizer  # noqa: E402

SHAPES = {"0.1B": RWKVConfig(vocab_size=65536, n_layer=12, n_embd=768),
          "tiny": RWKVConfig(vocab_size=65536, n_layer=2, n_embd=64, head_size=16)}  # for a smoke test
CACHE_BYTES = 512 * 2**20  # what `rwkv-lm serve` keeps by default
WORDS = ("the of and to in is that it was for on are as with his they at be this from have or by one had not but what "
         "all were when we there can an your which their said if do will each about how up out them then she many some "
         "so these would other into has more her two like him see time could no make than first been its who now people "
         "my made over did down only way find use may water long little very after words called just where most know").split()


@dataclass
class Run:
    """One level of one side: how long it took, how many tokens came, each request's time to first text."""

    wall_s: float
    tokens: int
    ttft_s: list[float]
    mean_batch: float = float("nan")

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s


@dataclass
class Cell:
    """The rounds of one level of one side: best tokens/s, TTFT over every request of every round."""

    runs: list[Run] = field(default_factory=list)

    @property
    def best(self) -> Run:
        return max(self.runs, key=lambda r: r.tok_s)

    def ttft(self, q: float) -> float:
        return percentile([t for r in self.runs for t in r.ttft_s], q)


def percentile(values, q: float) -> float:
    """Nearest rank: the smallest value with at least q% of the values at or below it."""
    values = sorted(values)
    return values[max(0, math.ceil(q / 100 * len(values)) - 1)]


class Prompts:
    """Texts of about `length` tokens, each unique in the run (a number first, then random words)."""

    def __init__(self, tokenizer, length: int):
        self.tokenizer, self.length, self.count, self.rng = tokenizer, length, 0, random.Random(0)

    def take(self, n: int) -> list[str]:
        texts = []
        for _ in range(n):
            self.count += 1
            text = f"{self.count}."
            while len(self.tokenizer.encode(text)) < self.length:
                text += " " + self.rng.choice(WORDS)
            texts.append(text)
        return texts


def sampling(max_tokens: int, seed: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed)


def run_api(engine: Engine, tokenizer, texts: list[str], clients: int, max_tokens: int) -> Run:
    """`clients` threads, each sending its share of `texts` one after another through the engine's Python API."""
    ttft, tokens, lock = [], [0], threading.Lock()

    def client(mine: list[str]):
        for i, text in enumerate(mine):
            sent = time.perf_counter()
            stream = engine.submit(Request(tokenizer.encode(text), sampling(max_tokens, seed=i)))
            first = None
            for _ in stream:
                if first is None:
                    first = time.perf_counter() - sent
            if stream.error is not None:
                raise stream.error
            with lock:
                ttft.append(first if first is not None else float("nan"))
                tokens[0] += stream.completion_tokens

    steps, rows = engine.counters.decode_steps, engine.counters.decode_step_rows
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, [texts[c::clients] for c in range(clients)]))
    wall = time.perf_counter() - start
    steps, rows = engine.counters.decode_steps - steps, engine.counters.decode_step_rows - rows
    return Run(wall, tokens[0], ttft, rows / max(steps, 1))


async def _run_http(base_url: str, texts: list[str], clients: int, max_tokens: int) -> Run:
    import httpx
    from openai import AsyncOpenAI

    ttft, tokens = [], [0]
    async with AsyncOpenAI(base_url=base_url + "/v1", api_key="bench", max_retries=0, timeout=600) as client:
        async def one(text: str, seed: int):
            sent = time.perf_counter()
            stream = await client.completions.create(model="bench", prompt=text, max_tokens=max_tokens, temperature=1.0,
                                                     seed=seed, stream=True, stream_options={"include_usage": True})
            first = None
            async for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].text:
                    first = time.perf_counter() - sent
                if chunk.usage is not None:
                    tokens[0] += chunk.usage.completion_tokens
            ttft.append(first if first is not None else float("nan"))

        async def run_client(mine: list[str]):
            for i, text in enumerate(mine):
                await one(text, seed=i)

        async with httpx.AsyncClient(base_url=base_url) as raw:
            before = (await raw.get("/health")).json()
            start = time.perf_counter()
            await asyncio.gather(*(run_client(texts[c::clients]) for c in range(clients)))
            wall = time.perf_counter() - start
            after = (await raw.get("/health")).json()
    steps = after["decode_steps"] - before["decode_steps"]
    return Run(wall, tokens[0], ttft, (after["decode_step_rows"] - before["decode_step_rows"]) / max(steps, 1))


def run_http(base_url, texts, clients, max_tokens) -> Run:
    return asyncio.run(_run_http(base_url, texts, clients, max_tokens))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server in a subprocess on a free port that answers GET /health with 200 once it serves: `rwkv-lm serve`
    (`Server.rwkv_lm`, the settings of the in-process engine) or a peer (bench_llamaserver.py's llama-server)."""

    def __init__(self, command: list[str], port: int, log: Path, env: dict | None = None):
        self.port, self.url, self.log = port, f"http://127.0.0.1:{port}", log
        with open(log, "w") as out:
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)

    @classmethod
    def rwkv_lm(cls, checkpoint: Path, threads: int, max_batch: int, log: Path, dtype: str = "fp32") -> "Server":
        port = free_port()
        command = [sys.executable, "-m", "rwkv_lm.cli", "serve", "--model", str(checkpoint), "--tokenizer", "world",
                   "--dtype", dtype, "--port", str(port), "--max-batch", str(max_batch), "--max-queue", "1024",
                   "--state-cache-mb", str(CACHE_BYTES // 2**20)]
        return cls(command, port, log, {**os.environ, "OMP_NUM_THREADS": str(threads)})

    def wait_ready(self, timeout_s: float = 300) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"the server did not answer /health within {timeout_s:.0f} s:\n{self.log.read_text()}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


@torch.no_grad()
def best_ms(fn, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return 1000 * best


@dataclass
class CacheRound:
    miss: float  # cold cache
    branch: float  # the second prompt: a shorter cached prefix, then the rest of the shared part
    hits: list[float]  # the third and later
    uncached: float  # the same prompt on an engine without a cache
    hit_tokens: int  # prompt tokens the hits read (the rest came from the cache)


def prefix_cache_round(model, tokenizer, prefix_len: int, suffix_len: int, hits: int, rng: random.Random) -> CacheRound:
    """Prompts sharing a `prefix_len`-token beginning, each a different `suffix_len`-token end, one at a time."""
    vocab = model.config.vocab_size
    prefix = [rng.randrange(1, vocab) for _ in range(prefix_len)]
    suffixes = [[first] + [rng.randrange(1, vocab) for _ in range(suffix_len - 1)]  # they differ at their first token
                for first in rng.sample(range(1, vocab), hits + 3)]

    def first_token_s(engine: Engine, suffix: list[int]) -> tuple[float, int]:
        stream = engine.submit(Request(prefix + suffix, SamplingParams(max_tokens=1, temperature=0)))
        stream.text()
        return stream.first_token_s, stream.prompt_tokens - stream.cached_tokens

    with Engine(model, tokenizer, max_batch=1, cache=0) as engine:
        uncached, _ = first_token_s(engine, suffixes[0])
    with Engine(model, tokenizer, max_batch=1, cache=StateCache(CACHE_BYTES)) as engine:
        miss, _ = first_token_s(engine, suffixes[1])
        branch, _ = first_token_s(engine, suffixes[2])
        times, read = zip(*(first_token_s(engine, s) for s in suffixes[3:]))
        assert engine.cache.stats()["hits"] == hits + 1, engine.cache.stats()
    return CacheRound(miss, branch, list(times), uncached, max(read))


# a string that cannot end within the run: every step of every row computes a mask, and no row ends early
LONG_STRING = Grammar.json_schema({"type": "object", "properties": {"story": {"type": "string", "minLength": 1000}},
                                   "required": ["story"]})


def decode_ms(model, tokenizer, rows: int, max_tokens: int, grammar) -> float:
    """Milliseconds per batched step once every row decodes (constrained by `grammar`, or free)."""
    engine = Engine(model, tokenizer, max_batch=rows)
    prompt = tokenizer.encode("Write a JSON object:")
    streams = [engine.submit(Request(prompt, sampling(max_tokens, seed), end_tokens=(), grammar=grammar))
               for seed in range(rows)]
    for stream in streams:
        stream.text()
    ended = time.perf_counter()
    started = max(s.submitted + s.first_token_s for s in streams)
    assert all(s.completion_tokens == max_tokens for s in streams), "a row ended early"
    return 1000 * (ended - started) / (max_tokens - 1)


def fork_s(model, tokenizer, prompt: list[int], n: int, max_tokens: int, forked: bool) -> tuple[float, int]:
    """(seconds from submission to the last token, prompt tokens read) for n continuations of one prompt."""
    engine = Engine(model, tokenizer, max_batch=n)
    start = time.perf_counter()
    request = Request(prompt, sampling(max_tokens, 0), end_tokens=())
    streams = engine.submit_n(request, n) if forked else [engine.submit(request) for _ in range(n)]
    for stream in streams:
        stream.text()
    return time.perf_counter() - start, engine.counters.prompt_tokens


def features_table(model, tokenizer, args) -> list[str]:
    """Constrained vs free decode at B=1 and 16, n=8 vs 8 requests: the table's lines."""
    batches = [1, 16] if not args.quick else [1, 4]
    decode_ms(model, tokenizer, 2, 4, LONG_STRING)  # first calls (the grammar's view of the vocabulary)
    steps = {(b, c): [] for b in batches for c in (False, True)}
    for _ in range(args.rounds):
        for b in batches:
            for constrained in (False, True):
                steps[b, constrained].append(decode_ms(model, tokenizer, b, args.max_tokens, LONG_STRING if constrained else None))
    prompt = tokenizer.encode(Prompts(tokenizer, 1000 if not args.quick else 64).take(1)[0])
    n = 8
    forks = {True: [], False: []}
    for _ in range(args.rounds):
        for forked in (True, False):
            forks[forked].append(fork_s(model, tokenizer, prompt, n, args.max_tokens // 2, forked))
    lines = ["| rows | free ms/step | JSON-schema ms/step | constrained / free |", "|---:|---:|---:|---:|"]
    for b in batches:
        free, held = min(steps[b, False]), min(steps[b, True])
        lines.append(f"| {b} | {free:.1f} | {held:.1f} | {held / free:.2f}x |")
    one, eight = min(forks[True]), min(forks[False])
    ratio = one[0] / eight[0]
    lines += ["", f"| {n} continuations of a {len(prompt)}-token prompt, {args.max_tokens // 2} tokens each | seconds | "
                  "prompt tokens read |", "|---|---:|---:|",
              f"| n={n}, one request (prompt read once, state forked) | {one[0]:.2f} | {one[1]:,} |",
              f"| {n} separate requests | {eight[0]:.2f} | {eight[1]:,} |",
              "", f"- {'PASS' if ratio <= 0.5 else 'FAIL'}: n={n} takes {ratio:.2f} of the time of {n} requests (goal <= 1/2)",
              f"- {'PASS' if min(steps[batches[-1], True]) <= 1.15 * min(steps[batches[-1], False]) else 'FAIL'}: "
              f"a JSON-schema row costs {min(steps[batches[-1], True]) / min(steps[batches[-1], False]) - 1:+.0%} per step "
              f"at B={batches[-1]} (goal <= +15%)",
              f"- spread over {args.rounds} interleaved rounds (ms/step, free at B={batches[-1]}): "
              f"{min(steps[batches[-1], False]):.1f} - {max(steps[batches[-1], False]):.1f}"]
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8, 16, 32], help="concurrency levels")
    parser.add_argument("--requests", type=int, default=2, help="requests each client sends, one after another")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens generated per request")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="about this many tokens per prompt")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of every measurement, interleaved")
    parser.add_argument("--prefix-tokens", type=int, default=2000, help="the shared prefix of the cache measurement")
    parser.add_argument("--suffix-tokens", type=int, default=32, help="what follows it in each prompt")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, here and in the server")
    parser.add_argument("--max-batch", type=int, default=32, help="rows the engine decodes together (here and in the server)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="0.1B")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 and 16 streams, 8 tokens, one round")
    parser.add_argument("--features-only", action="store_true", help="only constrained decode and n=8 (issue 19)")
    args = parser.parse_args()
    if args.quick:
        args.streams, args.requests, args.max_tokens, args.rounds = [1, 16], 1, 8, 1
    torch.set_num_threads(args.threads)
    host = machine()
    load_start = os.getloadavg()
    command = "python bench/bench_serve.py " + " ".join(sys.argv[1:])
    print(host)

    tokenizer = load_tokenizer("world")
    plain = random_model(SHAPES[args.shape])
    if args.features_only:
        features = features_table(optimize(plain), tokenizer, args)
        load_end = os.getloadavg()
        print("\n".join(features + [
            "", f"Machine: {host}; load average {load_start[0]:.1f} / {load_end[0]:.1f} at the start / end.",
            f"Command: `{command.strip()}` ({args.shape} shape, random weights, fp32, temperature 1, "
            f"{args.max_tokens} tokens per constrained/free row; best of {args.rounds} interleaved rounds; "
            f"{args.threads} torch threads)."]))
        return
    reference = 16 if 16 in args.streams else max(args.streams)
    prompts = Prompts(tokenizer, args.prompt_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = save(plain, Path(tmp) / "bench.safetensors", tokenizer="world")
        server = Server.rwkv_lm(checkpoint, args.threads, args.max_batch, Path(tmp) / "server.log")
        try:
            model = optimize(plain)
            engine = Engine(model, tokenizer, max_batch=args.max_batch, max_queue=1024, cache=CACHE_BYTES).start()
            server.wait_ready()
            warm = max(args.streams)  # first calls of every path (the kernels, torch's B > 16 ops, the server)
            run_api(engine, tokenizer, prompts.take(warm), warm, 4)
            run_http(server.url, prompts.take(warm), warm, 4)

            api, http, alone = {n: Cell() for n in args.streams}, {n: Cell() for n in args.streams}, Cell()
            for _ in range(args.rounds):
                alone.runs.append(run_api(engine, tokenizer, prompts.take(reference * args.requests), 1, args.max_tokens))
                for n in args.streams:
                    api[n].runs.append(run_api(engine, tokenizer, prompts.take(n * args.requests), n, args.max_tokens))
                    http[n].runs.append(run_http(server.url, prompts.take(n * args.requests), n, args.max_tokens))
            engine.stop()
        finally:
            server.stop()

    rng = random.Random(1)
    cache_rounds = [prefix_cache_round(model, tokenizer, args.prefix_tokens, args.suffix_tokens, 3, rng)
                    for _ in range(args.rounds + 1)]
    features = features_table(model, tokenizer, args)
    load_end = os.getloadavg()

    one = alone.best.tok_s
    ms = lambda s: f"{1000 * s:,.0f}"  # noqa: E731
    rows = [f"| {'streams':>7} | {'API tok/s':>9} | {'x one at a time':>15} | {'API TTFT p50 / p99 ms':>21} | {'mean batch':>10} "
            f"| {'HTTP tok/s':>10} | {'HTTP / API':>10} | {'HTTP TTFT p50 / p99 ms':>22} |",
            f"|{'-' * 8}:|{'-' * 10}:|{'-' * 16}:|{'-' * 22}:|{'-' * 11}:|{'-' * 11}:|{'-' * 11}:|{'-' * 23}:|"]
    rows.append(f"| {'1 by 1':>7} | {one:9.1f} | {1:14.2f}x | {ms(alone.ttft(50)) + ' / ' + ms(alone.ttft(99)):>21} "
                f"| {alone.best.mean_batch:10.1f} | {'':>10} | {'':>10} | {'':>22} |")
    for n in args.streams:
        a, h = api[n], http[n]
        rows.append(f"| {n:>7} | {a.best.tok_s:9.1f} | {a.best.tok_s / one:14.2f}x | "
                    f"{ms(a.ttft(50)) + ' / ' + ms(a.ttft(99)):>21} | {a.best.mean_batch:10.1f} | {h.best.tok_s:10.1f} | "
                    f"{h.best.tok_s / a.best.tok_s:9.0%} | {ms(h.ttft(50)) + ' / ' + ms(h.ttft(99)):>22} |")

    med = lambda xs: statistics.median(xs)  # noqa: E731
    miss, hit = med([r.miss for r in cache_rounds]), med([t for r in cache_rounds for t in r.hits])
    branch, uncached = med([r.branch for r in cache_rounds]), med([r.uncached for r in cache_rounds])
    P, S = args.prefix_tokens, args.suffix_tokens
    ratio_streams = api[reference].best.tok_s / one
    ratio_http = http[reference].best.tok_s / api[reference].best.tok_s
    verdict = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    lines = rows + [
        "",
        f"- prefix cache, {P}-token shared prefix + {S}-token suffix, time to first token (median of {len(cache_rounds)} "
        f"rounds): miss (cold cache) {ms(miss)} ms, no cache at all {ms(uncached)} ms, second prompt (cached at "
        f"{P // 256 * 256}, branch point found) {ms(branch)} ms, hit (third and later; reads {cache_rounds[0].hit_tokens} "
        f"tokens) {ms(hit)} ms: hit = 1/{miss / hit:.0f} of the miss",
        f"- {verdict(ratio_streams >= 6)}: {reference} concurrent streams {ratio_streams:.2f}x the tokens/s of one at a time "
        "(goal >= 6x)",
        f"- {verdict(ratio_http >= 0.9)}: HTTP {ratio_http:.0%} of the Python API's tokens/s at {reference} streams (goal >= 90%)",
        f"- {verdict(hit <= miss / 20)}: cache hit's first token in 1/{miss / hit:.0f} of the miss's time (goal <= 1/20)",
        "",
        f"Machine: {host}; load average {load_start[0]:.1f} / {load_start[1]:.1f} / {load_start[2]:.1f} at the start, "
        f"{load_end[0]:.1f} / {load_end[1]:.1f} / {load_end[2]:.1f} at the end.",
        f"Command: `{command.strip()}` ({args.shape} shape, random weights, fp32; {args.requests} requests per client of "
        f"~{args.prompt_tokens} prompt tokens and {args.max_tokens} tokens each at temperature 1; best tokens/s of "
        f"{args.rounds} interleaved rounds, TTFT over every request of every round; max batch {args.max_batch}, "
        f"{args.threads} torch threads).",
        "", "What agents send (constrained decode, n continuations):", "", *features,
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
