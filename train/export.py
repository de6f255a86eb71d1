"""`python -m train export CKPT OUT`: a trainer checkpoint -> the runtime's model file.

OUT ending in `.pth` gets RWKV-LM's official layout (RWKV-7 only); anything else our safetensors
format with the config and the tokenizer embedded, which `rwkv_lm.load` reads back.
"""
from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import torch

from rwkv_lm.checkpoint import CheckpointError, build, export_official, load_state, save


def read_trainer_checkpoint(path) -> tuple[torch.nn.Module, str | None, dict]:
    """(model, tokenizer spec, training metadata) from a Lightning checkpoint written by this trainer."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; pass a .ckpt from <default_root_dir>/checkpoints")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: cannot be read as a trainer checkpoint ({str(e).splitlines()[0]})") from None
    if not isinstance(ckpt, dict) or "rwkv_lm" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not a checkpoint of `python -m train` (no model config in it)")
    model = build(ckpt["rwkv_lm"]["config"])
    load_state(model, {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}, path)
    return model.eval(), ckpt["rwkv_lm"]["tokenizer"], {"step": ckpt.get("global_step", 0)}


def export(ckpt, out) -> Path:
    model, tokenizer, meta = read_trainer_checkpoint(ckpt)
    if str(out).endswith(".pth"):
        return export_official(model, out)
    return save(model, out, tokenizer=tokenizer, metadata={"trained_steps": meta["step"]})


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m train export", description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", help="a trainer checkpoint, e.g. runs/tiny/checkpoints/last.ckpt")
    parser.add_argument("out", help="model.safetensors (runtime format) or model.pth (official RWKV-7 layout)")
    args = parser.parse_args(argv)
    print(f"wrote {export(args.ckpt, args.out)}")
