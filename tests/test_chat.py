"""Chat sessions: the World template, state carried across turns, early exit, fork, save/load, reset."""
from dataclasses import dataclass

import pytest
import torch

from rwkv_lm import ChatSession, RWKVConfig, SamplingParams
from rwkv_lm.serve import Engine, prefill, state_key
from rwkv_lm.testing import random_model

from conftest import assert_close


@pytest.fixture(scope="module")
def model():
    cfg = RWKVConfig(vocab_size=65536, n_layer=2, n_embd=32, head_size=16, decay_lora=8, iclr_lora=8, value_lora=4, gate_lora=8)
    return random_model(cfg, seed=5)


@dataclass
class LastToken:
    """The state of `Bigram`: the last token seen, per row."""

    last: torch.Tensor  # [B]

    @property
    def nbytes(self):
        return self.last.numel() * self.last.element_size()

    def clone(self):
        return LastToken(self.last.clone())

    def tensors(self):
        return {"last": self.last}

    @classmethod
    def from_tensors(cls, tensors):
        return cls(tensors["last"])


class Bigram(torch.nn.Module):
    """A scripted model with the package's interface: the next token depends on the last one only.

    Token 0 always scores highest, so a chat that did not ban it would say nothing.
    """

    def __init__(self, table: dict[int, int], vocab_size=65536):
        super().__init__()
        self.config = RWKVConfig(vocab_size=vocab_size, n_layer=1, n_embd=64, head_size=64)
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.table, self.inputs = table, []

    def init_state(self, batch_size=1):
        return LastToken(torch.zeros(batch_size, dtype=torch.long))

    def forward(self, tokens, state=None, *, last_only=False):
        self.inputs.append(tokens[0].tolist())
        logits = torch.zeros(*tokens.shape, self.config.vocab_size)
        logits[..., 0] = 10
        nxt = torch.tensor([[self.table.get(t, 1) for t in row] for row in tokens.tolist()])
        logits.scatter_(-1, nxt.unsqueeze(-1), 5.0)
        return (logits[:, -1:] if last_only else logits), LastToken(tokens[:, -1])

    def step(self, tokens, state=None):
        logits, state = self(tokens.unsqueeze(1), state)
        return logits[:, 0], state


@pytest.fixture
def scripted(world):
    """After "Assistant:" the model says " Hello there", then a blank line, then "User"."""
    colon = world.encode("User: hi\n\nAssistant:")[-1]
    hello, there = world.encode(" Hello there")
    blank, user = world.encode("\n\nUser")
    return Bigram({colon: hello, hello: there, there: blank, blank: user}), (hello, there, blank)


def test_reply_ends_at_blank_line_and_bans_token_zero(scripted, world):
    bigram, (hello, there, blank) = scripted
    session = ChatSession(bigram, world)
    assert "".join(session.reply("hi", temperature=0)) == "Hello there"
    prompt = world.encode("User: hi\n\nAssistant:")
    assert bigram.inputs == [prompt, [hello], [there]], "prompt once, then one step per token"
    assert session.num_tokens == len(prompt) + 3

    bigram.inputs.clear()
    assert "".join(session.reply("  how\n\n\nare you?\n", temperature=0)) == "Hello there"
    # the reply's last token is fed with the next turn; newlines in the message collapse to one
    assert bigram.inputs[0] == [blank] + world.encode("User: how\nare you?\n\nAssistant:")


def test_unfinished_reply_is_closed_before_the_next_turn(scripted, world):
    bigram, (hello, _, _) = scripted
    session = ChatSession(bigram, world)
    assert "".join(session.reply("hi", temperature=0, max_tokens=1)) == "Hello"
    bigram.inputs.clear()
    list(session.reply("hi", temperature=0))
    assert bigram.inputs[0] == [hello] + world.encode("\n\nUser: hi\n\nAssistant:")


def test_system_prompt_is_read_once_and_shared_by_forks(scripted, world):
    bigram, _ = scripted
    session = ChatSession(bigram, world, system="You are\n\nterse.")
    assert bigram.inputs == [world.encode("System: You are\nterse.\n\n")]
    base = session.num_tokens
    fork = session.fork()
    list(fork.reply("hi", temperature=0))
    fork.reset()
    assert len(bigram.inputs) == 1 + 3 and fork.num_tokens == base == session.num_tokens


