"""CPU matmuls of a decode step: speedx's packed kernels (bf16 and GGUF-quantized weights, each SIMD
path) vs what PyTorch offers, as GFLOP/s, GB/s of weights and % of the machine's measured FMA peak.

Contenders, for each nn.Linear shape of the model (SmolLM2-135M) and each row count m:
  torch_bf16      F.linear in bf16 (what transformers.generate runs)
  torch_fp32      F.linear on the weights widened to fp32 (WideMatmulLinear)
  bf16@ISA        speedx._C.gemm_packed_weight on packed bf16 weights (PackedBf16Linear), ISA forced;
                  bf16@avx512bf16 is the vdpbf16ps path (x rounded to bf16, k pairs per instruction)
  q4_0@ISA, q4_1@ISA, q8_0@ISA   the same on GGUF blocks kept quantized (PackedQuantLinear)
Each shape cycles through one weight per layer, so weights come from memory as in a real step, not
from cache. GFLOP/s counts 2 flops per product (m * n * k products) for every contender. The peak is
threads x _C.fma_peak_gflops(ISA, 1), register-only fp32 FMA chains of that width on one core (the
all-thread measurement is printed too; on a shared machine it reads low). avx512bf16 rows and PyTorch's
are held against the AVX-512 fp32 FMA peak too: one vdpbf16ps does two products per lane where an FMA
does one, so those rows can pass 100% (up to 200% if the core issues it as fast as an FMA).
Medians over repeats; the CPU model and flags head every table; JSON out.

    python bench/cpu_matmul.py
    python bench/cpu_matmul.py --rows 1,64 --isas avx2 --formats bf16,q4_1
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from speedx import _C

# (name, in_features k, out_features n) of SmolLM2-135M's linear layers (q and o, k and v, fused
# gate/up, down, the tied lm_head).
SMOLLM2_SHAPES = [("q/o", 576, 576), ("k/v", 576, 192), ("gate_up", 576, 3072), ("down", 1536, 576),
                  ("lm_head", 576, 49152)]
_GGUF_BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q8_0": 34}
_SHOWN_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16",
                "avx512_vnni", "amx_tile", "amx_bf16")


def cpu_description() -> dict:
    """CPU model and the SIMD flags that matter here, from /proc/cpuinfo."""
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "flags": [f for f in _SHOWN_FLAGS if f in flags], "cpu_isa": _C.cpu_isa(),
            "gemm_isa": _C.gemm_isa()}


def cpu_line(cpu: dict, threads: int) -> str:
    return (f"CPU: {cpu['model']} | flags: {' '.join(cpu['flags'])} | speedx isa {cpu['cpu_isa']}, bf16 matmul "
            f"{cpu['gemm_isa']} | {threads} threads")


def _fma_isa(isa: str) -> str:
    """The fp32 FMA peak a contender is held against: avx512bf16's vdpbf16ps runs on AVX-512 registers."""
    return "avx512" if isa == "avx512bf16" else isa


