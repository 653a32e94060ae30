"""Triton paged attention (prefill, chunked prefill, decode, split-KV) and KV store against the
PyTorch twins. On CPU they run under the Triton interpreter (fp32, and bf16 for attention); the @gpu
variants run the compiled kernels in bf16 and fp32 on CUDA."""

from __future__ import annotations

import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from triton_marks import needs_cuda, needs_interpreter  # noqa: E402
from speedx.kernels.paged_attention import paged_attention_torch, store_kvcache_torch  # noqa: E402
from speedx.kernels.triton_attention import attention_config, paged_attention_triton, v_keys_contiguous  # noqa: E402
from speedx.kernels.triton_kv_store import store_kvcache_triton  # noqa: E402


MIXED = [(1, 1328), (5, 18), (129, 463)]  # (q_len, kv_len): a decode, a chunk, a long prefill chunk
# 37 decodes first (more than a prefill query block of the interpreter's tiles: the prompt chunks'
# launch starts past block 0), then chunks and a one-row sequence that rides their launch
DECODES_FIRST = [(1, 1 + (97 * i) % 700) for i in range(37)] + [(5, 18), (129, 463), (1, 40)]
DECODE = [(1, 1328), (1, 7), (1, 300), (1, 64), (1, 1)]
HEADS = [(4, 4), (8, 2), (5, 1)]


def keys_contiguous(v_cache: torch.Tensor) -> torch.Tensor:
    """The same values in the layout of model_runner.FP8_V_KEYS_CONTIGUOUS: each head's keys contiguous."""
    return v_cache.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)


