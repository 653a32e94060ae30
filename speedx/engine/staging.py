"""One host-to-device copy per step: a step's small index arrays packed into a pinned buffer.

Each `torch.tensor(list, device="cuda")` or pageable `.to("cuda")` is its own synchronous copy
(~0.5 ms with 256 sequences); a decode step of a small model needs only a few milliseconds of GPU
time, so the copies, not the GPU, would set the pace.
"""

from __future__ import annotations

import numpy as np
import torch


class Staging:
    def __init__(self, device: torch.device):
        self.device = device
        self.host = torch.empty(0, dtype=torch.uint8)
        self.copied: torch.cuda.Event | None = None  # the last copy out of `host`

    def to_device(self, *arrays: np.ndarray) -> list[torch.Tensor]:
        """The arrays as device tensors (same dtypes and shapes), moved together."""
        if self.device.type != "cuda":
            return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
        offsets, total = [], 0
        for a in arrays:
            offsets.append(total)
            total += -(-a.nbytes // 8) * 8  # 8-byte aligned, so every slice can be viewed as its dtype
        if self.copied is not None:
            self.copied.synchronize()  # the previous copy may still be reading the buffer
        if self.host.numel() < total:
            self.host = torch.empty(max(total, 2 * self.host.numel()), dtype=torch.uint8, pin_memory=True)
        host = self.host.numpy()
        for a, offset in zip(arrays, offsets):
            host[offset : offset + a.nbytes] = np.ascontiguousarray(a).view(np.uint8).reshape(-1)
        packed = self.host[:total].to(self.device, non_blocking=True)
        self.copied = torch.cuda.Event()
        self.copied.record()
        return [
            packed[offset : offset + a.nbytes].view(torch.from_numpy(a[:0]).dtype).view(a.shape)
            for a, offset in zip(arrays, offsets)
        ]
