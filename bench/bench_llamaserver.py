"""Serving beside llama-server (issue 20): `rwkv-lm serve --max-batch 16` against `llama-server -np 16` (16 slots,
continuous batching), the same random weights on both (ours saved with `rwkv_lm.save`, theirs exported from the same
model with `rwkv_lm.export_gguf`), at the same precision (fp32 / F32, int8 / Q8_0), one client for both.

The client is the `openai` package's async client, the same requests to both servers: prompts as token ids (the
World vocabulary; both servers read the same ids), greedy, `ignore_eos` so every answer is `--max-tokens` long,
`cache_prompt` and `id_slot` (llama-server's prompt cache and slot; our server ignores fields it does not know).

- Streams: 16 clients at once, one streaming completion each of ~32 prompt tokens (unique in the run) and 128
  tokens. Aggregate tokens/s = tokens / wall time from the first request sent to the last token; time to first
  token (TTFT) = from a request sent to the first text received.
- Follow-up turn: `--conversations` of them a round (3), one at a time, nothing else running. Turn 1: a prompt
  of ~1,000 tokens and a 128-token answer (its token ids: our logprobs; llama-server's /completion `tokens`).
  Turn 2: turn 1's prompt + answer + a new ~32-token message, as a chat client re-sends it; its TTFT is what our prefix state cache and llama-server's slot
  prompt cache (with its context checkpoints for recurrent models) are for. Turn 1's TTFT is the uncached reference.
  Turn 2's TTFT is also given from the moment its HTTP request left the client (an httpx hook): before sending, the
  openai client walks every id of the prompt through its type-driven transform, 10-25 ms of its own Python for
  1,160 ids (Zen 4 and Zen 2 EPYCs), the same for both servers; the goals' lines give the run's own median.

Rounds alternate which server goes first; the table gives medians over the rounds (the follow-ups: over every
conversation, each ratio ours / theirs on the same conversation) and the goals' lines.

    python bench/bench_llamaserver.py            # both precisions (builds llama-server once: see bench/llamacpp.py)
    python bench/bench_llamaserver.py --write    # and put the table at the end of bench/RESULTS.md
    python bench/bench_llamaserver.py --quick    # a smoke run: tiny model, 4 streams, few tokens, one round
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llamacpp  # noqa: E402
from bench_cpu import machine  # noqa: E402
from bench_llamacpp import write_at_end  # noqa: E402
from bench_serve import SHAPES, Prompts, Server, free_port, percentile  # noqa: E402

import rwkv_lm  # noqa: E402
from rwkv_lm.testing import random_model  # noqa: E402
from rwkv_lm.tokenizer import load_tokenizer  # noqa: E402

SECTION = "## Serving beside llama-server: bench_llamaserver.py"
PRECISIONS = {"fp32": "f32", "int8": "q8_0", "bf16": "bf16"}  # our --dtype -> the GGUF type llama-server runs beside it
# the fields both servers get: a fixed-length answer, llama-server's prompt cache on (our server ignores it)
EXTRA = {"ignore_eos": True, "cache_prompt": True}
INTRO = """`rwkv-lm serve --max-batch 16` against `llama-server -np 16 -c 32768 -cb --cache-prompt` (16 slots of 2,048
tokens, continuous batching, prompt cache; llama-server built from the llama-cpp-python sdist by
`python bench/llamacpp.py --server`), the same random 0.1B-shaped weights (ours `rwkv_lm.save`, theirs
`rwkv_lm.export_gguf` of the same model with the World vocabulary), the same precision on both (fp32 / F32,
int8 / Q8_0; bf16 / BF16 with `--precisions`), one client (the `openai` package) sending both the same token ids with the same fields (greedy,
`ignore_eos`, `cache_prompt`, `id_slot`). Ratios: **ours / llama-server** (tokens/s: > 1 we are faster; follow-up
TTFT: < 1 we are faster)."""


@dataclass
class Streams:
    wall_s: float
    tokens: int
    ttft_s: list[float]

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s


@dataclass
class FollowUp:
    first_ttft_s: float  # turn 1: nothing cached
    ttft_s: float  # turn 2: turn 1's prompt and answer may be cached; from the client's call
    sent_ttft_s: float  # turn 2, from the moment its HTTP request left the client (the server's part alone)
    cached_tokens: int | None  # what the server says it took from its cache for turn 2 (None: it does not say)


@dataclass
class Stream:
    ttft_s: float  # from the client's call
    sent_ttft_s: float  # from the request leaving the client: the openai client first walks every prompt token
    tokens: int  # through its type-driven transform, 10-25 ms of its own Python for a 1,160-id prompt
    cached_tokens: int | None


async def _stream(client, prompt: list[int], max_tokens: int, slot: int | None = None) -> Stream:
    """One streaming completion, timed from the call and from its HTTP request's sending."""
    called, tag = time.perf_counter(), str(next(_TAGS))
    extra = EXTRA if slot is None else {**EXTRA, "id_slot": slot}
    stream = await client.completions.create(model="bench", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True, stream_options={"include_usage": True}, extra_body=extra,
                                             extra_headers={SENT_TAG: tag})
    first, tokens, cached = None, 0, None
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].text:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
            details = chunk.usage.prompt_tokens_details
            cached = None if details is None else details.cached_tokens
    sent = client.sent_at.pop(tag)
    if first is None:
        return Stream(float("nan"), float("nan"), tokens, cached)
    return Stream(first - called, first - sent, tokens, cached)


