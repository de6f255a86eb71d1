"""The Gradio app: a Chat tab (RWKV-7, streaming, its state kept per browser session) and an Arena tab
(RWKV-7 beside a transformer baseline, with their speed and memory).

Every reply goes through one serving engine per model (`rwkv_lm.serve.Engine`), started once for the app, so
the users chatting at once share batched steps while each browser session keeps its own conversation.
"""
from __future__ import annotations

import threading

import gradio as gr

from rwkv_lm import RWKV
from rwkv_lm.model import parameter_count
from rwkv_lm.serve import Engine

from . import arena_tab, chat_tab

# Context lengths of the sweep: a few points are enough to see a flat line beside a rising one.
SWEEP_LENGTHS = [256, 1024, 2048, 4096, 8192]


class Engines:
    """The demo's two engines, RWKV-7 and the baseline, each over a loaded model with its `.tokenizer`, each
    decoding up to `max_batch` rows in one step.

    They take turns on the device through one lock (held for each engine iteration, and by the Arena's
    sweep), so a model's steps are timed alone: the Arena's numbers for one model are not slowed by the
    other's work. `with Engines(...)` (or start/stop) runs their loop threads.
    """

    def __init__(self, rwkv_model, baseline_model, *, max_batch: int):
        if not isinstance(rwkv_model, RWKV):
            raise ValueError(f"the first model must be an RWKV-7, got a {type(rwkv_model).__name__}")
        self.device_lock = threading.Lock()
        self.rwkv, self.baseline = (Engine(model, model.tokenizer, max_batch=max_batch, device_lock=self.device_lock)
                                    for model in (rwkv_model, baseline_model))
        self.max_batch = max_batch

    def start(self) -> "Engines":
        self.rwkv.start(), self.baseline.start()
        return self

    def stop(self) -> None:
        self.rwkv.stop(), self.baseline.stop()

    def __enter__(self) -> "Engines":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def describe(model) -> str:
    cfg = model.config
    return f"{cfg.n_layer} layers × {cfg.n_embd} wide, {parameter_count(model) / 1e6:,.1f}M parameters"


def size_warning(models: dict) -> str:
    """A warning (Markdown) when the largest of `models` (name -> model) has more than twice the parameters of the
    smallest, else ''. Their speeds then say more about their sizes than about their architectures."""
    counts = {name: parameter_count(model) for name, model in models.items()}
    (small, n_small), (large, n_large) = min(counts.items(), key=lambda kv: kv[1]), max(counts.items(), key=lambda kv: kv[1])
    if n_large <= 2 * n_small:
        return ""
    return (f"⚠️ **{large} has {n_large / n_small:.1f}x the parameters of {small}**: their speeds compare the sizes more "
            "than the architectures. Give the demo models of similar size (`--rwkv`, `--baseline`).")


DEFAULT_MODELS_NOTE = ("The default models are tiny (trained on a CPU in minutes): they show how the two architectures run, "
                       "but their replies are word salad. For real models: `python -m demo --rwkv RWKV-x070-World-0.1B.pth "
                       "--baseline SmolLM2-135M` (README.md, \"Models\").")


def baseline_name(model) -> str:
    """How the page calls the baseline: its class for our GPT, its folder or hub name for a transformers model."""
    name = getattr(model.config, "name", None)
    return f"{name.rstrip('/').rsplit('/', 1)[-1] if name else type(model).__name__} (baseline)"


def build_app(engines: Engines, *, concurrency_limit: int | None = None, max_queue: int = 32,
              sweep_lengths: list[int] = SWEEP_LENGTHS, states: dict | None = None,
              start_state: str | None = None, default_models: bool = False) -> gr.Blocks:
    """The demo over started `engines`.

    concurrency_limit: replies streamed at once, Chat and Arena together (default: the engines' max_batch, so
    each reply has a row at once); max_queue: requests that may wait beyond those, after which a user is told
    the demo is busy. states: name -> tuned state the Chat tab offers to start from; start_state: the one
    chosen at first. default_models: the page says that they are the tiny defaults and how to run real ones.
    """
    rwkv_model, baseline_model = engines.rwkv.model, engines.baseline.model
    rwkv_name = "RWKV-7"
    base_name = baseline_name(baseline_model)
    warning = size_warning({rwkv_name: rwkv_model, base_name: baseline_model})
    with gr.Blocks(title="RWKV-7 Goose") as app:
        gr.Markdown(f"## RWKV-7 \"Goose\": a language model with a fixed-size memory\n"
                    f"**{rwkv_name}**: {describe(rwkv_model)} · **{base_name}**: {describe(baseline_model)}"
                    + (f"\n\n{DEFAULT_MODELS_NOTE}" if default_models else "") + (f"\n\n{warning}" if warning else ""),
                    elem_id="header")
        with gr.Tab("Chat"):
            chat_tab.render(engines.rwkv, rwkv_name, engines.device_lock, states or {}, start_state)
        with gr.Tab("Arena"):
            arena_tab.render({rwkv_name: engines.rwkv, base_name: engines.baseline}, sweep_lengths,
                             engines.device_lock, warning)
    return app.queue(default_concurrency_limit=concurrency_limit or engines.max_batch, max_size=max_queue)
