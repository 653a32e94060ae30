"""speedx._C.paged_decode_attention (CPU decode attention read straight from the paged KV cache)
against a plain PyTorch gather + fp32 softmax reference."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch

from speedx import _C

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
_ALL_ISAS = ["baseline", "avx2", "avx512"]
ISAS = _ALL_ISAS[: _ALL_ISAS.index(_C.cpu_isa()) + 1]  # the SIMD paths this CPU can run


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    # The reference is many small ops: intra-op threads only add latency (badly so on a busy box).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def make_case(gen, dtype, num_heads, num_kv_heads, head_dim, block_size, kv_lens, spare_blocks=3):
    """Random q / caches and a randomly permuted block table over a pool ~3x larger than needed;
    table entries past a sequence's last block are -1 (never read)."""
    kv_lens = torch.tensor(kv_lens, dtype=torch.int32)
    blocks_per_seq = [-(-int(n) // block_size) for n in kv_lens]
    num_blocks = spare_blocks * sum(blocks_per_seq) + 1
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    table = torch.full((len(kv_lens), max(blocks_per_seq) + 2), -1, dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks_per_seq):
        table[i, :n] = perm[used : used + n]
        used += n
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    q = torch.randn((len(kv_lens), num_heads, head_dim), generator=gen).to(dtype)
    return q, k_cache, v_cache, table, kv_lens


def reference(q, k_cache, v_cache, table, kv_lens, scale):
    """fp32 attention of each sequence's single query over its gathered cache rows (padded to the
    longest sequence and masked)."""
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    block_size = k_cache.shape[1]
    pos = torch.arange(int(kv_lens.max()))
    valid = pos[None, :] < kv_lens[:, None].long()  # [batch, max_len]
    blocks = table[:, pos // block_size].long().clamp_min(0)
    k = k_cache[blocks, pos % block_size].float()  # [batch, max_len, kv_heads, head_dim]
    v = v_cache[blocks, pos % block_size].float()
    k = k.repeat_interleave(num_heads // num_kv_heads, dim=2)  # query head h -> kv head h // group
    v = v.repeat_interleave(num_heads // num_kv_heads, dim=2)
    scores = torch.einsum("bhd,bnhd->bhn", q.float(), k) * scale
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    return torch.einsum("bhn,bnhd->bhd", torch.softmax(scores, dim=-1), v)


def run_kernel(q, k_cache, v_cache, table, kv_lens, scale, num_threads=1, overrides=None, isa="auto"):
    """Calls the kernel on tensors; `overrides` replaces raw arguments (to test validation)."""
    out = torch.full_like(q, float("nan"))
    args = dict(
        out=out.data_ptr(),
        q=q.data_ptr(),
        k_cache=k_cache.data_ptr(),
        v_cache=v_cache.data_ptr(),
        block_tables=table.numpy(),
        kv_lens=kv_lens.numpy(),
        num_heads=q.shape[1],
        num_kv_heads=k_cache.shape[2],
        head_dim=q.shape[2],
        block_size=k_cache.shape[1],
        num_blocks=k_cache.shape[0],
        scale=scale,
        dtype=dtype_name(q.dtype),
        num_threads=num_threads,
    )
    args.update(overrides or {})
    _C.paged_decode_attention(**args, _debug_isa=isa)
    return out


def check_close(out, ref, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:  # one rounding of the fp32 result (bf16: 2^-8 relative, fp16: 2^-11) plus slack
        tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
        torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (9, 3), (5, 1)], ids=lambda h: f"h{h[0]}kv{h[1]}")
@pytest.mark.parametrize("head_dim", [64, 128, 40])
@pytest.mark.parametrize("block_size", [1, 16, 5])
def test_matches_reference(dtype, heads, head_dim, block_size):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((dtype, heads, head_dim, block_size)).encode()))
    lens = torch.randint(1, 60, (37,), generator=gen).tolist()
    lens[0], lens[5], lens[-1] = 1, 16, 333  # a single token, exactly one tile, many blocks
    q, k, v, table, kv_lens = make_case(gen, dtype, *heads, head_dim, block_size, lens)
    scale = 1 / math.sqrt(head_dim)
    out = run_kernel(q, k, v, table, kv_lens, scale, num_threads=2 if block_size == 16 else 1)
    check_close(out, reference(q, k, v, table, kv_lens, scale), dtype)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("head_dim", [64, 128, 40])
def test_every_simd_path(isa, dtype, head_dim):
    """The narrower code paths (AVX2: 8 lanes, SSE2 baseline: 4) that other CPUs would take."""
    gen = torch.Generator().manual_seed(head_dim)
    lens = torch.randint(1, 80, (9,), generator=gen).tolist()
    lens[0] = 1
    q, k, v, table, kv_lens = make_case(gen, dtype, 9, 3, head_dim, 5, lens)
    out = run_kernel(q, k, v, table, kv_lens, 0.1, isa=isa)
    check_close(out, reference(q, k, v, table, kv_lens, 0.1), dtype)
    if dtype != torch.float32:  # rounding is exact on every path: kv_len 1 returns v itself
        one = torch.ones_like(kv_lens)
        out = run_kernel(q, k, v, table, one, 0.1, isa=isa)
        assert torch.equal(out.float(), v[table[:, 0].long(), 0].repeat_interleave(3, dim=1).float())


def test_isa_names():
    assert _C.cpu_isa() in ("baseline", "avx2", "avx512")
    with pytest.raises(ValueError, match="isa must be 'auto', 'avx512', 'avx2' or 'baseline', got 'sse9'"):
        _C.paged_decode_attention(0, 0, 0, 0, np.zeros((0, 1), np.int32), np.zeros(0, np.int32),
                                  1, 1, 1, 1, 1, 1.0, "float32", 1, _debug_isa="sse9")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("kv_len", [1, 17, 1000])
@pytest.mark.parametrize("num_threads", [1, 3])
def test_batch_one(dtype, kv_len, num_threads):
    gen = torch.Generator().manual_seed(kv_len * 7 + num_threads)
    q, k, v, table, kv_lens = make_case(gen, dtype, 9, 3, 64, 16, [kv_len])
    out = run_kernel(q, k, v, table, kv_lens, 0.125, num_threads=num_threads)
    check_close(out, reference(q, k, v, table, kv_lens, 0.125), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_a_sequence_gets_the_same_bits_alone_or_in_a_large_batch(dtype):
    """A large batch hands each thread whole sequences (all KV heads in one sweep of a cache row),
    a small one (sequence, KV head) pairs: both must compute every head identically."""
    gen = torch.Generator().manual_seed(11)
    lens = torch.randint(1, 90, (24,), generator=gen).tolist()
    q, k, v, table, kv_lens = make_case(gen, dtype, 8, 4, 64, 16, lens)
    full = run_kernel(q, k, v, table, kv_lens, 0.125, num_threads=2)  # 24 >= 4 x 2: whole sequences
    check_close(full, reference(q, k, v, table, kv_lens, 0.125), dtype)
    for rows in ([0], [5, 17], [3, 9, 23]):  # < 4 x 2: pairs, split over both threads
        i = torch.tensor(rows)
        alone = run_kernel(q[i].contiguous(), k, v, table[i].contiguous(), kv_lens[i].contiguous(), 0.125, num_threads=2)
        assert torch.equal(alone, full[i])


def test_large_scores_are_stable():
    """Scores in the thousands: softmax must subtract the max (else exp overflows to inf / nan)."""
    gen = torch.Generator().manual_seed(5)
    q, k, v, table, kv_lens = make_case(gen, torch.float32, 4, 2, 64, 16, [50, 3])
    q *= 100
    out = run_kernel(q, k, v, table, kv_lens, 1.0)
    assert torch.isfinite(out).all()
    check_close(out, reference(q, k, v, table, kv_lens, 1.0), torch.float32)


def random_finite_bits(gen, n, dtype, max_exponent):
    """Random bit patterns of a 16-bit float type, subnormals included, exponent field <= max."""
    exp_bits, man_bits = (8, 7) if dtype == torch.bfloat16 else (5, 10)
    sign = torch.randint(0, 2, (n,), generator=gen)
    exponent = torch.randint(0, max_exponent + 1, (n,), generator=gen)
    mantissa = torch.randint(0, 2**man_bits, (n,), generator=gen)
    bits = (sign << (exp_bits + man_bits)) | (exponent << man_bits) | mantissa
    return bits.to(torch.int16).view(dtype)  # two's complement wrap keeps the bit pattern


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_name)
def test_single_token_is_exact(dtype):
    """kv_len 1: probability exactly 1, so out == the V row exactly (subnormals and the largest
    finite values included): checks both conversions and the element order."""
    gen = torch.Generator().manual_seed(1)
    q, k, v, table, kv_lens = make_case(gen, dtype, 8, 2, 128, 16, [1] * 9)
    max_exp = 254 if dtype == torch.bfloat16 else 30
    v.copy_(random_finite_bits(gen, v.numel(), dtype, max_exp).view(v.shape))
    out = run_kernel(q, k, v, table, kv_lens, 0.1)
    rows = v[table[:, 0].long(), 0].repeat_interleave(4, dim=1)  # [batch, heads, head_dim]
    assert torch.equal(out.float(), rows.float())  # as values: -0.0 may come back as +0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_name)
def test_rounding_is_nearest_even(dtype):
    """q = 0 and two tokens: out = (v0 + v1) / 2 exactly in fp32, half of the roundings are ties."""
    gen = torch.Generator().manual_seed(2)
    q, k, v, table, kv_lens = make_case(gen, dtype, 4, 4, 64, 16, [2] * 16)
    max_exp = 150 if dtype == torch.bfloat16 else 30  # bf16: keep (v0 + v1) / 2 a normal fp32
    v.copy_(random_finite_bits(gen, v.numel(), dtype, max_exp).view(v.shape))
    q.zero_()
    out = run_kernel(q, k, v, table, kv_lens, 1.0)
    rows = v[table[:, 0].long(), :2].float()  # [batch, 2, kv_heads, head_dim]
    expected = ((rows[:, 0] + rows[:, 1]) * 0.5).to(dtype)
    assert torch.equal(out.float(), expected.float())


def test_unused_table_entries_and_spare_blocks_are_not_read():
    gen = torch.Generator().manual_seed(3)
    q, k, v, table, kv_lens = make_case(gen, torch.float32, 4, 2, 64, 16, [20, 1])
    mask = torch.ones(k.shape[0], dtype=torch.bool)
    mask[table[table >= 0].long()] = False
    k[mask], v[mask] = float("nan"), float("nan")  # poison every block no sequence owns
    out = run_kernel(q, k, v, table, kv_lens, 0.125)
    check_close(out, reference(q, k, v, table, kv_lens, 0.125), torch.float32)


def test_empty_batch_is_a_no_op():
    q = torch.empty((0, 4, 64))
    k = torch.zeros((4, 16, 2, 64))
    empty = torch.empty((0, 3), dtype=torch.int32)
    run_kernel(q, k, k, empty, torch.empty(0, dtype=torch.int32), 1.0)


@pytest.fixture()
def small_case():
    gen = torch.Generator().manual_seed(4)
    return make_case(gen, torch.float32, 4, 2, 64, 16, [20, 7])


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(dtype="float64"), "dtype must be 'bfloat16', 'float16' or 'float32'"),
        (dict(num_heads=5), r"num_heads \(5\) must be a positive multiple of num_kv_heads \(2\)"),
        (dict(num_kv_heads=0), "positive multiple of num_kv_heads"),
        (dict(head_dim=0), "head_dim must be >= 1"),
        (dict(block_size=0), "block_size must be >= 1"),
        (dict(num_threads=0), "num_threads must be >= 1"),
        (dict(kv_lens=np.array([20, 0], dtype=np.int32)), r"kv_lens\[1\] = 0, must be >= 1"),
        (dict(kv_lens=np.array([20, 7, 3], dtype=np.int32)), "kv_lens must have one entry per block_tables row"),
        (dict(kv_lens=np.array([20, 7], dtype=np.int64)), "kv_lens must have dtype int32"),
        (dict(kv_lens=np.array([[20, 7]], dtype=np.int32)), "kv_lens must be 1-D"),
        (dict(kv_lens=np.array([20, 100], dtype=np.int32)), r"kv_lens\[1\] = 100 needs 7 blocks but block_tables has 4 columns"),
        (dict(num_blocks=1), r"block_tables\[\d, \d\] = \d+ is outside \[0, num_blocks=1\)"),
        (dict(q=0), "null data pointer"),
    ],
)
def test_invalid_arguments_raise(small_case, overrides, match):
    q, k, v, table, kv_lens = small_case
    with pytest.raises(ValueError, match=match):
        run_kernel(q, k, v, table, kv_lens, 0.125, overrides=overrides)


def test_bad_block_tables_raise(small_case):
    q, k, v, table, kv_lens = small_case
    bad = table.clone()
    bad[1, 0] = -1  # a block the sequence needs
    with pytest.raises(ValueError, match=r"block_tables\[1, 0\] = -1 is outside \[0, num_blocks="):
        run_kernel(q, k, v, bad, kv_lens, 0.125)
    with pytest.raises(ValueError, match="block_tables must have dtype int32"):
        run_kernel(q, k, v, table.long(), kv_lens, 0.125)
    with pytest.raises(ValueError, match="block_tables must be C-contiguous"):
        run_kernel(q, k, v, table, kv_lens, 0.125, overrides=dict(block_tables=np.asfortranarray(table.numpy())))
