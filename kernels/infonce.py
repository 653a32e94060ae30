"""Fused InfoNCE in Triton: contrastive cross-entropy without a B x N similarity matrix.

For normalized queries q [B, D], documents d [N, D], labels [B] and a scale s:

    loss_i = logsumexp_j(s * q_i . d_j) - s * q_i . d_{labels_i}     (j over the unmasked columns)

Forward: each program owns BLOCK_M query rows and streams d past them in BLOCK_N tiles; a tile is
one fp32 tl.dot over D, folded into an online log-sum-exp. Only lse [B] is saved (with the inputs).
Backward: the tiles are recomputed and turned into G = s * g * (softmax - onehot), one column chunk
at a time, in a [B, cols] buffer of at most WORKSPACE_BYTES whatever B x N is (small problems fit in
one chunk), and the two products go to the BLAS: dd[chunk] = G^T q, dq += G d[chunk]; ds sums
g * (softmax - onehot) * cos per tile. Every sum has a fixed order and there are no atomics, so the
gradients are deterministic.

Optional false-negative masking: with document_ids [N], a column j is dropped from row i when
ids[j] == ids[labels_i] and j != labels_i (duplicates of the positive).

The PyTorch twin with the same signature is speedx.embed.losses.infonce_torch.
"""

from __future__ import annotations

import torch

from speedx.kernels.triton_jit import check_device, import_triton, interpreter_active, jit

triton = import_triton()
import triton.language as tl  # noqa: E402

# The backward's dlogits chunk [B, cols]: 64 MiB, i.e. 4096 columns at B=8192 in bf16.
WORKSPACE_BYTES = 64 << 20


@jit
def _cos_tile(q_ptr, d_ptr, ids_ptr, rows, cols, labels, label_ids, B, col_end, D, stride_q, stride_d,
              HAS_IDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              PRECISION: tl.constexpr):
    """q[rows] . d[cols] in fp32, and which columns count (in range, not a masked false negative)."""
    row_ok = rows < B
    col_ok = cols < col_end
    q_rows = rows.to(tl.int64) * stride_q  # int64: N * D may pass 2**31
    d_rows = cols.to(tl.int64) * stride_d
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        q = tl.load(q_ptr + q_rows[:, None] + ks[None, :], mask=row_ok[:, None] & (ks[None, :] < D), other=0.0)
        dt = tl.load(d_ptr + d_rows[None, :] + ks[:, None], mask=col_ok[None, :] & (ks[:, None] < D), other=0.0)
        acc = tl.dot(q, dt, acc, input_precision=PRECISION)
    keep = col_ok[None, :] & (rows[:, None] >= 0)  # broadcast to the tile's shape
    if HAS_IDS:
        ids = tl.load(ids_ptr + cols, mask=col_ok, other=-1)
        duplicate = (ids[None, :] == label_ids[:, None]) & (cols[None, :] != labels[:, None])
        keep = keep & ~duplicate
    return acc, keep


