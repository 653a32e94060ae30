"""Linear layers for CPU models: for half-precision ones the same bf16 arithmetic as transformers
(products accumulate in fp32, outputs round to bf16), faster than PyTorch's bf16 GEMM; for GGUF
models, their Q4_0/Q4_1/Q8_0 weights kept quantized and dequantized in the matmul's registers."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from speedx.models.layers import SwiGLU
from speedx.models.loader import QuantizedWeight


class WideMatmulLinear(nn.Module):
    """A linear layer whose weights hold bf16/fp16 values but multiply in fp32 on the CPU.

    On CPUs without AMX, PyTorch's bf16 GEMM runs 1.2-1.5x slower than its fp32 GEMM (measured by
    bench/cpu_matmul.py). Widening bf16 values to fp32 is exact and both accumulate in fp32, so the
    result, rounded back to the activation dtype, is the same bf16 arithmetic, only faster. It is
    also the PyTorch twin of PackedBf16Linear.
    """

    def __init__(self, linear: nn.Linear, out_dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().float(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        self.out_dtype = out_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight, self.bias).to(self.out_dtype)


class _PackedLinear(nn.Module):
    """speedx's CPU matmul (csrc/cpu_gemm.cpp) on weights packed once into the panels it streams."""

    weight_format = "bf16"

    def _setup(self, out_dtype: torch.dtype, silu_mul: bool, rows: int, in_features: int, packed: torch.Tensor,
               bias: torch.Tensor | None) -> None:
        if out_dtype not in (torch.bfloat16, torch.float32) or (silu_mul and out_dtype != torch.bfloat16):
            raise ValueError(f"{type(self).__name__} writes bfloat16 or float32 (bfloat16 with silu_mul), not {out_dtype}")
        from speedx import _C

        self._C = _C
        self.silu_mul = silu_mul
        self.in_features = in_features
        self.out_features = rows // 2 if silu_mul else rows
        self.register_buffer("packed_weight", packed)
        self.bias = None if bias is None else nn.Parameter(bias.contiguous(), requires_grad=False)
        self.out_dtype = out_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Decoding calls this ~120 times a step: keep the host work to one allocation and one call.
        rows = x if x.dim() == 2 and x.is_contiguous() else x.reshape(-1, self.in_features).contiguous()
        if rows.dtype not in _GEMM_DTYPE_NAMES:
            rows = rows.float()
        out = torch.empty((rows.shape[0], self.out_features), dtype=self.out_dtype)
        bias = self.bias
        self._C.gemm_packed_weight(
            out.data_ptr(), rows.data_ptr(), self.packed_weight.data_ptr(), 0 if bias is None else bias.data_ptr(),
            rows.shape[0], self.out_features * (2 if self.silu_mul else 1), self.in_features,
            _GEMM_DTYPE_NAMES[rows.dtype], _GEMM_DTYPE_NAMES[self.out_dtype], torch.get_num_threads(), self.silu_mul,
            weight_format=self.weight_format,
        )
        return out if rows is x else out.view(*x.shape[:-1], self.out_features)


