"""Sampling masks against a sort-based reference, seeded draws, and empirical frequencies."""

from __future__ import annotations

import math

import numpy as np

import pytest
import torch

from speedx.engine.sampler import counter_uniform, mask_logits
from speedx.kernels.registry import select

sample_tokens = select(torch.device("cpu"), torch.float32, torch.float32, "auto").sample_tokens  # the CPU engine's


def reference_keep(logits: list[float], top_k: int, top_p: float, min_p: float) -> set[int]:
    """Plain-Python statement of the mask rules (ties at a boundary are kept)."""
    vocab = len(logits)
    keep = set(range(vocab))
    if 0 < top_k < vocab:
        kth = sorted(logits, reverse=True)[top_k - 1]
        keep = {i for i in keep if logits[i] >= kth}

    def probs_of(kept):
        finite = [logits[i] for i in kept if logits[i] != -math.inf]
        top = max(finite)
        weights = {i: (math.exp(logits[i] - top) if logits[i] != -math.inf else 0.0) for i in kept}
        total = sum(weights.values())
        return {i: w / total for i, w in weights.items()}

    if top_p < 1:
        p = probs_of(keep)
        keep = {i for i in keep if sum(q for q in p.values() if q > p[i]) < top_p}
    if min_p > 0:
        p = probs_of(keep)
        top = max(p.values())
        keep = {i for i in keep if p[i] >= min_p * top}
    return {i for i in keep if logits[i] != -math.inf}


def random_logits(gen, vocab):
    logits = torch.randn(vocab, generator=gen) * 2
    # Ties and impossible tokens on purpose.
    logits[torch.randint(vocab, (3,), generator=gen)] = logits[0].item()
    logits[torch.randint(vocab, (2,), generator=gen)] = float("-inf")
    return logits


@pytest.mark.parametrize("case", range(40))
def test_masks_equal_reference(case):
    gen = torch.Generator().manual_seed(case)
    vocab = int(torch.randint(5, 60, (1,), generator=gen))
    rows, settings = [], []
    for _ in range(4):
        rows.append(random_logits(gen, vocab))
        settings.append((int(torch.randint(-1, vocab + 2, (1,), generator=gen)),
                         [1.0, 0.5, 0.9, 0.05][int(torch.randint(4, (1,), generator=gen))],
                         [0.0, 0.1, 0.5][int(torch.randint(3, (1,), generator=gen))]))
    logits = torch.stack(rows)
    top_k = torch.tensor([s[0] for s in settings])
    top_p = torch.tensor([s[1] for s in settings])
    min_p = torch.tensor([s[2] for s in settings])
    masked = mask_logits(logits, top_k, top_p, min_p)
    for r, (k, p, m) in enumerate(settings):
        kept = set(torch.isfinite(masked[r]).nonzero().flatten().tolist())
        assert kept == reference_keep(logits[r].tolist(), k, p, m), (k, p, m)


def full_sort_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """top-p by sorting the whole vocabulary (what mask_logits avoids): the keep mask."""
    probs = torch.softmax(logits.double(), dim=-1)
    sorted_probs = probs.sort(dim=-1, descending=True).values
    keep = sorted_probs.cumsum(-1) - sorted_probs < top_p.double().unsqueeze(1)
    smallest_kept = sorted_probs.masked_fill(~keep, float("inf")).min(dim=-1, keepdim=True).values
    return probs >= smallest_kept


