"""CPU matmuls of a bf16 model's decode step: speedx's packed-bf16 kernel vs what PyTorch offers.

Contenders, for each nn.Linear shape of the model (SmolLM2-135M by default) and each row count m:
  torch_bf16      F.linear in bf16 (what transformers.generate runs)
  torch_fp32      F.linear on the weights widened to fp32 (WideMatmulLinear)
  onednn_fp32     oneDNN with weights pre-packed for it (torch.ops.mkldnn._linear_pointwise)
  speedx          speedx._C.gemm_bf16_weight on packed bf16 weights (PackedBf16Linear)
Each shape cycles through one weight per layer, so weights come from memory as in a real step, not
from cache. Reports ms per layer-call and GFLOP/s, medians over repeats; JSON out.

    python bench/cpu_matmul.py
    python bench/cpu_matmul.py --rows 1,64,256 --layers 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from speedx import _C
from speedx.models.cpu_linear import PackedBf16Linear

# (name, in_features, out_features) of SmolLM2-135M: fused qkv, o, fused gate/up, down, lm_head.
SMOLLM2_SHAPES = [("qkv", 576, 960), ("o", 576, 576), ("gate_up", 576, 3072), ("down", 1536, 576), ("lm_head", 576, 49152)]


def contenders(weights: list[torch.Tensor]):
    wide = [w.float() for w in weights]
    onednn = [torch.ops.mkldnn._reorder_linear_weight(w) for w in wide]
    packed = []
    for w in weights:
        linear = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.bfloat16)
        linear.weight.data.copy_(w)
        packed.append(PackedBf16Linear(linear, torch.bfloat16))
    return {
        "torch_bf16": lambda x, i: F.linear(x, weights[i]),
        "torch_fp32": lambda x, i: F.linear(x.float(), wide[i]).bfloat16(),
        "onednn_fp32": lambda x, i: torch.ops.mkldnn._linear_pointwise(x.float(), onednn[i], None, "none", [], "").bfloat16(),
        "speedx": lambda x, i: packed[i](x),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,16,64,256", help="comma-separated row counts m")
    parser.add_argument("--layers", type=int, default=30, help="weights per shape cycled through")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_matmul.json"))
    args = parser.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    gen = torch.Generator().manual_seed(0)
    results = []
    for name, k, n in SMOLLM2_SHAPES:
        layers = 2 if name == "lm_head" else args.layers  # one lm_head per step; 2 keep the cache cold
        weights = [(torch.randn(n, k, generator=gen) * k**-0.5).bfloat16() for _ in range(layers)]
        fns = contenders(weights)
        for m in rows:
            x = torch.randn(m, k, generator=gen).bfloat16()
            row = {"shape": name, "m": m, "k": k, "n": n}
            for label, fn in fns.items():
                for i in range(layers):
                    fn(x, i)  # warm up (and first-call allocations)
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    for i in range(layers):
                        fn(x, i)
                    times.append((time.perf_counter() - start) / layers)
                ms = statistics.median(times) * 1e3
                row[label] = {"ms": round(ms, 4), "gflops": round(2 * m * k * n / ms / 1e6, 1)}
            row["speedx_vs_torch_fp32"] = round(row["torch_fp32"]["ms"] / row["speedx"]["ms"], 2)
            row["speedx_vs_torch_bf16"] = round(row["torch_bf16"]["ms"] / row["speedx"]["ms"], 2)
            results.append(row)
            print(f"{name:8s} m={m:<4d} " + "  ".join(f"{c} {row[c]['ms']:.3f} ms" for c in fns)
                  + f"  speedx vs fp32 {row['speedx_vs_torch_fp32']}x")
    report = {"torch": torch.__version__, "threads": torch.get_num_threads(), "isa": _C.cpu_isa(), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
