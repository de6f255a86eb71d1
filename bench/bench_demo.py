"""Users chatting with the demo at once, as a new user would try it: `python -m demo` on the default models,
gradio_client users each sending one message with the Chat tab's default settings.

    python bench/bench_demo.py [--checkout DIR] [--users 8] [--rounds 2] [--min-tokens 30]

Starts `python -m demo --port P` in the checkout DIR (default: this one; pass another to compare a branch).
The default model's replies are mostly short (10-40 tokens, where Gradio's round trips are all one measures),
so each user first tries seeds until its reply has at least --min-tokens tokens. Then, each round, the users
send their messages one at a time ("alone") and all at once ("together"), with the same seeds, so the same
replies. Prints the reply times (sending to the last piece), the time to the first text, and the aggregate
tokens/s (alone: over the sum of the reply times). Tokens are read off the Chat tab's status line
("state: ..., N tokens": the conversation's tokens, less the prompt's).
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from gradio_client import Client

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "demo" / "models" / "rwkv7.safetensors"
# the Chat tab's defaults: max tokens, temperature, top p, top k, presence and frequency penalties
SETTINGS = (200, 1.0, 0.8, 0, 0.4, 0.4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_demo(checkout: Path, port: int, log) -> subprocess.Popen:
    demo = subprocess.Popen([sys.executable, "-m", "demo", "--port", str(port)], cwd=checkout, stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(checkout)})
    deadline = time.monotonic() + 300
    while True:
        if demo.poll() is not None:
            raise SystemExit(f"python -m demo in {checkout} ended with code {demo.returncode}; see {log.name}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 200:
                return demo
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"python -m demo in {checkout} did not answer on port {port}; see {log.name}")
        time.sleep(0.5)


def conversation_tokens(status: str) -> int:
    match = re.fullmatch(r"state: [\d.,]+ (MB|kB), ([\d,]+) tokens", status)
    if not match:
        raise SystemExit(f"unexpected status line {status!r}")
    return int(match.group(2).replace(",", ""))


def reply(client: Client, message: str, seed: int, prompt_tokens: int) -> dict:
    """One chat turn in a fresh conversation -> its reply time, time to the first text, completion tokens."""
    client.predict(api_name="/clear")
    start = time.perf_counter()
    job = client.submit(message, "", *SETTINGS, seed, api_name="/chat")
    first = None
    for history, _, _ in job:
        if first is None and history and any(part.get("text") for part in history[-1]["content"]):
            first = time.perf_counter() - start
    _, _, status = job.result()
    return {"reply_s": time.perf_counter() - start, "first_s": first,
            "tokens": conversation_tokens(status) - prompt_tokens}


def long_reply_seed(client, message, prompt_tokens, first_seed, min_tokens, tries=300) -> int:
    for seed in range(first_seed, first_seed + tries):
        if reply(client, message, seed, prompt_tokens)["tokens"] >= min_tokens:
            return seed
    raise SystemExit(f"no seed in {first_seed}..{first_seed + tries - 1} makes a reply of {min_tokens} tokens")


def together(clients, messages, seeds, prompt_tokens) -> tuple[list[dict], float]:
    results = [None] * len(clients)
    barrier = threading.Barrier(len(clients) + 1)

    def user(i):
        barrier.wait()
        results[i] = reply(clients[i], messages[i], seeds[i], prompt_tokens[i])

    threads = [threading.Thread(target=user, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return results, time.perf_counter() - start


def summary(label: str, results: list[dict], wall_s: float) -> str:
    times = sorted(r["reply_s"] for r in results)
    firsts = sorted(r["first_s"] for r in results if r["first_s"] is not None)
    tokens = sum(r["tokens"] for r in results)
    return (f"| {label} | {times[0]:.2f}-{times[-1]:.2f} (median {statistics.median(times):.2f}) | "
            f"{statistics.median(firsts):.2f} | {tokens} | {tokens / wall_s:,.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", type=Path, default=REPO, help="the checkout whose demo runs (default: this one)")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--min-tokens", type=int, default=30, help="reply length to pick seeds for")
    args = parser.parse_args()

    import rwkv_lm
    from rwkv_lm.chat_template import REPLY_CUE, turn_text

    tokenizer = rwkv_lm.load(MODEL).tokenizer
    messages = [f"Tell me a story, user {i} is listening." for i in range(args.users)]
    prompt_tokens = [len(tokenizer.encode(turn_text("user", m) + REPLY_CUE)) for m in messages]
    port = free_port()
    with tempfile.NamedTemporaryFile("w", prefix="bench_demo_", suffix=".log", delete=False) as log:
        demo = start_demo(args.checkout.resolve(), port, log)
    try:
        url = f"http://127.0.0.1:{port}/"
        clients = [Client(url, verbose=False) for _ in range(args.users)]
        reply(clients[0], "Warm up", 1, 0)
        seeds = [long_reply_seed(clients[i], messages[i], prompt_tokens[i], 1000 * i, args.min_tokens)
                 for i in range(args.users)]
        print(f"checkout {args.checkout.resolve()}, {args.users} users, message 'Tell me a story, user i is listening.', "
              f"Chat defaults {SETTINGS}, seeds {seeds}")
        print("| run | reply time s (min-max) | first text s (median) | tokens | aggregate tokens/s |")
        print("|---|---|---|---|---|")
        for round_ in range(args.rounds):
            alone = []
            for i, client in enumerate(clients):
                alone.append(reply(client, messages[i], seeds[i], prompt_tokens[i]))
            print(summary(f"round {round_ + 1}: alone, one after another", alone,
                          sum(r["reply_s"] for r in alone)), flush=True)
            results, wall_s = together(clients, messages, seeds, prompt_tokens)
            print(summary(f"round {round_ + 1}: {args.users} at once", results, wall_s), flush=True)
    finally:
        demo.terminate()
        demo.wait(30)


if __name__ == "__main__":
    main()
