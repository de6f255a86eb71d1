"""A Hugging Face transformers causal LM behind the package's interface (rwkv_lm/hf.py), on a tiny random Llama
saved in the test (no hub): its logits through our KV cache equal transformers' own, alone and batched."""
import pytest
import torch

import rwkv_lm
from rwkv_lm.hf import is_hf_model, load_hf
from rwkv_lm.tokenizer import train_bpe

transformers = pytest.importorskip("transformers")

CORPUS = ["The goose flies over the lake at dawn and the reeds remember the wind.",
          "Hello there! How are you today? I am fine, thank you, and you?"] * 20


def save_tiny_hf(directory, arch="llama", vocab_size=320, seed=0):
    """A random 2-layer Llama (grouped-query attention, as SmolLM2) or GPT-NeoX (partial rotary, as Pythia) and a
    BPE as its tokenizer.json, saved as from_pretrained reads them."""
    tok = train_bpe(CORPUS, vocab_size=vocab_size)
    torch.manual_seed(seed)
    if arch == "llama":
        config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    else:
        config = transformers.GPTNeoXConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, rotary_pct=0.25, max_position_embeddings=512)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok.hf).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", params=["llama", "gpt_neox"])
def hf_dir(request, tmp_path_factory):
    return save_tiny_hf(tmp_path_factory.mktemp(request.param), request.param)


def test_logits_through_our_cache_equal_transformers(hf_dir):
    model = load_hf(hf_dir)
    reference = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tokens = torch.randint(320, (1, 23), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(tokens).logits
        # a prompt in two pieces, then two single steps
        first, state = model(tokens[:, :10])
        second, state = model(tokens[:, 10:21], state)
        steps = []
        for t in (21, 22):
            logits, state = model.step(tokens[:, t], state)
            steps.append(logits)
    got = torch.cat([first, second, torch.stack(steps, 1)], 1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert state.pos.tolist() == [23] and state.k[0].shape == (1, model.config.n_kv_head, 23, 16)


def test_rows_of_different_lengths_decode_together_as_alone(hf_dir):
    model = load_hf(hf_dir)
    tok = model.tokenizer
    prompts = ["The goose flies", "Hello there! How are you today? I am"]
    alone = [rwkv_lm.complete(model, tok, p, max_tokens=12, temperature=0) for p in prompts]
    assert rwkv_lm.generate_batch(model, tok, prompts, max_tokens=12, temperature=0) == alone


def test_chat_session_runs_on_it(hf_dir):
    model = load_hf(hf_dir)
    session = rwkv_lm.ChatSession(model, model.tokenizer, system="Be brief.")
    reply = "".join(session.reply("Hello there!", max_tokens=8, temperature=0))
    assert isinstance(reply, str) and session.num_tokens > 8


def test_what_names_a_transformers_model(hf_dir, tmp_path):
    assert is_hf_model(hf_dir) and is_hf_model("HuggingFaceTB/SmolLM2-135M")
    assert not is_hf_model(tmp_path) and not is_hf_model("demo/models/gpt.safetensors")
    with pytest.raises(ValueError, match="cannot be loaded as a transformers causal LM"):
        load_hf(tmp_path)
