"""Fused InfoNCE: contrastive cross-entropy without a B x N similarity matrix.

For normalized queries q [B, D], documents d [N, D], labels [B] and a scale s:

    loss = mean_i( logsumexp_j(s * q_i . d_j) - s * q_i . d_{labels_i} )     (j over the unmasked columns)

The queries are walked in row chunks: a chunk's similarities S = q[rows] @ d^T [rows, N] (fp32
accumulation and output) fill a buffer of at most WORKSPACE_BYTES whatever B x N is. With whole rows
in hand, a Triton kernel reduces S to each row's log-sum-exp (online: running max and sum of
exponentials) and label logit, and when gradients are wanted a second one turns S into
G = s / B * (softmax - onehot) (and per-tile partials of d loss / d s), and two products follow:
dq[rows] = G d, dd += G^T q[rows].

So the gradients are computed in the forward pass and handed to autograd's backward, scaled by the
incoming gradient (as Liger-Kernel's fused linear cross-entropy does): the similarities are
computed once, in three products per chunk where recomputing them in backward takes four. The
reference (one cross_entropy on the full matrix) also runs three, plus passes over B x N, so the
recomputing form could at best tie it. Measured on an H200 at B=8192, N=57344, D=4096 bf16, that
form (column chunks: forward lse, backward recompute, 4 cuBLAS products) took 1.10x the reference's
time (2026-11-25; `python bench/infonce.py --breakdown` times each step).
Under torch.no_grad(), or when nothing needs a gradient, only the log-sum-exp pass runs. Backward can
run once per forward (retain_graph=True with a second backward raises).

The products are cuBLAS calls, not tl.dot tiles: on the H200 cuBLAS ran them at 705-812 TFLOP/s,
where tl.dot tiles fused with the log-sum-exp reached 135-330 under eight tile shapes. The Triton
kernels do what cuBLAS cannot: the streaming log-sum-exp, the masks, and the softmax gradient in one
pass over a chunk. Every sum has a fixed order and there are no atomics: the results are
deterministic. dd is summed over the row chunks in place, in the inputs' dtype (as autograd sums the
gradients of a tensor used twice; an fp32 sum would cost N x D x 4 bytes, 0.9 GB at the target). In a
CPU experiment (B=1024, N=7168, D=256, bf16, 16 chunks, errors against float64) that dd was off by
0.25% at scale 50 and 0.46% at scale 20, where the reference, whose logits are rounded to bf16, was
off by 1.45% and 0.33%.

Optional false-negative masking: with document_ids [N], a column j is dropped from row i when
ids[j] == ids[labels_i] and j != labels_i (duplicates of the positive).

The PyTorch twin with the same signature is speedx.embed.losses.infonce_torch.
"""

from __future__ import annotations

import torch

from speedx.kernels.triton_jit import check_device, import_triton, interpreter_active, jit

triton = import_triton()
import triton.language as tl  # noqa: E402

# The fp32 similarities of a row chunk [rows, N] (plus the gradient chunk G [rows, N] in the inputs'
# dtype when gradients are wanted): at B=8192, N=57344, 8 chunks of 1024 rows, 352 MB in all, 6.9% of
# the reference's extra memory there.
WORKSPACE_BYTES = 256 << 20

# (rows, columns, warps) per program of the two Triton kernels on GPU: the fastest of a
# bench/infonce.py --breakdown sweep on an H200 (chunks of 4096 columns then; rerun the sweep for row
# chunks); in the interpreter, small tiles so that tests on small shapes cross every tile boundary.
LSE_TILE = (2, 1024, 4)
GRAD_TILE = (16, 512, 8)
INTERPRETER_TILES = ((8, 32, 4), (16, 32, 4))
SCALE_BLOCK = 4096  # elements per program of the in-place gradient scaling

# Recent torch (2.11 on the GPU image, 2.13 here) multiplies bf16/fp16 into an fp32 result on CUDA:
# torch.mm(..., out_dtype=torch.float32). Without it the similarities round to the inputs' dtype.
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype_out")


@jit
def _keep(ids_ptr, rows, cols, labels, label_ids, col_ok, HAS_IDS: tl.constexpr):
    """Which columns of a tile count: in range, and not a masked false negative."""
    keep = col_ok[None, :] & (rows[:, None] >= 0)  # broadcast to the tile's shape
    if HAS_IDS:
        ids = tl.load(ids_ptr + cols, mask=col_ok, other=-1)
        duplicate = (ids[None, :] == label_ids[:, None]) & (cols[None, :] != labels[:, None])
        keep = keep & ~duplicate
    return keep


