"""Fused InfoNCE: contrastive cross-entropy without a B x N similarity matrix.

For normalized queries q [B, D], documents d [N, D], labels [B] and a scale s:

    loss_i = logsumexp_j(s * q_i . d_j) - s * q_i . d_{labels_i}     (j over the unmasked columns)

The columns are walked in chunks: a chunk's similarities S = q @ d[chunk]^T [B, cols] (fp32
accumulation and output) fill a buffer of at most WORKSPACE_BYTES whatever B x N is.
Forward: a Triton kernel folds each chunk into every row's online log-sum-exp (running max, sum of
exponentials, the label's logit). Only lse [B] is saved with the inputs.
Backward: each chunk is recomputed, a Triton kernel turns it into G = s * g * (softmax - onehot)
(and per-tile partials of d loss / d s = g * (softmax - onehot) . cos), and the two gradient
products follow: dd[chunk] = G^T q, dq += G d[chunk] (summed in fp32 over chunks).

The three products per chunk are cuBLAS calls, not tl.dot tiles: on an H200 at B=8192, N=57344,
D=4096 in bf16, cuBLAS ran them at 705-812 TFLOP/s, where this kernel's earlier form (tl.dot tiles
fused with the log-sum-exp, recomputed in backward) reached 135-330 under eight tile shapes and took
2.2x the reference's time (2026-11-26; `python bench/infonce.py --breakdown` times each step now).
The Triton kernels do what cuBLAS cannot: the streaming log-sum-exp, the masks, and the softmax
gradient in one pass over a chunk.
Every sum has a fixed order and there are no atomics, so the results are deterministic.

Optional false-negative masking: with document_ids [N], a column j is dropped from row i when
ids[j] == ids[labels_i] and j != labels_i (duplicates of the positive).

The PyTorch twin with the same signature is speedx.embed.losses.infonce_torch.
"""

from __future__ import annotations

import torch

from speedx.kernels.triton_jit import check_device, import_triton, interpreter_active, jit

triton = import_triton()
import triton.language as tl  # noqa: E402

# The fp32 similarity chunk [B, cols]: 128 MiB, i.e. 4096 columns at B=8192 (plus the gradient
# chunk G [B, cols] in the inputs' dtype during backward). H200, B=8192, N=57344, D=4096 bf16, two
# runs of bench/infonce.py --breakdown: forward + backward 26.1-26.4 ms with 64 MiB, 25.4-25.5 with
# 128, 24.9-25.1 with 256. 128 keeps the extra memory at 6.6% of the reference's; 256 would pass 10%.
WORKSPACE_BYTES = 128 << 20
COLUMN_ALIGN = 16  # chunk widths stay multiples of 16 so cuBLAS gets aligned leading dimensions

# (rows, columns, warps) per program of the two Triton kernels on GPU: the fastest of the first
# bench/infonce.py --breakdown sweep on an H200 (in a second one, within 0.1 ms of the fastest);
# in the interpreter, small tiles so that tests on small shapes cross every tile boundary.
LSE_TILE = (2, 1024, 4)
GRAD_TILE = (16, 512, 8)
INTERPRETER_TILES = ((8, 32, 4), (16, 32, 4))

# Recent torch (2.11 on the GPU image, 2.13 here) multiplies bf16/fp16 into an fp32 result on CUDA:
# torch.mm / torch.addmm(..., out_dtype=torch.float32). Without it the products round to the inputs' dtype.
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype_out") and hasattr(torch.ops.aten.addmm, "dtype_out")


@jit
def _keep(ids_ptr, rows, cols, labels, label_ids, col_ok, HAS_IDS: tl.constexpr):
    """Which columns of a tile count: in range, and not a masked false negative."""
    keep = col_ok[None, :] & (rows[:, None] >= 0)  # broadcast to the tile's shape
    if HAS_IDS:
        ids = tl.load(ids_ptr + cols, mask=col_ok, other=-1)
        duplicate = (ids[None, :] == label_ids[:, None]) & (cols[None, :] != labels[:, None])
        keep = keep & ~duplicate
    return keep


