"""Training embedding models on the synthesized data: the fused InfoNCE loss, hard-negative mining."""

from speedx.embed.losses import InfoNCELoss, false_negative_mask, infonce_loss, infonce_torch
from speedx.embed.mining import build_corpus, mine_hard_negatives, select_negatives

__all__ = [
    "InfoNCELoss", "build_corpus", "false_negative_mask", "infonce_loss", "infonce_torch", "mine_hard_negatives",
    "select_negatives",
]