SENT_TAG = "x-bench-request"  # a header naming each request, so the client's send hook can stamp when it left
_TAGS = itertools.count()


def _client(url: str):
    """The openai async client, over an httpx client whose request hook notes when each request is sent
    (`client.sent_at[tag]`)."""
    from openai import AsyncOpenAI, DefaultAsyncHttpxClient

    sent_at = {}

    async def note_sent(request):
        if SENT_TAG in request.headers:
            sent_at[request.headers[SENT_TAG]] = time.perf_counter()

    # (the openai client's own httpx defaults: its connection limits and redirects, with the hook added)
    http = DefaultAsyncHttpxClient(timeout=3600, event_hooks={"request": [note_sent]})
    client = AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=3600, http_client=http)
    client.sent_at = sent_at
    return client


async def _streams(url: str, prompts: list[list[int]], max_tokens: int) -> Streams:
    async with _client(url) as client:
        start = time.perf_counter()
        done = await asyncio.gather(*(_stream(client, p, max_tokens) for p in prompts))
        wall = time.perf_counter() - start
    counts = [d.tokens for d in done]
    if counts != [max_tokens] * len(prompts):
        raise RuntimeError(f"{url}: answers of {counts} tokens, not {max_tokens} each (ignore_eos not honoured?)")
    return Streams(wall, sum(counts), [d.ttft_s for d in done])


def streams_round(url: str, prompts: list[list[int]], max_tokens: int) -> Streams:
    """All `prompts` sent at once as streaming completions of `max_tokens` tokens each."""
    return asyncio.run(_streams(url, prompts, max_tokens))


def answer_ids(logprobs: dict, tokenizer) -> list[int]:
    """The token ids of our server's answer from its completions logprobs (OpenAI's shape: the tokens as text, or
    "bytes:\\xNN..." where a token is not whole UTF-8)."""
    ids = {tokenizer.token_bytes(i): i for i in range(tokenizer.vocab_size)}
    pieces = [bytes.fromhex(t[6:].replace("\\x", "")) if t.startswith("bytes:") else t.encode("utf-8")
              for t in logprobs["tokens"]]
    return [ids[p] for p in pieces]


async def _answer(client, url: str, prompt: list[int], max_tokens: int, slot: int, tokenizer,
                  llama_server: bool) -> list[int]:
    """The token ids of a greedy answer. llama-server's logprobs leave out tokens that end inside a UTF-8 character,
    so its ids come from its own /completion endpoint (`return_tokens`); ours from the completions logprobs."""
    if llama_server:
        import httpx

        async with httpx.AsyncClient(timeout=3600) as raw:
            done = await raw.post(url + "/completion", json={"prompt": prompt, "n_predict": max_tokens, "temperature": 0,
                                                             **EXTRA, "id_slot": slot, "return_tokens": True})
        done.raise_for_status()
        return done.json()["tokens"]
    answer = await client.completions.create(model="bench", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             logprobs=1, extra_body={**EXTRA, "id_slot": slot})
    return answer_ids(answer.choices[0].logprobs.model_dump(), tokenizer)


async def _follow_up(url: str, turn1: list[int], message: list[int], max_tokens: int, slot: int, tokenizer,
                     llama_server: bool) -> FollowUp:
    async with _client(url) as client:
        first = await _stream(client, turn1, 1, slot)  # TTFT of the uncached prompt
        ids = await _answer(client, url, turn1, max_tokens, slot, tokenizer, llama_server)
        if len(ids) != max_tokens:
            raise RuntimeError(f"{url}: an answer of {len(ids)} token ids, not {max_tokens}")
        turn2 = await _stream(client, turn1 + ids + message, 8, slot)
    return FollowUp(first.ttft_s, turn2.ttft_s, turn2.sent_ttft_s, turn2.cached_tokens)


