"""Training embedding models on the synthesized data: the fused InfoNCE loss, hard-negative mining,
the trainer, evaluation with MTEB. Only the loss is imported eagerly: faiss, mteb and the trainer
load on first use (mteb alone takes seconds to import)."""

import importlib

from speedx.embed.losses import InfoNCELoss, false_negative_mask, infonce_loss, infonce_torch

_LAZY = {
    "mine_hard_negatives": "mining", "select_negatives": "mining", "build_corpus": "mining",
    "evaluate_model": "evaluation", "EvalInputError": "evaluation",
    "TrainConfig": "trainer", "train_embedder": "trainer", "CachedInfoNCELoss": "trainer",
    "run_scaling": "scaling",
}

__all__ = ["InfoNCELoss", "false_negative_mask", "infonce_loss", "infonce_torch", *sorted(_LAZY)]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"speedx.embed.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'speedx.embed' has no attribute {name!r}")