@jit
def _infonce_fwd_kernel(q_ptr, d_ptr, labels_ptr, ids_ptr, label_ids_ptr, scale_ptr, lse_ptr, loss_ptr,
                        B, N, D, stride_q, stride_d,
                        HAS_IDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    label_ids = labels
    if HAS_IDS:
        label_ids = tl.load(label_ids_ptr + rows, mask=row_ok, other=-1)
    scale = tl.load(scale_ptr)

    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running max
    sumexp = tl.zeros((BLOCK_M,), tl.float32)  # running sum of exp(logit - m)
    pos = tl.zeros((BLOCK_M,), tl.float32)  # the label column's logit
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cos, keep = _cos_tile(q_ptr, d_ptr, ids_ptr, rows, cols, labels, label_ids, B, N, D, stride_q, stride_d,
                              HAS_IDS, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        logits = tl.where(keep, cos * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has kept no column yet
        sumexp = sumexp * tl.exp(m - m_safe) + tl.sum(tl.exp(logits - m_safe[:, None]), axis=1)
        m = m_new
        pos += tl.sum(tl.where(cols[None, :] == labels[:, None], logits, 0.0), axis=1)
    lse = m + tl.log(sumexp)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(loss_ptr + rows, lse - pos, mask=row_ok)


@jit
def _infonce_bwd_kernel(q_ptr, d_ptr, labels_ptr, ids_ptr, label_ids_ptr, scale_ptr, lse_ptr, g_ptr, G_ptr, ds_ptr,
                        B, col0, n_cols, D, stride_q, stride_d, stride_G,
                        HAS_IDS: tl.constexpr, SCALE_GRAD: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """G[:, chunk] = s * g_i * (softmax_ij - onehot_ij) for columns col0 .. col0 + n_cols."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    local = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = col0 + local
    row_ok = rows < B
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    label_ids = labels
    if HAS_IDS:
        label_ids = tl.load(label_ids_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)  # padding rows get no gradient
    scale = tl.load(scale_ptr)

    cos, keep = _cos_tile(q_ptr, d_ptr, ids_ptr, rows, cols, labels, label_ids, B, col0 + n_cols, D, stride_q,
                          stride_d, HAS_IDS, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
    p = tl.where(keep, tl.exp(cos * scale - lse[:, None]), 0.0)
    onehot = tl.where(keep & (cols[None, :] == labels[:, None]), 1.0, 0.0)
    dlogits = g[:, None] * (p - onehot)
    out = G_ptr + rows.to(tl.int64)[:, None] * stride_G + local[None, :]
    tl.store(out, (dlogits * scale).to(G_ptr.dtype.element_ty), mask=row_ok[:, None] & (local < n_cols)[None, :])
    if SCALE_GRAD:  # d logits / d s = cos; one partial per tile, summed on the host in a fixed order
        tl.store(ds_ptr + pid_m * tl.num_programs(1) + pid_n, tl.sum(tl.sum(dlogits * cos, axis=1), axis=0))


def _config(D: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages)."""
    if interpreter_active():  # small tiles so that tests on small shapes cross every tile boundary
        return 32, 32, 32, 4, 1
    return 128, 64, min(64, max(16, triton.next_power_of_2(D))), 8, 3


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs: the same precision torch's own matmul would use (the twin's), bf16/fp16: ignored.
    return "ieee" if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest" else "tf32"


def chunk_columns(B: int, N: int, elem_size: int, block_n: int) -> int:
    """Columns of the backward's dlogits chunk: a multiple of block_n, within WORKSPACE_BYTES."""
    cols = max(block_n, WORKSPACE_BYTES // max(1, B * elem_size) // block_n * block_n)
    return min(cols, triton.cdiv(N, block_n) * block_n)


def workspace_bytes(B: int, N: int, D: int, dtype: torch.dtype) -> int:
    """Peak memory the fused path allocates beyond its inputs and their gradients (analytic, GPU tiles)."""
    elem = torch.empty((), dtype=dtype).element_size()
    cols = chunk_columns(B, N, elem, 64)
    total = 2 * B * 4 + B * cols * elem  # lse + per-row loss, the dlogits chunk
    if cols < N and dtype != torch.float32:  # several chunks: an fp32 dq accumulator, each chunk's product
        total += B * D * 4 + B * D * elem
    return total


class InfoNCEFunction(torch.autograd.Function):
    """(q [B, D], d [N, D] normalized, labels [B] int64, scale [1] tensor, document_ids [N] or None) -> loss [B]."""

    @staticmethod
    def forward(ctx, q, d, labels, scale, document_ids):
        q, d, labels = q.contiguous(), d.contiguous(), labels.contiguous()
        B, D = q.shape
        N = d.shape[0]
        scale32 = scale.detach().reshape(1).float().contiguous()
        has_ids = document_ids is not None
        ids = document_ids.contiguous() if has_ids else labels  # a dummy pointer when unused
        label_ids = ids[labels].contiguous() if has_ids else labels
        lse = torch.empty(B, dtype=torch.float32, device=q.device)
        loss = torch.empty(B, dtype=torch.float32, device=q.device)
        block_m, block_n, block_d, warps, stages = _config(D)
        _infonce_fwd_kernel[(triton.cdiv(B, block_m),)](
            q, d, labels, ids, label_ids, scale32, lse, loss, B, N, D, q.stride(0), d.stride(0),
            HAS_IDS=has_ids, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=_precision(q.dtype),
            num_warps=warps, num_stages=stages,
        )
        ctx.save_for_backward(q, d, labels, ids, label_ids, scale32, lse)
        ctx.has_ids = has_ids
        ctx.scale_shape, ctx.scale_dtype = scale.shape, scale.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        q, d, labels, ids, label_ids, scale32, lse = ctx.saved_tensors
        need_q, need_d, _, need_s, _ = ctx.needs_input_grad
        B, D = q.shape
        N = d.shape[0]
        g = grad_loss.float().contiguous()
        block_m, block_n, block_d, warps, stages = _config(D)
        cols = chunk_columns(B, N, q.element_size(), block_n)
        grid_m = triton.cdiv(B, block_m)
        G = torch.empty((B, cols), dtype=q.dtype, device=q.device)
        dd = torch.empty_like(d) if need_d else None
        dq = dq_acc = None
        if need_q and cols < N:  # several chunks: sum their products in fp32
            dq_acc = torch.zeros((B, D), dtype=torch.float32, device=q.device)
        ds_parts = []
        for col0 in range(0, N, cols):
            n = min(cols, N - col0)
            grid_n = triton.cdiv(n, block_n)
            ds = torch.empty(grid_m * grid_n, dtype=torch.float32, device=q.device)
            _infonce_bwd_kernel[(grid_m, grid_n)](
                q, d, labels, ids, label_ids, scale32, lse, g, G, ds, B, col0, n, D,
                q.stride(0), d.stride(0), G.stride(0),
                HAS_IDS=ctx.has_ids, SCALE_GRAD=need_s, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                PRECISION=_precision(q.dtype), num_warps=warps, num_stages=stages,
            )
            Gc = G[:, :n]
            if need_d:
                torch.mm(Gc.t(), q, out=dd[col0:col0 + n])
            if need_q and dq_acc is None:
                dq = Gc @ d
            elif need_q and q.dtype == torch.float32:
                dq_acc.addmm_(Gc, d[col0:col0 + n])
            elif need_q:
                dq_acc.add_(Gc @ d[col0:col0 + n])
            if need_s:
                ds_parts.append(ds.sum())
        if dq_acc is not None:
            dq = dq_acc.to(q.dtype)
        dscale = torch.stack(ds_parts).sum().reshape(ctx.scale_shape).to(ctx.scale_dtype) if need_s else None
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