@pytest.mark.parametrize("seed", range(3))
def test_top_p_on_a_large_vocabulary_equals_a_full_sort(seed):
    """Peaked rows need only the first 256 tokens sorted, flatter ones 2048, a flat one all of them."""
    gen = torch.Generator().manual_seed(seed)
    vocab = 20000
    scales = torch.tensor([8.0, 3.0, 1.0, 0.3, 0.0, 2.0])[:, None]  # 0.0: every token equally likely
    logits = torch.randn(6, vocab, generator=gen) * scales
    logits[1, :50] = logits[1, 0]  # ties
    logits[5, torch.randperm(vocab, generator=gen)[:5000]] = float("-inf")
    top_p = torch.tensor([0.9, 0.5, 0.95, 0.7, 0.6, 0.99])
    masked = mask_logits(logits, torch.zeros(6, dtype=torch.long), top_p, torch.zeros(6))
    assert torch.equal(torch.isfinite(masked), full_sort_top_p(logits, top_p))
    kept = torch.isfinite(masked).sum(-1)
    assert kept[0] < 256 < kept[3] and kept[4] == vocab  # all three regimes were exercised
    assert torch.equal(masked[torch.isfinite(masked)], logits[torch.isfinite(masked)])


def test_tied_top_k_keeps_all_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.5]])
    masked = mask_logits(logits, torch.tensor([2]), torch.tensor([1.0]), torch.tensor([0.0]))
    assert torch.isfinite(masked[0]).tolist() == [False, True, True, True, False]


def test_greedy_is_argmax_and_ignores_random():
    logits = torch.randn(5, 17)
    zeros = torch.zeros(5)
    tokens = sample_tokens(logits, zeros, torch.full((5,), -1), torch.ones(5), zeros, torch.rand(5, dtype=torch.float64))
    assert tokens.tolist() == logits.argmax(-1).tolist()


def test_counter_uniform_depends_only_on_key():
    values = {counter_uniform(7, s, p) for s in range(3) for p in range(200)}
    assert len(values) == 600
    assert all(0.0 <= v < 1.0 for v in values)
    assert counter_uniform(7, 1, 5) == counter_uniform(7, 1, 5)


def test_draw_is_batch_invariant():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(8, 50, generator=gen)
    temp, k, p, m = torch.full((8,), 0.7), torch.full((8,), 20), torch.full((8,), 0.95), torch.full((8,), 0.01)
    u = torch.tensor([counter_uniform(11, 0, pos) for pos in range(8)], dtype=torch.float64)
    batch = sample_tokens(logits, temp, k, p, m, u)
    perm = torch.randperm(8, generator=gen)
    permuted = sample_tokens(logits[perm], temp[perm], k[perm], p[perm], m[perm], u[perm])
    assert permuted.tolist() == batch[perm].tolist()
    for i in range(8):
        alone = sample_tokens(logits[i : i + 1], temp[i : i + 1], k[i : i + 1], p[i : i + 1], m[i : i + 1], u[i : i + 1])
        assert int(alone) == int(batch[i])


def test_empirical_frequencies_match_masked_distribution():
    """20,000 seeded draws; each token's frequency within 5 standard errors (+1e-3) of its probability."""
    logits = torch.tensor([2.0, 1.5, 1.5, 0.3, -1.0, -2.5, float("-inf"), -4.0])
    temperature, top_k, top_p, min_p = 0.9, 6, 0.97, 0.02
    draws = 20_000
    scaled = (logits / temperature).expand(draws, -1)
    u = torch.tensor([counter_uniform(99, 0, pos) for pos in range(draws)], dtype=torch.float64)
    tokens = sample_tokens(
        scaled.clone() * temperature, torch.full((draws,), temperature), torch.full((draws,), top_k),
        torch.full((draws,), top_p), torch.full((draws,), min_p), u,
    )
    masked = mask_logits(scaled[:1], torch.tensor([top_k]), torch.tensor([top_p]), torch.tensor([min_p]))[0]
    probs = torch.softmax(masked.double(), -1)
    counts = torch.bincount(tokens, minlength=len(logits)).double() / draws
    for token, (f, q) in enumerate(zip(counts.tolist(), probs.tolist())):
        bound = 5 * math.sqrt(max(q * (1 - q), 1e-12) / draws) + 1e-3
        assert abs(f - q) <= bound, (token, f, q)
        if q == 0:
            assert f == 0