class PackedBf16Linear(_PackedLinear):
    """A bf16 linear layer through speedx's CPU matmul (csrc/cpu_gemm.cpp).

    The weights stay bf16 (half the bytes of WideMatmulLinear's), packed once into the panels the
    kernel streams, and are widened in registers; products accumulate in fp32, so the arithmetic is
    WideMatmulLinear's. Each output is one FMA chain in k order: a row's result does not depend on
    the other rows of the batch. On CPUs with AVX512_BF16 (_C.gemm_isa() "avx512bf16") x is rounded
    to bf16 (as it already is in a bf16 model) and the chain takes k in pairs (vdpbf16ps), which
    changes only the summation order.
    """

    def __init__(self, linear: nn.Linear, out_dtype: torch.dtype, silu_mul: bool = False):
        """silu_mul: the linear's output is [gate | up] (SwiGLU's fused projection); the layer then
        returns silu(gate) * up, computed in the matmul's epilogue."""
        super().__init__()
        from speedx import _C

        rows, in_features = linear.weight.shape
        weight = linear.weight.detach().to(torch.bfloat16)
        bias = None if linear.bias is None else linear.bias.detach().float()
        if silu_mul:  # rows gate 0, up 0, gate 1, up 1, ...: each gate lands next to its up
            weight = _interleave_halves(weight)
            bias = None if bias is None else _interleave_halves(bias)
        weight = weight.contiguous()
        packed = torch.empty(_C.packed_weight_size(rows, in_features), dtype=torch.bfloat16)
        _C.pack_bf16_weight(weight.data_ptr(), rows, in_features, packed.data_ptr(), torch.get_num_threads())
        self._setup(out_dtype, silu_mul, rows, in_features, packed, bias)


class PackedQuantLinear(_PackedLinear):
    """A linear layer on GGUF-quantized weights (Q4_0, Q4_1, Q8_0) kept as they are, through speedx's
    CPU matmul: each 32-value block is dequantized in registers (d * q, or d * q + m for Q4_1) to
    exactly the values gguf.quants.dequantize gives, then multiplied in fp32 as PackedBf16Linear does.
    Small-batch decoding reads every weight once a step, so 4-bit weights read ~4x fewer bytes than bf16.
    """

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None, out_dtype: torch.dtype,
                 silu_mul: bool = False):
        super().__init__()
        from speedx import _C

        rows, in_features = weight.shape
        blocks = weight.blocks
        bias = None if bias is None else bias.detach().float()
        if silu_mul:  # whole rows of blocks move, exactly
            blocks = _interleave_halves(blocks)
            bias = None if bias is None else _interleave_halves(bias)
        blocks = blocks.contiguous()
        self.weight_format = weight.format
        packed = torch.empty(_C.packed_weight_bytes(weight.format, rows, in_features), dtype=torch.uint8)
        _C.pack_quant_weight(weight.format, blocks.data_ptr(), rows, in_features, packed.data_ptr(),
                             torch.get_num_threads())
        self._setup(out_dtype, silu_mul, rows, in_features, packed, bias)


_GEMM_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32"}

# Whether PackedBf16Linear beats WideMatmulLinear, per SIMD path (_C.gemm_isa()): bench/cpu_matmul.py
# on an AMD EPYC Zen 4 measured it 1.2-8x faster with AVX-512 and with AVX2 (forced) at m = 1, 8 and 64
# on SmolLM2's shapes, since it reads half the weight bytes and PyTorch's fp32 GEMM is slow at small m,
# and the avx512bf16 path faster still (also than PyTorch's bf16 F.linear at m = 16 and 64); the SSE2
# baseline was not measured against a baseline CPU's PyTorch, so it keeps PyTorch's fp32 GEMM.
_PACKED_BF16_FASTER = {"avx512bf16": True, "avx512": True, "avx2": True, "baseline": False}


def _interleave_halves(t: torch.Tensor) -> torch.Tensor:
    """Rows [a0 .. an-1, b0 .. bn-1] -> [a0, b0, a1, b1, ...]."""
    half = t.shape[0] // 2
    return torch.stack([t[:half], t[half:]], dim=1).reshape(t.shape)


# Fused projections of speedx's models and the checkpoint tensors they hold, in row order.
_FUSED_PIECES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _quantized_weight(quantized: dict[str, QuantizedWeight], module_name: str,
                      linear: nn.Linear) -> QuantizedWeight | None:
    """The quantized weight of a (fused) linear layer: its pieces stacked row-wise, or None when a
    piece is not quantized or the pieces' formats differ (the layer then stays dense)."""
    parent, _, leaf = module_name.rpartition(".")
    prefix = f"model.{parent}." if parent else ""
    pieces = [quantized.get(f"{prefix}{piece}.weight") for piece in _FUSED_PIECES.get(leaf, (leaf,))]
    if any(p is None for p in pieces) or len({p.format for p in pieces}) != 1:
        return None
    weight = QuantizedWeight(pieces[0].format, torch.cat([p.blocks for p in pieces]),
                             (sum(p.shape[0] for p in pieces), pieces[0].shape[1]))
    if weight.shape != tuple(linear.weight.shape):
        raise ValueError(f"quantized weight of {module_name} has shape {weight.shape}, the layer {tuple(linear.weight.shape)}")
    return weight


