"""Soak of `rwkv-lm serve` (issue 18): normal streaming clients alone, then the same clients while abusive
clients send every input of issue 18 in a loop, for a bounded time. Everything goes to 127.0.0.1 only.

    python bench/soak_serve.py                                  # 60 s alone, then 240 s with abuse
    python bench/soak_serve.py --alone 10 --soak 20 --clients 2 --abusers 2   # a smoke run

It starts `rwkv-lm serve` on a free port (the default demo model unless --model), and prints one markdown
table: requests served, answers by status (and transport errors) of each phase, p50/p95 gap between the
text chunks of the normal streams (the goal: abuse raises the p95 by less than 2x), the server's RSS at
the start (after a warm-up) and at the end (the goal: the end within the start plus the state cache's bytes,
+10%), and the rows and queue once the clients have stopped (the goal: 0 and 0).

Normal client: a streaming completion of `--max-tokens` tokens at temperature 1, a unique prompt each time.
Abusive inputs, one after another, by each abusive client: a 1,000-char x 4 stop list (allowed) and a
1,000,000-char stop (400); a body announced as 100 MB (413 unread); a 3 MB prompt of words (413 after it is
tokenized off the event loop); a lone surrogate (400); max_tokens 10^12 (400); an endless stream dropped
after 2 s; 405; invalid UTF-8; 10,000-deep JSON; seed 2^64; a form body; an unknown model (404); max_tokens
"5" (400); a wrong key (401); OPTIONS (CORS off: 405); HEAD /health; an idle socket, a head sent a byte at a
time and a body that never ends (each held until the server lets go: --header-timeout / --body-timeout).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-soak"
WORDS = ("the of and to in is that it was for on are as with his they at be this from have or by one had not but what "
         "all were when we there can an your which their said if do will each about how up out them then she many").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def percentile(values, q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


class Tally:
    def __init__(self):
        self.status = collections.Counter()
        self.gaps: list[float] = []
        self.normal_done = 0

    def note(self, status):
        self.status[status] += 1


async def normal_client(client: httpx.AsyncClient, stop_at: float, tally: Tally, max_tokens: int, rng: random.Random):
    while time.monotonic() < stop_at:
        prompt = " ".join(rng.choice(WORDS) for _ in range(12))
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0, "stream": True}
        try:
            async with client.stream("POST", "/v1/completions", json=body) as response:
                tally.note(response.status_code)
                last = None
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    if not json.loads(line[6:])["choices"][0]["text"]:
                        continue
                    now = time.perf_counter()
                    if last is not None:
                        tally.gaps.append(now - last)
                    last = now
                tally.normal_done += 1
        except httpx.HTTPError as e:
            tally.note(type(e).__name__)


def _json(body) -> bytes:
    return json.dumps(body).encode()


def abusive_requests(rng: random.Random):
    """(name, method, path, raw body or None, extra headers, stream seconds) for each abusive input."""
    j = {"Content-Type": "application/json"}
    words = " ".join(rng.choice(WORDS) for _ in range(600_000))[:3_000_000]
    return [
        ("stops 4 x 1,000 chars", "POST", "/v1/completions",
         _json({"prompt": "hi", "max_tokens": 32, "stop": ["x" * 999 + c for c in "abcd"]}), j, 0),
        ("stop 10^6 chars", "POST", "/v1/completions", _json({"prompt": "hi", "max_tokens": 2, "stop": ["x" * 10**6]}), j, 0),
        ("3 MB prompt", "POST", "/v1/completions", _json({"prompt": words, "max_tokens": 2}), j, 0),
        ("lone surrogate", "POST", "/v1/completions", _json({"prompt": "a\ud800b", "stream": True}), j, 0),
        ("max_tokens 10^12", "POST", "/v1/completions", _json({"prompt": "hi", "max_tokens": 10**12}), j, 0),
        ("endless, dropped", "POST", "/v1/completions",
         _json({"prompt": "go", "max_tokens": 16_000, "ignore_eos": True, "stream": True}), j, 2.0),
        ("405", "GET", "/v1/completions", None, {}, 0),
        ("invalid UTF-8", "POST", "/v1/completions", b'{"prompt": "\xff\xfe"}', j, 0),
        ("deep JSON", "POST", "/v1/completions", b"[" * 10_000 + b"]" * 10_000, j, 0),
        ("seed 2^64", "POST", "/v1/completions", _json({"prompt": "hi", "seed": 2**64}), j, 0),
        ("form body", "POST", "/v1/completions", b"prompt=hi", {"Content-Type": "application/x-www-form-urlencoded"}, 0),
        ("unknown model", "POST", "/v1/completions", _json({"prompt": "hi", "model": "../../etc/passwd"}), j, 0),
        ("max_tokens '5'", "POST", "/v1/completions", _json({"prompt": "hi", "max_tokens": "5"}), j, 0),
        ("wrong key", "POST", "/v1/completions", _json({"prompt": "hi"}), {**j, "Authorization": "Bearer nope"}, 0),
        ("OPTIONS", "OPTIONS", "/v1/completions", None, {"Origin": "http://x", "Access-Control-Request-Method": "POST"}, 0),
        ("HEAD /health", "HEAD", "/health", None, {}, 0),
    ]


async def abusive_request(client, name, method, path, content, extra, stream_s, tally: Tally):
    try:
        if stream_s:
            async with client.stream(method, path, content=content, headers=extra) as response:
                tally.note(response.status_code)
                end = time.monotonic() + stream_s
                async for _ in response.aiter_lines():
                    if time.monotonic() > end:
                        break
        else:
            tally.note((await client.request(method, path, content=content, headers=extra)).status_code)
    except httpx.HTTPError as e:
        tally.note(type(e).__name__)


async def announced_huge_body(port: int, tally: Tally):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: "
                 f"application/json\r\nContent-Length: {100 << 20}\r\n\r\n{{\"prompt\": \"".encode())
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 60)
    tally.note(int(answer.split()[1]) if answer else "closed")
    writer.close()


async def held_socket(port: int, kind: str, tally: Tally):
    """An idle socket, a head sent a byte at a time, or a body that never ends: held until the server lets go."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000\r\n\r\n").encode()
    if kind == "slow body":
        writer.write(head + b'{"prompt": "')
    began = time.monotonic()
    sent = 0
    try:
        while time.monotonic() - began < 120:
            try:
                data = await asyncio.wait_for(reader.read(65536), 0.5)
            except asyncio.TimeoutError:
                if kind == "slow head" and sent < len(head) - 4:
                    writer.write(head[sent:sent + 1])
                    sent += 1
                continue
            if not data:
                tally.note(f"{kind}: closed")
                return
            if data.startswith(b"HTTP/1.1 "):
                tally.note(int(data.split()[1]))
        tally.note(f"{kind}: still open after 120 s")
    except (ConnectionError, OSError):
        tally.note(f"{kind}: reset")
    finally:
        writer.close()


