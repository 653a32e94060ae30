"""InfoNCE for embedding training: the public loss, its PyTorch twin, and a sentence-transformers loss.

    loss = mean_i( logsumexp_j(s * cos(q_i, d_j)) - s * cos(q_i, d_{labels_i}) )

over all documents d (in-batch positives and hard negatives, in any layout: labels say which column
is each query's positive). The fused Triton path (speedx.kernels.infonce) never holds the B x N
similarity matrix; the twin below does (one cross_entropy) and is the reference and the CPU path.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from speedx.kernels.registry import REQUESTS as BACKENDS, infonce_backend


def infonce_loss(
    q: Tensor,
    d: Tensor,
    labels: Tensor,
    scale: float | Tensor = 50.0,
    backend: str = "auto",
    document_ids: Tensor | None = None,
    gather_across_processes: bool = False,
) -> Tensor:
    """Mean InfoNCE of queries q [B, D] against documents d [N, D] (unnormalized embeddings).

    labels [B] (int): column of d holding each query's positive. scale: 1 / temperature, a float or
    a tensor (an nn.Parameter is learned: its gradient flows). document_ids [N] (int, optional):
    documents that share an id with a query's positive, other than the positive itself, are known
    false negatives (duplicates of the positive) and are left out of that query's softmax.
    gather_across_processes: when torch.distributed is initialized, score the local queries against
    the documents of every process (all ranks must pass the same N; document_ids must then be
    global, e.g. text hashes); gradients flow back to each document's owner, and labels stay local
    (they are offset by rank * N here). backend: "triton" (the fused
    kernel), "torch" (the twin) or "auto" (triton for CUDA tensors when it is importable).
    """
    labels, document_ids = _check_inputs(q, d, labels, scale, backend, document_ids)
    dtype = torch.promote_types(q.dtype, d.dtype)
    q, d = F.normalize(q.to(dtype), dim=-1), F.normalize(d.to(dtype), dim=-1)
    if gather_across_processes and dist.is_available() and dist.is_initialized():
        labels = labels + dist.get_rank() * d.shape[0]
        d = _GatherRows.apply(d)
        document_ids = _gather_rows(document_ids) if document_ids is not None else None
    # torch.full: a fill kernel, where torch.tensor(x, device=cuda) copies from the host and syncs
    scale = scale.to(q.device).float() if torch.is_tensor(scale) else torch.full((), float(scale), device=q.device)
    if infonce_backend(q.device, backend) == "triton":
        from speedx.kernels.infonce import infonce_triton

        return infonce_triton(q, d, labels, scale, document_ids)
    return infonce_torch(q, d, labels, scale, document_ids)


def infonce_torch(q: Tensor, d: Tensor, labels: Tensor, scale: Tensor | float, document_ids: Tensor | None = None):
    """The twin of speedx.kernels.infonce.infonce_triton: normalized q [B, D], d [N, D] -> mean loss."""
    logits = (q @ d.T).float() * scale
    if document_ids is not None:
        logits = logits.masked_fill(false_negative_mask(labels, document_ids), float("-inf"))
    return F.cross_entropy(logits, labels)


def false_negative_mask(labels: Tensor, document_ids: Tensor) -> Tensor:
    """[B, N] bool: True where column j shares the positive's document id but is not the positive."""
    same = document_ids[None, :] == document_ids[labels][:, None]
    cols = torch.arange(document_ids.shape[0], device=labels.device)
    return same & (cols[None, :] != labels[:, None])


