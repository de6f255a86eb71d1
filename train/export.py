"""`python -m train export CKPT OUT`: a trainer checkpoint -> the runtime's model file.

OUT ending in `.pth` gets RWKV-LM's official layout (RWKV-7 only); anything else our safetensors
format with the config and the tokenizer embedded, which `rwkv_lm.load` reads back.
A `model.tune: state` run writes its tuned state instead (`.pth`: the official state file, else ours;
`rwkv_lm.load_state` reads both); a `model.tune: lora` run writes the model with the adapters merged,
or with `--adapter` the adapters alone (`rwkv_lm.lora.apply_adapter` merges them at load).
"""
from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import torch

from rwkv_lm.checkpoint import build, copy_tensors
from rwkv_lm.files import CheckpointError

from .tuning import Tuning, from_checkpoint


def read_trainer_checkpoint(path) -> tuple[torch.nn.Module, str | None, Tuning, int]:
    """(model, tokenizer spec, the run's tuning with its trained parameters, step) from a Lightning checkpoint
    written by this trainer."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; pass a .ckpt from <default_root_dir>/checkpoints")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: cannot be read as a trainer checkpoint ({str(e).splitlines()[0]})") from None
    if not isinstance(ckpt, dict) or "rwkv_lm" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not a checkpoint of `python -m train` (no model config in it)")
    info, sd = ckpt["rwkv_lm"], ckpt["state_dict"]
    model = build(info["config"], initialize=False)
    copy_tensors(model, {k.removeprefix("model."): v for k, v in sd.items() if k.startswith("model.")}, path)
    tuning = from_checkpoint(info, model, sd, path)
    return model.eval(), info["tokenizer"], tuning, ckpt.get("global_step", 0)


def export(ckpt, out, *, adapter: bool = False) -> Path:
    model, tokenizer, tuning, step = read_trainer_checkpoint(ckpt)
    try:
        return tuning.export(model, out, tokenizer=tokenizer, step=step, adapter=adapter)
    except CheckpointError as e:
        raise CheckpointError(f"{ckpt}: {e}") from None


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m train export", description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", help="a trainer checkpoint, e.g. runs/tiny/checkpoints/last.ckpt")
    parser.add_argument("out", help="model.safetensors (runtime format) or model.pth (official RWKV-7 layout); "
                                    "for a state-tuned run the state file (.pth official, else ours)")
    parser.add_argument("--adapter", action="store_true", help="a LoRA run: write the adapters alone, unmerged")
    args = parser.parse_args(argv)
    print(f"wrote {export(args.ckpt, args.out, adapter=args.adapter)}")
