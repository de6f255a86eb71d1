"""The Gradio app: a Chat tab (RWKV-7, streaming, its state kept per browser session) and an Arena tab
(RWKV-7 beside a transformer baseline, with their speed and memory)."""
from __future__ import annotations

import gradio as gr

from rwkv_lm import RWKV

from . import arena_tab, chat_tab

# Context lengths of the sweep: a few points are enough to see a flat line beside a rising one.
SWEEP_LENGTHS = [256, 1024, 2048, 4096, 8192]


def describe(model) -> str:
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    return f"{cfg.n_layer} layers × {cfg.n_embd} wide, {params / 1e6:,.1f}M parameters"


def build_app(rwkv_model, baseline_model, *, concurrency_limit: int = 4, max_queue: int = 32,
              sweep_lengths: list[int] = SWEEP_LENGTHS) -> gr.Blocks:
    """The demo for two loaded models, each with its `.tokenizer` (as `rwkv_lm.load` sets it).

    concurrency_limit: replies computed at once; max_queue: requests that may wait beyond those, after which
    a user is told the demo is busy.
    """
    rwkv_name = "RWKV-7"
    baseline_name = f"{type(baseline_model).__name__} (baseline)"
    if not isinstance(rwkv_model, RWKV):
        raise ValueError(f"the first model must be an RWKV-7, got a {type(rwkv_model).__name__}")
    with gr.Blocks(title="RWKV-7 Goose") as app:
        gr.Markdown(f"## RWKV-7 \"Goose\": a language model with a fixed-size memory\n"
                    f"**{rwkv_name}**: {describe(rwkv_model)} · **{baseline_name}**: {describe(baseline_model)}")
        with gr.Tab("Chat"):
            chat_tab.render(rwkv_model, rwkv_model.tokenizer, rwkv_name)
        with gr.Tab("Arena"):
            arena_tab.render({rwkv_name: rwkv_model, baseline_name: baseline_model}, sweep_lengths)
    return app.queue(default_concurrency_limit=concurrency_limit, max_size=max_queue)