class InfoNCELoss(nn.Module):
    """A sentence-transformers loss: a drop-in for MultipleNegativesRankingLoss on the fused InfoNCE.

    Columns (anchor, positive, negative_1, ..., negative_k): every anchor is scored against all
    positives and negatives of the batch, documents = cat(positives, negatives...), labels = arange(B).
    scale: 1 / temperature (a float, or an nn.Parameter to learn it; the trainer's optimizer only sees
    the model's parameters, so add a learnable scale to it yourself). gather_across_devices: score
    against the documents of every process (DDP), as MultipleNegativesRankingLoss does.
    """

    def __init__(self, model: nn.Module, scale: float | Tensor = 50.0, gather_across_devices: bool = False,
                 backend: str = "auto") -> None:
        super().__init__()
        if not torch.is_tensor(scale) and not float(scale) > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.model = model
        self.scale = scale  # an nn.Parameter registers itself
        self.gather_across_devices = gather_across_devices
        self.backend = backend

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        return self.compute_loss_from_embeddings(_embed_columns(self.model, sentence_features), labels)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None = None) -> Tensor:
        """labels is the trainer's (unused, as in MultipleNegativesRankingLoss): targets are arange(B)."""
        if len(embeddings) < 2:
            raise ValueError(f"InfoNCELoss needs (anchor, positive, *negatives) columns, got {len(embeddings)}")
        queries = embeddings[0]
        targets = torch.arange(queries.shape[0], device=queries.device)
        return infonce_loss(queries, torch.cat(embeddings[1:]), targets, scale=self.scale, backend=self.backend,
                            gather_across_processes=self.gather_across_devices)

    def get_config_dict(self) -> dict[str, Any]:
        scale = float(self.scale.detach()) if torch.is_tensor(self.scale) else float(self.scale)
        return {"scale": scale, "similarity_fct": "cos_sim", "gather_across_devices": self.gather_across_devices,
                "backend": self.backend}

    @property
    def temperature(self) -> float:
        return 1.0 / self.get_config_dict()["scale"]

    @property
    def citation(self) -> str:
        return """
@misc{oord2019representationlearningcontrastivepredictive,
      title={Representation Learning with Contrastive Predictive Coding},
      author={Aaron van den Oord and Yazhe Li and Oriol Vinyals},
      year={2019},
      eprint={1807.03748},
      archivePrefix={arXiv},
      primaryClass={cs.LG},
      url={https://arxiv.org/abs/1807.03748},
}
"""


def _embed_columns(model: nn.Module, sentence_features: Iterable[dict[str, Tensor]]) -> list[Tensor]:
    try:  # sentence-transformers >= 6 merges the candidate columns into one forward pass
        from sentence_transformers.base.losses.merged_forward import embed_columns
    except ImportError:
        return [model(features)["sentence_embedding"] for features in sentence_features]
    return embed_columns(model, sentence_features)


def _check_inputs(q, d, labels, scale, backend, document_ids):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not torch.is_tensor(q) or not torch.is_tensor(d) or q.dim() != 2 or d.dim() != 2:
        raise ValueError(f"q and d must be 2-D tensors [batch, dim] and [docs, dim], got {_shape(q)} and {_shape(d)}")
    if q.shape[1] != d.shape[1]:
        raise ValueError(f"q and d must have the same embedding dim, got q {tuple(q.shape)} and d {tuple(d.shape)}")
    if q.shape[0] == 0 or d.shape[0] == 0:
        raise ValueError(f"need at least one query and one document, got q {tuple(q.shape)} and d {tuple(d.shape)}")
    if q.device != d.device:
        raise ValueError(f"q and d must be on the same device, got {q.device} and {d.device}")
    if torch.is_tensor(scale):
        if scale.numel() != 1:
            raise ValueError(f"scale must be a single value, got a tensor of shape {tuple(scale.shape)}")
    elif not (math.isfinite(float(scale)) and float(scale) > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    labels = _int_vector("labels", labels, q.shape[0], q.device)
    # One host sync per call: an out-of-range label would read out of bounds in the kernel.
    if bool(((labels < 0) | (labels >= d.shape[0])).any()):
        raise ValueError(
            f"labels must lie in [0, {d.shape[0]}) (columns of the local d), got min {int(labels.min())} "
            f"and max {int(labels.max())}"
        )
    if document_ids is not None:
        document_ids = _int_vector("document_ids", document_ids, d.shape[0], d.device)
    return labels, document_ids


def _int_vector(name: str, x, length: int, device) -> Tensor:
    x = torch.as_tensor(x, device=device)
    if x.dim() != 1 or x.shape[0] != length or x.dtype in (torch.bool,) or x.is_floating_point() or x.is_complex():
        raise ValueError(f"{name} must be a 1-D integer tensor of length {length}, got {x.dtype} {tuple(x.shape)}")
    return x.long()


def _shape(x) -> str:
    return str(tuple(x.shape)) if torch.is_tensor(x) else type(x).__name__


def _gather_rows(x: Tensor) -> Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class _GatherRows(torch.autograd.Function):
    """cat over ranks of x [rows, ...], with gradients: every rank's loss reads every rank's rows, so
    the backward sums the gradients of all ranks and hands each rank its own rows."""

    @staticmethod
    def forward(ctx, x):
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        return _gather_rows(x)

    @staticmethod
    def backward(ctx, grad):
        start = ctx.rank * ctx.rows
        if dist.get_backend() == "nccl":  # reduce_scatter moves half the bytes of an all_reduce
            out = grad.new_empty((ctx.rows, *grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad.contiguous())
            return out
        grad = grad.contiguous().clone()  # gloo has no reduce_scatter
        dist.all_reduce(grad)
        return grad[start:start + ctx.rows]
