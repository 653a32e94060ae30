"""LoRA adapters in PEFT's format, merged into the base weights as they load: W + s * B @ A.

Merging at load keeps generation at full engine speed (no extra matmuls per step); the alignment
stages produce one adapter per model (junior, senior, revisor), so nothing needs switching per request.
s = lora_alpha / r (or / sqrt(r) with rsLoRA), per module when the config has an alpha_pattern.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Iterator

import torch

# base_model.model.<HF module path>.lora_A[.default].weight
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


class LoRAAdapter:
    def __init__(self, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], config: dict, path: Path):
        self.pairs = pairs  # HF weight name -> (A [r, in], B [out, r])
        self.config = config
        self.path = path

    @classmethod
    def load(cls, path: str | Path) -> "LoRAAdapter":
        path = Path(path)
        config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
        if not config_file.is_file() or not weights_file.is_file():
            raise FileNotFoundError(
                f"{path} is not a PEFT LoRA adapter: expected adapter_config.json and adapter_model.safetensors"
            )
        config = json.loads(config_file.read_text())
        unsupported = {
            "peft_type": config.get("peft_type", "LORA") != "LORA",
            "use_dora": bool(config.get("use_dora")),
            "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
            "modules_to_save": bool(config.get("modules_to_save")),
            "bias": config.get("bias", "none") != "none",
        }
        if any(unsupported.values()):
            names = ", ".join(k for k, bad in unsupported.items() if bad)
            raise ValueError(f"adapter {path}: {names} not supported; merge it with peft (merge_and_unload) and load "
                             "the merged checkpoint instead")
        from safetensors.torch import load_file

        halves: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in load_file(str(weights_file)).items():
            match = _KEY.match(key)
            if match is None:
                raise ValueError(f"adapter {path}: unexpected tensor {key!r} (only lora_A/lora_B weights are supported)")
            halves.setdefault(match["module"] + ".weight", {})[match["ab"]] = tensor
        pairs = {}
        for name, half in halves.items():
            if set(half) != {"A", "B"}:
                raise ValueError(f"adapter {path}: {name} has lora_{''.join(half)} but not its other half")
            pairs[name] = (half["A"], half["B"])
        return cls(pairs, config, path)

    def scaling(self, weight_name: str, rank: int) -> float:
        module = weight_name.removesuffix(".weight")
        alpha = self.config.get("lora_alpha", 8)
        for pattern, value in (self.config.get("alpha_pattern") or {}).items():
            if re.search(rf"(^|\.){pattern}$", module):
                alpha = value
        return alpha / (math.sqrt(rank) if self.config.get("use_rslora") else rank)

    def merge(self, weights: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """The base weights with every targeted matrix updated (in fp32, then back to its dtype)."""
        pending = dict(self.pairs)
        for name, tensor in weights:
            pair = pending.pop(name, None)
            if pair is not None:
                a, b = pair
                delta = (b.float() @ a.float()) * self.scaling(name, a.shape[0])
                if delta.shape != tensor.shape:
                    raise ValueError(f"adapter {self.path}: {name} update has shape {tuple(delta.shape)}, the model's "
                                     f"weight {tuple(tensor.shape)}; was it trained on another base model?")
                tensor = (tensor.float() + delta).to(tensor.dtype)
            yield name, tensor
        if pending:
            raise ValueError(f"adapter {self.path} targets {len(pending)} weights the model does not have, e.g. "
                             f"{sorted(pending)[:3]}; was it trained on another base model?")