def follow_up_round(url: str, turn1: list[int], message: list[int], max_tokens: int, slot: int, tokenizer, *,
                    llama_server: bool = False) -> FollowUp:
    """Turn 1 (its TTFT alone, then its answer), then turn 2 = turn 1 + the answer + `message`: TTFTs."""
    return asyncio.run(_follow_up(url, turn1, message, max_tokens, slot, tokenizer, llama_server))


def _counts(values: list) -> str:
    """`1129 (all 9)` where every value is one, else the values in order."""
    return f"{values[0]} (all {len(values)})" if len(set(values)) == 1 else ", ".join(map(str, values))


def llama_server(gguf: Path, threads: int, slots: int, ctx_per_slot: int, log: Path) -> Server:
    """llama-server on `gguf`: `slots` parallel slots of `ctx_per_slot` tokens each, continuous batching (its
    default), prompt cache on (its default), no web UI."""
    port = free_port()
    command = [str(llamacpp.build(llamacpp.SERVER) / "llama-server"), "-m", str(gguf), "--host", "127.0.0.1",
               "--port", str(port), "-np", str(slots), "-c", str(slots * ctx_per_slot), "-t", str(threads),
               "-tb", str(threads), "-cb", "--cache-prompt", "--no-webui", *(["--no-repack"] if llamacpp.AMX_CRASH else [])]
    return Server(command, port, log)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", default="fp32,int8", help=f"comma-separated, of {', '.join(PRECISIONS)}")
    parser.add_argument("--streams", type=int, default=16, help="concurrent clients (and slots / max batch)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per answer")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="about this many tokens per streams prompt")
    parser.add_argument("--conversation-tokens", type=int, default=1000, help="about the length of turn 1's prompt")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each measurement, interleaved")
    parser.add_argument("--conversations", type=int, default=3,
                        help="follow-up conversations a round (each its own turn 1: a first token is one sample)")
    parser.add_argument("--threads", type=int, default=2, help="threads of each server")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="0.1B")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny shape, 4 streams, 8 tokens, one round")
    parser.add_argument("--write", action="store_true", help="write the table at the end of bench/RESULTS.md")
    args = parser.parse_args()
    if args.quick:
        args.shape, args.streams, args.max_tokens, args.conversation_tokens, args.rounds = "tiny", 4, 8, 64, 1
        args.conversations = 1
        args.precisions = "fp32"
    precisions = args.precisions.split(",")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # a stopped run stops its servers too (the finally below)
    llamacpp.build(llamacpp.SERVER)
    host = machine()
    load_start = os.getloadavg()
    print(host, flush=True)

    tokenizer = load_tokenizer("world")
    model = random_model(SHAPES[args.shape])
    prompts = Prompts(tokenizer, args.prompt_tokens)
    rng = random.Random(2)
    results = {}  # (precision, side) -> (list of Streams, list of FollowUp)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = rwkv_lm.save(model, tmp / "bench.safetensors", tokenizer="world")
        for precision in precisions:
            gguf = rwkv_lm.export_gguf(model, tmp / f"bench-{PRECISIONS[precision]}.gguf", type=PRECISIONS[precision],
                                       tokenizer=tokenizer)
            ctx_per_slot = 1 << (args.conversation_tokens + 3 * args.max_tokens).bit_length()  # turn 2 fits a slot
            servers = {"rwkv_lm": Server.rwkv_lm(checkpoint, args.threads, args.streams, tmp / "ours.log", precision),
                       "llama.cpp": llama_server(gguf, args.threads, args.streams, ctx_per_slot, tmp / "llama.log")}
            try:
                for server in servers.values():
                    server.wait_ready()
                for server in servers.values():  # first calls of every path
                    streams_round(server.url, [tokenizer.encode(t) for t in prompts.take(args.streams)], 4)
                for side in servers:
                    results[precision, side] = ([], [])
                for r in range(args.rounds):
                    batch = [tokenizer.encode(t) for t in prompts.take(args.streams)]
                    conversations = []
                    for c in range(args.conversations):
                        turn1 = tokenizer.encode(Prompts(tokenizer, args.conversation_tokens).take(1)[0] + f" {r}.{c}")
                        turn1 = [rng.randrange(1, tokenizer.vocab_size)] + turn1  # one neither server has seen
                        conversations.append((turn1, tokenizer.encode(prompts.take(1)[0])))
                    for side in (list(servers) if r % 2 == 0 else list(servers)[::-1]):
                        url = servers[side].url
                        results[precision, side][0].append(streams_round(url, batch, args.max_tokens))
                        for c, (turn1, message) in enumerate(conversations):
                            slot = (r * args.conversations + c) % args.streams
                            results[precision, side][1].append(
                                follow_up_round(url, turn1, message, args.max_tokens, slot, tokenizer,
                                                llama_server=side == "llama.cpp"))
                    print(f"{precision} round {r + 1}/{args.rounds} done, load average {os.getloadavg()[0]:.1f}",
                          flush=True)
            finally:
                for server in servers.values():
                    server.stop()
    load_end = os.getloadavg()

    ms = lambda s: f"{1000 * s:,.0f}"  # noqa: E731
    med = statistics.median
    lines = [f"| precision | server | aggregate tok/s, {args.streams} streams | TTFT p50 / p90 ms | follow-up turn TTFT "
             "ms | follow-up TTFT from the send, ms | turn 1 TTFT ms (uncached) | follow-up prompt tokens cached |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    goals = []
    for precision in precisions:
        for side in ("rwkv_lm", "llama.cpp"):
            streams, turns = results[precision, side]
            ttft = [t for s in streams for t in s.ttft_s]
            cached = [t.cached_tokens for t in turns]
            lines.append(f"| {precision if side == 'rwkv_lm' else PRECISIONS[precision]} | {side} "
                         f"| {med(s.tok_s for s in streams):.1f} | {ms(percentile(ttft, 50))} / {ms(percentile(ttft, 90))} "
                         f"| {ms(med(t.ttft_s for t in turns))} | {ms(med(t.sent_ttft_s for t in turns))} "
                         f"| {ms(med(t.first_ttft_s for t in turns))} "
                         f"| {'n/a' if None in cached else _counts(cached)} |")
        (ours_s, ours_t), (their_s, their_t) = results[precision, "rwkv_lm"], results[precision, "llama.cpp"]
        speed = [a.tok_s / b.tok_s for a, b in zip(ours_s, their_s)]
        follow = [a.ttft_s / b.ttft_s for a, b in zip(ours_t, their_t)]
        follow_sent = [a.sent_ttft_s / b.sent_ttft_s for a, b in zip(ours_t, their_t)]
        walk = med(t.ttft_s - t.sent_ttft_s for t in ours_t + their_t)  # the client's own, before each send
        span = lambda xs, of: "" if len(xs) == 1 else f" ({of} {min(xs):.2f}-{max(xs):.2f})"  # noqa: E731
        goals += [f"- {'PASS' if med(speed) >= 1.5 else 'FAIL'}: {precision}, ours {med(speed):.2f}x llama-server's "
                  f"aggregate tokens/s at {args.streams} streams{span(speed, 'rounds')} (goal >= 1.5x)",
                  f"- {'PASS' if med(follow) <= 0.5 else 'FAIL'}: {precision}, our follow-up turn's first token in "
                  f"{med(follow):.2f} of llama-server's time{span(follow, 'conversations')} (goal <= 1/2); from the "
                  f"request's send (without the client's own {walk * 1e3:.0f} ms on the prompt's ids) {med(follow_sent):.2f}"]
    command = "python bench/bench_llamaserver.py " + " ".join(sys.argv[1:])
    table = "\n".join(lines + [""] + goals + [
        "", f"Machine: {host}; load average {' / '.join(f'{x:.1f}' for x in load_start)} at the start, "
            f"{' / '.join(f'{x:.1f}' for x in load_end)} at the end (1 / 5 / 15 min).",
        f"Command: `{command.strip()}` ({args.shape} shape, random weights, World vocabulary; {args.streams} streams of "
        f"~{args.prompt_tokens} prompt tokens and {args.max_tokens} tokens each, greedy; turn 1 of "
        f"~{args.conversation_tokens} tokens; medians of {args.rounds} interleaved rounds ({args.conversations} follow-up "
        f"conversations a round, each ratio within its pair), TTFT percentiles over every "
        f"request of every round; {args.threads} threads each; llama-server of the llama-cpp-python "
        f"{llamacpp.LLAMA_CPP_PYTHON} sdist{', weight repacking off (llamacpp.AMX_CRASH)' * llamacpp.AMX_CRASH}, "
        f"run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})."])
    print(table)
    if args.write:
        write_at_end(SECTION, f"{SECTION}\n\n{INTRO}\n\n{table}\n")


if __name__ == "__main__":
    main()
