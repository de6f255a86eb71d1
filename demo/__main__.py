"""`python -m demo`: serve the Gradio demo on the default checkpoints in demo/models/, or on others."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import rwkv_lm
from rwkv_lm.tokenizer import load_tokenizer

from .app import build_app

MODELS = Path(__file__).parent / "models"
DEFAULT_RWKV = MODELS / "rwkv7.safetensors"
DEFAULT_BASELINE = MODELS / "gpt.safetensors"
HOW_TO_MAKE_DEFAULTS = ("Make them with the commands in train/README.md (\"The demo's default models\"), "
                        "or pass your own: --rwkv PATH --baseline PATH.")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__)
    parser.add_argument("--rwkv", type=Path, default=DEFAULT_RWKV,
                        help="RWKV-7 checkpoint: ours (.safetensors) or an official .pth (default: %(default)s)")
    parser.add_argument("--baseline", type=Path, default=DEFAULT_BASELINE,
                        help="the model to compare with, usually a GPT checkpoint (default: %(default)s)")
    parser.add_argument("--tokenizer", default=None,
                        help="'world' or a tokenizer.json, for a checkpoint that carries no tokenizer "
                             "(official World-vocabulary .pth files get 'world' by themselves)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 to serve a network")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    parser.add_argument("--concurrency", type=int, default=4, help="replies computed at once (default: %(default)s)")
    parser.add_argument("--max-queue", type=int, default=32,
                        help="requests that may wait; past that, users are told the demo is busy (default: %(default)s)")
    return parser.parse_args(argv)


def load_model(path: Path, tokenizer_spec: str | None):
    """A checkpoint with a tokenizer, or SystemExit with a message that says what to do."""
    try:
        model = rwkv_lm.load(path)
        if model.tokenizer is None and tokenizer_spec is not None:
            model.tokenizer = load_tokenizer(tokenizer_spec)
    except ValueError as e:  # CheckpointError is a ValueError, as are tokenizer errors
        raise SystemExit(f"error: {e}") from None
    if model.tokenizer is None:
        raise SystemExit(f"error: {path} carries no tokenizer; pass one with --tokenizer (world, or a tokenizer.json)")
    return model


def main(argv=None) -> None:
    args = parse_args(argv)
    missing_defaults = [p for p in (args.rwkv, args.baseline) if p in (DEFAULT_RWKV, DEFAULT_BASELINE) and not p.exists()]
    if missing_defaults:
        raise SystemExit(f"error: the default model {missing_defaults[0]} is missing. {HOW_TO_MAKE_DEFAULTS}")
    rwkv, baseline = load_model(args.rwkv, args.tokenizer), load_model(args.baseline, args.tokenizer)
    try:
        app = build_app(rwkv, baseline, concurrency_limit=args.concurrency, max_queue=args.max_queue)
    except ValueError as e:
        raise SystemExit(f"error: --rwkv {args.rwkv}: {e}") from None
    print(f"RWKV-7 from {args.rwkv}, baseline from {args.baseline}", file=sys.stderr)
    app.launch(server_name=args.host, server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()
