"""Token sampling: temperature, top-k, top-p, min-p masks, then a seeded inverse-CDF draw.

The random number of a draw is a counter-based hash of (request seed, sample index, position),
so a seeded request gets the same tokens alone or inside any batch. The draw inverts the float64
CDF with a 53-bit uniform, so even tiny probabilities keep their exact share.
"""

from __future__ import annotations

import numpy as np
import torch

from speedx.hashing import MASK64, splitmix64


def counter_uniform(seed: int, sample_index: int, position: int) -> float:
    """A uniform in [0, 1) that depends only on its three arguments."""
    x = splitmix64((seed & MASK64) ^ splitmix64(sample_index ^ splitmix64(position)))
    return (x >> 11) * 2.0**-53


def _splitmix64_array(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)  # uint64 arithmetic wraps like the & MASK64 above
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def counter_uniforms(seeds, sample_indices, positions) -> np.ndarray:
    """counter_uniform over whole rows at once (float64 array)."""
    seeds = np.fromiter((s & MASK64 for s in seeds), dtype=np.uint64)
    sample_indices = np.asarray(sample_indices, dtype=np.uint64)
    positions = np.asarray(positions, dtype=np.uint64)
    x = _splitmix64_array(seeds ^ _splitmix64_array(sample_indices ^ _splitmix64_array(positions)))
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53


def mask_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf every token outside top-k, then top-p (over the top-k renormalised), then min-p.

    Ties at a boundary are all kept: top-k keeps every logit >= the k-th largest; top-p keeps a
    token when the mass of strictly-more-probable tokens is < top_p; min-p keeps p >= min_p * p_max.
    top_k <= 0 or top_p == 1 or min_p == 0 switch a mask off for that row. Returns `logits` itself
    (not a copy) when no mask is on.
    """
    vocab = logits.shape[-1]
    k_on = (top_k > 0) & (top_k < vocab)
    p_on = top_p < 1
    m_on = min_p > 0
    if not bool((k_on | p_on | m_on).any()):
        return logits
    logits = logits.clone()
    if bool(k_on.any()):
        k = torch.where(k_on, top_k, torch.ones_like(top_k)).clamp(max=vocab)
        kth = logits.topk(int(k.max()), dim=-1).values.gather(1, (k - 1).unsqueeze(1))
        kth = torch.where(k_on.unsqueeze(1), kth, torch.full_like(kth, float("-inf")))
        logits.masked_fill_(logits < kth, float("-inf"))
    if bool(p_on.any()):
        probs = torch.softmax(logits.double(), dim=-1)
        smallest_kept = _smallest_top_p_prob(probs, top_p.double())
        drop = (probs < smallest_kept) & p_on.unsqueeze(1)
        logits.masked_fill_(drop, float("-inf"))
    if bool(m_on.any()):
        probs = torch.softmax(logits, dim=-1)
        threshold = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        logits.masked_fill_((probs < threshold) & m_on.unsqueeze(1), float("-inf"))
    return logits


def _smallest_top_p_prob(probs: torch.Tensor, top_p: torch.Tensor, first_k: int = 256) -> torch.Tensor:
    """Per row, the smallest probability that top-p keeps ([rows, 1]; rows with top_p >= 1: any).

    Sorts only the k most probable tokens, k growing 8x until top-p drops the last of them in every
    row: then it drops all that follow too, and the sorted prefix gives the cumulative sums a full
    sort would (which costs ~20x more on a 50K vocabulary)."""
    vocab = probs.shape[-1]
    k = min(first_k, vocab)
    while True:
        top = probs.topk(k, dim=-1).values  # sorted, descending
        keep = top.cumsum(-1) - top < top_p.unsqueeze(1)  # the mass of the more probable ones
        if k == vocab or bool((~keep[:, -1] | (top_p >= 1)).all()):
            return top.masked_fill(~keep, float("inf")).min(dim=-1, keepdim=True).values
        k = min(8 * k, vocab)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits with -inf wherever the row's bitmask bit is clear."""
    vocab = logits.shape[-1]
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).flatten(-2)[..., :vocab].bool()
    return logits.masked_fill(~allowed, float("-inf"))


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """Index of each row's first maximum (NaN counts as the maximum, as in torch.argmax)."""
    if logits.device.type == "cpu":  # numpy's argmax is ~6x faster than torch's on CPU, same answer
        return torch.from_numpy(logits.numpy().argmax(axis=-1))
    return logits.argmax(dim=-1)


def sample_tokens_torch(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    uniforms: torch.Tensor,
) -> torch.Tensor:
    """logits [rows, vocab] fp32 -> token ids [rows]. temperature 0 means greedy (argmax)."""
    return _sample(logits, temperature, top_k, top_p, min_p, uniforms, _draw_torch)


def sample_tokens_cpu(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    uniforms: torch.Tensor,
) -> torch.Tensor:
    """sample_tokens_torch's contract and tokens on CPU fp32 logits, the draw (and a top-p mask) in C++
    (csrc/cpu_sample.cpp, fp64 weights) instead of float64 softmaxes, sorts, cumsum and search."""
    return _sample(logits, temperature, top_k, top_p, min_p, uniforms, _draw_cpp)


def _sample(logits, temperature, top_k, top_p, min_p, uniforms, draw) -> torch.Tensor:
    """Greedy rows by argmax; the rows with temperature > 0 through draw(...) on just those rows."""
    tokens = _argmax(logits)
    sampled = (temperature > 0).nonzero().squeeze(1)
    if sampled.numel() == 0:
        return tokens
    rows = (logits, temperature, top_k, top_p, min_p, uniforms)
    if sampled.numel() < logits.shape[0]:
        rows = tuple(t[sampled] for t in rows)
    tokens[sampled] = draw(*rows)
    return tokens


def _draw_torch(logits, temperature, top_k, top_p, min_p, uniforms) -> torch.Tensor:
    masked = mask_logits(logits / temperature.unsqueeze(1), top_k, top_p, min_p)
    cdf = torch.softmax(masked.double(), dim=-1).cumsum(dim=-1)
    target = uniforms.double().unsqueeze(1) * cdf[:, -1:]
    # right=True: the first token whose CDF exceeds the target, so zero-probability tokens never win.
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=logits.shape[-1] - 1)


def _draw_cpp(logits, temperature, top_k, top_p, min_p, uniforms) -> torch.Tensor:
    """Top-p alone is applied in C++ too; with top-k or min-p in the batch, the masks run here first."""
    from speedx.kernels.cpu import draw_rows

    if bool((((top_k > 0) & (top_k < logits.shape[-1])) | (min_p > 0)).any()):
        logits = mask_logits(logits / temperature.unsqueeze(1), top_k, top_p, min_p)  # scaled and masked
        temperature, top_p = torch.ones_like(temperature), torch.ones_like(top_p)
    return draw_rows(logits, temperature, uniforms, top_p)
