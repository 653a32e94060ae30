"""Triton sampling against the sort-based twin (speedx.engine.sampler): identical masks (ties, -inf,
bitmask), greedy argmax, a draw keyed only by (seed, sample index, position), and frequencies that
match the masked distribution. CPU: Triton interpreter; @gpu: compiled on CUDA."""

from __future__ import annotations

import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from triton_marks import needs_cuda, needs_interpreter  # noqa: E402
from speedx.kernels.registry import select  # noqa: E402
from speedx.engine.sampler import counter_uniform, mask_logits, sample_tokens_torch  # noqa: E402
from speedx.kernels.triton_sampling import (  # noqa: E402
    mask_logits_triton,
    sample_tokens_from_uniforms_triton,
    sample_tokens_triton,
)



def random_case(rows, vocab, device="cpu"):
    """Logits with heavy ties (small integers) on half the rows, -inf runs, and mask settings that
    hit the edges: top_k 0 / 1 / at a tie / >= vocab, top_p 1 / tiny, min_p 0 / large."""
    logits = torch.randn(rows, vocab) * 3
    logits[: rows // 2] = torch.randint(-4, 4, (rows // 2, vocab)).float()
    logits[1, : vocab // 2] = float("-inf")
    logits[3, torch.randperm(vocab)[: vocab - 5]] = float("-inf")  # fewer finite logits than top_k
    logits[4, 7] = -0.0  # ties with +0.0 like the floats do
    top_k = torch.randint(0, 40, (rows,))
    top_k[[0, 2]] = torch.tensor([1, vocab])
    top_k[5] = vocab + 3
    top_p = torch.rand(rows) * 0.9 + 0.05
    top_p[[0, 6]] = torch.tensor([1.0, 0.001])
    min_p = torch.rand(rows) * 0.2
    min_p[[1, 7]] = torch.tensor([0.0, 0.9])
    return [t.to(device) for t in (logits, top_k, top_p, min_p)]


def random_bitmask(rows, vocab, device="cpu"):
    allowed = torch.rand(rows, vocab) < 0.6
    allowed[:, 0] = True  # at least one token per row
    return pack_bitmask(allowed).to(device), allowed.to(device)


def pack_bitmask(allowed):
    rows, vocab = allowed.shape
    words = (vocab + 31) // 32
    padded = torch.zeros(rows, words * 32, dtype=torch.int64)
    padded[:, :vocab] = allowed.long()
    packed = (padded.view(rows, words, 32) << torch.arange(32)).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # bit 31 -> sign


def check_masks(rows, vocab, device="cpu"):
    logits, top_k, top_p, min_p = random_case(rows, vocab, device)
    assert torch.equal(mask_logits_triton(logits, top_k, top_p, min_p), mask_logits(logits, top_k, top_p, min_p))
    bitmask, allowed = random_bitmask(rows, vocab, device)
    expected = mask_logits(logits.masked_fill(~allowed, float("-inf")), top_k, top_p, min_p)
    assert torch.equal(mask_logits_triton(logits, top_k, top_p, min_p, bitmask=bitmask), expected)


@needs_interpreter
@pytest.mark.parametrize("rows,vocab", [(12, 300), (8, 64), (8, 4100)], ids=["300", "64", "two-blocks"])
def test_masks_match_sort_based_twin(rows, vocab):
    check_masks(rows, vocab)


def row_args(rows, temperature, top_k=0, top_p=1.0, min_p=0.0, device="cpu"):
    return (
        torch.full((rows,), temperature, device=device),
        torch.full((rows,), top_k, dtype=torch.int64, device=device),
        torch.full((rows,), top_p, device=device),
        torch.full((rows,), min_p, device=device),
    )


@needs_interpreter
def test_greedy_rows_are_first_argmax_after_bitmask():
    logits = torch.randint(-3, 3, (6, 70)).float()  # many tied maxima: the first one wins, like torch
    logits[2, 40] = 9.0
    bitmask, allowed = random_bitmask(6, 70)
    seeds = torch.arange(6)
    args = row_args(6, 0.0, top_k=3, top_p=0.5, min_p=0.3)  # masks do not apply to greedy rows
    tokens = sample_tokens_triton(logits, *args, seeds, seeds, seeds)
    assert torch.equal(tokens, logits.argmax(-1))
    tokens = sample_tokens_triton(logits, *args, seeds, seeds, seeds, bitmask=bitmask)
    assert torch.equal(tokens, logits.masked_fill(~allowed, float("-inf")).argmax(-1))


def check_keyed_draw(device="cpu"):
    rows, vocab = 10, 300
    logits, top_k, top_p, min_p = random_case(rows, vocab, device)
    temperature = (torch.rand(rows) + 0.5).to(device)
    seeds = torch.tensor([2**63 + 5] * 3 + list(range(7)), dtype=torch.uint64).view(torch.int64).to(device)
    sample_idx = torch.randint(0, 3, (rows,)).to(device)
    positions = torch.randint(0, 10_000, (rows,)).to(device)
    tokens = sample_tokens_triton(logits, temperature, top_k, top_p, min_p, seeds, sample_idx, positions)
    # every token is inside the twin's mask of the temperature-scaled logits
    masked = mask_logits(logits / temperature.unsqueeze(1), top_k, top_p, min_p)
    assert torch.isfinite(masked.gather(1, tokens.unsqueeze(1))).all()
    # any batch order / composition: rows reversed and doubled with other rows in between
    order = torch.cat([torch.arange(rows).flip(0), torch.arange(rows)]).to(device)
    again = sample_tokens_triton(
        logits[order], temperature[order], top_k[order], top_p[order], min_p[order],
        seeds[order], sample_idx[order], positions[order],
    )
    assert torch.equal(again, tokens[order])
    # the engine's path (sample_tokens with counter_uniform's uniforms) draws the same tokens
    uniforms = torch.tensor(
        [counter_uniform(s % 2**64, i, p) for s, i, p in zip(seeds.tolist(), sample_idx.tolist(), positions.tolist())],
        dtype=torch.float64, device=device,
    )
    assert torch.equal(sample_tokens_from_uniforms_triton(logits, temperature, top_k, top_p, min_p, uniforms), tokens)


@needs_interpreter
def test_draw_is_keyed_by_seed_sample_position_only():
    check_keyed_draw()


def check_frequencies(draws, device="cpu"):
    """Many positions of one seeded row: each token's frequency within 4.5 sigma of its probability
    under the twin's masked distribution (fixed seed, so deterministic; a fair draw fails ~1e-4)."""
    logits = torch.tensor([[2.0, 1.5, 1.5, 0.0, -1.0, -2.5, 3.0, -6.0]])
    vocab = logits.shape[1]
    allowed = torch.ones(1, vocab, dtype=torch.bool)
    allowed[0, 6] = False  # the bitmask removes the best token
    bitmask = pack_bitmask(allowed).to(device).expand(draws, -1)
    temperature, top_k, top_p, min_p = row_args(draws, 0.8, min_p=0.02, device=device)
    positions = torch.arange(draws, device=device)
    tokens = sample_tokens_triton(
        logits.to(device).expand(draws, -1), temperature, top_k, top_p, min_p,
        torch.full((draws,), 1234, device=device), torch.zeros(draws, dtype=torch.int64, device=device), positions,
        bitmask=bitmask,
    )
    masked = mask_logits(logits.masked_fill(~allowed, float("-inf")) / 0.8, top_k[:1].cpu(), top_p[:1].cpu(), min_p[:1].cpu())
    probs = torch.softmax(masked.double(), -1)[0]
    freqs = torch.bincount(tokens.cpu(), minlength=vocab).double() / draws
    sigma = (probs * (1 - probs) / draws).sqrt()
    assert (freqs[probs == 0] == 0).all(), "a masked token was drawn"
    assert ((freqs - probs).abs() <= 4.5 * sigma + 1e-12).all(), (freqs, probs)


@needs_interpreter
def test_frequencies_match_masked_distribution():
    check_frequencies(800)


@needs_interpreter
def test_sampler_dispatch(monkeypatch):
    rows, vocab = 8, 100
    logits, top_k, top_p, min_p = random_case(rows, vocab)
    temperature = torch.tensor([0.0, 1.0, 0.7, 0.0, 1.3, 0.9, 0.5, 2.0])
    uniforms = torch.tensor([counter_uniform(7, 0, p) for p in range(rows)], dtype=torch.float64)
    monkeypatch.setenv("SPEEDX_KERNELS", "torch")
    cpu = torch.device("cpu")
    twin = select(cpu, torch.float32, torch.float32).sample_tokens(logits, temperature, top_k, top_p, min_p, uniforms)
    assert torch.equal(twin, sample_tokens_torch(logits, temperature, top_k, top_p, min_p, uniforms))
    monkeypatch.setenv("SPEEDX_KERNELS", "triton")
    tokens = select(cpu, torch.float32, torch.float32).sample_tokens(logits, temperature, top_k, top_p, min_p, uniforms)
    assert torch.equal(tokens, sample_tokens_from_uniforms_triton(logits, temperature, top_k, top_p, min_p, uniforms))
    greedy = temperature == 0
    assert torch.equal(tokens[greedy], twin[greedy])
    masked = mask_logits(logits[~greedy] / temperature[~greedy, None], top_k[~greedy], top_p[~greedy], min_p[~greedy])
    assert torch.isfinite(masked.gather(1, tokens[~greedy, None])).all()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("rows,vocab", [(64, 32000), (16, 128256)], ids=["32k", "128k"])
def test_masks_gpu(rows, vocab):
    check_masks(rows, vocab, device="cuda")


@pytest.mark.gpu
@needs_cuda
def test_keyed_draw_gpu():
    check_keyed_draw(device="cuda")


@pytest.mark.gpu
@needs_cuda
def test_frequencies_gpu():
    check_frequencies(200_000, device="cuda")


@pytest.mark.gpu
@needs_cuda
def test_greedy_gpu():
    logits = torch.randn(32, 128256, device="cuda")
    args = row_args(32, 0.0, device="cuda")
    seeds = torch.arange(32, device="cuda")
    assert torch.equal(sample_tokens_triton(logits, *args, seeds, seeds, seeds), logits.argmax(-1))
