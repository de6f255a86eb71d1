"""The Arena tab: one prompt, RWKV-7 and the transformer baseline answering side by side, with their
speed and memory live, and a sweep of the cost of a token against the context length."""
from __future__ import annotations

import threading
import time
from contextlib import closing

import gradio as gr

from rwkv_lm.model import parameter_count
from rwkv_lm.serve import Engine

from .arena import Lane, race, readings_frame, sweep
from .inputs import MAX_MESSAGE_CHARS, UserError, check_message, named_errors, sampling_params

# Redrawing per token would cost the browser more than the models (a busy page stops answering clicks,
# Stop included): two panes of text 5 times a second still read as streaming; the plots, heavier to draw,
# once a second.
TEXT_EVERY_S = 0.2
PLOTS_EVERY_S = 1.0


def _plot(title: str, y: str, y_title: str, elem_id: str) -> gr.LinePlot:
    # Gradio draws a plot's colours for the models in its first data only, so a plot gets no data until
    # every model has a point (see `outputs` and `run_sweep`)
    return gr.LinePlot(None, x="context", y=y, color="model", title=title, x_title="context (tokens)",
                       y_title=y_title, height=260, elem_id=elem_id)


def render(engines: dict[str, Engine], sweep_lengths: list[int], device_lock: threading.Lock,
           size_warning: str = "") -> None:
    """Lay out the tab and wire its events, inside an open gr.Blocks. `engines`: display name -> a started
    engine; `device_lock`: the one they take turns with; `size_warning`: shown above the panes when the models
    differ much in size."""
    names = list(engines)
    lanes_state = gr.State(None)
    sizes = " · ".join(f"**{name}**: {parameter_count(engine.model) / 1e6:,.1f}M parameters" for name, engine in engines.items())
    gr.Markdown(sizes + (f"\n\n{size_warning}" if size_warning else ""), elem_id="arena-sizes")
    # the prompt comes first: on a phone the panes stack, and it would be two screens down
    prompt = gr.Textbox(placeholder="One prompt for both models (Enter to send)", label="Prompt", show_label=False,
                        max_length=MAX_MESSAGE_CHARS)
    with gr.Row():
        run = gr.Button("Run both", variant="primary")
        stop = gr.Button("Stop", variant="stop")
        clear = gr.Button("Clear")
    with gr.Row():
        panes, stats = [], []
        for i, name in enumerate(names):
            with gr.Column():
                panes.append(gr.Chatbot(label=name, height=360, elem_id=f"arena-pane-{i}", buttons=["copy_all"]))
                stats.append(gr.Markdown("", elem_id=f"arena-stats-{i}", min_height=48))  # no jumps as it grows
    with gr.Accordion("Sampling (the same for both)", open=False):
        with gr.Row():
            controls = [
                gr.Slider(1, 2048, value=300, step=1, label="Max tokens", elem_id="arena-max-tokens"),
                gr.Slider(0, 2, value=1.0, step=0.05, label="Temperature (0: greedy)"),
                gr.Slider(0.05, 1, value=0.8, step=0.05, label="Top p"),
                gr.Number(-1, precision=0, minimum=-1, label="Seed (-1: random)", elem_id="arena-seed"),
            ]
            for control, name in zip(controls, ("max_tokens", "temperature", "top_p", "seed")):
                named_errors(control, name)
    with gr.Row():
        latency_plot = _plot("Time per token while streaming", "ms_per_token", "ms per token", "live-latency")
        memory_plot = _plot("Memory held while streaming", "memory_mb", "MB (state or KV cache)", "live-memory")
    gr.Markdown("The two models take turns on the CPU and each step is timed while its model has it alone, so "
                "tokens/s and ms per token are each model's own (a step decodes every user's row of that model at "
                "once); the time to first token counts from sending.")

    gr.Markdown(f"### Context-length sweep\nFor each length ({', '.join(f'{n:,}' for n in sweep_lengths)} tokens), "
                "each model reads random tokens up to it, then a few single-token steps are timed.")
    sweep_button = gr.Button("Sweep context length")
    with gr.Row():
        sweep_latency = _plot("Time per token after a prefill", "ms_per_token", "ms per token", "sweep-latency")
        sweep_memory = _plot("Memory after a prefill", "memory_mb", "MB (state or KV cache)", "sweep-memory")

    def outputs(lanes, plots: bool):
        if plots and all(lane.readings for lane in lanes):
            frame = readings_frame([r for lane in lanes for r in lane.readings])
        else:
            frame = gr.skip()
        return (*(lane.history for lane in lanes), *(lane.stats() for lane in lanes), frame, frame, lanes)

    def check_arena(prompt, lanes, max_tokens, temperature, top_p, seed):
        check_message(prompt), sampling_params(max_tokens, temperature, top_p, seed=seed)
        if lanes is not None and not all(lane.done for lane in lanes):
            raise UserError("Both models are still answering: press Stop first.")

    def arena(prompt, lanes, max_tokens, temperature, top_p, seed):
        prompt = check_message(prompt)
        params = sampling_params(max_tokens, temperature, top_p, seed=seed)
        lanes = lanes or [Lane.open(name, engine) for name, engine in engines.items()]
        plots_shown = 0.0
        with closing(race(lanes, prompt, params, TEXT_EVERY_S)) as rounds:
            for _ in rounds:
                plots = time.monotonic() - plots_shown >= PLOTS_EVERY_S
                plots_shown = time.monotonic() if plots else plots_shown
                yield "", *outputs(lanes, plots)
        yield "", *outputs(lanes, plots=True)

    def clear_all():
        return "", *([] for _ in names), *("" for _ in names), None, None, None

    def run_sweep():
        readings = []
        models = {name: engine.model for name, engine in engines.items()}
        for reading in sweep(models, sweep_lengths, device_lock):
            readings.append(reading)
            if len(readings) % len(models) == 0:  # every model has measured this length
                frame = readings_frame(readings)
                yield frame, frame

    arena_outputs = [prompt, *panes, *stats, latency_plot, memory_plot, lanes_state]
    # chat and arena share one pool of workers ("models"): the limit is on the CPU, not on each button
    # inputs are checked before the streaming step, as in the Chat tab, so a bad one leaves the panes as they were
    arena_event = gr.on([prompt.submit, run.click], check_arena, [prompt, lanes_state, *controls], None,
                        api_visibility="private").success(
        arena, [prompt, lanes_state, *controls], arena_outputs, api_name="arena", concurrency_id="models")
    stop.click(None, cancels=[arena_event])
    clear.click(clear_all, None, arena_outputs, api_name="arena_clear", cancels=[arena_event])
    for pane in panes:  # a pane's own bin clears both sides, as the two conversations go together
        pane.clear(clear_all, None, arena_outputs, api_visibility="private", cancels=[arena_event])
    sweep_button.click(run_sweep, None, [sweep_latency, sweep_memory], api_name="sweep", concurrency_limit=1,
                       concurrency_id="sweep")