def use_fast_cpu_matmuls(model: nn.Module, dtype: torch.dtype, quantized: dict[str, QuantizedWeight] | None = None,
                         dense: bool = True, _prefix: str = "") -> None:
    """Swap the nn.Linear layers of a CPU model for faster matmuls.

    quantized: GGUF weights kept quantized (loader.gguf_quantized_weights); the layers whose weights
    are all there run PackedQuantLinear. dense: the other layers of a half-precision model run the
    fastest same-arithmetic matmul, PackedBf16Linear where it measured faster (_PACKED_BF16_FASTER),
    else WideMatmulLinear (fp32 GEMM); with dense=False they stay as they are.
    """
    from speedx import _C

    packed = dense and dtype == torch.bfloat16 and _PACKED_BF16_FASTER[_C.gemm_isa()]
    quantized = quantized or {}
    for name, child in list(model.named_children()):
        path = _prefix + name
        if isinstance(child, SwiGLU):  # bf16: the activation runs in the gate/up matmul's epilogue
            gate_up = _quantized_weight(quantized, path + ".gate_up_proj", child.gate_up_proj)
            if gate_up is not None:
                child.gate_up_proj = PackedQuantLinear(gate_up, child.gate_up_proj.bias, dtype,
                                                       silu_mul=dtype == torch.bfloat16)
            elif packed:
                child.gate_up_proj = PackedBf16Linear(child.gate_up_proj, dtype, silu_mul=True)
            elif dense:
                child.gate_up_proj = WideMatmulLinear(child.gate_up_proj, dtype)
            use_fast_cpu_matmuls(child, dtype, quantized, dense, path + ".")  # down_proj
        elif isinstance(child, nn.Linear):
            weight = _quantized_weight(quantized, path, child)
            if weight is not None:
                setattr(model, name, PackedQuantLinear(weight, child.bias, dtype))
            elif dense:
                setattr(model, name, (PackedBf16Linear if packed else WideMatmulLinear)(child, dtype))
        elif not isinstance(child, _PackedLinear | WideMatmulLinear):
            use_fast_cpu_matmuls(child, dtype, quantized, dense, path + ".")


def resolve_quantization(quantization: str, model_path: Path, device: torch.device, lora: bool = False) -> bool:
    """LLM(quantization=...): whether to keep a GGUF model's quantized weights. "auto": yes for a GGUF
    model on CPU without a LoRA adapter (as llama.cpp does); "gguf": yes, and a ValueError where it
    cannot; "none": no (the weights are dequantized, for exact parity with transformers)."""
    from speedx.models.loader import is_gguf

    if quantization not in ("auto", "gguf", "none"):
        raise ValueError(f"quantization must be 'auto', 'gguf' or 'none', got {quantization!r}")
    if quantization == "gguf" and not is_gguf(model_path):
        raise ValueError(f"quantization='gguf' needs a .gguf model; {model_path} is not one (use 'auto' or 'none')")
    if quantization == "gguf" and device.type != "cpu":
        raise ValueError(f"quantization='gguf' runs on CPU only, not on {device.type} (use 'auto' or 'none')")
    if quantization == "gguf" and lora:
        raise ValueError("quantization='gguf' cannot merge a LoRA adapter into quantized weights (use 'auto' or 'none')")
    return quantization != "none" and device.type == "cpu" and is_gguf(model_path) and not lora