@jit(do_not_specialize=["col0", "n_cols"])
def _lse_update_kernel(S_ptr, labels_ptr, ids_ptr, label_ids_ptr, scale_ptr, max_ptr, sumexp_ptr, pos_ptr,
                       B, col0, n_cols, stride_S,
                       HAS_IDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Fold the chunk S [B, n_cols] (columns col0 ..) into each row's running max, sum and label logit."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    label_ids = labels
    if HAS_IDS:
        label_ids = tl.load(label_ids_ptr + rows, mask=row_ok, other=-1)
    scale = tl.load(scale_ptr)
    m = tl.load(max_ptr + rows, mask=row_ok, other=float("-inf"))
    sumexp = tl.load(sumexp_ptr + rows, mask=row_ok, other=0.0)
    pos = tl.load(pos_ptr + rows, mask=row_ok, other=0.0)
    S_rows = S_ptr + rows.to(tl.int64)[:, None] * stride_S  # int64: B x cols may pass 2**31
    for n0 in range(0, n_cols, BLOCK_N):
        local = n0 + tl.arange(0, BLOCK_N)
        cols = col0 + local
        col_ok = local < n_cols
        cos = tl.load(S_rows + local[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        keep = _keep(ids_ptr, rows, cols, labels, label_ids, col_ok, HAS_IDS)
        logits = tl.where(keep, cos * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has kept no column yet
        sumexp = sumexp * tl.exp(m - m_safe) + tl.sum(tl.exp(logits - m_safe[:, None]), axis=1)
        m = m_new
        is_label = keep & (cols[None, :] == labels[:, None])  # keep: a tile may reach into the next chunk
        pos += tl.sum(tl.where(is_label, logits, 0.0), axis=1)
    tl.store(max_ptr + rows, m, mask=row_ok)
    tl.store(sumexp_ptr + rows, sumexp, mask=row_ok)
    tl.store(pos_ptr + rows, pos, mask=row_ok)


@jit(do_not_specialize=["col0", "n_cols"])
def _softmax_grad_kernel(S_ptr, labels_ptr, ids_ptr, label_ids_ptr, scale_ptr, lse_ptr, g_ptr, G_ptr, ds_ptr,
                         B, col0, n_cols, stride_S, stride_G,
                         HAS_IDS: tl.constexpr, SCALE_GRAD: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    """G[:, chunk] = s * g_i * (softmax_ij - onehot_ij) from the chunk's similarities S."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    local = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = col0 + local
    row_ok = rows < B
    col_ok = local < n_cols
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    label_ids = labels
    if HAS_IDS:
        label_ids = tl.load(label_ids_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)  # padding rows get no gradient
    scale = tl.load(scale_ptr)

    tile = row_ok[:, None] & col_ok[None, :]
    cos = tl.load(S_ptr + rows.to(tl.int64)[:, None] * stride_S + local[None, :], mask=tile, other=0.0)
    keep = _keep(ids_ptr, rows, cols, labels, label_ids, col_ok, HAS_IDS)
    p = tl.where(keep, tl.exp(cos * scale - lse[:, None]), 0.0)
    onehot = tl.where(keep & (cols[None, :] == labels[:, None]), 1.0, 0.0)
    dlogits = g[:, None] * (p - onehot)
    out = G_ptr + rows.to(tl.int64)[:, None] * stride_G + local[None, :]
    tl.store(out, (dlogits * scale).to(G_ptr.dtype.element_ty), mask=tile)
    if SCALE_GRAD:  # d logits / d s = cos; one partial per tile, summed on the host in a fixed order
        tl.store(ds_ptr + pid_m * tl.num_programs(1) + pid_n, tl.sum(tl.sum(dlogits * cos, axis=1), axis=0))


def _tiles() -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(rows, columns, warps) of a program's tile: for the lse update, for the softmax gradient."""
    return INTERPRETER_TILES if interpreter_active() else (LSE_TILE, GRAD_TILE)


def chunk_columns(B: int, N: int) -> int:
    """Columns per chunk: the fp32 similarity chunk [B, cols] within WORKSPACE_BYTES."""
    cols = max(COLUMN_ALIGN, WORKSPACE_BYTES // (4 * max(1, B)) // COLUMN_ALIGN * COLUMN_ALIGN)
    return min(cols, N)


def workspace_bytes(B: int, N: int, D: int, dtype: torch.dtype) -> int:
    """Peak memory the fused path allocates on CUDA beyond its inputs and their gradients (analytic)."""
    elem = torch.empty((), dtype=dtype).element_size()
    cols = chunk_columns(B, N)
    rounded_products = dtype != torch.float32 and not _MM_OUT_DTYPE  # each product first in the inputs' dtype
    total = 5 * B * 4 + B * cols * (4 + elem)  # max/sum/pos/lse/loss, similarity + gradient chunks
    if rounded_products:
        total += B * cols * elem
    if cols < N:  # several chunks: dq summed in fp32
        total += B * D * (4 + (elem if rounded_products else 0))
    return total


def _chunk_view(buffer: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A contiguous [rows, cols] view at the start of a flat buffer (the last chunk is narrower)."""
    return buffer[: rows * cols].view(rows, cols)


def _similarities(q: torch.Tensor, d_chunk: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """q @ d_chunk^T into the fp32 buffer out, accumulated in fp32 (cuBLAS on CUDA)."""
    if q.dtype == torch.float32:
        return torch.mm(q, d_chunk.t(), out=out)
    if q.is_cuda and _MM_OUT_DTYPE:
        return torch.mm(q, d_chunk.t(), out_dtype=torch.float32, out=out)
    return out.copy_(q @ d_chunk.t())  # CPU (the interpreter's tests) or an older torch: the product's dtype


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.is_cuda and _MM_OUT_DTYPE:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.add_(a @ b)


class InfoNCEFunction(torch.autograd.Function):
    """(q [B, D], d [N, D] normalized, labels [B] int64, scale [1] tensor, document_ids [N] or None) -> loss [B]."""

    @staticmethod
    def forward(ctx, q, d, labels, scale, document_ids):
        q, d, labels = q.contiguous(), d.contiguous(), labels.contiguous()
        B, N = q.shape[0], d.shape[0]
        scale32 = scale.detach().reshape(1).float().contiguous()
        has_ids = document_ids is not None
        ids = document_ids.contiguous() if has_ids else labels  # a dummy pointer when unused
        label_ids = ids[labels].contiguous() if has_ids else labels
        row_max = torch.full((B,), float("-inf"), dtype=torch.float32, device=q.device)
        sumexp = torch.zeros(B, dtype=torch.float32, device=q.device)
        pos = torch.zeros(B, dtype=torch.float32, device=q.device)
        cols = chunk_columns(B, N)
        buffer = torch.empty(B * cols, dtype=torch.float32, device=q.device)
        (lse_rows, lse_cols, lse_warps), _ = _tiles()
        for col0 in range(0, N, cols):
            n = min(cols, N - col0)
            S = _similarities(q, d[col0:col0 + n], _chunk_view(buffer, B, n))
            _lse_update_kernel[(triton.cdiv(B, lse_rows),)](
                S, labels, ids, label_ids, scale32, row_max, sumexp, pos, B, col0, n, S.stride(0),
                HAS_IDS=has_ids, BLOCK_M=lse_rows, BLOCK_N=lse_cols, num_warps=lse_warps,
            )
        lse = row_max + sumexp.log()  # the label column is always kept, so every sum is > 0
        ctx.save_for_backward(q, d, labels, ids, label_ids, scale32, lse)
        ctx.has_ids = has_ids
        ctx.scale_shape, ctx.scale_dtype = scale.shape, scale.dtype
        return lse - pos

    @staticmethod
    def backward(ctx, grad_loss):
        q, d, labels, ids, label_ids, scale32, lse = ctx.saved_tensors
        need_q, need_d, _, need_s, _ = ctx.needs_input_grad
        B, N = q.shape[0], d.shape[0]
        g = grad_loss.float().contiguous()
        cols = chunk_columns(B, N)
        _, (block_m, block_n, warps) = _tiles()
        grid_m = triton.cdiv(B, block_m)
        sim_buffer = torch.empty(B * cols, dtype=torch.float32, device=q.device)
        grad_buffer = torch.empty(B * cols, dtype=q.dtype, device=q.device)
        dd = torch.empty_like(d) if need_d else None
        dq = dq_acc = None
        if need_q and cols < N:  # several chunks: sum their products in fp32
            dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        # d loss / d s: one partial per tile of each chunk, summed at the end in a fixed order
        ds = torch.zeros((triton.cdiv(N, cols), grid_m * triton.cdiv(cols, block_n)), device=q.device)
        for chunk, col0 in enumerate(range(0, N, cols)):
            n = min(cols, N - col0)
            grid_n = triton.cdiv(n, block_n)
            d_chunk = d[col0:col0 + n]
            S = _similarities(q, d_chunk, _chunk_view(sim_buffer, B, n))
            G = _chunk_view(grad_buffer, B, n)
            _softmax_grad_kernel[(grid_m, grid_n)](
                S, labels, ids, label_ids, scale32, lse, g, G, ds[chunk], B, col0, n, S.stride(0), G.stride(0),
                HAS_IDS=ctx.has_ids, SCALE_GRAD=need_s, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
            )
            if need_d:
                torch.mm(G.t(), q, out=dd[col0:col0 + n])
            if need_q and dq_acc is None:
                dq = G @ d_chunk
            elif need_q:
                _add_product(dq_acc, G, d_chunk)
        if dq_acc is not None:
            dq = dq_acc.to(q.dtype)
        dscale = ds.sum().reshape(ctx.scale_shape).to(ctx.scale_dtype) if need_s else None
        return dq, dd, None, dscale, None


def infonce_triton(q, d, labels, scale, document_ids=None):
    """Mean InfoNCE over rows; same contract as speedx.embed.losses.infonce_torch (inputs already checked)."""
    check_device(q)
    if not torch.is_tensor(scale):
        scale = torch.tensor(float(scale), device=q.device)
    if q.is_cuda and torch.is_autocast_enabled("cuda"):  # the precision the twin's matmul gets under autocast
        dtype = torch.get_autocast_dtype("cuda")
        q, d = q.to(dtype), d.to(dtype)
    return InfoNCEFunction.apply(q, d, labels, scale, document_ids).mean()