def test_tiny_probabilities_are_not_truncated():
    # A token with probability ~1e-9 must still own its share of the unit interval.
    logits = torch.tensor([[0.0, -20.7]])
    probs = torch.softmax(logits.double(), -1)
    u = torch.tensor([1.0 - probs[0, 1].item() / 2], dtype=torch.float64)
    token = sample_tokens(logits, torch.ones(1), torch.tensor([-1]), torch.ones(1), torch.zeros(1), u)
    assert int(token) == 1


def test_counter_uniforms_equal_the_scalar_hash():
    import random

    from speedx.engine.sampler import counter_uniform, counter_uniforms

    rng = random.Random()
    rows = [(rng.randrange(2**64), rng.randrange(8), rng.randrange(10**6)) for _ in range(200)]
    rows += [(0, 0, 0), (2**64 - 1, 3, 7), (-5, 1, 2)]  # negative seeds wrap like the scalar hash
    seeds, samples, positions = zip(*rows)
    expected = [counter_uniform(*row) for row in rows]
    assert counter_uniforms(seeds, samples, positions).tolist() == expected


def test_cpu_argmax_matches_torch_on_ties_nan_and_all_minus_inf():
    from speedx.engine.sampler import _argmax

    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(6, 1000, generator=gen)
    logits[1, [3, 7, 900]] = 50.0  # ties: the first wins
    logits[2, [10, 20]] = float("nan")  # NaN counts as the maximum
    logits[3] = float("-inf")
    logits[4, -1] = float("inf")
    with torch.inference_mode():
        ours = _argmax(logits)
        assert ours.dtype == torch.int64 and torch.equal(ours, logits.argmax(dim=-1))


