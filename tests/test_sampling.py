"""Sampling: a pure function of logits and each row's settings; every setting does what its name says."""
import pickle

import pytest
import torch

from rwkv_lm.ops.cpu_kernels import kernels
from rwkv_lm.sampling import (RowSampler, SamplingError, SamplingParams, forbid, greedy_tokens, resolve, sample,
                              top_p_filter, unpack_bitmask)

LOGITS = torch.tensor([[0.0, 3.0, 2.0, 1.0, -1.0, 2.5]])


def sampler(params, **kw):
    row = RowSampler(params, **kw)
    row.generator = row.generator or torch.Generator().manual_seed(0)
    return row


def draws(params, n=4000, logits=LOGITS, **kw):
    row = sampler(params, **kw)
    return torch.stack([sample(logits, [row]) for _ in range(n)]).flatten()


def test_greedy_is_argmax():
    logits = torch.randn(5, 1000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample(logits, [RowSampler(SamplingParams(temperature=0))] * 5), logits.argmax(-1))


def test_temperature_one_follows_softmax():
    counts = torch.bincount(draws(SamplingParams(seed=1)), minlength=6).float() / 4000
    assert torch.allclose(counts, LOGITS.softmax(-1)[0], atol=0.025)


def test_low_temperature_sharpens():
    assert (draws(SamplingParams(temperature=0.1, seed=1), 500) == 1).float().mean() > 0.98


def test_top_k_keeps_the_k_best():
    assert set(draws(SamplingParams(top_k=2, seed=1), 500).tolist()) == {1, 5}


def test_top_p_keeps_the_smallest_set_reaching_p():
    p = LOGITS.softmax(-1)[0]  # sorted: 1 (0.40), 5 (0.24), 2 (0.15), ...
    top_p = float(p[1] + p[5]) - 0.01
    assert set(draws(SamplingParams(top_p=top_p, seed=1), 500).tolist()) == {1, 5}
    assert set(draws(SamplingParams(top_p=1e-6, seed=1), 100).tolist()) == {1}


def test_min_p_drops_unlikely_tokens():
    # p(token) / p(best) = exp(logit - 3): token 5: 0.61, token 2: 0.37, token 3: 0.14
    assert set(draws(SamplingParams(min_p=0.3, seed=1), 800).tolist()) == {1, 5, 2}


def test_banned_token_never_drawn():
    assert 1 not in draws(SamplingParams(seed=1), 500, banned=(1,)).tolist()
    assert sample(LOGITS, [RowSampler(SamplingParams(temperature=0), banned=(1,))]).item() == 5


def test_greedy_rows_with_banned_tokens_take_the_masked_argmax():
    """Greedy rows whose only edit is a banned set skip the masking unless the raw argmax is banned: the tokens of
    the masked argmax on random logits, with ties (the first maximum banned or not) and NaN (banned or not)."""
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        logits = torch.randint(0, 6, (5, 40), generator=g).float()  # many ties
        if trial % 4 == 0:
            logits[trial % 5, trial % 40] = float("nan")
        banned = [tuple(torch.randperm(40, generator=g)[:int(torch.randint(0, 30, (1,), generator=g))].tolist())
                  for _ in range(5)]
        rows = [RowSampler(SamplingParams(temperature=0), banned=b) for b in banned]
        masked = logits.clone()
        for i, b in enumerate(banned):
            masked[i, list(b)] = float("-inf")
        assert sample(logits, rows).tolist() == masked.argmax(-1).tolist(), trial


def test_a_negative_banned_id_is_refused():
    with pytest.raises(ValueError, match="banned token ids must be >= 0"):
        RowSampler(SamplingParams(temperature=0), banned=(3, -1))


def test_greedy_tokens_are_argmax_with_ties_and_nan():
    g = torch.Generator().manual_seed(1)
    for trial in range(100):
        logits = torch.randint(0, 4, (6, 3000), generator=g).float()
        if trial % 3 == 0:
            logits[trial % 6, (trial * 37) % 3000] = float("nan")
        if trial % 5 == 0:  # two NaNs in one row: the first wins
            logits[0, [2999 - trial, 1500 + trial]] = float("nan")
        assert torch.equal(greedy_tokens(logits), logits.argmax(-1)), trial


