"""Fine-tuning: model.tune state | lora through the trainer's command line, their exports, and
long sequences trained window by window (model.window) with the state carried forward."""
import csv
from pathlib import Path

import pytest
import torch

import rwkv_lm
from rwkv_lm.checkpoint import CheckpointError
from rwkv_lm.lora import LoRA, apply_adapter
from rwkv_lm.testing import random_model
from train.__main__ import main
from train.module import LanguageModel

from conftest import assert_close
from test_train import SHORT, TINY, losses

CHAT = ["--data.train", "[chatterbot]", "--data.chat", "true", "--trainer.num_sanity_val_steps", "0",
        "--trainer.val_check_interval", "8", "--trainer.limit_val_batches", "2", "--model.warmup_steps", "1"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def base(tmp_path_factory, cache):
    """The tiny config's model (2 layers, width 64, heads of 32) after its 60 steps: a random model barely
    uses its state, so tuning one would show nothing."""
    root = tmp_path_factory.mktemp("base")
    assert main(["fit", "--config", TINY, "--trainer.default_root_dir", str(root), "--data.cache_dir", cache,
                 "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0", "--trainer.max_steps", "30"]) == 0
    assert main(["export", str(root / "checkpoints/last.ckpt"), str(root / "base.safetensors")]) == 0
    return root / "base.safetensors"


def tune(root, cache, base, *extra, command="fit"):
    return main([command, "--config", TINY, "--trainer.default_root_dir", str(root), "--data.cache_dir", cache, *SHORT,
                 *CHAT, "--model.init_from", str(base), "--data.tokenizer", str(base), *extra])


def val_loss(root) -> float:
    rows = [r for p in sorted(Path(root).glob("logs/version_*/metrics.csv")) for r in csv.DictReader(open(p)) if r.get("val/loss")]
    return float(rows[-1]["val/loss"])


def frozen_weights_unchanged(ckpt, base):
    sd = torch.load(ckpt, weights_only=True)["state_dict"]
    for k, v in rwkv_lm.load(base).state_dict().items():
        assert torch.equal(sd["model." + k], v), k
    return sd


def test_state_tuning_trains_the_initial_state_only_and_exports_it(tmp_path, cache, base, capsys):
    assert tune(tmp_path / "before", cache, base, command="validate") == 0
    assert tune(tmp_path / "run", cache, base, "--model.tune", "state", "--model.lr", "0.3", "--model.lr_final", "0.3", "--trainer.max_steps", "16") == 0
    assert "tune state: 4,096 trainable parameters" in capsys.readouterr().out  # 2 layers x 2 heads x 32 x 32
    assert val_loss(tmp_path / "run") < val_loss(tmp_path / "before") - 0.01
    ckpt = tmp_path / "run/checkpoints/last.ckpt"
    time_state = frozen_weights_unchanged(ckpt, base)["tuning.time_state"]
    assert time_state.shape == (2, 2, 32, 32) and time_state.abs().max() > 0

    for name in ("tuned.pth", "tuned.safetensors"):
        assert main(["export", str(ckpt), str(tmp_path / name)]) == 0
        state = rwkv_lm.load_state(tmp_path / name)
        for i, layer in enumerate(state.layers):
            assert torch.equal(layer.wkv[0], time_state[i]) and not layer.att_shift.any()
    official = torch.load(tmp_path / "tuned.pth", weights_only=True)
    assert sorted(official) == ["blocks.0.att.time_state", "blocks.1.att.time_state"]
    assert official["blocks.0.att.time_state"].dtype == torch.float32

    model = rwkv_lm.load(base)
    session = rwkv_lm.ChatSession(model, model.tokenizer, state=tmp_path / "tuned.safetensors")
    assert "".join(session.reply("Hello", max_tokens=4, temperature=0)) == \
        "".join(rwkv_lm.ChatSession(model, model.tokenizer, state=state).reply("Hello", max_tokens=4, temperature=0))
    other = random_model(rwkv_lm.RWKVConfig(vocab_size=512, n_layer=3, n_embd=64, head_size=16, decay_lora=8,
                                            iclr_lora=8, value_lora=8, gate_lora=8))
    for name, made in (("tuned.safetensors", "n_layer=2, n_embd=64, head_size=32"), ("tuned.pth", "2 layers of 2 heads of size 32")):
        with pytest.raises(CheckpointError, match=f"made for another model shape \\({made}\\); this model has n_layer=3"):
            rwkv_lm.ChatSession(other, model.tokenizer, state=tmp_path / name)
    with pytest.raises(CheckpointError, match="not a state file"):
        rwkv_lm.load_state(base)

    from rwkv_lm.cli import main as cli

    capsys.readouterr()
    greedy = ["--model", str(base), "--prompt", "User: Hello", "--max-tokens", "6", "--temperature", "0"]
    assert cli(["generate", *greedy, "--state", str(tmp_path / "tuned.pth")]) == 0
    tuned = rwkv_lm.complete(model, model.tokenizer, "User: Hello", max_tokens=6, temperature=0, state=state)
    assert capsys.readouterr().out == tuned + "\n"
    other_path = rwkv_lm.save(other, tmp_path / "other.safetensors", tokenizer=model.tokenizer.spec)
    assert cli(["generate", *greedy, "--model", str(other_path), "--state", str(tmp_path / "tuned.pth")]) == 2
    assert "made for another model shape" in capsys.readouterr().err
    capsys.readouterr()
    assert main(["export", str(ckpt), str(tmp_path / "a.safetensors"), "--adapter"]) == 1
    assert "--adapter needs a run with model.tune lora; this one tuned 'state'" in capsys.readouterr().err


def test_lora_trains_adapters_only_and_exports_merged_or_alone(tmp_path, cache, base, capsys):
    assert tune(tmp_path / "before", cache, base, command="validate") == 0
    assert tune(tmp_path / "run", cache, base, "--model.tune", "lora", "--model.lora_rank", "4", "--model.lr", "1e-2") == 0
    # rank 4 on 2 x (4 [64x64] + ffn [256x64] + [64x256]) Linear layers
    assert f"tune lora: {2 * (4 * 4 * 128 + 2 * 4 * 320):,} trainable parameters" in capsys.readouterr().out
    assert val_loss(tmp_path / "run") < val_loss(tmp_path / "before") - 0.01
    ckpt = tmp_path / "run/checkpoints/last.ckpt"
    frozen_weights_unchanged(ckpt, base)

    for name in ("merged.safetensors", "merged.pth"):
        assert main(["export", str(ckpt), str(tmp_path / name)]) == 0
    assert main(["export", str(ckpt), str(tmp_path / "adapter.safetensors"), "--adapter"]) == 0
    x = torch.randint(0, 512, (1, 37), generator=torch.Generator().manual_seed(0))
    model = rwkv_lm.load(base)
    lora = LoRA(model, rank=4, alpha=16.0)
    sd = torch.load(ckpt, weights_only=True)["state_dict"]
    lora.load_state_dict({k.removeprefix("tuning.lora."): v for k, v in sd.items() if k.startswith("tuning.lora.")})
    with torch.no_grad():
        adapted = model(x)[0]
        merged = rwkv_lm.load(tmp_path / "merged.safetensors")(x)[0]
        applied = apply_adapter(rwkv_lm.load(base), tmp_path / "adapter.safetensors")(x)[0]
        official = rwkv_lm.load(tmp_path / "merged.pth")(x)[0]  # bf16 weights
    assert (adapted - rwkv_lm.load(base)(x)[0]).abs().max() > 1e-4  # training moved the adapters
    assert_close(merged, adapted, 1e-5, "merged export")
    assert_close(applied, adapted, 1e-5, "adapter file applied at load")
    assert_close(official, adapted, 5e-2, "official bf16 export")
    with pytest.raises(CheckpointError, match="made for another model shape"):
        apply_adapter(random_model(rwkv_lm.RWKVConfig(vocab_size=512, n_layer=1, n_embd=32, head_size=16)), tmp_path / "adapter.safetensors")


def test_tune_settings_that_cannot_work_are_clear_errors(tmp_path, cache, base, capsys):
    assert main(["fit", "--config", TINY, "--trainer.default_root_dir", str(tmp_path), "--data.cache_dir", cache, *SHORT,
                 "--model.arch", "gpt", "--model.config", "{n_layer: 1, n_embd: 32, n_head: 2}", "--model.tune", "state"]) == 1
    assert "model.tune 'state' and model.window need an RWKV-7 model, not GPT" in capsys.readouterr().err
    assert tune(tmp_path / "b", cache, base, "--model.tune", "lora", "--model.lora_rank", "0") == 1
    assert "LoRA needs rank >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tune(tmp_path / "d", cache, base, "--model.tune", "everything")


def _module(window, grad_across_windows=False, tune="full"):
    torch.manual_seed(0)
    lm = LanguageModel(config={"n_layer": 2, "n_embd": 32, "head_size": 16}, vocab_size=50, tune=tune,
                       window=window, grad_across_windows=grad_across_windows)
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return lm


def _loss_and_grads(lm, batch):
    lm.zero_grad()
    loss = lm._loss(batch, l2wrap=True)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in lm.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("tune", ["full", "state"])
def test_windowed_pass_equals_the_whole_sequence(tune):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 50, (2, 45), generator=g), torch.randint(0, 50, (2, 45), generator=g)
    y[0, :7] = -100  # positions without loss (chat prompts)
    whole_loss, whole = _loss_and_grads(_module(0, tune=tune), (x, y))
    exact_loss, exact = _loss_and_grads(_module(16, grad_across_windows=True, tune=tune), (x, y))
    cut_loss, cut = _loss_and_grads(_module(16, tune=tune), (x, y))
    assert_close(exact_loss, whole_loss, 1e-5, "loss, gradients through the state")
    assert_close(cut_loss, whole_loss, 1e-5, "loss, gradients cut at window edges")
    for name, grad in whole.items():
        assert_close(exact[name], grad, 1e-4, f"gradient of {name}")
    # cut at the edges, the gradients are another (truncated) one: earlier windows miss what later ones add
    assert max((cut[n] - g).abs().max() / g.abs().max() for n, g in whole.items()) > 1e-3
    with torch.no_grad():  # validation takes the same path without a graph
        assert_close(_module(16, tune=tune)._loss((x, y)), whole_loss, 1e-5, "validation loss")


