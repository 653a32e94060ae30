"""Training embedding models on the synthesized data: losses (the fused InfoNCE and its twin)."""

from speedx.embed.losses import InfoNCELoss, false_negative_mask, infonce_loss, infonce_torch

__all__ = ["InfoNCELoss", "false_negative_mask", "infonce_loss", "infonce_torch"]
