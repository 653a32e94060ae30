"""Paged attention in Triton: one kernel for prefill, chunked prefill and decode, plus split-KV.

Same contract as paged_attention_torch (kernels/paged_attention.py): query j of sequence i sits at
absolute position kv_lens[i] - q_len + j and attends causally to the cache through the block table.
Every sequence has at least one query row (the model runner never schedules an empty one).

Grid: (query block, kv head[, split]). A query block is BLOCK_Q tokens of one sequence times the
query heads of one KV-head group (GQA packing: each K/V tile is loaded once for the whole group).
Sequence i's query blocks start at cu_seqlens_q[i] // BLOCK_Q + i, so the grid size needs only host
numbers (tokens, sequences) and the kernel finds its sequence by binary search: no host sync.

A mixed batch (decodes first, then prompt chunks) is two launches when the caller says how many
leading sequences are decodes: those on the decode tile (one row per sequence), the prompt chunks on
the prefill tile. On one prefill tile the decodes would each fill a whole query block (1 of its
BLOCK_Q tokens) and turn a memory-bound read of their KV into tensor-core work.
"""

from __future__ import annotations

import functools

import torch

from speedx.kernels.triton_jit import check_device, import_triton, interpreter_active, jit

triton = import_triton()
import triton.language as tl  # noqa: E402

LOG2E = 1.4426950408889634