def test_one_chatterbot_topic_is_a_source():
    from train.corpus import CorpusMissing
    from train.data import read_conversations

    emotion = read_conversations("chatterbot:emotion")
    everything = read_conversations("chatterbot")
    assert 0 < len(emotion) < len(everything) and all(c in everything for c in emotion)
    with pytest.raises(CorpusMissing, match="no topic 'emotions'; topics: ai, botprofile"):
        read_conversations("chatterbot:emotions")


def test_a_long_context_run_trains_window_by_window_from_the_command_line(tmp_path, cache, base):
    assert tune(tmp_path / "run", cache, base, "--data.ctx_len", "64", "--model.window", "16",
                "--model.grad_across_windows", "true", "--model.tune", "state", "--model.lr", "0.1",
                "--trainer.max_steps", "3", "--trainer.val_check_interval", "3") == 0
    assert val_loss(tmp_path / "run") < 10


@pytest.mark.parametrize("method", ["state", "lora"])
def test_a_resumed_tuning_run_repeats_the_uninterrupted_one(tmp_path, cache, base, method, monkeypatch):
    run = ["--model.tune", method, "--model.lr", "0.1" if method == "state" else "1e-2", "--trainer.limit_val_batches", "0",
           "--checkpoint.every_n_train_steps", "4"]
    assert tune(tmp_path / "whole", cache, base, *run) == 0
    real_loss = LanguageModel._loss

    def nan_from_step_6(self, batch, **kwargs):  # the run dies at step 6; the checkpoint of step 4 stays
        loss = real_loss(self, batch, **kwargs)
        return loss * float("nan") if self.global_step >= 6 else loss

    monkeypatch.setattr(LanguageModel, "_loss", nan_from_step_6)
    assert tune(tmp_path / "cut", cache, base, *run) == 1
    monkeypatch.setattr(LanguageModel, "_loss", real_loss)
    assert tune(tmp_path / "cut", cache, base, *run, "--ckpt_path", "last") == 0
    whole, resumed = losses(tmp_path / "whole"), losses(tmp_path / "cut")
    assert sorted(resumed) == sorted(whole) == list(range(8))
    for step in whole:
        assert resumed[step] == pytest.approx(whole[step], rel=1e-6), step
