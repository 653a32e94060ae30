"""Triton RMSNorm(+residual), SiLU-and-mul and RoPE(+KV store) against their PyTorch twins. On CPU
they run under the Triton interpreter in fp32 (it truncates fp32 -> bf16 instead of rounding, so it
cannot check half-precision rounding); the @gpu variants run compiled on CUDA in fp32 and bf16."""

from __future__ import annotations

import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from triton_marks import needs_cuda, needs_interpreter  # noqa: E402
from speedx.kernels.layers_torch import rms_norm_torch, rope_and_store_torch, silu_mul_torch  # noqa: E402
from speedx.kernels.triton_layers import rms_norm_triton, rope_and_store_triton, silu_mul_triton  # noqa: E402
from speedx.models.layers import RotaryEmbedding  # noqa: E402

ON_GPU = [pytest.mark.gpu, needs_cuda]
DEVICES = [pytest.param("cpu", marks=needs_interpreter), pytest.param("cuda", marks=ON_GPU)]
CASES = [pytest.param("cpu", torch.float32, marks=needs_interpreter, id="cpu-fp32"),
         pytest.param("cuda", torch.float32, marks=ON_GPU, id="cuda-fp32"),
         pytest.param("cuda", torch.bfloat16, marks=ON_GPU, id="cuda-bf16")]
# fp32: only summation order differs. bf16: the kernels round where the twins do, so at most one
# bf16 step apart (an exp/rsqrt ulp can move a value across a rounding boundary), and rarely.
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=0, rtol=2**-7)}


def close_in_bulk(out, ref, dtype):
    torch.testing.assert_close(out.float(), ref.float(), **TOLERANCE[dtype])
    if dtype == torch.bfloat16:  # the one-step differences must be rare, not systematic
        assert (out != ref).float().mean() < 0.01


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("rows,hidden", [(37, 96), (5, 200), (1, 4096)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_twin(device, dtype, rows, hidden, with_residual):
    x = torch.randn(rows, hidden, device=device).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype)
    residual = torch.randn(rows, hidden, device=device).to(dtype) if with_residual else None
    out = rms_norm_triton(x, weight, 1e-5, residual)
    ref = rms_norm_torch(x, weight, 1e-5, residual)
    if with_residual:
        assert torch.equal(out[1], ref[1])  # the sum: one rounding, the same in both
        out, ref = out[0], ref[0]
    assert out.dtype == dtype and out.shape == x.shape
    close_in_bulk(out, ref, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_3d_input_keeps_its_shape(device):
    x = torch.randn(3, 7, 64, device=device)
    weight = torch.rand(64, device=device)
    torch.testing.assert_close(rms_norm_triton(x, weight, 1e-6), rms_norm_torch(x, weight, 1e-6), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("rows,n", [(13, 1500), (1, 64), (4, 2048)])
def test_silu_mul_matches_twin(device, dtype, rows, n):
    gate_up = (3 * torch.randn(rows, 2 * n, device=device)).to(dtype)
    out = silu_mul_triton(gate_up)
    assert out.shape == (rows, n) and out.dtype == dtype
    close_in_bulk(out, silu_mul_torch(gate_up), dtype)


def rope_case(tokens, num_heads, num_kv_heads, head_dim, dtype, device, block_size=16):
    """Fresh qkv rows, random positions, and slots scattered over a pool 4x larger than needed
    (one padded lane with slot -1); both caches start from the same random contents."""
    rotary = RotaryEmbedding(head_dim, 4096, 10000.0, None).to(device)
    qkv = torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim, device=device).to(dtype)
    positions = torch.randint(0, 4096, (tokens,), device=device)
    pool = 4 * (tokens // block_size + 1)
    slots = torch.randperm(pool * block_size, device=device)[:tokens]
    slots[tokens // 2] = -1
    cache = torch.randn(2, pool, block_size, num_kv_heads, head_dim, device=device).to(dtype)
    return qkv, positions, rotary.cos_table, rotary.sin_table, cache, slots


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (5, 1)], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128, 80])
def test_rope_and_store_matches_twin(device, dtype, heads, head_dim):
    num_heads, num_kv_heads = heads
    qkv, positions, cos, sin, cache, slots = rope_case(19, num_heads, num_kv_heads, head_dim, dtype, device)
    ref_cache = cache.clone()
    q = rope_and_store_triton(qkv, positions, cos, sin, cache[0], cache[1], slots, num_heads, num_kv_heads)
    ref_q = rope_and_store_torch(qkv, positions, cos, sin, ref_cache[0], ref_cache[1], slots, num_heads, num_kv_heads)
    assert q.shape == (19, num_heads, head_dim) and q.dtype == dtype
    close_in_bulk(q, ref_q, dtype)
    close_in_bulk(cache, ref_cache, dtype)  # K rotated, V copied, the -1 lane and all other rows untouched
    assert torch.equal(cache[1], ref_cache[1])  # V is a plain copy
    stored = cache[0].flatten(0, 1)[slots[slots >= 0]]
    assert not torch.equal(stored, torch.zeros_like(stored))


@pytest.mark.parametrize("device,dtype", CASES)
def test_rope_and_store_into_v_with_keys_contiguous(device, dtype):
    """V stored through its strides into a cache with each head's keys contiguous (FP8_V_KEYS_CONTIGUOUS)."""
    from test_triton_attention import keys_contiguous

    qkv, positions, cos, sin, cache, slots = rope_case(19, 8, 2, 64, dtype, device)
    v_cache, ref_cache = keys_contiguous(cache[1]), cache.clone()
    rope_and_store_triton(qkv, positions, cos, sin, cache[0], v_cache, slots, 8, 2)
    rope_and_store_torch(qkv, positions, cos, sin, ref_cache[0], ref_cache[1], slots, 8, 2)
    assert v_cache.stride(1) == 1 and torch.equal(v_cache, ref_cache[1])
    close_in_bulk(cache[0], ref_cache[0], dtype)