@jit(do_not_specialize=["num_seqs", "num_splits", "first_q_block", "stride_bt"])
def _paged_attention_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, cu_seqlens_q_ptr, kv_lens_ptr,
    part_out_ptr, part_lse_ptr,
    scale_log2, num_seqs, num_heads, num_splits, first_q_block,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_vd, stride_bt,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    ALL_DECODE: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, FP16_DOTS: tl.constexpr,
    V_KEYS_CONTIGUOUS: tl.constexpr, WIDE_DOTS: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD
    # first_q_block: cu_seqlens_q[0] // BLOCK_Q when the sequences are the tail of a batch (their
    # cu_seqlens_q then start past 0: query rows stay absolute, block numbers are shifted)
    pid = tl.program_id(0) + first_q_block
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if ALL_DECODE:
        seq = pid
        q_block = 0
    else:
        # Last sequence whose first query block is <= pid.
        lo = tl.full((), 0, tl.int32)
        hi = tl.full((), 0, tl.int32) + num_seqs
        while lo < hi:
            mid = (lo + hi) // 2
            if tl.load(cu_seqlens_q_ptr + mid) // BLOCK_Q + mid <= pid:
                lo = mid + 1
            else:
                hi = mid
        seq = lo - 1
        q_block = pid - (tl.load(cu_seqlens_q_ptr + seq) // BLOCK_Q + seq)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    if q_block * BLOCK_Q >= q_len:
        return
    kv_len = tl.load(kv_lens_ptr + seq)

    rows = tl.arange(0, BLOCK_M)
    q_idx = q_block * BLOCK_Q + rows // GROUP_PAD
    h = rows % GROUP_PAD
    head = kv_head * GROUP + h
    row_ok = (q_idx < q_len) & (h < GROUP)
    d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = d < HEAD_DIM
    tok = (q_start + q_idx).to(tl.int64)
    io_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :], mask=io_mask, other=0.0)
    # An fp8 cache widens to fp16 in one conversion (to bf16 it takes a detour through fp32), so
    # FP16_DOTS runs both dots in fp16: q (bf16, |q| << 65504) and p (in [0, 1]) convert exactly enough.
    dot_dtype = tl.float16 if FP16_DOTS else q.dtype
    # WIDE_DOTS (the CPU interpreter, which multiplies bf16 operands' bit patterns: triton-lang/triton
    # #11584) hands the dots fp32 copies of the rounded operands: each product is exact either way.
    operand_dtype = tl.float32 if WIDE_DOTS else dot_dtype
    q = q.to(dot_dtype).to(operand_dtype)
    q_pos = kv_len - q_len + q_idx  # absolute position: the causal limit of each row

    # Keys up to the block's last query (causal), never past kv_len.
    kv_end = tl.minimum(kv_len, kv_len - q_len + (q_block + 1) * BLOCK_Q)
    num_tiles = tl.cdiv(kv_end, BLOCK_N)
    if SPLIT:
        per_split = tl.cdiv(num_tiles, num_splits)
        tile_begin = split * per_split
        tile_end = tl.minimum(tile_begin + per_split, num_tiles)
    else:
        tile_begin = 0
        tile_end = num_tiles

    # Finite start: a row whose tile is all masked then gives exp2(-inf) = 0, never inf - inf.
    m_i = tl.full([BLOCK_M], -1e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for tile in range(tile_begin, tile_end):
        n = tile * BLOCK_N + offs_n
        n_ok = n < kv_end
        # int64 before the stride multiply: block ids x block stride overflow int32 on big pools.
        blk = tl.load(table + n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
        slot = n % BLOCK_SIZE
        k_off = blk * stride_kb + slot * stride_ks + kv_head * stride_kh
        kt = tl.load(k_cache_ptr + k_off[None, :] + d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        kt = kt.to(dot_dtype).to(operand_dtype)  # an fp8 cache is widened
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION) * scale_log2
        qk = tl.where((n[None, :] <= q_pos[:, None]) & n_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if V_KEYS_CONTIGUOUS:
            v = _load_v_keys_contiguous(v_cache_ptr, table, tile, kv_end, kv_head, d, d_ok, stride_vb, stride_vh,
                                        stride_vd, BLOCK_SIZE, BLOCK_N, HEAD_DIM_PAD)
        else:
            v_off = blk * stride_vb + slot * stride_vs + kv_head * stride_vh
            v = tl.load(v_cache_ptr + v_off[:, None] + d[None, :] * stride_vd, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        v = v.to(dot_dtype).to(operand_dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(dot_dtype).to(operand_dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if SPLIT:
        # Normalised partial output + its log2-sum-exp; an empty split writes zeros and -inf.
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.maximum(l_i, 1e-30)), float("-inf"))
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        part = (seq.to(tl.int64) * num_heads + head) * num_splits + split
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM_PAD + d[None, :], o, mask=row_ok[:, None])
        tl.store(part_lse_ptr + part, lse, mask=row_ok)
    else:
        o = acc / l_i[:, None]
        out_ptrs = out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
        tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=io_mask)


@jit
def _load_v_keys_contiguous(v_cache_ptr, table, tile, kv_end, kv_head, d, d_ok, stride_vb, stride_vh, stride_vd,
                            BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    """A [BLOCK_N, head dims] V tile from a cache whose blocks hold each head's V transposed (the
    BLOCK_SIZE keys of a head dim contiguous), whole cache blocks at a time. As P V's second operand
    the keys are its reduction axis, so this is the layout ldmatrix reads without transposing, as
    for K: with an fp8 cache and the head dims contiguous instead, the sm_90 SASS reads V from shared
    memory one byte per instruction. Only whole blocks are masked (a per-key mask would split the
    16-byte loads): keys of the sequence's last block past kv_end are read, and get p = 0. That is
    exact while they are finite: the cache starts zeroed and the fp8 stores saturate (satfinite), so
    only a NaN the model itself produced could get there."""
    BLOCKS: tl.constexpr = BLOCK_N // BLOCK_SIZE
    kb = tile * BLOCKS + tl.arange(0, BLOCKS)
    kb_ok = kb * BLOCK_SIZE < kv_end
    blk = tl.load(table + kb, mask=kb_ok, other=0).to(tl.int64)
    keys = tl.arange(0, BLOCK_SIZE)
    ptrs = (v_cache_ptr + (blk * stride_vb + kv_head * stride_vh)[:, None, None] + keys[None, :, None]
            + d[None, None, :] * stride_vd)
    v = tl.load(ptrs, mask=kb_ok[:, None, None] & d_ok[None, None, :], other=0.0)
    return tl.reshape(v, [BLOCK_N, HEAD_DIM_PAD])


@jit
def _merge_splits_kernel(
    out_ptr, part_out_ptr, part_lse_ptr, num_heads, num_splits, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    s_ok = s < num_splits
    d = tl.arange(0, HEAD_DIM_PAD)
    base = (seq.to(tl.int64) * num_heads + head) * num_splits
    lse = tl.load(part_lse_ptr + base + s, mask=s_ok, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))  # split 0 is never empty, so the max is finite
    o = tl.load(part_out_ptr + (base + s)[:, None] * HEAD_DIM_PAD + d[None, :], mask=s_ok[:, None], other=0.0)
    res = tl.sum(w[:, None] * o, 0) / tl.sum(w, 0)
    out_ptrs = out_ptr + seq.to(tl.int64) * stride_ot + head * stride_oh + d
    tl.store(out_ptrs, res.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def v_keys_contiguous(v_cache: torch.Tensor, block_n: int) -> bool:
    """Whether V tiles of block_n keys are read whole cache blocks at a time (_load_v_keys_contiguous):
    the cache's keys are contiguous (model_runner.FP8_V_KEYS_CONTIGUOUS) and a tile holds whole blocks.
    Any other layout is read through its strides, key by key."""
    block_size = v_cache.shape[1]
    return v_cache.stride(1) == 1 and block_size > 1 and block_n % block_size == 0


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def prefill_rows(device: torch.device) -> int:
    """Query rows per prefill tile on `device`: PREFILL_ROWS on sm_90+ and in the CPU interpreter,
    64 on older GPUs."""
    return 64 if device.type == "cuda" and _capability(_device_index(device)) < (9, 0) else PREFILL_ROWS


def choose_num_splits(device: torch.device, programs: int, max_kv_len: int) -> int:
    """Split KV only when (sequences x kv heads) leave SMs idle and the context is long enough that
    each split still streams >= 512 keys; a power of two to bound the compiled variants."""
    if device.type != "cuda":
        return 1
    sms = _sm_count(_device_index(device))
    if programs >= sms:
        return 1
    splits = min(triton.cdiv(2 * sms, programs), max_kv_len // 512, 32)
    return 1 if splits < 2 else 1 << (splits.bit_length() - 1)


# Query rows (tokens x GQA group) per prefill tile, for 16-bit queries with head_dim <= 128 on sm_90+
# (64 below: without wgmma, sm_80 spills registers at 128 rows, ptxas). H100, 2026-11-26: 128 ran
# 1.6-1.7x the TFLOP/s of 64 on fresh prompts and 1.3x on a mixed step (bench/gpu_kernels.py
# prefill_tiles), and the 8B grid 9,810 output tok/s against 9,009 (one H200 run with 3 stages had
# shown 7% fewer; attention_config's note).
PREFILL_ROWS = 128

# An fp8 cache's decode tile: keys per tile, warps, pipeline stages. Registers bound its occupancy
# (sm_90 ptxas, 8B heads): (128, 4, 3), the tile before 2026-11-26, takes 199 registers a thread over
# V with head dims contiguous, so 2 blocks (8 warps) fit an SM, and 166 over V with keys contiguous
# (3 blocks); 64-key tiles there take under 100 (5 blocks, 20 warps, as the bf16 tile). H100,
# 2026-11-26, 256 x 1536 over V with keys contiguous (bench/gpu_kernels.py decode_tiles): 0.87 of copy
# bandwidth for this tile and (64, 4, 2), 0.84 for (128, 4, 3).
FP8_DECODE_TILE = (64, 4, 3)


def attention_config(dtype: torch.dtype, head_dim: int, group: int, all_decode: bool,
                     kv_dtype: torch.dtype | None = None, rows: int | None = None) -> dict:
    """Tile constexprs + launch options for queries of `dtype` over a cache of `kv_dtype` (default:
    the same). Tiles chosen so that sm_90 compiles them without register spills (ptxas): `rows`
    (prefill_rows: PREFILL_ROWS on sm_90+, the default) x 64 for 16-bit head_dim <= 128, smaller for
    padded or larger heads and for fp32 (FMA dots, tests only).
    Decode: one token per block, the group padded to 16 rows (the smallest tl.dot tile), 4 warps;
    an fp8 cache streams FP8_DECODE_TILE and dots in fp16. H200, 2026-11-26 (bench/gpu_kernels.py
    decode_tiles, share of copy bandwidth at 256 x 1536 / 64 x 1024): bf16 1.02 / 0.82 with 4 warps
    against 0.90 / 0.62 with 8; fp8 over V with head dims contiguous, on the 128-key tile then shipped,
    0.63 / 0.51 against 0.36 / 0.32 for the bf16 tile. H100, later that day, at 256 x 1536: fp8 0.80
    that way, 0.87 over V with keys contiguous on FP8_DECODE_TILE (model_runner.FP8_V_KEYS_CONTIGUOUS).
    Measured and rejected for the fp8 decode tile (H200, 2026-11-26, 8B 1024/1024 grid with async
    scheduling, 10,602 output tok/s as then shipped): P V computed transposed (acc^T += V^T P^T,
    which avoids byte-wise shared loads of V but takes V out of the cp.async pipeline) 9,374 tok/s
    and 0.56 of copy bandwidth at 256 x 1536; the group padded to 64 rows (both dots on wgmma)
    9,133 tok/s and 0.51. 128-row prefill tiles with 3 stages gave 9,857 tok/s there in one run; on
    an H100 with 2 stages they gave 9,810 against 9,009 (PREFILL_ROWS' note)."""
    head_dim_pad = triton.next_power_of_2(head_dim)
    wide = dtype != torch.float32 and head_dim_pad <= 128
    fp8_cache = kv_dtype is not None and kv_dtype.itemsize == 1
    block_m, block_n = (rows or PREFILL_ROWS, 64 if head_dim == head_dim_pad else 32) if wide else (32, 32)
    num_stages = 2
    if all_decode:
        group_pad, block_q, num_warps = max(16, triton.next_power_of_2(group)), 1, 4
        if fp8_cache and wide and head_dim == head_dim_pad:
            block_n, num_warps, num_stages = FP8_DECODE_TILE
    else:
        group_pad = triton.next_power_of_2(group)
        block_q, num_warps = max(1, block_m // group_pad), 8 if dtype != torch.float32 else 4
    return dict(
        GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, BLOCK_N=block_n, ALL_DECODE=all_decode,
        DOT_PRECISION="ieee" if dtype == torch.float32 else None,  # fp32 caches: no TF32 rounding
        FP16_DOTS=fp8_cache and dtype != torch.float32,
        WIDE_DOTS=dtype == torch.bfloat16 and not fp8_cache and interpreter_active(),
        num_warps=num_warps, num_stages=num_stages,
    )


def paged_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    kv_lens: torch.Tensor,
    scale: float,
    num_splits: int = 0,
    num_decodes: int = 0,
) -> torch.Tensor:
    """paged_attention_torch's contract. num_splits: split-KV for the decode rows; 0 = choose from the
    device and the block table's width, 1 = off (prompt chunks never split). num_decodes: how many
    leading sequences have one query row (a host number; 0 = unknown): they get the decode tile."""
    check_device(q)
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = kv_lens.shape[0]
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    assert k_cache.stride(-1) == 1, "K cache rows must be contiguous"  # V: any strides (v_keys_contiguous)
    if num_tokens == num_seqs:  # one query row per sequence (each has at least one)
        num_decodes = num_seqs
    args = q, k_cache, v_cache, scale, out
    if num_decodes:
        _decode_launch(*args, block_tables[:num_decodes], cu_seqlens_q[: num_decodes + 1], kv_lens[:num_decodes],
                       num_splits)
    if num_decodes < num_seqs:
        _prefill_launch(*args, block_tables[num_decodes:], cu_seqlens_q[num_decodes:], kv_lens[num_decodes:],
                        first_row=num_decodes)
    return out


def _decode_launch(q, k_cache, v_cache, scale, out, block_tables, cu_seqlens_q, kv_lens, num_splits):
    """Sequences of one query row each, rows 0 .. num_seqs - 1 of q."""
    num_seqs, num_kv_heads = kv_lens.shape[0], k_cache.shape[2]
    config = attention_config(q.dtype, q.shape[2], q.shape[1] // num_kv_heads, True, k_cache.dtype)
    if num_splits == 0:
        num_splits = choose_num_splits(q.device, num_seqs * num_kv_heads, block_tables.shape[1] * k_cache.shape[1])
    num_splits = max(1, num_splits)
    if num_splits == 1:
        _launch(q, k_cache, v_cache, scale, out, block_tables, cu_seqlens_q, kv_lens, config, num_seqs)
        return
    head_dim_pad = triton.next_power_of_2(q.shape[2])
    part_out = torch.empty((num_seqs, q.shape[1], num_splits, head_dim_pad), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((num_seqs, q.shape[1], num_splits), dtype=torch.float32, device=q.device)
    _launch(q, k_cache, v_cache, scale, out, block_tables, cu_seqlens_q, kv_lens, config, num_seqs,
            num_splits=num_splits, parts=(part_out, part_lse))
    _merge_splits_kernel[(num_seqs, q.shape[1])](
        out, part_out, part_lse, q.shape[1], num_splits, out.stride(0), out.stride(1),
        HEAD_DIM=q.shape[2], HEAD_DIM_PAD=head_dim_pad, SPLITS_PAD=triton.next_power_of_2(num_splits),
    )


def _prefill_launch(q, k_cache, v_cache, scale, out, block_tables, cu_seqlens_q, kv_lens, first_row):
    """Sequences whose query rows start at row first_row of q (cu_seqlens_q[0] == first_row)."""
    num_seqs, num_kv_heads = kv_lens.shape[0], k_cache.shape[2]
    config = attention_config(q.dtype, q.shape[2], q.shape[1] // num_kv_heads, False, k_cache.dtype,
                              rows=prefill_rows(q.device))
    first_q_block = first_row // config["BLOCK_Q"]
    num_q_blocks = q.shape[0] // config["BLOCK_Q"] + num_seqs - first_q_block
    _launch(q, k_cache, v_cache, scale, out, block_tables, cu_seqlens_q, kv_lens, config, num_q_blocks,
            first_q_block=first_q_block)


def _launch(q, k_cache, v_cache, scale, out, block_tables, cu_seqlens_q, kv_lens, config, num_q_blocks,
            num_splits=1, first_q_block=0, parts=None):
    part_out, part_lse = parts or (out, out)  # unused without splits
    _paged_attention_kernel[(num_q_blocks, k_cache.shape[2], num_splits)](
        out, q, k_cache, v_cache, block_tables, cu_seqlens_q, kv_lens, part_out, part_lse,
        scale * LOG2E, kv_lens.shape[0], q.shape[1], num_splits, first_q_block,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3), block_tables.stride(0),
        HEAD_DIM=q.shape[2], HEAD_DIM_PAD=triton.next_power_of_2(q.shape[2]), BLOCK_SIZE=k_cache.shape[1],
        SPLIT=num_splits > 1, V_KEYS_CONTIGUOUS=v_keys_contiguous(v_cache, config["BLOCK_N"]), **config,
    )
