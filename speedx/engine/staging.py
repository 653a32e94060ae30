"""One host-to-device copy per step: a step's small index arrays packed into a pinned buffer.

Each `torch.tensor(list, device="cuda")` or pageable `.to("cuda")` is its own synchronous copy
(~0.5 ms with 256 sequences); a decode step of a small model needs only a few milliseconds of GPU
time, so the copies, not the GPU, would set the pace.
"""

from __future__ import annotations

import numpy as np
import torch


class Staging:
    """Two pinned buffers used in turn: filling one waits only for the copy out of the step before
    last, so a step launched ahead (async scheduling) need not wait for the one still running."""

    def __init__(self, device: torch.device):
        self.device = device
        self.hosts = [torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8)]
        self.copied: list[torch.cuda.Event | None] = [None, None]  # the last copy out of each buffer
        self.turn = 0

    def to_device(self, *arrays: np.ndarray) -> list[torch.Tensor]:
        """The arrays as device tensors (same dtypes and shapes), moved together."""
        if self.device.type != "cuda":
            return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
        offsets, total = [], 0
        for a in arrays:
            offsets.append(total)
            total += -(-a.nbytes // 8) * 8  # 8-byte aligned, so every slice can be viewed as its dtype
        turn, self.turn = self.turn, 1 - self.turn
        if self.copied[turn] is not None:
            self.copied[turn].synchronize()  # an earlier copy may still be reading this buffer
        if self.hosts[turn].numel() < total:
            self.hosts[turn] = torch.empty(max(total, 2 * self.hosts[turn].numel()), dtype=torch.uint8, pin_memory=True)
        host = self.hosts[turn].numpy()
        for a, offset in zip(arrays, offsets):
            host[offset : offset + a.nbytes] = np.ascontiguousarray(a).view(np.uint8).reshape(-1)
        packed = self.hosts[turn][:total].to(self.device, non_blocking=True)
        self.copied[turn] = torch.cuda.Event()
        self.copied[turn].record()
        return [
            packed[offset : offset + a.nbytes].view(torch.from_numpy(a[:0]).dtype).view(a.shape)
            for a, offset in zip(arrays, offsets)
        ]
