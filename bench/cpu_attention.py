"""CPU decode attention: speedx._C.paged_decode_attention vs the index_select + SDPA path.

Default workload: the engine's decode step on SmolLM2-135M shapes -- batch 64, 9 query / 3 KV
heads, head_dim 64, block_size 16, bf16, every sequence ~150 or ~1000 cached tokens (+-10%,
random), block tables randomly permuted over the pool. Medians over repeats, the two contenders
interleaved call by call so that both see the same machine load; JSON out.

    python bench/cpu_attention.py
    python bench/cpu_attention.py --threads 2 --repeats 500
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from speedx import _C
from speedx.kernels.paged_attention import _decode_batch


def cpu_name() -> str:
    path = Path("/proc/cpuinfo")
    for line in path.read_text().splitlines() if path.exists() else []:
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return platform.processor() or "cpu"


def make_workload(batch, num_heads, num_kv_heads, head_dim, block_size, kv_len, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(int(kv_len * 0.9), int(kv_len * 1.1) + 1, (batch,), generator=gen, dtype=torch.int32)
    blocks_per_seq = (lens + block_size - 1) // block_size
    max_blocks = int(blocks_per_seq.max())
    num_blocks = int(blocks_per_seq.sum() * 5 // 4)  # a pool with some free blocks
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    table = torch.zeros((batch, max_blocks), dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks_per_seq.tolist()):
        table[i, :n] = perm[used : used + n]
        used += n
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    q = torch.randn((batch, num_heads, head_dim), generator=gen).to(dtype)
    return q, k_cache, v_cache, table, lens


def bench_one(args, kv_len, threads):
    q, k_cache, v_cache, table, lens = make_workload(
        args.batch, args.num_heads, args.num_kv_heads, args.head_dim, args.block_size, kv_len, getattr(torch, args.dtype)
    )
    scale = args.head_dim**-0.5
    max_len = int(lens.max())
    out = torch.empty_like(q)
    num_heads, head_dim = q.shape[1:]

    def kernel():  # what a caller does per step: pointers + zero-copy numpy views
        _C.paged_decode_attention(
            out.data_ptr(), q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), table.numpy(), lens.numpy(),
            num_heads, k_cache.shape[2], head_dim, k_cache.shape[1], k_cache.shape[0], scale, args.dtype, threads,
        )

    def reference():
        return _decode_batch(q, k_cache, v_cache, table, lens, max_len, scale)

    torch.set_num_threads(threads)
    kernel()
    err = (out.float() - reference().float()).abs().max().item()
    times = {"kernel": [], "index_select_sdpa": []}
    for _ in range(args.warmup):
        kernel(), reference()
    for _ in range(args.repeats):
        for name, fn in (("kernel", kernel), ("index_select_sdpa", reference)):
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    row = {"threads": threads, "kv_len": kv_len, "mean_kv_len": float(lens.float().mean()), "max_abs_diff": err}
    for name, ts in times.items():
        row[f"{name}_median_ms"] = statistics.median(ts)
        row[f"{name}_min_ms"] = min(ts)
    row["speedup_median"] = row["index_select_sdpa_median_ms"] / row["kernel_median_ms"]
    row["speedup_min"] = row["index_select_sdpa_min_ms"] / row["kernel_min_ms"]
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kv-lens", type=int, nargs="+", default=[150, 1000])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--num-heads", type=int, default=9)
    p.add_argument("--num-kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--threads", type=int, nargs="+", default=sorted({1, torch.get_num_threads()}),
                   help="thread counts to run (kernel and torch alike); default 1 and torch's")
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cpu_attention.json")
    args = p.parse_args()
    load_before = os.getloadavg()
    rows = [bench_one(args, kv_len, threads) for threads in args.threads for kv_len in args.kv_lens]
    result = {
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "isa": _C.cpu_isa(),
        "load_average_1min_before_after": [load_before[0], os.getloadavg()[0]],
        "workload": {k: getattr(args, k) for k in ("batch", "num_heads", "num_kv_heads", "head_dim", "block_size", "dtype")},
        "repeats": args.repeats,
        "results": rows,
    }

    print(f"{result['cpu']}, {result['isa']}, torch {torch.__version__}, {args.dtype}, batch {args.batch}, "
          f"heads {args.num_heads}/{args.num_kv_heads}, head_dim {args.head_dim}, block_size {args.block_size}; "
          f"median (min) of {args.repeats}")
    print(f"{'threads':>7} {'kv_len':>7} {'kernel ms':>17} {'index_select+sdpa ms':>22} {'speedup':>8} {'max|diff|':>10}")
    for r in rows:
        print(f"{r['threads']:>7} {r['kv_len']:>7} {r['kernel_median_ms']:>8.3f} ({r['kernel_min_ms']:.3f})"
              f" {r['index_select_sdpa_median_ms']:>13.3f} ({r['index_select_sdpa_min_ms']:.3f})"
              f" {r['speedup_median']:>7.1f}x {r['max_abs_diff']:>10.2g}")
    if max(result["load_average_1min_before_after"]) > 0.5 * (os.cpu_count() or 1):
        print(f"note: machine busy (load average {result['load_average_1min_before_after']}); timings are noisy")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
