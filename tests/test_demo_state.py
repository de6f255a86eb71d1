"""The demo's Chat tab started from a tuned state (`python -m demo --state FILE`, demo/models/*.state.*)."""
import re
from pathlib import Path

import pytest
import torch

import rwkv_lm

pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")
pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402

from demo import __main__ as cli  # noqa: E402
from demo.inputs import sampling_params  # noqa: E402

from test_demo import CHAT_SETTINGS, make_checkpoints, reply_text, serve  # noqa: E402


def test_the_chat_tab_starts_from_the_chosen_tuned_state(tmp_path, capsys):
    rwkv_path, gpt_path = make_checkpoints(tmp_path)
    model = rwkv_lm.load(rwkv_path)
    g = torch.Generator().manual_seed(4)
    state_path = rwkv_lm.save_state([torch.randn(4, 16, 16, generator=g) * 3 for _ in range(2)], tmp_path / "calm.pth")
    states = cli.tuned_states(cli.load_model(rwkv_path, None), rwkv_path, state_path)
    assert list(states) == ["calm.pth"]

    def session_says(state, seed):
        session = rwkv_lm.ChatSession(model, model.tokenizer, state=state)
        return "".join(session.reply("Hello goose", sampling_params(*CHAT_SETTINGS.values(), seed)))

    with serve(rwkv_path, gpt_path, states=states, start_state="calm.pth") as (url, _):
        client = Client(url, verbose=False)
        tuned = client.predict("Hello goose", "", *CHAT_SETTINGS.values(), 3, "calm.pth", api_name="/chat")[0]
        assert reply_text(tuned) == session_says(state_path, 3) != session_says(None, 3)
        plain = client.predict("Hello goose", "", *CHAT_SETTINGS.values(), 3, "none", api_name="/chat")[0]
        assert reply_text(plain) == session_says(None, 3)
        assert len(plain) == 2, "another state starts a new conversation"

    other = rwkv_lm.save_state([torch.zeros(2, 32, 32)], tmp_path / "other.pth")
    with pytest.raises(SystemExit, match="--state: .*other.pth: the state was made for another model shape"):
        cli.main(["--rwkv", str(rwkv_path), "--baseline", str(gpt_path), "--state", str(other)])


def test_every_state_the_configs_and_docs_export_into_demo_models_is_offered_by_the_chat_tab(tmp_path, monkeypatch):
    repo = Path(__file__).resolve().parents[1]
    texts = [p.read_text() for p in sorted((repo / "train/configs").glob("*.yaml"))]
    texts += [(repo / doc).read_text() for doc in ("README.md", "train/README.md")]
    names = {Path(p).name for p in re.findall(r"demo/models/[a-z0-9_.-]+\.state\.safetensors", "\n".join(texts))}
    assert "rwkv7.emotion.state.safetensors" in names, names  # persona_rwkv7.yaml's
    rwkv_path, _ = make_checkpoints(tmp_path)  # tmp_path/rwkv7.safetensors, as the default model is named
    monkeypatch.setattr(cli, "MODELS", tmp_path)
    monkeypatch.setattr(cli, "DEFAULT_RWKV", rwkv_path)
    for name in names:
        rwkv_lm.save_state([torch.zeros(4, 16, 16) for _ in range(2)], tmp_path / name)
    offered = cli.tuned_states(cli.load_model(rwkv_path, None), rwkv_path, None)
    assert len(offered) == len(names), f"exported {sorted(names)}, offered {sorted(offered)}"
