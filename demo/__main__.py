"""`python -m demo`: serve the Gradio demo on the default checkpoints in demo/models/, or on others."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import rwkv_lm
from rwkv_lm.checkpoint import tokenizer_from
from rwkv_lm.hf import is_hf_model, load_hf
from rwkv_lm.statefile import load_state

MODELS = Path(__file__).parent / "models"
DEFAULT_RWKV = MODELS / "rwkv7.safetensors"
DEFAULT_BASELINE = MODELS / "gpt.safetensors"
HOW_TO_MAKE_DEFAULTS = ("Make them with the commands in train/README.md (\"The demo's default models\"), "
                        "or pass your own: --rwkv PATH --baseline PATH.")
MAX_BATCH = 16  # rows one batched step decodes: the CPU kernels take 16 per pass over the weights


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__)
    parser.add_argument("--rwkv", type=Path, default=DEFAULT_RWKV,
                        help="RWKV-7 checkpoint: ours (.safetensors) or an official .pth (default: %(default)s)")
    parser.add_argument("--baseline", type=Path, default=DEFAULT_BASELINE,
                        help="the model to compare with: a GPT checkpoint of ours, or a transformers causal LM (a folder "
                             "saved by save_pretrained, or a hub name such as HuggingFaceTB/SmolLM2-135M where the hub "
                             "is reachable; pip install 'rwkv-lm[hf]') (default: %(default)s)")
    parser.add_argument("--state", type=Path, default=None,
                        help="a tuned-state file for --rwkv (python -m train export of a model.tune state run), chosen "
                             "in the Chat tab at start; the default model's demo/models/rwkv7.*.state.safetensors are "
                             "offered there too")
    parser.add_argument("--tokenizer", default=None,
                        help="'world' or a tokenizer.json, for a checkpoint that carries no tokenizer "
                             "(official World-vocabulary .pth files get 'world' by themselves)")
    parser.add_argument("--host", default=None, help="address to listen on; 0.0.0.0 to serve a network "
                                                     "(default: $GRADIO_SERVER_NAME, else 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None,
                        help="default: $GRADIO_SERVER_PORT, else the first free port from 7860")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    parser.add_argument("--max-batch", type=int, default=MAX_BATCH,
                        help="replies each model decodes together in one batched step (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="replies streamed at once, Chat and Arena together (default: --max-batch); "
                             "beyond --max-batch they wait for a row")
    parser.add_argument("--max-queue", type=int, default=32,
                        help="requests that may wait; past that, users are told the demo is busy (default: %(default)s)")
    args = parser.parse_args(argv)
    for name in ("max_batch", "concurrency", "max_queue", "port"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "max_queue" else 1):
            parser.error(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'max_queue' else '>= 1'}, got {value}")
    port = os.environ.get("GRADIO_SERVER_PORT")  # Gradio reads it as it is imported, --port or not
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        parser.error(f"GRADIO_SERVER_PORT={port!r} is not a port number (1-65535); set it to one or unset it")
    return args


def load_model(path: Path, tokenizer_spec: str | None):
    """A checkpoint with a tokenizer, on the fast path `rwkv-lm` runs (or a transformers model with its own), or
    SystemExit with a message that says what to do."""
    try:
        if is_hf_model(path):
            return load_hf(path)
        model = rwkv_lm.load(path)
        if model.tokenizer is None and tokenizer_spec is not None:
            model.tokenizer = tokenizer_from(tokenizer_spec)
    except ValueError as e:  # CheckpointError is a ValueError, as are tokenizer errors
        raise SystemExit(f"error: {e}") from None
    if model.tokenizer is None:
        raise SystemExit(f"error: {path} carries no tokenizer; pass one with --tokenizer (world, or a tokenizer.json)")
    return model


def tuned_states(model, rwkv_path: Path, chosen: Path | None) -> dict:
    """name -> state of one row: the default model's tuned states (when it runs), then `chosen`; SystemExit
    when `chosen` was made for another model."""
    paths = sorted(MODELS.glob(f"{DEFAULT_RWKV.stem}.*.state.safetensors")) if rwkv_path == DEFAULT_RWKV else []
    states = {path.name.removeprefix(f"{DEFAULT_RWKV.stem}.").removesuffix(".state.safetensors"): path for path in paths}
    if chosen is not None:
        states = {k: v for k, v in states.items() if v.resolve() != chosen.resolve()}
        states[chosen.name] = chosen
    try:
        return {name: load_state(path, model) for name, path in states.items()}
    except ValueError as e:
        raise SystemExit(f"error: --state: {e}") from None


def main(argv=None) -> None:
    args = parse_args(argv)
    from .app import Engines, build_app  # Gradio, imported only now that GRADIO_SERVER_PORT is checked

    missing_defaults = [p for p in (args.rwkv, args.baseline) if p in (DEFAULT_RWKV, DEFAULT_BASELINE) and not p.exists()]
    if missing_defaults:
        raise SystemExit(f"error: the default model {missing_defaults[0]} is missing. {HOW_TO_MAKE_DEFAULTS}")
    rwkv, baseline = load_model(args.rwkv, args.tokenizer), load_model(args.baseline, args.tokenizer)
    states = tuned_states(rwkv, args.rwkv, args.state)
    try:
        engines = Engines(rwkv, baseline, max_batch=args.max_batch)
    except ValueError as e:
        raise SystemExit(f"error: --rwkv {args.rwkv}: {e}") from None
    with engines:
        app = build_app(engines, concurrency_limit=args.concurrency, max_queue=args.max_queue, states=states,
                        start_state=args.state.name if args.state else None,
                        default_models=(args.rwkv, args.baseline) == (DEFAULT_RWKV, DEFAULT_BASELINE))
        print(f"RWKV-7 from {args.rwkv}, baseline from {args.baseline} (batches of up to {args.max_batch} rows)",
              file=sys.stderr)
        app.launch(server_name=args.host, server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()