def test_bitmask_twin_hides_cleared_bits_and_greedy_picks_the_best_allowed():
    from speedx.engine.sampler import apply_bitmask

    gen = torch.Generator().manual_seed(13)
    rows, vocab = 5, 70  # a last word only partly used
    allowed = torch.rand(rows, vocab, generator=gen) < 0.5
    allowed[:, 3] = True
    words = torch.zeros(rows, 3, dtype=torch.int64)
    for r, t in allowed.nonzero().tolist():
        words[r, t // 32] |= 1 << (t % 32)
    bitmask = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # bit 31 is the sign
    logits = torch.randn(rows, vocab, generator=gen)
    assert torch.equal(apply_bitmask(logits, bitmask), logits.masked_fill(~allowed, float("-inf")))
    zeros = torch.zeros(rows)
    tokens = sample_tokens(logits, zeros, zeros.long(), torch.ones(rows), zeros, zeros.double(), bitmask)
    assert torch.equal(tokens, logits.masked_fill(~allowed, float("-inf")).argmax(-1))


# The C++ draw on CPU (csrc/cpu_sample.cpp) against the PyTorch twin's float64 softmax/cumsum/search.

def draw_args(rows: int, vocab: int, gen: torch.Generator, temperature: float, top_k=0, top_p=1.0, min_p=0.0):
    return (
        torch.full((rows,), temperature), torch.full((rows,), top_k, dtype=torch.int64), torch.full((rows,), top_p),
        torch.full((rows,), min_p), torch.rand(rows, dtype=torch.float64, generator=gen),
    )


@pytest.mark.parametrize("vocab", [1, 7, 131, 1000, 49157])
@pytest.mark.parametrize("params", [dict(temperature=1.0), dict(temperature=0.37), dict(temperature=1.7, top_k=20),
                                    dict(temperature=0.8, top_p=0.9, min_p=0.02), dict(temperature=1.0, top_p=0.9),
                                    dict(temperature=0.5, top_p=0.3), dict(temperature=1.2, top_p=0.999)], ids=str)
def test_cpu_draw_equals_the_twin_token_for_token(vocab, params):
    from speedx.engine.sampler import sample_tokens_cpu, sample_tokens_torch

    gen = torch.Generator().manual_seed(vocab)
    for _ in range(3):
        logits = torch.randn(33, vocab, generator=gen) * 4
        logits[::5, : vocab // 2] = float("-inf")  # masked tokens (a grammar's bitmask) weigh nothing
        args = draw_args(33, vocab, gen, **params)
        assert torch.equal(sample_tokens_cpu(logits, *args), sample_tokens_torch(logits, *args))


def test_cpu_draw_edges_of_the_uniform_and_a_lone_token():
    from speedx import _C

    logits = torch.tensor([[float("-inf"), 0.5, -2.0, 1.0, float("-inf")]] * 3 + [[float("-inf")] * 2 + [3.0] + [float("-inf")] * 2])
    tokens = np.empty(4, dtype=np.int64)
    uniforms = np.array([0.0, 1 - 2.0**-53, 0.5, 0.99])
    _C.sample_rows(tokens, logits.data_ptr(), 5, np.ones(4, dtype=np.float32), uniforms, np.ones(4, dtype=np.float32), 1)
    # u = 0: the first token with weight; u just below 1: the last; a lone finite logit always wins
    assert tokens[0] == 1 and tokens[1] == 3 and tokens[3] == 2
    cdf = torch.softmax(logits[2].double(), -1).cumsum(-1)
    assert tokens[2] == int((cdf > 0.5 * cdf[-1]).nonzero()[0])


@pytest.mark.parametrize("temperature,top_p,message", [(0.0, 1.0, "temperatures must be > 0"),
                                                       (1.0, 0.0, r"top_p must be in \(0, 1\]"),
                                                       (1.0, 1.5, r"top_p must be in \(0, 1\]")])
def test_cpu_draw_rejects_bad_arguments(temperature, top_p, message):
    from speedx import _C

    logits = torch.zeros(1, 4)
    with pytest.raises(ValueError, match=message):
        _C.sample_rows(np.empty(1, dtype=np.int64), logits.data_ptr(), 4, np.full(1, temperature, dtype=np.float32),
                       np.zeros(1), np.full(1, top_p, dtype=np.float32), 1)


@pytest.mark.parametrize("top_p", [0.2, 0.5, 0.9])
def test_cpu_top_p_keeps_tied_boundary_tokens_like_the_twin(top_p):
    from speedx.engine.sampler import sample_tokens_cpu, sample_tokens_torch

    gen = torch.Generator().manual_seed(int(top_p * 10))
    logits = torch.randint(-4, 3, (64, 1000), generator=gen).float()  # a few levels: ties everywhere
    args = draw_args(64, 1000, gen, temperature=1.0, top_p=top_p)
    assert torch.equal(sample_tokens_cpu(logits, *args), sample_tokens_torch(logits, *args))
    # and the nucleus itself: uniforms just below 1 land on the last kept token, which must be a kept one
    kept = mask_logits(logits, args[1], args[2], args[3]) > float("-inf")
    last = sample_tokens_cpu(logits, *args[:4], torch.full((64,), 1 - 2.0**-53, dtype=torch.float64))
    assert bool(kept[torch.arange(64), last].all())
    assert torch.equal(last, torch.tensor([int(row.nonzero().max()) for row in kept]))


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.95])
def test_cpu_top_p_nucleus_ends_where_the_twins_does(top_p):
    """Logits sorted high to low: the nucleus is a prefix, and a uniform just below 1 draws its last
    token, so the C++ boundary must equal the twin mask's to the token."""
    from speedx.engine.sampler import sample_tokens_cpu

    gen = torch.Generator().manual_seed(int(top_p * 100))
    logits = (torch.randn(16, 49157, generator=gen) * 2).sort(dim=-1, descending=True).values
    args = draw_args(16, 49157, gen, temperature=0.9, top_p=top_p)
    kept = mask_logits(logits / 0.9, args[1], args[2], args[3]) > float("-inf")
    last = sample_tokens_cpu(logits, *args[:4], torch.full((16,), 1 - 2.0**-53, dtype=torch.float64))
    assert torch.equal(last, kept.sum(dim=-1) - 1)
