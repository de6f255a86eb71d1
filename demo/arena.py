"""Two models answering the same prompt at once, each through its own engine, with what each costs: time to
first token, tokens per second, and the memory its state holds as the context grows.

The numbers are the engine's own counts of each reply (`rwkv_lm.serve.Stream`). The two engines take turns
on the device (one lock, held for each iteration), and a step is timed while its engine holds it, so taking
turns does not slow either model's tokens/s or per-token times; the time to first token is counted from
sending, so it may include one step of the other model.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pandas as pd
import torch

from rwkv_lm import RWKV
from rwkv_lm.chat import ChatSession
from rwkv_lm.sampling import SamplingParams
from rwkv_lm.serve import PREFILL_TOKENS, Engine, Stream, prefill


def format_bytes(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 1_000_000 else f"{n / 1e3:,.1f} kB"


def memory_label(model) -> str:
    """What the bytes a model carries between tokens are called: an RNN state or a transformer's KV cache."""
    return "state" if isinstance(model, RWKV) else "KV cache"


@dataclass
class Reading:
    """One point on the plots: the cost of a token at a context length."""

    model: str
    context: int  # tokens in the conversation when the token was made
    ms_per_token: float
    memory_mb: float


@dataclass(eq=False)
class Lane:
    """One model's side of the arena: its conversation, and its latest reply read in a thread of its own
    (so a slow model never holds up the other's text)."""

    name: str
    session: ChatSession  # replying through the model's engine
    history: list[dict] = field(default_factory=list)  # chat messages, as a gr.Chatbot shows them
    readings: list[Reading] = field(default_factory=list)  # the tokens of every turn, a reading per piece read
    reply: Stream | None = None  # the latest reply's counts, once it is sent
    finished: threading.Event = field(default_factory=threading.Event)
    _reader: threading.Thread | None = field(default=None, repr=False)
    _stopping: bool = False

    def __post_init__(self):
        self.finished.set()

    @classmethod
    def open(cls, name: str, engine: Engine) -> "Lane":
        return cls(name, ChatSession(engine.model, engine.tokenizer, engine=engine))

    @property
    def done(self) -> bool:
        return self.finished.is_set()

    def start(self, message: str, params: SamplingParams) -> None:
        """Send `message`; the reply streams into `history` from a reader thread."""
        pieces = self.session.reply(message, params)  # checks the message before anything changes
        self.history = self.history + [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        self.reply, self._stopping = None, False
        self.finished.clear()
        self._reader = threading.Thread(target=self._read, args=(pieces, self.session.last_reply), daemon=True,
                                        name=f"arena-{self.name}")
        self._reader.start()

    def _read(self, pieces: Iterator[str], previous: Stream | None) -> None:
        seen = 0
        try:
            for piece in pieces:
                reply = self.reply = self.session.last_reply
                self.history[-1] = {"role": "assistant", "content": self.history[-1]["content"] + piece}
                # the tokens since the last piece, at what the engine's steps cost them; the first costs a prefill
                new = reply.token_s[seen:]
                steps = new[1:] if seen == 0 else new
                if steps:
                    self.readings.append(Reading(self.name, self.session.num_tokens,
                                                 1000 * sum(steps) / len(steps), reply.state_bytes / 1e6))
                seen += len(new)
                if self._stopping:
                    break
        finally:
            pieces.close()  # after a break: cancels the reply and waits for its state
            if self.session.last_reply is not previous:
                self.reply = self.session.last_reply
            self.finished.set()

    def stop(self) -> None:
        """Cancel the reply (its engine row is freed within one iteration) and wait for the reader to end."""
        if self._reader is None:
            return
        self._stopping = True  # for a reply not sent yet: the reader stops at its first piece
        if self.session.last_reply is not None:  # this reply's stream once sent (else the turn before's: a no-op)
            self.session.last_reply.close(wait=False)
        self._reader.join()
        self._reader = None

    def stats(self) -> str:
        """One line of numbers for under the pane."""
        reply = self.reply
        memory = f"{memory_label(self.session.model)} {format_bytes(reply.state_bytes if reply else 0)}"
        context = f"context {self.session.num_tokens:,}"
        if reply is None or reply.first_token_s is None:
            return f"{memory} · {context}"
        speed = reply.completion_tokens / reply.busy_s if reply.busy_s else 0.0
        return (f"first token {reply.first_token_s:.2f} s · {speed:,.1f} tokens/s · "
                f"{reply.completion_tokens:,} tokens · {memory} · {context}")


def race(lanes: list[Lane], message: str, params: SamplingParams, every_s: float) -> Iterator[list[Lane]]:
    """Send `message` to every lane and yield the lanes every `every_s` seconds while any reply streams, then
    once more at the end. Closing this generator stops the replies at once."""
    for lane in lanes:
        lane.start(message, params)
    try:
        update = time.monotonic() + every_s
        while not all(lane.done for lane in lanes):
            for lane in lanes:
                lane.finished.wait(max(0.0, update - time.monotonic()))
            update = max(update + every_s, time.monotonic())
            yield lanes
    finally:
        for lane in lanes:
            lane.stop()


def readings_frame(readings: list[Reading], max_points: int = 200) -> pd.DataFrame:
    """The readings as a gr.LinePlot takes them, at most `max_points` rows per model: runs of consecutive
    readings are averaged, which also smooths the jitter of single-token timings (a browser redrawing
    thousands of points at every update slows the whole page to a crawl)."""
    frame = pd.DataFrame([vars(r) for r in readings])
    position = frame.groupby("model", sort=False).cumcount()
    run = position // (frame.groupby("model", sort=False)["context"].transform("size") // max_points + 1)
    return frame.groupby([frame["model"], run], sort=False).agg(
        {"model": "first", "context": "mean", "ms_per_token": "mean", "memory_mb": "mean"}).reset_index(drop=True)


@torch.inference_mode()
def sweep(models: dict[str, object], lengths: list[int], device_lock: threading.Lock, decode_steps: int = 8,
          seed: int = 0) -> Iterator[Reading]:
    """Per-token decode time and memory after a prefill of each length in `lengths` (increasing).

    Each model reads one random token sequence up to each length in turn, so the longest length is read once,
    not once per point; at each length `decode_steps` single-token steps are timed from the state there, then
    dropped. The models run directly, holding `device_lock` (the engines') one prefill chunk or timing at a
    time: the timings are their own, and the users chatting meanwhile wait at most one chunk.
    """
    generator = torch.Generator().manual_seed(seed)
    states = {name: None for name in models}
    done = dict.fromkeys(models, 0)
    for length in lengths:
        for name, model in models.items():
            tokens = torch.randint(model.config.vocab_size, (length - done[name],), generator=generator)
            for start in range(0, len(tokens), PREFILL_TOKENS):
                with device_lock:
                    _, states[name] = prefill(model, tokens[start:start + PREFILL_TOKENS], states[name])
            done[name] = length
            token, state = tokens[-1:], states[name]
            with device_lock:
                start = time.perf_counter()
                for _ in range(decode_steps):
                    logits, state = model.step(token, state)
                    token = logits.argmax(-1)
                elapsed = time.perf_counter() - start
            yield Reading(name, length, 1000 * elapsed / decode_steps, states[name].nbytes / 1e6)