def test_seed_repeats_and_differs():
    a, b, c = (draws(SamplingParams(seed=s), 50) for s in (7, 7, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_penalties_follow_decayed_counts():
    params = SamplingParams(temperature=0, presence_penalty=0.4, frequency_penalty=0.3, penalty_decay=0.5)
    row = RowSampler(params)
    assert sample(LOGITS, [row]).item() == 1
    row.observe(1, 6)
    row.observe(1, 6)
    assert row.counts[1].item() == pytest.approx(1.5) and row.counts.sum().item() == pytest.approx(1.5)
    # token 1: 3.0 - 0.4 - 0.45 = 2.15 < token 5's 2.5
    assert sample(LOGITS, [row]).item() == 5
    plain = RowSampler(SamplingParams())
    plain.observe(1, 6)
    assert plain.counts is None, "no penalty, no bookkeeping"


def test_each_row_of_a_batch_follows_its_own_settings():
    """One batch, six settings: every row draws what it would draw alone, seeded rows the very same tokens."""
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    settings = [SamplingParams(temperature=0), SamplingParams(seed=3), SamplingParams(top_k=2, seed=4),
                SamplingParams(top_p=0.3, temperature=0.7, seed=5), SamplingParams(min_p=0.5, seed=6),
                SamplingParams(temperature=0, presence_penalty=5.0)]
    batch_rows = [RowSampler(p, banned=(7,) if i == 4 else ()) for i, p in enumerate(settings)]
    alone_rows = [RowSampler(p, banned=(7,) if i == 4 else ()) for i, p in enumerate(settings)]
    for _ in range(30):
        together = sample(logits, batch_rows)
        alone = torch.cat([sample(logits[i:i + 1], [row]) for i, row in enumerate(alone_rows)])
        assert torch.equal(together, alone)
        for rows in (batch_rows, alone_rows):
            for row, token in zip(rows, together.tolist()):
                row.observe(token, 50)
    assert together[0] == logits[0].argmax() and together[5] != logits[5].argmax(), "the penalty moved row 5 on"


@pytest.mark.parametrize("bad, field", [
    (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(min_p=2.0), "min_p"), (dict(max_tokens=0), "max_tokens"),
    (dict(penalty_decay=0.0), "penalty_decay"), (dict(stop=[""]), "stop"), (dict(temperature=float("nan")), "temperature"),
])
def test_invalid_values_name_the_setting(bad, field):
    with pytest.raises(SamplingError, match=field) as raised:
        SamplingParams(**bad)
    assert raised.value.param == field and raised.value.reason.startswith(field)
    copied = pickle.loads(pickle.dumps(raised.value))  # (an error may cross a process boundary)
    assert (copied.param, copied.reason, str(copied)) == (field, raised.value.reason, str(raised.value))


def test_overrides_and_unknown_names():
    params = resolve(SamplingParams(top_k=5), dict(temperature=0.5, stop="\n"))
    assert (params.top_k, params.temperature, params.stop) == (5, 0.5, ("\n",))
    with pytest.raises(ValueError, match="unknown sampling setting 'temprature'"):
        resolve(None, dict(temprature=0.5))


def test_top_p_among_candidates_matches_the_full_sort():
    """top_p looks for its cut among the most likely tokens first, then among more, and sorts everything only for
    rows whose cut lies further down (flat distributions, top_p near 1): the kept tokens are the full sort's."""
    g = torch.Generator().manual_seed(0)
    spread = torch.tensor([8.0, 6.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.1, 1e-3, 5.0, 2.5, 0.3]).unsqueeze(1)
    probs = (torch.randn(12, 5000, generator=g) * spread).softmax(-1)
    top_p = torch.tensor([0.05, 0.5, 0.9, 0.95, 0.99, 0.999, 0.3, 0.7, 0.8, 0.6, 0.97, 0.2]).unsqueeze(1)
    fast = top_p_filter(probs, top_p, candidates=(16, 256))
    reference = top_p_filter(probs, top_p, candidates=())
    assert torch.equal(fast, reference)
    kept = (reference > 0).sum(-1)
    assert (kept <= 16).any() and ((kept > 16) & (kept <= 256)).any() and (kept > 256).any(), kept  # every stage


def test_unpack_bitmask_reads_bits_as_a_loop_would():
    masks = torch.randint(-2**31, 2**31 - 1, (3, 4), dtype=torch.int32, generator=torch.Generator().manual_seed(2))
    expected = torch.tensor([[(int(masks[b, t // 32]) >> (t % 32)) & 1 for t in range(100)] for b in range(3)]).bool()
    assert torch.equal(unpack_bitmask(masks, 100), expected)


@pytest.mark.parametrize("vocab", [65536, 1000, 77])
def test_forbid_in_c_equals_the_unpacked_reference(vocab):
    if "mask_logits" not in kernels():
        pytest.skip("the CPU kernels are not built here (no C compiler)")
    g = torch.Generator().manual_seed(vocab)
    words = (vocab + 31) // 32
    masks = torch.randint(-2**31, 2**31 - 1, (16, words), dtype=torch.int32, generator=g)
    masks[:4] = -1  # rows a grammar does not constrain, and words of ones and of zeros as a grammar writes them
    masks[4:8, : words // 2] = -1
    masks[8:12, words // 2:] = 0
    logits = torch.randn(16, vocab, generator=g)
    expected = logits.masked_fill(~unpack_bitmask(masks, vocab), float("-inf"))
    forbid(logits, masks)
    assert torch.equal(logits, expected)
    assert torch.isinf(logits).any() and not torch.isinf(logits[:4]).any()


def test_allowed_tokens_are_the_only_ones_drawn():
    allowed = torch.zeros(2, 1, dtype=torch.int32)
    allowed[0, 0], allowed[1, 0] = 1 << 4, (1 << 2) | (1 << 3)  # row 0: token 4 (the least likely); row 1: 2 or 3
    rows = [sampler(SamplingParams(temperature=0)), sampler(SamplingParams(temperature=1.0))]
    logits = LOGITS.repeat(2, 1)
    for _ in range(50):
        token = sample(logits, rows, allowed).tolist()
        assert token[0] == 4 and token[1] in (2, 3)
    assert torch.equal(logits, LOGITS.repeat(2, 1))  # the caller's logits are left as they were


def test_banned_tokens_of_rows_that_share_them_and_rows_that_do_not():
    """Rows that ban the same tokens are edited together (every row, or some): each still loses exactly its own."""
    logits = torch.tensor([[0.0, 1.0, 5.0, 4.0, 3.0]]).repeat(4, 1)
    everyone = [RowSampler(SamplingParams(temperature=0), banned=(2,)) for _ in range(4)]
    assert sample(logits, everyone).tolist() == [3, 3, 3, 3]
    mixed = [RowSampler(SamplingParams(temperature=0), banned=b) for b in ((2, 3), (), (2, 3), (2,))]
    assert sample(logits, mixed).tolist() == [4, 2, 4, 3]
    assert logits[0, 2] == 5.0, "the caller's logits are left as they were"
