"""Sampling in Triton: temperature, top-k, top-p, min-p (+ an optional token bitmask), then a draw.

Masks equal speedx.engine.sampler.mask_logits (the sort-based twin) without sorting: the top-k and
top-p thresholds are found by a search over the logits' order-preserving int32 keys, 16 candidate
keys per pass over the row, 8 passes each (top-k: the largest key with >= k logits at or above it,
i.e. the k-th largest with ties kept; top-p: the smallest key whose strictly-greater mass is
< top_p, from fp32 probabilities summed in float64 per block, so it differs from the twin's float64
only when a mass lies within ~1e-7 of top_p).

The draw is an exponential race (Gumbel-max): token = argmax(logit - log E_t), E_t ~ Exp(1) from a
SplitMix64 stream keyed by the row's 53-bit key and indexed by the token, so a row's token depends only on
its key: batch-invariant and no host sync. E_t comes from 64 random bits in float64 and is exact
near 0 (series for -log1p(-v)), where a rare token's chance is decided.
"""

from __future__ import annotations

import torch

from speedx.kernels.triton_jit import check_device, import_triton, jit

triton = import_triton()
import triton.language as tl  # noqa: E402


@jit
def _load_block(row_logits, row_bitmask, start, vocab, temp, HAS_BITMASK: tl.constexpr, SCALE: tl.constexpr,
                BLOCK_V: tl.constexpr):
    """Logits of one block as fp32 (bitmask-disallowed -> -inf, / temperature), the in-vocab flag and
    an int32 key with the float order (-0.0 folded onto +0.0 so they tie like the floats do)."""
    offs = start + tl.arange(0, BLOCK_V)
    valid = offs < vocab
    x = tl.load(row_logits + offs, mask=valid, other=float("-inf")).to(tl.float32)
    if HAS_BITMASK:
        words = tl.load(row_bitmask + offs // 32, mask=valid, other=0)
        x = tl.where(((words >> (offs % 32)) & 1) != 0, x, float("-inf"))
    if SCALE:
        x = tl.math.div_rn(x, temp)  # IEEE division, like the twin's logits / temperature
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return x, valid, key


@jit
def _sample_kernel(
    logits_ptr, stride_l, vocab, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr,
    key_ptr, seed_ptr, sample_index_ptr, position_ptr, bitmask_ptr, stride_bm, tokens_ptr, masked_ptr, stride_m,
    HAS_BITMASK: tl.constexpr, HASH_KEYS: tl.constexpr, DRAW: tl.constexpr, WRITE_MASKED: tl.constexpr,
    BLOCK_V: tl.constexpr, RADIX_BITS: tl.constexpr,
):
    RADIX: tl.constexpr = 1 << RADIX_BITS
    row = tl.program_id(0).to(tl.int64)
    row_logits = logits_ptr + row * stride_l
    row_bitmask = bitmask_ptr + row * stride_bm
    offs = tl.arange(0, BLOCK_V)
    temp = 1.0  # mask_logits mode has no temperature
    if DRAW:
        temp = tl.load(temperature_ptr + row).to(tl.float32)

    # Max and first argmax of the raw (bitmasked) logits: greedy rows stop here.
    best = tl.full((), float("-inf"), tl.float32)
    best_idx = tl.full((), 0, tl.int32)
    for start in range(0, vocab, BLOCK_V):
        x, valid, _ = _load_block(row_logits, row_bitmask, start, vocab, temp, HAS_BITMASK, False, BLOCK_V)
        block_max = tl.max(x, 0)
        best_idx = tl.where(block_max > best, tl.argmax(x, 0) + start, best_idx)
        best = tl.maximum(best, block_max)
    x_max = best
    if DRAW:
        if temp == 0:
            tl.store(tokens_ptr + row, best_idx.to(tl.int64))
            return
        x_max = tl.math.div_rn(best, temp)  # rounding is monotone: the max of the scaled logits

    # Threshold searches: each pass tests RADIX evenly spaced keys t_j at once (a 16-ary search),
    # so 8 passes pin one of the 2**32 int32 keys instead of 32 binary-search passes.
    lanes = tl.arange(0, RADIX)

    # Top-k: the largest key K with count(key >= K) >= k is the k-th largest logit (ties kept).
    top_k = tl.load(top_k_ptr + row)
    kth = tl.full((), -2147483648, tl.int64)
    if (top_k > 0) & (top_k < vocab):
        lo = tl.full((), -2147483648, tl.int64)
        hi = tl.full((), 2147483647, tl.int64)
        for _step in range(32 // RADIX_BITS):
            t = lo + lanes.to(tl.int64) * ((hi - lo + RADIX) // RADIX)
            count = tl.zeros([RADIX], tl.int32)
            for start in range(0, vocab, BLOCK_V):
                x, valid, key = _load_block(row_logits, row_bitmask, start, vocab, temp, HAS_BITMASK, DRAW, BLOCK_V)
                count += tl.sum(((key[:, None] >= t[None, :]) & valid[:, None]).to(tl.int32), 0)
            j = tl.max(tl.where(count >= top_k, lanes, 0), 0)  # last t_j still holding >= k (t_0 = lo does)
            hi = tl.where(j == RADIX - 1, hi, tl.minimum(hi, tl.sum(tl.where(lanes == j + 1, t, 0), 0) - 1))
            lo = tl.sum(tl.where(lanes == j, t, 0), 0)
        kth = lo

    # Top-p over the top-k renormalised: keep a token when the mass f of strictly more probable tokens
    # is < top_p; f is nonincreasing in the key, so the kept tokens are those at or above the smallest
    # key K with f(K) < top_p (f(INT32_MAX) = 0). Probabilities are fp32 (exp on the fast unit), each
    # block's sum is added in float64: the twin's float64 masses to ~1e-7, far cheaper than fp64 exp.
    top_p = tl.load(top_p_ptr + row).to(tl.float64)
    cut = kth
    if top_p < 1.0:
        total = tl.full((), 0.0, tl.float64)
        for start in range(0, vocab, BLOCK_V):
            x, valid, key = _load_block(row_logits, row_bitmask, start, vocab, temp, HAS_BITMASK, DRAW, BLOCK_V)
            total += tl.sum(tl.where(valid & (key >= kth), tl.exp(x - x_max), 0.0), 0).to(tl.float64)
        inv_total = (1.0 / total).to(tl.float32)
        lo = tl.full((), -2147483648, tl.int64)
        hi = tl.full((), 2147483647, tl.int64)
        for _step in range(32 // RADIX_BITS):
            t = lo + lanes.to(tl.int64) * ((hi - lo + RADIX) // RADIX)
            mass = tl.zeros([RADIX], tl.float64)
            for start in range(0, vocab, BLOCK_V):
                x, valid, key = _load_block(row_logits, row_bitmask, start, vocab, temp, HAS_BITMASK, DRAW, BLOCK_V)
                p = tl.where(valid & (key >= kth), tl.exp(x - x_max) * inv_total, 0.0)
                mass += tl.sum(tl.where(key[:, None] > t[None, :], p[:, None], 0.0), 0).to(tl.float64)
            j = tl.min(tl.where(mass < top_p, lanes, RADIX), 0)  # first t_j below top_p; RADIX: none
            prev = tl.sum(tl.where(lanes == j - 1, t, 0), 0)
            hi = tl.where(j == RADIX, hi, tl.minimum(hi, tl.sum(tl.where(lanes == j, t, 0), 0)))
            lo = tl.where(j == 0, lo, prev + 1)
        cut = tl.maximum(kth, lo)

    # Min-p on the fp32 softmax of what is left: keep p >= min_p * p_max, p_max = exp(0) / total.
    min_p = tl.load(min_p_ptr + row).to(tl.float32)
    total32 = tl.full((), 1.0, tl.float32)
    if min_p > 0:
        total32 = tl.full((), 0.0, tl.float32)
        for start in range(0, vocab, BLOCK_V):
            x, valid, key = _load_block(row_logits, row_bitmask, start, vocab, temp, HAS_BITMASK, DRAW, BLOCK_V)
            total32 += tl.sum(tl.where(valid & (key >= cut), tl.exp(x - x_max), 0.0), 0)
    threshold = min_p * (1.0 / total32)

    if DRAW:
        if HASH_KEYS:  # counter_uniform's splitmix64 chain (seed, sample index, position) >> 11
            z = tl.load(position_ptr + row).to(tl.uint64, bitcast=True) + 0x9E3779B97F4A7C15
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
            z = (z ^ (z >> 27)) * 0x94D049BB133111EB
            z = (z ^ (z >> 31)) ^ tl.load(sample_index_ptr + row).to(tl.uint64, bitcast=True)
            z = z + 0x9E3779B97F4A7C15
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
            z = (z ^ (z >> 27)) * 0x94D049BB133111EB
            z = (z ^ (z >> 31)) ^ tl.load(seed_ptr + row).to(tl.uint64, bitcast=True)
            z = z + 0x9E3779B97F4A7C15
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
            z = (z ^ (z >> 27)) * 0x94D049BB133111EB
            row_key = ((z ^ (z >> 31)) >> 11).to(tl.int64, bitcast=True)
        else:
            row_key = tl.load(key_ptr + row)
        stream = row_key.to(tl.uint64, bitcast=True) * 0xBF58476D1CE4E5B9  # spread the 53-bit key
    best = tl.full((), float("-inf"), tl.float32)
    best_idx = tl.full((), 0, tl.int32)
    for start in range(0, vocab, BLOCK_V):
        x, valid, key = _load_block(row_logits, row_bitmask, start, vocab, temp, HAS_BITMASK, DRAW, BLOCK_V)
        keep = valid & (key >= cut) & (tl.exp(x - x_max) / total32 >= threshold)
        if WRITE_MASKED:
            tl.store(masked_ptr + row * stride_m + start + offs, tl.where(keep, x, float("-inf")), mask=valid)
        if DRAW:
            # SplitMix64 stream of the row: state key + (token + 1) * golden gamma, then the finaliser.
            r = stream + (start + offs + 1).to(tl.uint64) * 0x9E3779B97F4A7C15
            r = (r ^ (r >> 30)) * 0xBF58476D1CE4E5B9
            r = (r ^ (r >> 27)) * 0x94D049BB133111EB
            r = r ^ (r >> 31)
            hi_f = (r >> 32).to(tl.float64)
            lo_f = (r & 0xFFFFFFFF).to(tl.float64)
            v = hi_f * 2.3283064365386963e-10 + lo_f * 5.421010862427522e-20 + 2.710505431213761e-20  # (0, 1)
            w = (4294967295.0 - hi_f) * 2.3283064365386963e-10 + (4294967295.0 - lo_f) * 5.421010862427522e-20
            w = w + 2.710505431213761e-20  # exactly 1 - v, and exact near 0 too
            e = tl.where(v < 0.0009765625, v * (1.0 + v * (0.5 + v * (0.3333333333333333 + v * 0.25))), -tl.log(w))
            score = tl.where(keep, x - tl.log(e).to(tl.float32), float("-inf"))
            block_max = tl.max(score, 0)
            best_idx = tl.where(block_max > best, tl.argmax(score, 0) + start, best_idx)
            best = tl.maximum(best, block_max)
    if DRAW:
        tl.store(tokens_ptr + row, best_idx.to(tl.int64))


RADIX_BITS = 4  # 16 candidate thresholds per pass over the row
NUM_WARPS = 8


def _block_v(vocab: int) -> int:
    # [BLOCK_V, 16] search tiles stay in registers at 8 warps (no spills on sm_90)
    return min(triton.next_power_of_2(vocab), 1024)


def _launch(logits, temperature, top_k, top_p, min_p, *, keys=None, seeds=None, sample_indices=None, positions=None,
            bitmask=None, draw=True, write_masked=False):
    check_device(logits)
    rows, vocab = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    tokens = torch.empty(rows, dtype=torch.int64, device=logits.device)
    masked = torch.empty((rows, vocab), dtype=torch.float32, device=logits.device) if write_masked else tokens
    if rows == 0:
        return tokens, masked
    if bitmask is not None:
        assert bitmask.dtype == torch.int32 and bitmask.shape == (rows, (vocab + 31) // 32), "bitmask: int32 [rows, ceil(vocab/32)]"
        bitmask = bitmask.contiguous()
    hash_keys = keys is None
    dummy = tokens
    _sample_kernel[(rows,)](
        logits, logits.stride(0), vocab, temperature if draw else dummy, top_k, top_p, min_p,
        dummy if hash_keys else keys, seeds if draw and hash_keys else dummy,
        sample_indices if draw and hash_keys else dummy, positions if draw and hash_keys else dummy,
        dummy if bitmask is None else bitmask, 0 if bitmask is None else bitmask.stride(0),
        tokens, masked, masked.stride(0) if write_masked else 0,
        HAS_BITMASK=bitmask is not None, HASH_KEYS=hash_keys, DRAW=draw, WRITE_MASKED=write_masked,
        BLOCK_V=_block_v(vocab), RADIX_BITS=RADIX_BITS, num_warps=NUM_WARPS,
    )
    return tokens, masked


def sample_tokens_triton(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    seeds: torch.Tensor,
    sample_indices: torch.Tensor,
    positions: torch.Tensor,
    bitmask: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits [rows, vocab] -> token ids [rows] (int64). temperature 0 = greedy. seeds, sample_indices,
    positions: int64 [rows] (seeds >= 2**63 passed as their two's complement); the row's key is
    counter_uniform(seed, sample_index, position) * 2**53, so this draws exactly what
    sample_tokens_from_uniforms_triton draws from those uniforms. bitmask: int32 [rows, ceil(vocab/32)],
    bit set = allowed, applied before everything (greedy rows too)."""
    return _launch(logits, temperature, top_k, top_p, min_p, seeds=seeds, sample_indices=sample_indices,
                   positions=positions, bitmask=bitmask)[0]


def sample_tokens_from_uniforms_triton(logits, temperature, top_k, top_p, min_p, uniforms, bitmask=None) -> torch.Tensor:
    """sample_tokens' signature: the per-row uniform (counter_uniform, a multiple of 2**-53) becomes
    the row's 53-bit key, so the draw stays keyed by (seed, sample index, position)."""
    keys = (uniforms.to(torch.float64) * 2.0**53).to(torch.int64)
    return _launch(logits, temperature, top_k, top_p, min_p, keys=keys, bitmask=bitmask)[0]


def mask_logits_triton(logits, top_k, top_p, min_p, bitmask=None) -> torch.Tensor:
    """mask_logits' result (fp32, dropped tokens -inf), bitmask applied first."""
    return _launch(logits, None, top_k, top_p, min_p, bitmask=bitmask, draw=False, write_masked=True)[1]