# n_cols (N) stays specialized: when it is a multiple of 16, Triton knows the column masks are
# constant over 16-element runs and vectorizes (sm_90 SASS: LDG.E.128 and STG.E.128; with n_cols
# unspecialized, as when chunk widths varied, every load and store was scalar: LDG.E, STG.E.U16).
@jit
def _row_lse_kernel(S_ptr, labels_ptr, ids_ptr, label_ids_ptr, scale_ptr, lse_ptr, pos_ptr,
                    n_rows, n_cols, stride_S,
                    HAS_IDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Each row's log-sum-exp over its kept columns, and its label's logit, from whole rows S [n_rows, n_cols]."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    label_ids = labels
    if HAS_IDS:
        label_ids = tl.load(label_ids_ptr + rows, mask=row_ok, other=-1)
    scale = tl.load(scale_ptr)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    sumexp = tl.zeros([BLOCK_M], tl.float32)
    pos = tl.zeros([BLOCK_M], tl.float32)
    S_rows = S_ptr + rows.to(tl.int64)[:, None] * stride_S  # int64: rows x n_cols may pass 2**31
    for n0 in range(0, n_cols, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_cols
        cos = tl.load(S_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        keep = _keep(ids_ptr, rows, cols, labels, label_ids, col_ok, HAS_IDS)
        logits = tl.where(keep, cos * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has kept no column yet
        sumexp = sumexp * tl.exp(m - m_safe) + tl.sum(tl.exp(logits - m_safe[:, None]), axis=1)
        m = m_new
        pos += tl.sum(tl.where(keep & (cols[None, :] == labels[:, None]), logits, 0.0), axis=1)
    tl.store(lse_ptr + rows, m + tl.log(sumexp), mask=row_ok)  # the label is always kept: sumexp > 0
    tl.store(pos_ptr + rows, pos, mask=row_ok)


@jit
def _softmax_grad_kernel(S_ptr, labels_ptr, ids_ptr, label_ids_ptr, scale_ptr, lse_ptr, row_weight, G_ptr, ds_ptr,
                         n_rows, n_cols, stride_S, stride_G,
                         HAS_IDS: tl.constexpr, SCALE_GRAD: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    """G = s * w * (softmax - onehot) from whole rows S [n_rows, n_cols] (w: each row's weight in the loss)."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    label_ids = labels
    if HAS_IDS:
        label_ids = tl.load(label_ids_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    scale = tl.load(scale_ptr)

    tile = row_ok[:, None] & col_ok[None, :]
    cos = tl.load(S_ptr + rows.to(tl.int64)[:, None] * stride_S + cols[None, :], mask=tile, other=0.0)
    keep = _keep(ids_ptr, rows, cols, labels, label_ids, col_ok, HAS_IDS) & tile
    p = tl.where(keep, tl.exp(cos * scale - lse[:, None]), 0.0)
    onehot = tl.where(keep & (cols[None, :] == labels[:, None]), 1.0, 0.0)
    dlogits = row_weight * (p - onehot)
    out = G_ptr + rows.to(tl.int64)[:, None] * stride_G + cols[None, :]
    tl.store(out, (dlogits * scale).to(G_ptr.dtype.element_ty), mask=tile)
    if SCALE_GRAD:  # d logits / d s = cos; one partial per tile, summed on the host in a fixed order
        tl.store(ds_ptr + pid_m * tl.num_programs(1) + pid_n, tl.sum(tl.sum(dlogits * cos, axis=1), axis=0))


@jit
def _scale_kernel(x_ptr, scale_ptr, n, BLOCK: tl.constexpr):
    """x *= scale in place, skipped when scale == 1: loss.backward() hands 1, and then the gradients
    computed in forward are final (no 2 x 537 MB pass at the 8192 x 57344 x 4096 target)."""
    scale = tl.load(scale_ptr)
    if scale != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n)
        tl.store(x_ptr + offs, (x.to(tl.float32) * scale).to(x.dtype), mask=offs < n)


def _scale_(x: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor | None:
    if x is not None:
        _scale_kernel[(triton.cdiv(x.numel(), SCALE_BLOCK),)](x, scale, x.numel(), BLOCK=SCALE_BLOCK)
    return x


def _tiles() -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(rows, columns, warps) of a program's tile: for the lse update, for the softmax gradient."""
    return INTERPRETER_TILES if interpreter_active() else (LSE_TILE, GRAD_TILE)


def chunk_rows(B: int, N: int) -> int:
    """Rows per chunk: the fp32 similarities [rows, N] within WORKSPACE_BYTES, in chunks of equal size."""
    most = max(1, WORKSPACE_BYTES // (4 * N))
    return -(-B // -(-B // most))


def workspace_bytes(B: int, N: int, dtype: torch.dtype, grads: bool = True) -> int:
    """Peak memory the fused path allocates on CUDA beyond its inputs and their gradients (analytic)."""
    elem = torch.empty((), dtype=dtype).element_size()
    rows = chunk_rows(B, N)
    rounded = dtype != torch.float32 and not _MM_OUT_DTYPE  # each similarity chunk first in the inputs' dtype
    total = 2 * B * 4 + rows * N * (4 + (elem if rounded else 0))  # lse and label logits, similarities
    if grads:
        total += rows * N * elem  # the gradient chunk G
    return total


def _chunk_view(buffer: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A contiguous [rows, cols] view at the start of a flat buffer (the last chunk is smaller)."""
    return buffer[: rows * cols].view(rows, cols)


def _similarities(q: torch.Tensor, d: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """q @ d^T into the fp32 buffer out, accumulated in fp32 (cuBLAS on CUDA)."""
    if q.dtype == torch.float32:
        return torch.mm(q, d.t(), out=out)
    if q.is_cuda and _MM_OUT_DTYPE:
        return torch.mm(q, d.t(), out_dtype=torch.float32, out=out)
    return out.copy_(q @ d.t())  # CPU (the interpreter's tests) or an older torch: the product's dtype


class InfoNCEFunction(torch.autograd.Function):
    """(q [B, D], d [N, D] normalized, labels [B] int64, scale [1] tensor, document_ids [N] or None,
    grads: compute the gradients) -> mean loss."""

    @staticmethod
    def forward(ctx, q, d, labels, scale, document_ids, grads):
        q, d, labels = q.contiguous(), d.contiguous(), labels.contiguous()
        need_q, need_d, _, need_s, _, _ = ctx.needs_input_grad
        need_q, need_d, need_s = need_q and grads, need_d and grads, need_s and grads
        grads = need_q or need_d or need_s
        B, N = q.shape[0], d.shape[0]
        scale32 = scale.detach().reshape(1).float().contiguous()
        has_ids = document_ids is not None
        ids = document_ids.contiguous() if has_ids else labels  # a dummy pointer when unused
        label_ids = ids[labels].contiguous() if has_ids else labels
        lse = torch.empty(B, dtype=torch.float32, device=q.device)
        pos = torch.empty(B, dtype=torch.float32, device=q.device)
        rows = chunk_rows(B, N)
        (lse_m, lse_n, lse_warps), (grad_m, grad_n, grad_warps) = _tiles()
        sim_buffer = torch.empty(rows * N, dtype=torch.float32, device=q.device)
        if grads:
            grad_buffer = torch.empty(rows * N, dtype=q.dtype, device=q.device)
            dq = torch.empty_like(q) if need_q else None
            dd = torch.empty_like(d) if need_d else None
            # d loss / d s: one partial per tile of each chunk, summed at the end in a fixed order
            ds = torch.zeros((triton.cdiv(B, rows), triton.cdiv(rows, grad_m) * triton.cdiv(N, grad_n)),
                             device=q.device)
        for chunk, r0 in enumerate(range(0, B, rows)):
            r = slice(r0, min(r0 + rows, B))
            n_rows = r.stop - r0
            S = _similarities(q[r], d, _chunk_view(sim_buffer, n_rows, N))
            _row_lse_kernel[(triton.cdiv(n_rows, lse_m),)](
                S, labels[r], ids, label_ids[r], scale32, lse[r], pos[r], n_rows, N, S.stride(0),
                HAS_IDS=has_ids, BLOCK_M=lse_m, BLOCK_N=lse_n, num_warps=lse_warps,
            )
            if not grads:
                continue
            G = _chunk_view(grad_buffer, n_rows, N)
            _softmax_grad_kernel[(triton.cdiv(n_rows, grad_m), triton.cdiv(N, grad_n))](
                S, labels[r], ids, label_ids[r], scale32, lse[r], 1.0 / B, G, ds[chunk], n_rows, N,
                S.stride(0), G.stride(0),
                HAS_IDS=has_ids, SCALE_GRAD=need_s, BLOCK_M=grad_m, BLOCK_N=grad_n, num_warps=grad_warps,
            )
            if need_q:
                torch.mm(G, d, out=dq[r])
            if need_d:
                # summed in d's dtype, as autograd sums the gradients of a tensor used twice
                torch.addmm(dd, G.t(), q[r], beta=int(r0 > 0), out=dd)
        ctx.grads = None
        if grads:
            dscale = ds.sum().reshape(scale.shape).to(scale.dtype) if need_s else None
            ctx.grads = (dq, dd, dscale)
        return (lse - pos).mean()

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError(
                "the fused InfoNCE (backend='triton') computes its gradients in the forward pass and hands them "
                "to one backward: run the loss again for a second backward, or use backend='torch'"
            )
        dq, dd, dscale = ctx.grads
        ctx.grads = None
        g = grad_loss.detach().float().reshape(1).contiguous()
        # in place: these tensors become the .grad of the inputs
        return (_scale_(dq, g), _scale_(dd, g), None, dscale * grad_loss if dscale is not None else None, None, None)


def infonce_triton(q, d, labels, scale, document_ids=None):
    """Mean InfoNCE over rows; same contract as speedx.embed.losses.infonce_torch (inputs already checked)."""
    check_device(q)
    if not torch.is_tensor(scale):
        scale = torch.full((), float(scale), device=q.device)  # a fill kernel: no host-to-device copy and sync
    if q.is_cuda and torch.is_autocast_enabled("cuda"):  # the precision the twin's matmul gets under autocast
        dtype = torch.get_autocast_dtype("cuda")
        q, d = q.to(dtype), d.to(dtype)
    return InfoNCEFunction.apply(q, d, labels, scale, document_ids, torch.is_grad_enabled())
