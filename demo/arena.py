"""Two models answering the same prompt, stepped in turn, with what each costs: time to first token,
tokens per second, and the memory its state holds as the context grows.

Time is measured inside each model's own steps only, so taking turns does not slow either one's numbers.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pandas as pd
import torch

from rwkv_lm import RWKV
from rwkv_lm.chat import ChatSession
from rwkv_lm.generate import prefill
from rwkv_lm.sampling import SamplingParams


def format_bytes(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 1_000_000 else f"{n / 1e3:,.1f} kB"


def memory_label(model) -> str:
    """What the bytes a model carries between tokens are called: an RNN state or a transformer's KV cache."""
    return "state" if isinstance(model, RWKV) else "KV cache"


class Metered:
    """A model seen through a window: notes the size of every state it returns and counts its steps.

    A chat session keeps its live state inside the reply generator; reading the last state the model
    handed back is how the demo shows memory while a reply streams. Shared weights, one window per user.
    """

    def __init__(self, model):
        self.model, self.config = model, model.config
        self.state_bytes = 0
        self.steps = 0

    def __call__(self, tokens, state=None, **kwargs):
        logits, state = self.model(tokens, state, **kwargs)
        self.state_bytes = state.nbytes
        return logits, state

    def step(self, tokens, state=None):
        logits, state = self.model.step(tokens, state)
        self.state_bytes, self.steps = state.nbytes, self.steps + 1
        return logits, state

    def init_state(self, batch_size: int = 1):
        return self.model.init_state(batch_size)

    def parameters(self):
        return self.model.parameters()


@dataclass
class Reading:
    """One point on the plots: the cost of a token at a context length."""

    model: str
    context: int  # tokens in the conversation when the token was made
    ms_per_token: float
    memory_mb: float


@dataclass
class Lane:
    """One model's side of the arena: its conversation and what its latest reply cost."""

    name: str
    session: ChatSession  # over a Metered model
    history: list[dict] = field(default_factory=list)  # chat messages, as a gr.Chatbot shows them
    readings: list[Reading] = field(default_factory=list)  # every token of every turn
    tokens: int = 0  # made in the current reply
    busy_s: float = 0.0  # spent inside this model's reply (prefill, steps, sampling, decoding), not the other's
    first_token_s: float | None = None
    done: bool = False

    @classmethod
    def open(cls, name: str, model, tokenizer) -> "Lane":
        return cls(name, ChatSession(Metered(model), tokenizer))

    @property
    def meter(self) -> Metered:
        return self.session.model

    def start(self, message: str):
        self.history = self.history + [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        self.tokens, self.busy_s, self.first_token_s, self.done = 0, 0.0, None, False

    def advance(self, reply: Iterator[str]):
        """Take one piece of the reply and time it."""
        steps = self.meter.steps
        start = time.perf_counter()
        try:
            piece = next(reply)
        except StopIteration:
            self.done = True
            return
        elapsed = time.perf_counter() - start
        self.busy_s += elapsed
        # a token is sampled, then fed by the step that precedes the next sample; the first costs a prefill
        made = self.meter.steps - steps
        if self.first_token_s is None:
            self.first_token_s, made = elapsed, made + 1
        elif made:
            self.readings.append(Reading(self.name, self.session.num_tokens, 1000 * elapsed / made,
                                         self.meter.state_bytes / 1e6))
        self.tokens += made
        self.history[-1] = {"role": "assistant", "content": self.history[-1]["content"] + piece}

    def stats(self) -> str:
        """One line of numbers for under the pane."""
        memory = f"{memory_label(self.meter.model)} {format_bytes(self.meter.state_bytes)}"
        context = f"context {self.session.num_tokens:,}"
        if self.first_token_s is None:
            return f"{memory} · {context}"
        speed = self.tokens / self.busy_s if self.busy_s else 0.0
        return (f"first token {self.first_token_s:.2f} s · {speed:,.1f} tokens/s · {self.tokens:,} tokens · "
                f"{memory} · {context}")


def race(lanes: list[Lane], message: str, params: SamplingParams) -> Iterator[list[Lane]]:
    """Send `message` to every lane and advance their replies one piece each in turn, yielding after each round.

    Closing this generator closes the replies, which stops the models at once.
    """
    replies = [lane.session.reply(message, params) for lane in lanes]
    for lane in lanes:
        lane.start(message)
    try:
        while not all(lane.done for lane in lanes):
            for lane, reply in zip(lanes, replies):
                if not lane.done:
                    lane.advance(reply)
            yield lanes
    finally:
        for lane, reply in zip(lanes, replies):
            reply.close()
            lane.done = True


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
def sweep(models: dict[str, object], lengths: list[int], decode_steps: int = 8, seed: int = 0) -> Iterator[Reading]:
    """Per-token decode time and memory after a prefill of each length in `lengths` (increasing).

    Each model reads one random token sequence up to each length in turn, so the longest length is read once,
    not once per point; at each length `decode_steps` single-token steps are timed from the state there, then
    dropped.
    """
    generator = torch.Generator().manual_seed(seed)
    states = {name: None for name in models}
    done = dict.fromkeys(models, 0)
    for length in lengths:
        for name, model in models.items():
            tokens = torch.randint(model.config.vocab_size, (length - done[name],), generator=generator)
            _, states[name] = prefill(model, tokens, states[name])
            done[name] = length
            token, state = tokens[-1:], states[name]
            start = time.perf_counter()
            for _ in range(decode_steps):
                logits, state = model.step(token, state)
                token = logits.argmax(-1)
            elapsed = time.perf_counter() - start
            yield Reading(name, length, 1000 * elapsed / decode_steps, states[name].nbytes / 1e6)
