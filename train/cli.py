"""`python -m train fit --config train/configs/<name>.yaml`: LightningCLI over LanguageModel and TokenData.

What every run gets unless its config says otherwise: CSV and TensorBoard logs, a Rich progress bar,
`last.ckpt` (written atomically) in `<default_root_dir>/checkpoints` so `--ckpt_path last` finds it,
and bf16-mixed precision on a GPU, 32-true on a CPU.
"""
from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBarTheme
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO

from rwkv_lm.files import atomic_write

from .data import TokenData
from .module import LanguageModel


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning writes checkpoints in place; a crash mid-write would leave a broken last.ckpt. Write a
    temporary file beside it and move it over the old one in one step instead."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        atomic_write(path, lambda tmp: super(AtomicCheckpointIO, self).save_checkpoint(checkpoint, tmp, storage_options))


class Checkpoints(ModelCheckpoint):
    """ModelCheckpoint that also writes last.ckpt at the final step, which rarely falls on the step cadence."""

    def on_train_end(self, trainer, pl_module):
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class ProgressBar(RichProgressBar):
    """Rich's progress bar, showing "Epoch 3" in a run bounded by steps (Lightning's own shows "Epoch 3/-2" there:
    max_epochs is -1)."""

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs is not None and self.trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        return f"{f'Epoch {current_epoch}':{len(self.validation_description)}}"


class TrainCLI(LightningCLI):
    def add_arguments_to_parser(self, parser):
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        # `--checkpoint.every_n_train_steps N` etc.; the folder is fixed so that `--ckpt_path last` finds last.ckpt
        parser.add_lightning_class_args(Checkpoints, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 50})
        parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath",
                              compute_fn=lambda root: str(Path(root or ".") / "checkpoints"))

    def instantiate_trainer(self, **kwargs):
        config = self._get(self.config_init, "trainer", default={})
        root = Path(config.get("default_root_dir") or ".")
        if config.get("logger") in (None, True):
            csv = CSVLogger(root, name="logs")
            kwargs["logger"] = [csv, TensorBoardLogger(root, name="logs", version=csv.version)]
        callbacks = list(config.get("callbacks") or [])
        if not any(isinstance(c, RichProgressBar) for c in callbacks) and config.get("enable_progress_bar") is not False:
            callbacks.append(ProgressBar(theme=RichProgressBarTheme(metrics_format=".4g")))  # lr needs digits
        kwargs["callbacks"] = callbacks
        if not config.get("plugins") and not str(config.get("strategy", "")).startswith(("deepspeed", "fsdp")):
            kwargs["plugins"] = [AtomicCheckpointIO()]  # deepspeed and fsdp save sharded checkpoints their own way
        return super().instantiate_trainer(**kwargs)


def run(args: list[str] | None = None):
    return TrainCLI(
        LanguageModel,
        TokenData,
        args=args,
        seed_everything_default=0,
        parser_kwargs={"description": "Train rwkv_lm models (train/README.md). To write a trained model for the "
                                      "runtime: python -m train export CKPT OUT.safetensors|OUT.pth"},
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"precision": "bf16-mixed" if torch.cuda.is_available() else "32-true",
                          "gradient_clip_val": 1.0, "log_every_n_steps": 10},
    )
