"""Training embedding models on the synthesized data: the fused InfoNCE loss, hard-negative mining,
evaluation with MTEB (imported on first use: mteb takes seconds to import)."""

from speedx.embed.losses import InfoNCELoss, false_negative_mask, infonce_loss, infonce_torch
from speedx.embed.mining import build_corpus, mine_hard_negatives, select_negatives

_LAZY = {
    "evaluate_model": "speedx.embed.evaluation", "EvalInputError": "speedx.embed.evaluation",
    "TrainConfig": "speedx.embed.trainer", "train_embedder": "speedx.embed.trainer",
    "CachedInfoNCELoss": "speedx.embed.trainer", "run_scaling": "speedx.embed.scaling",
}

__all__ = [
    "CachedInfoNCELoss", "EvalInputError", "InfoNCELoss", "TrainConfig", "run_scaling", "train_embedder", "build_corpus", "evaluate_model", "false_negative_mask", "infonce_loss",
    "infonce_torch", "mine_hard_negatives", "select_negatives",
]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'speedx.embed' has no attribute {name!r}")