def test_state_is_the_whole_conversation(model, world):
    session = ChatSession(model, world, system="Be brief.")
    first = "".join(session.reply("Hello!", temperature=0, max_tokens=5))
    second = "".join(session.reply("And then?", temperature=0, max_tokens=4))
    # one pass over the same conversation, written out with the template (each part encoded on its own)
    text = f"System: Be brief.\n\nUser: Hello!\n\nAssistant: {first}"
    tokens = world.encode("System: Be brief.\n\n") + world.encode("User: Hello!\n\nAssistant:")
    tokens += _greedy(model, tokens, 5)
    tokens += world.encode("\n\nUser: And then?\n\nAssistant:")
    tokens += _greedy(model, tokens, 4)
    assert world.decode(tokens).startswith(text)
    assert session.num_tokens == len(tokens)
    assert_close(session.state.layers[-1].wkv, prefill(model, tokens)[1].layers[-1].wkv, 1e-4, "state")
    assert second == world.decode(tokens[-4:]).lstrip(" ")


def _greedy(model, tokens, n):
    logits, state = prefill(model, tokens)
    out = []
    for _ in range(n):
        logits[:, 0] = float("-inf")
        out.append(int(logits.argmax(-1)))
        logits, state = prefill(model, out[-1:], state)
    return out


@pytest.mark.parametrize("stop_after", [None, 3], ids=["whole-reply", "break"])
def test_state_mid_reply_holds_every_token_so_far(model, world, stop_after):
    prompt = world.encode("User: Hi!\n\nAssistant:")
    generated = _greedy(model, prompt, 8)
    session, pieces = ChatSession(model, world), []

    def check(when):
        so_far = prompt + generated[:session.num_tokens - len(prompt)]
        assert_close(session.state.layers[-1].wkv, prefill(model, so_far)[1].layers[-1].wkv, 1e-4, f"state {when}")

    for piece in session.reply("Hi!", temperature=0, max_tokens=8):
        pieces.append(piece)
        if len(pieces) == stop_after:
            break
        if len(pieces) % 2 == 0:  # not after every token: tokens go by unseen between two looks
            check(f"after {len(pieces)} pieces")
    check("after the reply")
    assert len(pieces) >= 3
    # reading the state did not disturb the reply
    assert "".join(pieces) == "".join(ChatSession(model, world).reply("Hi!", temperature=0, max_tokens=8))[:len("".join(pieces))]


def test_break_keeps_what_was_generated(model, world):
    full = ChatSession(model, world)
    reference = "".join(full.reply("Tell me a story.", temperature=0, max_tokens=12))
    session = ChatSession(model, world)
    pieces = []
    for piece in session.reply("Tell me a story.", temperature=0, max_tokens=12):
        pieces.append(piece)
        if len(pieces) == 3:
            break
    assert reference.startswith("".join(pieces)) and session.num_tokens < full.num_tokens
    twin = ChatSession(model, world)
    list(twin.reply("Tell me a story.", temperature=0, max_tokens=session.num_tokens - ChatSession(model, world).num_tokens
                    - len(world.encode("User: Tell me a story.\n\nAssistant:"))))
    assert twin.num_tokens == session.num_tokens
    assert_close(session.state.layers[-1].wkv, twin.state.layers[-1].wkv, 1e-6, "state after the break")


def test_fork_is_independent(model, world):
    session = ChatSession(model, world, system="You answer in one word.")
    list(session.reply("Hi", temperature=0, max_tokens=3))
    before = session.state.clone()
    fork = session.fork()
    list(fork.reply("Why?", temperature=0, max_tokens=3))
    assert fork.num_tokens > session.num_tokens
    assert torch.equal(session.state.layers[0].wkv, before.layers[0].wkv)
    assert "".join(fork.fork().reply("x", temperature=0, max_tokens=4)) == "".join(fork.reply("x", temperature=0, max_tokens=4))