async def abuser(client, port: int, stop_at: float, tally: Tally, rng: random.Random):
    requests = abusive_requests(rng)
    while time.monotonic() < stop_at:
        for item in requests:
            if time.monotonic() >= stop_at:
                return
            await abusive_request(client, *item, tally)
        await announced_huge_body(port, tally)
        await asyncio.gather(*(held_socket(port, kind, tally) for kind in ("idle", "slow head", "slow body")))


async def phase(url: str, port: int, seconds: float, clients: int, abusers: int, max_tokens: int, seed: int) -> Tally:
    tally = Tally()
    stop_at = time.monotonic() + seconds
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=clients + abusers + 8)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                                 limits=limits) as client:
        await asyncio.gather(*(normal_client(client, stop_at, tally, max_tokens, random.Random(rng.random()))
                               for _ in range(clients)),
                             *(abuser(client, port, stop_at, tally, random.Random(rng.random())) for _ in range(abusers)))
    return tally


def server_numbers(url: str) -> dict:
    health = httpx.get(url + "/health", timeout=30).json()
    metrics = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).text
    cache = [float(line.split()[1]) for line in metrics.splitlines() if line.startswith("rwkv_lm_state_cache_bytes ")]
    return {"active": health["active"], "waiting": health["waiting"], "cache_mb": cache[0] / 2**20 if cache else 0.0}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "demo/models/rwkv7.safetensors"))
    parser.add_argument("--alone", type=float, default=60, help="seconds of normal clients alone")
    parser.add_argument("--soak", type=float, default=240, help="seconds of normal and abusive clients")
    parser.add_argument("--clients", type=int, default=4, help="normal streaming clients")
    parser.add_argument("--abusers", type=int, default=4, help="abusive clients")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per normal request")
    parser.add_argument("--header-timeout", type=float, default=5, help="the server's --header-timeout")
    parser.add_argument("--body-timeout", type=float, default=5, help="the server's --body-timeout")
    parser.add_argument("--state-cache-mb", type=float, default=512, help="the server's --state-cache-mb")
    args = parser.parse_args()
    command = "python bench/soak_serve.py " + " ".join(sys.argv[1:])

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        with open(log, "w") as out:
            server = subprocess.Popen([sys.executable, "-m", "rwkv_lm.cli", "serve", "--model", args.model,
                                       "--port", str(port), "--api-key", KEY, "--header-timeout", str(args.header_timeout),
                                       "--body-timeout", str(args.body_timeout), "--shutdown-timeout", "5",
                                       "--state-cache-mb", str(args.state_cache_mb)],
                                      cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                      env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            deadline = time.monotonic() + 300
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"the server exited:\n{log.read_text()}")
                try:
                    if httpx.get(url + "/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("the server did not come up")
                time.sleep(0.2)
            asyncio.run(phase(url, port, 5, args.clients, 0, args.max_tokens, seed=0))  # warm-up
            rss_start = rss_mb(server.pid)
            load_start = os.getloadavg()[0]
            alone = asyncio.run(phase(url, port, args.alone, args.clients, 0, args.max_tokens, seed=1))
            soak = asyncio.run(phase(url, port, args.soak, args.clients, args.abusers, args.max_tokens, seed=2))
            time.sleep(1.0)
            end = server_numbers(url)
            rss_end = rss_mb(server.pid)
            load_end = os.getloadavg()[0]
        finally:
            server.terminate()
            server.wait(timeout=60)

    def gaps(t: Tally) -> str:
        return f"{percentile(t.gaps, 0.5) * 1e3:.1f} / {percentile(t.gaps, 0.95) * 1e3:.1f}"

    def statuses(t: Tally) -> str:
        return ", ".join(f"{k}: {v}" for k, v in sorted(t.status.items(), key=lambda kv: str(kv[0])))

    ratio = percentile(soak.gaps, 0.95) / percentile(alone.gaps, 0.95)
    lines = [f"`{command}`", "",
             "| phase | seconds | normal streams done | answers by status | gap p50 / p95 (ms) |",
             "| --- | --- | --- | --- | --- |",
             f"| normal clients alone ({args.clients}) | {args.alone:g} | {alone.normal_done} | {statuses(alone)} | {gaps(alone)} |",
             f"| with {args.abusers} abusive clients | {args.soak:g} | {soak.normal_done} | {statuses(soak)} | {gaps(soak)} |",
             "",
             f"p95 gap with abuse / alone: {ratio:.2f}x (goal < 2x). RSS {rss_start:.0f} MB after the warm-up, "
             f"{rss_end:.0f} MB at the end (state cache {end['cache_mb']:.1f} MB; goal: end <= start + cache, +10%). "
             f"At the end: {end['active']} rows, {end['waiting']} waiting. Load average (1 min) "
             f"{load_start:.1f} at the start, {load_end:.1f} at the end."]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
