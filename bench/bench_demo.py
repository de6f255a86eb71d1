"""The demo measured as a user meets it.

    python bench/bench_demo.py [users] [--checkout DIR] [--users 8] [--rounds 2] [--min-tokens 30]
    python bench/bench_demo.py arena [--models default|0.1B] [--rounds 2] [--lengths 256,1024,2048,4096,8192]

`arena`: the Arena tab's two measurements, in-process: one prompt answered by both models through the demo's
own code (demo.app.Engines, demo.arena.race: time to first token, tokens/s, memory; wall clock), then the
context-length sweep: CPU ms per decode token and state / KV-cache MB at each length, from states made at that
length directly (random keys and values for a KV cache) instead of the demo's prefill of random tokens, which
would take most of an hour at 8,192 tokens on two shared cores and changes no step's cost.
`--models default`: demo/models/rwkv7.safetensors and gpt.safetensors as `python -m demo` loads them;
`--models 0.1B`: random weights of the official RWKV-7 0.1B shape (12 layers x 768, World vocabulary, on the
CPU fast path) against a random transformers model of SmolLM2-135M's shape (a Llama: 30 layers x 576, 9 heads
with 3 KV heads, vocab 49,152, tied embeddings), fp32. Rounds are interleaved: each round runs both models.

`users`: gradio_client users chatting with `python -m demo` on the default models at once, each sending one
message with the Chat tab's default settings.

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
SETTINGS = (500, 1.0, 0.3, 0, 0.5, 0.5)
ARENA_PROMPT = "Tell me a story about a king."


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


def arena_models(which: str):
    """(RWKV-7, baseline), each with its `.tokenizer`, as the demo runs them."""
    import torch
    import transformers

    import rwkv_lm
    from demo.__main__ import DEFAULT_BASELINE, DEFAULT_RWKV, load_model
    from rwkv_lm.hf import HFCausalLM
    from rwkv_lm.runtime import prepare
    from rwkv_lm.testing import random_model
    from rwkv_lm.tokenizer import load_tokenizer, train_bpe

    if which == "default":
        return load_model(DEFAULT_RWKV, None), load_model(DEFAULT_BASELINE, None)
    rwkv = prepare(random_model(rwkv_lm.RWKVConfig(vocab_size=65536, n_layer=12, n_embd=768)))
    rwkv.tokenizer = load_tokenizer("world")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                                      tie_word_embeddings=True)
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float()
    # any tokenizer within its vocabulary: random weights make the same kind of text of any
    tokenizer = train_bpe([ARENA_PROMPT * 3, "Once upon a time there was a goose."] * 50, vocab_size=400)
    return rwkv, HFCausalLM(hf, tokenizer, "random SmolLM2-135M shape")


def arena(args) -> None:
    import torch

    from demo.app import Engines, baseline_name, describe
    from demo.arena import Lane, race
    from rwkv_lm.model import parameter_count
    from rwkv_lm.sampling import SamplingParams

    torch.set_num_threads(args.threads)
    rwkv, baseline = arena_models(args.models)
    names = {"RWKV-7": rwkv, baseline_name(baseline): baseline}
    for name, model in names.items():
        print(f"{name}: {describe(model)} ({parameter_count(model):,})")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=1.0, top_p=0.8, seed=1, stop=())
    print(f"\narena: {ARENA_PROMPT!r}, max_tokens {args.max_tokens}, temperature 1, top_p 0.8, seed 1, "
          f"{args.threads} threads")
    print("| round | model | first token s | tokens | tokens/s | memory after |")
    print("|---|---|---|---|---|---|")
    with Engines(rwkv, baseline, max_batch=16) as engines:
        for round_ in range(args.rounds):
            lanes = [Lane.open(name, engine) for name, engine in zip(names, (engines.rwkv, engines.baseline))]
            for _ in race(lanes, ARENA_PROMPT, params, every_s=0.5):
                pass
            for lane in lanes:
                r = lane.reply
                print(f"| {round_ + 1} | {lane.name} | {r.first_token_s:.3f} | {r.completion_tokens} | "
                      f"{r.completion_tokens / r.busy_s:,.1f} | {r.state_bytes / 1e6:,.2f} MB |", flush=True)
    lengths = [int(n) for n in args.lengths.split(",")]
    print(f"\nsweep: CPU ms per decode token of the timing thread ({args.steps} steps, {args.threads} threads) from "
          "a state of each context length, and that state's MB (state or KV cache)")
    print("| round | model | " + " | ".join(f"{n:,}" for n in lengths) + " |")
    print("|---|---|" + "---|" * len(lengths))
    for round_ in range(args.rounds):
        for name, model in names.items():
            points = [decode_cost(model, n, args.steps) for n in lengths]
            print(f"| {round_ + 1} | {name} ms/token | " + " | ".join(f"{ms:.2f}" for ms, _ in points) + " |")
            print(f"| {round_ + 1} | {name} MB | " + " | ".join(f"{mb:,.2f}" for _, mb in points) + " |", flush=True)


def state_at(model, length: int, generator):
    """A state of one row after `length` tokens, made directly: a KV cache of random keys and values (a step
    costs the same whatever they hold), an RNN state as it is (its size and cost do not depend on the length)."""
    import torch

    from rwkv_lm.gpt import GPTState

    state = model.init_state(1)
    if not isinstance(state, GPTState):
        return state
    shape = lambda k: (*k.shape[:2], length, k.shape[3])
    return GPTState([torch.randn(shape(k), generator=generator) for k in state.k],
                    [torch.randn(shape(v), generator=generator) for v in state.v], state.pos + length)


def decode_cost(model, length: int, steps: int) -> tuple[float, float]:
    """(CPU ms per decode step of this thread, state MB) at a context of `length` tokens. The thread's CPU time,
    not the wall clock: on a shared machine the wait for a core is not the model's cost (the C kernels and torch
    run their work on this thread at --threads 1)."""
    import torch

    state = state_at(model, length, torch.Generator().manual_seed(length))
    token = torch.zeros(1, dtype=torch.long)
    with torch.inference_mode():
        model.step(token, state)  # warm-up
        start = time.thread_time()
        for _ in range(steps):
            logits, _ = model.step(token, state)  # each step from the same state: the length stays `length`
        return 1000 * (time.thread_time() - start) / steps, state.nbytes / 1e6

def users(args) -> None:
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



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    p = modes.add_parser("users", help="gradio_client users chatting at once with python -m demo")
    p.add_argument("--checkout", type=Path, default=REPO, help="the checkout whose demo runs (default: this one)")
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--min-tokens", type=int, default=30, help="reply length to pick seeds for")
    p.set_defaults(run=users)
    p = modes.add_parser("arena", help="the Arena's race and sweep, in-process")
    p.add_argument("--models", choices=["default", "0.1B"], default="default")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="torch's threads (1: the sweep's CPU time is all the work)")
    p.add_argument("--lengths", default="256,1024,2048,4096,8192")
    p.add_argument("--steps", type=int, default=16, help="decode steps timed at each length")
    p.set_defaults(run=arena)
    argv = sys.argv[1:]
    if not argv or argv[0] not in ("users", "arena", "-h", "--help"):
        argv = ["users", *argv]  # the mode it had alone before `arena` came (bench/RESULTS.md's commands)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