def test_save_and_load_continue_the_same(tmp_path, model, world):
    session = ChatSession(model, world, system="Hello.")
    list(session.reply("Hi", temperature=0, max_tokens=3))
    session.save(tmp_path / "chat.safetensors")
    loaded = ChatSession.load(tmp_path / "chat.safetensors", model, world)
    assert loaded.num_tokens == session.num_tokens and loaded.system == "Hello."
    assert "".join(loaded.reply("More", temperature=0, max_tokens=6)) == "".join(session.reply("More", temperature=0, max_tokens=6))
    loaded.reset()
    assert loaded.num_tokens == len(world.encode("System: Hello.\n\n"))


def test_state_size_is_fixed(model, world):
    session = ChatSession(model, world)
    list(session.reply("Hi", temperature=0, max_tokens=2))
    small = session.state.nbytes
    list(session.reply("word " * 2000, temperature=0, max_tokens=2))
    assert session.state.nbytes == small


def test_bad_input(tmp_path, model, world, tiny_model):
    session = ChatSession(model, world)
    with pytest.raises(ValueError, match="user message is empty"):
        session.reply(" \n\n ")
    with pytest.raises(ValueError, match="top_p must be in"):
        session.reply("hi", top_p=0)
    with pytest.raises(ValueError, match="tokenizer has 65530 tokens but the model only 101"):
        ChatSession(tiny_model, world)
    session.save(tmp_path / "s.safetensors")
    other = random_model(RWKVConfig(vocab_size=65536, n_layer=3, n_embd=32, head_size=16, decay_lora=8, iclr_lora=8, value_lora=4, gate_lora=8))
    with pytest.raises(ValueError, match="does not fit this model"):
        ChatSession.load(tmp_path / "s.safetensors", other, world)
    (tmp_path / "junk").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="cannot be read as a saved chat session"):
        ChatSession.load(tmp_path / "junk", model, world)


def test_gpt_session_saves_and_loads(tmp_path, world):
    from rwkv_lm import GPT, GPTConfig

    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=65536, n_layer=2, n_embd=32, n_head=2)).reset_parameters().eval()
    session = ChatSession(gpt, world)
    list(session.reply("Hi", temperature=0, max_tokens=4))
    session.save(tmp_path / "gpt.safetensors")
    loaded = ChatSession.load(tmp_path / "gpt.safetensors", gpt, world)
    assert loaded.state.nbytes == session.state.nbytes > 0
    assert "".join(loaded.reply("More", temperature=0, max_tokens=5)) == "".join(session.reply("More", temperature=0, max_tokens=5))


def test_a_tuned_state_reads_its_system_prompt_once_under_its_own_cache_key(model, world):
    g = torch.Generator().manual_seed(3)
    calm, other = (model.init_state(1).map(lambda t: torch.randn(t.shape, generator=g, dtype=t.dtype) * 3) for _ in range(2))
    engine = Engine(model, world, cache=64 << 20)
    system = "You are a calm assistant who answers in one short sentence, always."
    read = len(world.encode(f"System: {system}\n\n"))
    params = SamplingParams(max_tokens=6, temperature=0)

    def session(state):
        before = dict(prompt=engine.counters.prompt_tokens, cached=engine.counters.cached_prompt_tokens)
        chat = ChatSession(model, world, system=system, state=state, engine=engine)
        return chat, engine.counters.prompt_tokens - before["prompt"], engine.counters.cached_prompt_tokens - before["cached"]

    first, fed, cached = session(calm)
    assert (fed, cached) == (read, 0)
    again, fed, cached = session(calm.clone())  # an equal state, loaded again: the same key
    assert (fed, cached) == (0, read)
    for state in (other, None):  # another state, or zeros, never starts from calm's entries
        _, fed, cached = session(state)
        assert (fed, cached) == (read, 0)
    origins = {entry.origin for entry in engine.cache._entries.values()}
    assert origins == {"", state_key(calm), state_key(other)} and state_key(calm) != state_key(other)
    alone = ChatSession(model, world, system=system, state=calm)  # its own engine, no cache
    texts = ["".join(chat.reply("Hi", params)) for chat in (first, again, alone)]
    assert texts[0] == texts[1] == texts[2]
