"""Fused InfoNCE (Triton) vs its PyTorch twin: forward + backward time and extra memory.

Workload: B queries, k documents per query (the positive and k - 1 hard negatives, as column
blocks: N = k * B, labels = arange(B)), dim D, normalized embeddings as leaf tensors (the
normalization is the same for both paths and left out). "extra memory" = peak during forward +
backward - inputs - their gradients: the loss's own working memory.

GPU (CUDA + triton): both paths measured (CUDA events, torch.cuda.max_memory_allocated): the
median of single steps started on an idle GPU, and the mean of steps run back to back as in a
training loop. The target, at B=8192, k=7, D=4096 bf16: fused extra memory < 10% of the
reference's, time <= 1.1x. `--breakdown` times each step of the fused path (the similarity
products, the two Triton kernels under other tiles, the gradient products) for one row chunk,
whole steps under other workspace sizes, and prints a torch.profiler table of one step.
CPU: the Triton path only runs interpreted, so only the reference is measured: time, and the peak
of its live tensors (tracked op by op with a TorchDispatchMode); the fused path's memory is
analytic (speedx.kernels.infonce.workspace_bytes), and the GPU target's memory is estimated (the
reference traced on the meta device). The JSON labels which is which.

    python bench/infonce.py                       # GPU: up to the target; CPU: a smaller sweep
    python bench/infonce.py --batch 8192 --docs-per-query 7 --dim 4096 --dtype bfloat16
    python bench/infonce.py --breakdown --batch 8192 --docs-per-query 7
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
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from speedx.embed.losses import infonce_torch

RESULTS = Path(__file__).parent / "results" / "infonce.json"
SCALE = 50.0


def make_inputs(B, k, D, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(B, D, generator=gen, device=device), dim=-1)
    d = torch.nn.functional.normalize(torch.randn(k * B, D, generator=gen, device=device), dim=-1)
    q, d = q.to(dtype).requires_grad_(), d.to(dtype).requires_grad_()
    return q, d, torch.arange(B, device=device)


def step(fn, q, d, labels):
    q.grad = d.grad = None
    loss = fn(q, d, labels, SCALE)
    loss.backward()
    return loss.detach()


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return platform.processor() or "cpu"


# --- GPU: both paths measured ------------------------------------------------------------------


def measure_cuda(fn, q, d, labels, repeats):
    step(fn, q, d, labels)  # warm-up (and Triton's compile)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        q.grad = d.grad = None
        torch.cuda.synchronize()
        start.record()
        fn(q, d, labels, SCALE).backward()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    back_to_back = timed_ms(lambda: step(fn, q, d, labels), repeats)  # as in a training loop: no idle gaps
    q.grad = d.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = step(fn, q, d, labels)
    torch.cuda.synchronize()
    grads = q.grad.nbytes + d.grad.nbytes
    return {"median_ms": statistics.median(times), "min_ms": min(times), "back_to_back_mean_ms": back_to_back,
            "extra_bytes": torch.cuda.max_memory_allocated() - base - grads}, loss


def bench_cuda(B, k, D, dtype, repeats):
    from speedx.kernels.infonce import infonce_triton, workspace_bytes

    q, d, labels = make_inputs(B, k, D, dtype, "cuda")
    row = {"batch": B, "docs_per_query": k, "num_docs": k * B, "dim": D, "dtype": str(dtype).split(".")[1]}
    fused, fused_loss = measure_cuda(infonce_triton, q, d, labels, repeats)
    row["fused"] = {**fused, "analytic_extra_bytes": workspace_bytes(B, k * B, dtype)}
    try:
        row["reference"], ref_loss = measure_cuda(infonce_torch, q, d, labels, repeats)
    except torch.cuda.OutOfMemoryError:
        row["reference"] = "out of memory"
        return row
    row["loss_abs_diff"] = abs(float(fused_loss) - float(ref_loss))
    row["memory_ratio"] = row["fused"]["extra_bytes"] / row["reference"]["extra_bytes"]
    row["time_ratio"] = row["fused"]["median_ms"] / row["reference"]["median_ms"]
    row["time_ratio_back_to_back"] = row["fused"]["back_to_back_mean_ms"] / row["reference"]["back_to_back_mean_ms"]
    return row


def timed_ms(fn, repeats=5):
    """Mean milliseconds of fn (CUDA events; on CPU, a smoke run of one call under TRITON_INTERPRET=1)."""
    fn()
    if not torch.cuda.is_available():
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


WORKSPACES_MIB = [64, 128, 256, 384]
# (rows, columns, warps) per program: candidates, timed after the tiles kernels/infonce.py ships.
LSE_TILES = [(1, 4096, 8), (1, 4096, 16), (2, 2048, 8), (1, 2048, 4), (4, 1024, 4), (1, 1024, 4), (8, 256, 4)]
GRAD_TILES = [(32, 512, 8), (16, 1024, 8), (8, 1024, 4), (32, 256, 8), (16, 256, 4), (8, 2048, 8), (32, 128, 4)]


def breakdown(B, k, D, dtype, device="cuda"):
    """Where the fused path's time goes at one shape: each step of one row chunk (times the number
    of chunks), the two Triton kernels under other tiles, then, with the fastest tiles, the whole
    forward + backward under other workspace sizes (chunk heights) and against the reference."""
    from speedx.kernels import infonce as K

    q, d, labels = make_inputs(B, k, D, dtype, device)
    N = k * B
    q_, d_ = q.detach(), d.detach()
    scale = torch.tensor([SCALE], device=device)
    rows = K.chunk_rows(B, N)
    chunks = B / rows
    S = torch.empty(rows, N, dtype=torch.float32, device=device)
    G = torch.randn(rows, N, device=device).to(dtype)
    lse, pos = torch.zeros(rows, device=device), torch.zeros(rows, device=device)
    dq_rows = torch.empty(rows, D, dtype=dtype, device=device)
    dd = torch.zeros(N, D, dtype=dtype, device=device)
    chunk_flops = 2 * rows * N * D

    def row_lse(block_m, block_n, warps):
        return lambda: K._row_lse_kernel[(triton_cdiv(rows, block_m),)](
            S, labels, labels, labels, scale, lse, pos, rows, N, S.stride(0),
            HAS_IDS=False, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)

    def softmax_grad(block_m, block_n, warps):
        grid = (triton_cdiv(rows, block_m), triton_cdiv(N, block_n))
        ds = torch.empty(grid[0] * grid[1], device=device)
        return lambda: K._softmax_grad_kernel[grid](
            S, labels, labels, labels, scale, lse, 1.0 / B, G, ds, rows, N, S.stride(0), G.stride(0),
            HAS_IDS=False, SCALE_GRAD=True, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)

    lse_tiles = [K.LSE_TILE] + [t for t in LSE_TILES if t != K.LSE_TILE]
    grad_tiles = [K.GRAD_TILE] + [t for t in GRAD_TILES if t != K.GRAD_TILE]
    steps = {"similarities q[rows] @ d^T (fp32 out)": (lambda: K._similarities(q_[:rows], d_, S), chunk_flops, 0)}
    steps |= {f"row lse {t}": (row_lse(*t), 0, rows * N * 4) for t in lse_tiles}
    steps |= {f"softmax grad {t}": (softmax_grad(*t), 0, rows * N * (4 + G.element_size())) for t in grad_tiles}
    steps |= {"dq[rows] = G d": (lambda: torch.mm(G, d_, out=dq_rows), chunk_flops, 0),
              "dd += G^T q[rows]": (lambda: torch.addmm(dd, G.t(), q_[:rows], out=dd), chunk_flops, 0)}
    report = {"chunk_rows": rows, "chunks": chunks}
    for name, (fn, flops, moved) in steps.items():
        ms = timed_ms(fn)
        report[name] = {"ms_all_chunks": ms * chunks,
                        **({"TFLOP/s": flops / ms / 1e9} if flops else {"GB/s": moved / ms / 1e6})}
        print(name, {key: round(v, 2) for key, v in report[name].items()})
    fastest = {kind: min(tiles, key=lambda t, kind=kind: report[f"{kind} {t}"]["ms_all_chunks"])
               for kind, tiles in (("row lse", lse_tiles), ("softmax grad", grad_tiles))}
    report["fastest_tiles"] = {kind: list(t) for kind, t in fastest.items()}
    shipped = K.WORKSPACE_BYTES, K.LSE_TILE, K.GRAD_TILE
    try:
        K.LSE_TILE, K.GRAD_TILE = fastest["row lse"], fastest["softmax grad"]
        for mib in WORKSPACES_MIB:
            K.WORKSPACE_BYTES = mib << 20
            ms = timed_ms(lambda: step(K.infonce_triton, q, d, labels))
            report[f"fwd+bwd, fastest tiles, workspace {mib} MiB"] = {
                "ms": ms, "chunk_rows": K.chunk_rows(B, N), "analytic_extra_bytes": K.workspace_bytes(B, N, dtype)}
            print(f"fwd+bwd, fastest tiles, workspace {mib} MiB: {ms:.2f} ms")
        K.WORKSPACE_BYTES = shipped[0]
        if torch.cuda.is_available():  # the kernels of one whole fused step, as they run in it
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                step(K.infonce_triton, q, d, labels)
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e3  # one stream: no overlap
            span = (max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)) / 1e3
            report["profile_one_step"] = {"table": table, "kernels_busy_ms": busy, "first_to_last_kernel_ms": span}
            print(table)
            print(f"kernels busy {busy:.2f} ms of the {span:.2f} ms from the first kernel's start to the last's end")
            report["fastest tiles, shipped workspace, vs reference"] = bench_cuda(B, k, D, dtype, repeats=10)
            print(json.dumps(report["fastest tiles, shipped workspace, vs reference"]))
    finally:
        K.WORKSPACE_BYTES, K.LSE_TILE, K.GRAD_TILE = shipped
    return report


def triton_cdiv(a, b):
    return -(-a // b)


# --- CPU: the reference measured, the fused path analytic --------------------------------------


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensors created while active: each op's outputs are tracked until freed
    (exact for tensors; BLAS scratch is not counted). Works on the meta device too."""

    def __init__(self):
        super().__init__()
        self.live, self.peak = {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.live = {key: (ref, n) for key, (ref, n) in self.live.items() if not ref.expired()}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in self.live:  # views share one
                storage = t.untyped_storage()
                self.live[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def reference_extra_meta(B, k, D, dtype):
    """The reference's extra memory at any size, traced on the meta device (no memory, no compute)."""
    q = torch.empty(B, D, dtype=dtype, device="meta", requires_grad=True)
    d = torch.empty(k * B, D, dtype=dtype, device="meta", requires_grad=True)
    labels = torch.empty(B, dtype=torch.long, device="meta")
    with LiveTensorBytes() as tracker:
        step(infonce_torch, q, d, labels)
    return tracker.peak - q.grad.nbytes - d.grad.nbytes


def bench_cpu(B, k, D, dtype, repeats):
    q, d, labels = make_inputs(B, k, D, dtype, "cpu")
    step(infonce_torch, q, d, labels)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(infonce_torch, q, d, labels)
        times.append((time.perf_counter() - start) * 1e3)
    q.grad = d.grad = None
    with LiveTensorBytes() as tracker:
        step(infonce_torch, q, d, labels)
    extra = tracker.peak - q.grad.nbytes - d.grad.nbytes
    row = {"batch": B, "docs_per_query": k, "num_docs": k * B, "dim": D, "dtype": str(dtype).split(".")[1],
           "reference": {"median_ms": statistics.median(times), "min_ms": min(times),
                         "extra_bytes_measured": extra}}
    try:
        from speedx.kernels.infonce import workspace_bytes
    except ImportError:
        row["fused"] = "triton is not installed"
        return row
    analytic = workspace_bytes(B, k * B, dtype)
    row["fused"] = {"extra_bytes_analytic": analytic, "time": "not measured: Triton only runs interpreted on CPU"}
    row["memory_ratio_analytic_vs_measured"] = analytic / extra
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--batch", type=int, nargs="+", default=[1024, 4096, 8192] if cuda else [256, 1024, 2048])
    parser.add_argument("--docs-per-query", type=int, nargs="+", default=[2, 7])
    parser.add_argument("--dim", type=int, default=4096 if cuda else 384)
    parser.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    parser.add_argument("--repeats", type=int, default=10 if cuda else 3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--breakdown", action="store_true",
                        help="time each step of the fused path and other workspace sizes, at --batch[0] x --docs-per-query[0]")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.breakdown:
        rows = breakdown(args.batch[0], args.docs_per_query[0], args.dim, dtype, "cuda" if cuda else "cpu")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": device_name(), "breakdown": rows}, indent=2) + "\n")
        return
    load_before = os.getloadavg()[0]  # other work on the machine skews the timings
    rows = []
    for k in args.docs_per_query:
        for B in args.batch:
            row = (bench_cuda if cuda else bench_cpu)(B, k, args.dim, dtype, args.repeats)
            print(json.dumps(row))
            rows.append(row)
    report = {
        "device": device_name(),
        "torch": torch.__version__,
        "mode": "cuda: both paths measured" if cuda else
                "cpu: reference measured (time; peak live tensor bytes); fused memory analytic, fused time not measured",
        "extra_memory": "peak during forward+backward minus inputs minus their gradients",
        "results": rows,
    }
    if cuda:
        target = [r for r in rows if (r["batch"], r["docs_per_query"], r["dim"]) == (8192, 7, 4096)]
        if target and isinstance(target[0]["reference"], dict):
            t = target[0]
            report["target_b8192_k7_d4096"] = {"memory_ratio": t["memory_ratio"], "time_ratio": t["time_ratio"],
                                               "met": t["memory_ratio"] < 0.10 and t["time_ratio"] <= 1.1}
    else:  # the GPU target's memory, without a GPU: reference traced on the meta device, fused analytic
        from speedx.kernels.infonce import workspace_bytes

        ref = reference_extra_meta(8192, 7, 4096, torch.bfloat16)
        fused = workspace_bytes(8192, 7 * 8192, torch.bfloat16)
        report["target_b8192_k7_d4096_bf16_memory_estimate"] = {
            "reference_extra_bytes_meta_trace": ref, "fused_extra_bytes_analytic": fused, "memory_ratio": fused / ref,
            "time": "not estimated: needs a GPU run"}
    report["load_average_1min_before_after"] = [load_before, os.getloadavg()[0]]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