def make_case(seqs, num_heads, num_kv_heads, head_dim, block_size=16, dtype=torch.float32, device="cpu", strided_q=False,
              v_layout="dims"):
    """Fresh random q / caches and a block table randomly permuted over a pool 3x larger than needed;
    v_layout "keys": the V cache with each head's keys contiguous."""
    blocks = [-(-kv // block_size) for _, kv in seqs]
    pool = 3 * sum(blocks) + 5
    perm = torch.randperm(pool).to(torch.int32)
    table = torch.full((len(seqs), max(blocks) + 2), -1, dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks):
        table[i, :n] = perm[used : used + n]
        used += n
    shape = (pool, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    tokens = sum(q for q, _ in seqs)
    if strided_q:  # a view out of a fused qkv row, like the model's
        q = torch.randn(tokens, num_heads + 2 * num_kv_heads, head_dim).to(dtype)[:, :num_heads]
    else:
        q = torch.randn(tokens, num_heads, head_dim).to(dtype)
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor([q_len for q_len, _ in seqs]), 0)
    kv_lens = torch.tensor([kv for _, kv in seqs], dtype=torch.int32)
    to = lambda t: t.to(device)  # noqa: E731
    v_cache = keys_contiguous(to(v_cache)) if v_layout == "keys" else to(v_cache)
    return to(q), to(k_cache), v_cache, to(table), to(cu), to(kv_lens)


def check_attention(seqs, num_heads, num_kv_heads, head_dim, atol, num_splits=1, num_decodes=0, **kw):
    q, k_cache, v_cache, table, cu, kv_lens = make_case(seqs, num_heads, num_kv_heads, head_dim, **kw)
    scale = head_dim**-0.5
    out = paged_attention_triton(q, k_cache, v_cache, table, cu, kv_lens, scale, num_splits=num_splits,
                                 num_decodes=num_decodes)
    # fp32 reference from the same (possibly bf16) inputs
    ref = paged_attention_torch(q.float(), k_cache.float(), v_cache.float(), table, cu, kv_lens, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=0)


@needs_interpreter
@pytest.mark.parametrize("heads", HEADS, ids=str)
@pytest.mark.parametrize("seqs", [MIXED, DECODE], ids=["mixed", "decode"])
def test_attention_matches_twin(seqs, heads):
    check_attention(seqs, *heads, head_dim=64, atol=2e-5)


@needs_interpreter
@pytest.mark.parametrize("seqs", [MIXED, DECODE], ids=["mixed", "decode"])
def test_attention_head_dim_128_and_strided_q(seqs):
    check_attention(seqs, 8, 2, 128, atol=2e-5, strided_q=True)


@needs_interpreter
@pytest.mark.parametrize("block_size", [4, 12])
def test_attention_small_and_odd_block_sizes(block_size):
    # the engine's tests use block_size 4; a non-power of two still walks the table per token
    check_attention([(1, 37), (3, 3), (17, 40)], 5, 1, 80, atol=2e-5, block_size=block_size)


@needs_interpreter
@pytest.mark.parametrize("num_splits", [2, 3, 8])
@pytest.mark.parametrize("heads", HEADS, ids=str)
def test_split_kv_matches_twin(heads, num_splits):
    # kv_len 1 and 7 leave most splits empty: they must merge as zero weight
    check_attention(DECODE, *heads, head_dim=64, atol=2e-5, num_splits=num_splits)


@needs_interpreter
@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("heads", HEADS, ids=str)
def test_mixed_batch_in_two_launches(heads, num_splits):
    check_attention(DECODES_FIRST, *heads, head_dim=64, atol=2e-5, num_splits=num_splits, num_decodes=37)


@needs_interpreter
@pytest.mark.parametrize("block_size", [16, 64], ids=["whole-blocks", "key-by-key"])
@pytest.mark.parametrize("seqs,num_splits,num_decodes", [(MIXED, 1, 0), (DECODE, 3, 0), (DECODES_FIRST, 4, 37)],
                         ids=["mixed", "decode-split", "decodes-first"])
def test_attention_over_v_with_keys_contiguous(seqs, num_splits, num_decodes, block_size):
    """A V cache with each head's keys contiguous: tiles of whole blocks (the interpreter's 32-key tiles
    over 16-key blocks; the last block's keys past kv_len are read and weigh 0), or key by key through
    the strides when a block is larger than a tile."""
    assert v_keys_contiguous(keys_contiguous(torch.empty(1, block_size, 1, 8)), 32) == (block_size == 16)
    check_attention(seqs, 8, 2, 64, atol=2e-5, num_splits=num_splits, num_decodes=num_decodes, block_size=block_size,
                    v_layout="keys")


@needs_interpreter
@pytest.mark.parametrize("seqs,num_splits,num_decodes", [(MIXED, 1, 0), (DECODE, 3, 0), (DECODES_FIRST, 4, 37)],
                         ids=["mixed", "decode-split", "decodes-first"])
def test_attention_bf16_in_the_interpreter(seqs, num_splits, num_decodes):
    """bf16 as the GPU runs it (SPEEDX_KERNELS=triton on CPU with a bf16 model). The interpreter's
    bf16 dots multiply the operands' bit patterns (triton-lang/triton#11584), so attention_config
    widens them to fp32 there; the products are exact either way."""
    assert attention_config(torch.bfloat16, 128, 4, False)["WIDE_DOTS"]
    check_attention(seqs, 8, 2, 128, atol=2e-2, num_splits=num_splits, num_decodes=num_decodes, dtype=torch.bfloat16)


def check_store(num_kv_heads, head_dim, dtype=torch.float32, device="cpu", v_layout="dims"):
    pool, block_size, tokens = 40, 16, 50
    k_cache = torch.randn(pool, block_size, num_kv_heads, head_dim).to(dtype).to(device)
    v_cache = torch.randn_like(k_cache)
    if v_layout == "keys":
        v_cache = keys_contiguous(v_cache)
    qkv = torch.randn(tokens, 3 * num_kv_heads, head_dim).to(dtype).to(device)
    k, v = qkv[:, :num_kv_heads], qkv[:, num_kv_heads : 2 * num_kv_heads]  # strided views, like the model's
    slots = torch.randperm(pool * block_size)[:tokens].to(device)
    slots[torch.randperm(tokens)[:7]] = -1  # padding rows
    k_ref, v_ref = k_cache.clone(), v_cache.contiguous().clone()  # the twin stores into the usual layout
    store_kvcache_torch(k, v, k_ref, v_ref, slots)
    store_kvcache_triton(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@needs_interpreter
@pytest.mark.parametrize("num_kv_heads,head_dim", [(2, 64), (1, 128), (3, 80)])
def test_store_kvcache_matches_twin(num_kv_heads, head_dim):
    check_store(num_kv_heads, head_dim)
    check_store(num_kv_heads, head_dim, v_layout="keys")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("num_splits", [1, 4, 0])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", HEADS, ids=str)
@pytest.mark.parametrize("seqs", [MIXED, DECODE], ids=["mixed", "decode"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_attention_gpu(dtype, seqs, heads, head_dim, num_splits):
    atol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    check_attention(seqs, *heads, head_dim, atol, num_splits=num_splits, dtype=dtype, device="cuda")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", HEADS, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_mixed_batch_in_two_launches_gpu(dtype, heads, head_dim):
    atol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    check_attention(DECODES_FIRST, *heads, head_dim, atol, num_splits=0, num_decodes=37, dtype=dtype, device="cuda")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_store_kvcache_gpu(dtype):
    check_store(8, 128, dtype=dtype, device="cuda")
    check_store(8, 128, dtype=dtype, device="cuda", v_layout="keys")
