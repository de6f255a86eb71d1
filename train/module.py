"""The LightningModule: any rwkv_lm model (RWKV-7 or the GPT baseline), next-token loss, RWKV-LM's optimizer.

AdamW with RWKV-LM's parameter groups (weight decay on 2-D `.weight` matrices only, `att.w0` at twice
the learning rate), linear warmup then cosine decay to `lr_final`, and L2Wrap on the logits.

What is trained (`tune`): every weight ("full"), only each layer's initial WKV state ("state": the
state every training sequence starts from), or LoRA adapters on the Linear layers ("lora",
rwkv_lm.lora). Sequences longer than `window` run window by window with the state carried forward.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from rwkv_lm.checkpoint import build, read_model
from rwkv_lm.model import RWKV
from rwkv_lm.state import RWKVState

from .data import IGNORE, NO_BASE_MODEL
from .tuning import MODES

CHINCHILLA_TOKENS_PER_PARAM = 20  # Hoffmann et al. 2022: compute-optimal training sees ~20 tokens per parameter


class TrainingDiverged(RuntimeError):
    pass


class ConfigError(ValueError):
    """A `model:` setting that cannot work, with what to change."""


class L2Wrap(torch.autograd.Function):
    """Identity on the loss; in backward, adds factor * max_logit to each position's largest logit gradient.

    RWKV-LM's trick: it gently pushes the winning logit down, so logits stay bounded over long training.
    """

    @staticmethod
    def forward(ctx, loss, logits, factor):
        ctx.save_for_backward(logits)
        ctx.factor = factor
        return loss

    @staticmethod
    def backward(ctx, grad):
        (logits,) = ctx.saved_tensors
        top, where = logits.max(-1, keepdim=True)
        return grad, torch.zeros_like(logits).scatter_(-1, where, top * ctx.factor), None


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float) -> list[dict]:
    """RWKV-LM's groups of the trainable parameters: decay on 2-D `.weight` matrices, `att.w0` at 2x
    learning rate, the rest plain."""
    decay, fast, plain = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("att.w0"):
            fast.append(p)
        elif p.dim() >= 2 and name.endswith(".weight"):
            decay.append(p)
        else:
            plain.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "lr": lr},
              {"params": plain, "weight_decay": 0.0, "lr": lr},
              {"params": fast, "weight_decay": 0.0, "lr": 2 * lr}]
    return [g for g in groups if g["params"]]


def warmup_cosine(step: int, warmup: int, total: int, final_ratio: float) -> float:
    """Learning-rate multiplier: linear warmup to 1, then cosine down to final_ratio at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class LanguageModel(L.LightningModule):
    """Trains one rwkv_lm model.

    Args:
        arch: "rwkv7" or "gpt" (a key of rwkv_lm.checkpoint.ARCHITECTURES).
        config: the model config's fields (RWKVConfig or GPTConfig), vocab_size aside.
        vocab_size: set from the data's tokenizer.
        init_from: a .safetensors model to start from (fine-tuning); arch and config are then read from it.
        lr, lr_final, warmup_steps: the schedule; the cosine ends at trainer.max_steps.
        l2wrap: RWKV-LM's logit regularizer.
        tune: what is trained: "full" (every weight), "state" (only the initial WKV state of each layer,
            [n_layer, H, N, N]; the weights stay frozen) or "lora" (adapters on the blocks' Linear
            layers, rwkv_lm.lora; the weights stay frozen). RWKV-7 only for "state" and "lora".
        lora_rank, lora_alpha, lora_dropout: the adapters of tune "lora" (scale alpha / rank).
        window: tokens per forward pass (0: the whole data.ctx_len window at once). A longer sequence runs
            window by window, the state carried from one to the next; each window's activations are
            recomputed in backward, so memory holds one window's activations (RWKV-7 only).
        grad_across_windows: let gradients flow back through the carried state into earlier windows (the
            exact gradient of the whole sequence); false: they stop at each window's edge.
    """

    def __init__(self, arch: str = "rwkv7", config: dict | None = None, vocab_size: int = 0, init_from: str | None = None,
                 lr: float = 6e-4, lr_final: float = 6e-5, warmup_steps: int = 20, weight_decay: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.99), eps: float = 1e-18, l2wrap: bool = True,
                 tune: Literal["full", "state", "lora"] = "full", lora_rank: int = 8, lora_alpha: float = 16.0,
                 lora_dropout: float = 0.0, window: int = 0, grad_across_windows: bool = False):
        super().__init__()
        self.save_hyperparameters()
        if init_from:
            if not init_from.startswith("hf:") and not Path(init_from).exists():  # (hub names: looked up by read_model)
                raise ConfigError(f"model.init_from {init_from}: no such file; {NO_BASE_MODEL}")
            self.model = read_model(init_from).train()
            if self.model.config.vocab_size != vocab_size:
                raise ConfigError(f"{init_from}: the model has a vocabulary of {self.model.config.vocab_size}, the data's "
                                 f"tokenizer {vocab_size}; set data.tokenizer to {init_from} to use its tokenizer")
        else:
            try:
                self.model = build({"arch": arch, **(config or {}), "vocab_size": vocab_size})
            except (TypeError, ValueError) as e:
                raise ConfigError(f"model.config does not fit arch {arch!r}: {e}") from None
            self.model.reset_parameters()
        if (tune != "full" or window) and not isinstance(self.model, RWKV):
            raise ConfigError(f"model.tune {tune!r} and model.window need an RWKV-7 model, not {type(self.model).__name__}; "
                              "use model.tune full and model.window 0")
        if window < 0:
            raise ConfigError(f"model.window is {window}; give the tokens per pass (> 0), or 0 for the whole window")
        try:
            self.tuning = MODES[tune](self.model, lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout)
        except ValueError as e:
            raise ConfigError(f"model.lora_*: {e}") from None
        self._last_step_time = None

    def forward(self, tokens):
        return self.model(tokens, self.start_state(tokens.shape[0]))[0]

    def start_state(self, batch_size: int) -> RWKVState | None:
        """The state every sequence starts from: the tuned one (tune "state"), else zeros (None)."""
        return self.tuning.start_state(self.model, batch_size)

    def _loss(self, batch, l2wrap: bool = False):
        """Mean loss over the loss-carrying tokens; with l2wrap, L2Wrap rides on it (training)."""
        x, y = batch
        window = self.hparams.window or x.shape[1]
        counted = (y != IGNORE).sum().clamp_min(1)
        factor = 1e-4 / y.numel() if l2wrap else 0.0

        def window_loss(x, y, *state):
            logits, state = self.model(x, RWKVState.from_tensors(dict(zip(names, state))) if state else None)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE, reduction="sum") / counted
            if factor:
                loss = L2Wrap.apply(loss, logits, factor)
            return loss, *state.tensors().values()

        state = self.start_state(x.shape[0])
        names = None if state is None else list(state.tensors())
        carried = [] if state is None else list(state.tensors().values())
        if window >= x.shape[1]:
            return window_loss(x, y, *carried)[0]
        names = names or list(self.model.init_state(1).tensors())
        loss = 0.0
        for start in range(0, x.shape[1], window):
            if start and not self.hparams.grad_across_windows:
                carried = [t.detach() for t in carried]
            piece = (x[:, start:start + window], y[:, start:start + window], *carried)
            if torch.is_grad_enabled():  # keep one window's activations: recompute them in backward
                out = checkpoint(window_loss, *piece, use_reentrant=False)
            else:
                out = window_loss(*piece)
            loss, carried = loss + out[0], list(out[1:])
        return loss

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch, l2wrap=self.hparams.l2wrap)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"the training loss became {loss.item()} at step {self.global_step}; training stopped "
                                   "and the last good checkpoint is kept. Lower model.lr or raise "
                                   "model.warmup_steps, then resume with --ckpt_path last")
        tokens = batch[0].numel() * self.trainer.world_size
        now = time.perf_counter()
        if self._last_step_time is not None:
            self.log("tok/s", tokens / (now - self._last_step_time), prog_bar=True)
        self._last_step_time = now
        self.log("loss", loss, prog_bar=True, sync_dist=True)
        self.log("lr", self.optimizers().param_groups[0]["lr"], prog_bar=True)
        self.log("tokens", float((self.global_step + 1) * self.trainer.accumulate_grad_batches * tokens))
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        dm = self.trainer.datamodule
        if dm is not None and hasattr(dm, "val_bytes_per_token"):
            self.log("val/bpb", loss / math.log(2) / dm.val_bytes_per_token, sync_dist=True)

    def configure_optimizers(self):
        hp, total = self.hparams, self.trainer.max_steps
        if total is None or total <= 0:
            raise ConfigError("set trainer.max_steps: the data is an endless stream of windows and the schedule ends there")
        optimizer = torch.optim.AdamW(param_groups(self, hp.weight_decay, hp.lr), lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, hp.warmup_steps, total, hp.lr_final / hp.lr))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_fit_start(self):
        dm = self.trainer.datamodule
        if not self.trainer.is_global_zero or dm is None:
            return
        n = self.model.num_params()
        planned = self.trainer.max_steps * dm.tokens_per_step()
        optimal = CHINCHILLA_TOKENS_PER_PARAM * n
        print(f"{type(self.model).__name__}: {n / 1e6:.2f} M parameters; compute-optimal budget (Chinchilla, "
              f"{CHINCHILLA_TOKENS_PER_PARAM} tokens/param): {optimal / 1e6:.1f} M tokens; planned: "
              f"{planned / 1e6:.2f} M tokens ({planned / optimal:.1%} of it)", flush=True)
        if self.tuning.name != "full":
            print(f"tune {self.tuning.name}: {self.num_trainable():,} trainable parameters, the model's weights frozen", flush=True)

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def on_save_checkpoint(self, checkpoint):
        # what `python -m train export` needs to write a runtime model without the training code
        dm = self.trainer.datamodule
        checkpoint["rwkv_lm"] = {"config": self.model.config.to_dict(),
                                 "tokenizer": dm.tokenizer.spec if dm is not None else None,
                                 "tune": self.tuning.name, "tuning": self.tuning.checkpoint_info()}