def random_blocks(fmt: str, n: int, k: int, gen: np.random.Generator) -> torch.Tensor:
    """Random GGUF blocks of a plausible scale (random quants, fp16 scales ~0.01)."""
    blocks = gen.integers(0, 256, size=(n, k // 32, _GGUF_BLOCK_BYTES[fmt]), dtype=np.uint8)
    blocks[..., 0:2] = np.array([0.01 / k**0.5], dtype=np.float16).view(np.uint8)
    if fmt == "q4_1":
        blocks[..., 2:4] = np.array([-0.08 / k**0.5], dtype=np.float16).view(np.uint8)
    return torch.from_numpy(blocks.reshape(n, -1))


def packed_contender(weights: list[torch.Tensor], fmt: str, n: int, k: int, isa: str):
    packed = []
    for w in weights:
        if fmt == "bf16":
            p = torch.empty(_C.packed_weight_size(n, k), dtype=torch.bfloat16)
            _C.pack_bf16_weight(w.data_ptr(), n, k, p.data_ptr(), torch.get_num_threads())
        else:
            p = torch.empty(_C.packed_weight_bytes(fmt, n, k), dtype=torch.uint8)
            _C.pack_quant_weight(fmt, w.data_ptr(), n, k, p.data_ptr(), torch.get_num_threads())
        packed.append(p)
    threads = torch.get_num_threads()

    def run(x, i):
        out = torch.empty(x.shape[0], n, dtype=torch.bfloat16)
        _C.gemm_packed_weight(out.data_ptr(), x.data_ptr(), packed[i].data_ptr(), 0, x.shape[0], n, k, "bfloat16",
                              "bfloat16", threads, weight_format=fmt, _debug_isa=isa)
        return out

    return run, _C.packed_weight_bytes(fmt, n, k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,8,64", help="comma-separated row counts m")
    parser.add_argument("--layers", type=int, default=30, help="weights per shape cycled through")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--isas", default="avx512bf16,avx512,avx2",
                        help="SIMD paths to force (those this CPU lacks are skipped; avx512bf16: bf16 weights only)")
    parser.add_argument("--formats", default="bf16,q4_0,q4_1,q8_0", help="weight formats of the packed kernel")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch contenders")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: PyTorch's)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_matmul.json"))
    args = parser.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    order = ["baseline", "avx2", "avx512", "avx512bf16"]
    isas = [i for i in args.isas.split(",") if order.index(i) <= order.index(_C.gemm_isa())]
    formats = args.formats.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    cpu = cpu_description()
    fma_isas = sorted({_fma_isa(isa) for isa in isas}, key=order.index, reverse=True)
    peaks = {isa: {"1_thread": round(_C.fma_peak_gflops(isa, 1), 1),
                   f"{threads}_threads": round(_C.fma_peak_gflops(isa, threads), 1)} for isa in fma_isas}
    print(cpu_line(cpu, threads))
    for isa, p in peaks.items():
        print(f"measured FMA peak {isa}: {p['1_thread']} GFLOP/s per core, {p[f'{threads}_threads']} GFLOP/s on {threads} threads")

    gen = torch.Generator().manual_seed(0)
    npgen = np.random.default_rng(0)
    results = []
    header = (f"{'shape':8s} {'m':>3s}  {'contender':11s} {'ms':>8s} {'GFLOP/s':>8s} {'GB/s':>6s} {'% peak':>6s}"
              f"   best of repeats: {'ms':>8s} {'GFLOP/s':>8s} {'GB/s':>6s} {'% peak':>6s}")
    print(header)
    for name, k, n in SMOLLM2_SHAPES:
        layers = 2 if name == "lm_head" else args.layers  # one lm_head per step; 2 keep the cache cold
        dense = [(torch.randn(n, k, generator=gen) * k**-0.5).bfloat16() for _ in range(layers)]
        fns = {}  # label -> (fn, weight bytes, isa or None)
        if not args.no_torch:
            wide = [w.float() for w in dense]
            fns["torch_bf16"] = (lambda x, i: F.linear(x, dense[i]), 2 * n * k, None)
            fns["torch_fp32"] = (lambda x, i: F.linear(x.float(), wide[i]).bfloat16(), 4 * n * k, None)
        for fmt in formats:
            weights = dense if fmt == "bf16" else [random_blocks(fmt, n, k, npgen) for _ in range(layers)]
            for isa in isas:
                if fmt != "bf16" and isa == "avx512bf16":
                    continue  # quantized weights run the avx512 path there
                fn, nbytes = packed_contender(weights, fmt, n, k, isa)
                fns[f"{fmt}@{isa}"] = (fn, nbytes, isa)
        for m in rows:
            x = torch.randn(m, k, generator=gen).bfloat16()
            for label, (fn, nbytes, isa) in fns.items():
                for i in range(layers):
                    fn(x, i)  # warm up (and first-call allocations)
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    for i in range(layers):
                        fn(x, i)
                    times.append((time.perf_counter() - start) / layers)
                peak = threads * (peaks[_fma_isa(isa)]["1_thread"] if isa else max(p["1_thread"] for p in peaks.values()))
                row = {"shape": name, "m": m, "k": k, "n": n, "contender": label}
                line = f"{name:8s} {m:3d}  {label:11s}"
                # The median is the figure; the best of the repeats shows the kernel apart from other load.
                for suffix, sec in (("", statistics.median(times)), ("_best", min(times))):
                    gflops = 2 * m * k * n / sec / 1e9
                    row.update({f"ms{suffix}": round(sec * 1e3, 4), f"gflops{suffix}": round(gflops, 1),
                                f"weight_gb_per_s{suffix}": round(nbytes / sec / 1e9, 1),
                                f"pct_of_fma_peak{suffix}": round(100 * gflops / peak, 1)})
                    line += (f" {row[f'ms{suffix}']:8.3f} {row[f'gflops{suffix}']:8.1f} {row[f'weight_gb_per_s{suffix}']:6.1f} "
                             f"{row[f'pct_of_fma_peak{suffix}']:6.1f}" + ("   " + " " * 18 if not suffix else ""))
                results.append(row)
                print(line, flush=True)
    print(cpu_line(cpu, threads) + f"  (% peak: of {threads} x the contender's ISA fp32 FMA peak per core, avx512's "
          "for avx512bf16; PyTorch's: of the widest)")
    report = {"torch": torch.__version__, "threads": threads, "cpu": cpu, "fma_peak_gflops": peaks, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
