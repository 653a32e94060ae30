"""Triton kernels vs their PyTorch twins (and flash-attn where installed) on one CUDA GPU.

Medians of triton.testing.do_bench; memory-bound kernels also report achieved bandwidth next to a
measured device-to-device copy (the practical ceiling). Shapes: Llama-3-8B (32 query / 8 KV heads,
head_dim 128, bf16 KV cache, block_size 16, vocab 128256). JSON out.

    python bench/gpu_kernels.py                       # needs CUDA; on CPU it says so and exits 0
    python bench/gpu_kernels.py --out bench/results/kernels.json
    python bench/gpu_kernels.py --only decode_tiles --decode-tiles-match "1536, float8"   # one sweep, fp8 workloads
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from speedx.models.attention import leading_decodes

HEADS, KV_HEADS, HEAD_DIM, BLOCK, VOCAB = 32, 8, 128, 16, 128256
DTYPE = torch.bfloat16


def bench(fn) -> float:
    """Median milliseconds."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / (bench(lambda: dst.copy_(src)) * 1e-3)


def paged_case(seqs, device="cuda", kv_dtype=DTYPE):
    """seqs: [(q_len, kv_len)]; a block table randomly permuted over the pool (as after churn)."""
    blocks = [-(-kv // BLOCK) for _, kv in seqs]
    pool = sum(blocks) + 64
    perm = torch.randperm(pool, device=device).to(torch.int32)
    table = torch.full((len(seqs), max(blocks)), -1, dtype=torch.int32, device=device)
    used = 0
    for i, n in enumerate(blocks):
        table[i, :n] = perm[used : used + n]
        used += n
    k_cache = torch.randn(pool, BLOCK, KV_HEADS, HEAD_DIM, device=device, dtype=DTYPE).to(kv_dtype)
    v_cache = torch.randn(pool, BLOCK, KV_HEADS, HEAD_DIM, device=device, dtype=DTYPE).to(kv_dtype)
    tokens = sum(q for q, _ in seqs)
    q = torch.randn(tokens, HEADS, HEAD_DIM, device=device, dtype=DTYPE)
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32, device=device)
    cu[1:] = torch.tensor([q_len for q_len, _ in seqs], device=device).cumsum(0)
    kv_lens = torch.tensor([kv for _, kv in seqs], dtype=torch.int32, device=device)
    return q, k_cache, v_cache, table, cu, kv_lens


def flash_attn_decode(seqs):
    """flash_attn_with_kvcache on its own paged layout (page size 256, its minimum), same bytes."""
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        return None
    page = 256
    kv_lens = torch.tensor([kv for _, kv in seqs], dtype=torch.int32, device="cuda")
    pages = [-(-kv // page) for _, kv in seqs]
    k = torch.randn(sum(pages), page, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    v = torch.randn_like(k)
    table = torch.zeros(len(seqs), max(pages), dtype=torch.int32, device="cuda")
    perm, used = torch.randperm(sum(pages), device="cuda").to(torch.int32), 0
    for i, n in enumerate(pages):
        table[i, :n] = perm[used : used + n]
        used += n
    q = torch.randn(len(seqs), 1, HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    return bench(lambda: flash_attn_with_kvcache(q, k, v, cache_seqlens=kv_lens, block_table=table, causal=True))


def attention_rows(peak: float) -> list[dict]:
    from speedx.kernels.paged_attention import paged_attention_torch
    from speedx.kernels.triton_attention import paged_attention_triton

    workloads = {
        "decode 64 x 1024": [(1, 1024)] * 64,
        "decode 256 x 512": [(1, 512)] * 256,
        "decode 8 x 8192": [(1, 8192)] * 8,
        "decode 1 x 32768": [(1, 32768)],
        "prefill 4 x 2048": [(2048, 2048)] * 4,
        "mixed 32 decodes x 1024 + 512-token chunk at 1536": [(1, 1024)] * 32 + [(512, 1536)],
    }
    rows = []
    for name, seqs in workloads.items():
        q, k_cache, v_cache, table, cu, kv_lens = paged_case(seqs)
        scale = HEAD_DIM**-0.5
        kv_bytes = sum(kv for _, kv in seqs) * KV_HEADS * HEAD_DIM * 2 * k_cache.element_size()
        io_bytes = kv_bytes + 2 * q.numel() * q.element_size()
        flops = sum(4 * q_len * (kv - q_len / 2) * HEADS * HEAD_DIM for q_len, kv in seqs)  # causal QK^T + PV
        row = {"workload": name}
        decodes = leading_decodes([q_len for q_len, _ in seqs])
        variants = [
            ("triton", lambda: paged_attention_triton(q, k_cache, v_cache, table, cu, kv_lens, scale, num_decodes=decodes)),
            ("triton_no_split", lambda: paged_attention_triton(q, k_cache, v_cache, table, cu, kv_lens, scale,
                                                               num_splits=1, num_decodes=decodes)),
            ("torch_twin", lambda: paged_attention_torch(q, k_cache, v_cache, table, cu, kv_lens, scale)),
        ]
        if 0 < decodes < len(seqs):  # the decodes on the prompt chunks' tile, as before 2026-11-26
            variants.append(("triton_one_launch", lambda: paged_attention_triton(q, k_cache, v_cache, table, cu,
                                                                                 kv_lens, scale)))
        for label, fn in variants:
            ms = bench(fn)
            row[label] = {"ms": ms, "GB/s": io_bytes / ms / 1e6, "TFLOP/s": flops / ms / 1e9, "of_copy_bw": io_bytes / (ms * 1e-3) / peak}
        if all(q_len == 1 for q_len, _ in seqs):
            ms = flash_attn_decode(seqs)
            if ms is not None:
                row["flash_attn_page256"] = {"ms": ms, "GB/s": io_bytes / ms / 1e6, "of_copy_bw": io_bytes / (ms * 1e-3) / peak}
        rows.append(row)
        print(name, {k: round(v["ms"], 4) for k, v in row.items() if isinstance(v, dict)})
    return rows


PREFILL_TILES = [  # (query rows per program = tokens x GQA group, keys per tile, warps, pipeline stages);
    # shipped: 128, 64, 8, 2 on sm_90+ (64 rows before 2026-11-26, and on sm_80: prefill_rows)
    (64, 64, 8, 2), (64, 64, 8, 3), (128, 64, 8, 2), (128, 64, 8, 3), (64, 32, 8, 2), (128, 32, 8, 2), (128, 128, 8, 2),
]


def prefill_tile_rows() -> list[dict]:
    """TFLOP/s of the prefill/mixed attention kernel under other tile shapes than attention_config's:
    an offline sweep, so no autotuning runs at import or in use.

    H100, earlier on 2026-11-26: 128 x 64 tiles with 3 stages ran fresh 8 x 1024 prompts at 202 TFLOP/s
    against 64 x 64's 119, yet made the 8B 1024/1024 grid's mixed steps 13% slower end to end: there
    most rows were decodes, which rode the prefill tiles and wasted 127 of 128 rows. Mixed batches now
    launch their decodes apart (on the decode tile, which this sweep leaves alone), so the prompt
    chunks' tile is chosen for them alone: later that day 128 x 64 x 2 stages ran 194 / 232 / 89
    TFLOP/s on this sweep's three workloads against 64 x 64's 122 / 137 / 68, and is shipped."""
    from speedx.kernels import triton_attention as A

    shipped = A.attention_config
    workloads = {"prefill 8 x 1024 (fresh prompts)": [(1024, 1024)] * 8, "prefill 4 x 2048": [(2048, 2048)] * 4,
                 "mixed 32 decodes x 1024 + 512-token chunk at 1536": [(1, 1024)] * 32 + [(512, 1536)]}
    rows = []
    try:
        for name, seqs in workloads.items():
            q, k_cache, v_cache, table, cu, kv_lens = paged_case(seqs)
            flops = sum(4 * q_len * (kv - q_len / 2) * HEADS * HEAD_DIM for q_len, kv in seqs)
            decodes = leading_decodes([q_len for q_len, _ in seqs])
            row = {"workload": name}
            for block_m, block_n, warps, stages in PREFILL_TILES:
                def config(*args, _m=block_m, _n=block_n, _w=warps, _s=stages, **kwargs):
                    c = shipped(*args, **kwargs)
                    if c["ALL_DECODE"]:
                        return c
                    return c | dict(BLOCK_Q=_m // c["GROUP_PAD"], BLOCK_N=_n, num_warps=_w, num_stages=_s)
                A.attention_config = config
                label = f"m{block_m}_n{block_n}_w{warps}_s{stages}"
                try:
                    ms = bench(lambda: A.paged_attention_triton(q, k_cache, v_cache, table, cu, kv_lens, HEAD_DIM**-0.5,
                                                                num_decodes=decodes))
                except Exception as exc:  # e.g. out of shared memory: that shape is simply not a candidate
                    print(f"{label}: {type(exc).__name__}: {exc}"[:300])
                    continue
                row[label] = {"ms": ms, "TFLOP/s": flops / ms / 1e9}
            rows.append(row)
            print(name, {k: round(v["TFLOP/s"], 1) for k, v in row.items() if isinstance(v, dict)})
    finally:
        A.attention_config = shipped
    return rows


DECODE_TILES = [  # (keys per tile, warps, pipeline stages, fp16 dots). Shipped (attention_config): 64, 4, 2 for
    # a bf16 cache, 64, 4, 3 with fp16 dots for fp8 (128, 4, 3 earlier on 2026-11-26, FP8_DECODE_TILE's note);
    # 64, 8, 2 was the decode tile before 2026-11-26. P V computed
    # transposed and the group padded to 32 or 64 rows were swept on 2026-11-26 and lost (attention_config's note).
    (64, 8, 2, False), (64, 4, 2, False), (64, 4, 3, False), (128, 4, 2, False), (128, 4, 3, False), (128, 8, 2, False),
    (64, 8, 2, True), (64, 4, 3, True), (128, 4, 2, True), (128, 4, 3, True), (128, 8, 2, True), (128, 4, 4, True),
    (256, 4, 3, True),
    # Tiles that need fewer registers over V with keys contiguous, so more blocks fit an SM
    # (FP8_DECODE_TILE's note): 86, 96 and 128 registers a thread there.
    (64, 4, 2, True), (32, 4, 3, True), (256, 8, 2, True),
]


def decode_tile_rows(peak: float, match: str = "") -> list[dict]:
    """Share of copy bandwidth of the decode attention kernel under other tiles than attention_config's
    (the first entry is the decode tile before 2026-11-26), with a bf16 and an fp8 KV cache, the fp8 one
    also with V's keys contiguous (model_runner.FP8_V_KEYS_CONTIGUOUS): an offline sweep. Only the
    workloads whose name contains `match`."""
    from speedx.kernels import triton_attention as A

    shipped = A.attention_config
    rows = []
    try:
        for kv_dtype, v_keys in ((DTYPE, False), (torch.float8_e4m3fn, False), (torch.float8_e4m3fn, True)):
            for name, seqs in {"decode 256 x 1536": [(1, 1536)] * 256, "decode 64 x 1024": [(1, 1024)] * 64}.items():
                workload = f"{name}, {str(kv_dtype).split('.')[1]} KV" + (", V keys contiguous" if v_keys else "")
                if match not in workload:
                    continue
                q, k_cache, v_cache, table, cu, kv_lens = paged_case(seqs, kv_dtype=kv_dtype)
                if v_keys:  # the same values, each head's keys contiguous
                    v_cache = v_cache.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
                io_bytes = sum(kv for _, kv in seqs) * KV_HEADS * HEAD_DIM * 2 * k_cache.element_size()
                row = {"workload": workload}
                for block_n, warps, stages, fp16 in DECODE_TILES:
                    if fp16 and kv_dtype == DTYPE:  # fp16 dots are for fp8 caches only (a bf16 one may overflow fp16)
                        continue
                    def config(*args, _n=block_n, _w=warps, _s=stages, _f=fp16, **kwargs):
                        return shipped(*args, **kwargs) | dict(
                            BLOCK_N=_n, num_warps=_w, num_stages=_s, FP16_DOTS=_f)
                    A.attention_config = config
                    label = f"n{block_n}_w{warps}_s{stages}" + ("_fp16dots" if fp16 else "")
                    try:
                        ms = bench(lambda: A.paged_attention_triton(q, k_cache, v_cache, table, cu, kv_lens,
                                                                    HEAD_DIM**-0.5, num_splits=1))
                    except Exception as exc:  # e.g. out of shared memory: not a candidate
                        print(f"{label}: {type(exc).__name__}: {str(exc).splitlines()[0]}"[:300])
                        continue
                    row[label] = {"ms": ms, "of_copy_bw": io_bytes / (ms * 1e-3) / peak}
                rows.append(row)
                print(row["workload"], {k: round(v["of_copy_bw"], 3) for k, v in row.items() if isinstance(v, dict)})
    finally:
        A.attention_config = shipped
    return rows


def kv_store_rows(peak: float) -> list[dict]:
    from speedx.kernels.paged_attention import store_kvcache_torch
    from speedx.kernels.triton_kv_store import store_kvcache_triton

    rows = []
    for tokens in (256, 8192):
        pool = 4096
        k_cache = torch.zeros(pool, BLOCK, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
        v_cache = torch.zeros_like(k_cache)
        qkv = torch.randn(tokens, HEADS + 2 * KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
        k, v = qkv[:, HEADS : HEADS + KV_HEADS], qkv[:, HEADS + KV_HEADS :]  # the model's strided views
        slots = torch.randperm(pool * BLOCK, device="cuda")[:tokens]
        moved = 2 * 2 * k.numel() * k.element_size()  # read + write of K and V
        row = {"workload": f"store {tokens} tokens"}
        for label, fn in [
            ("triton", lambda: store_kvcache_triton(k, v, k_cache, v_cache, slots)),
            ("torch_twin", lambda: store_kvcache_torch(k, v, k_cache, v_cache, slots)),
        ]:
            ms = bench(fn)
            row[label] = {"ms": ms, "GB/s": moved / ms / 1e6, "of_copy_bw": moved / (ms * 1e-3) / peak}
        rows.append(row)
        print(row["workload"], {k: round(v["ms"], 4) for k, v in row.items() if isinstance(v, dict)})
    return rows


def layer_rows(peak: float) -> list[dict]:
    """The fused elementwise layers vs their PyTorch twins at Llama-3-8B widths, a decode batch and a
    prefill chunk; bytes = each input read once + each output written once."""
    from speedx.kernels.layers_torch import rms_norm_torch, rope_and_store_torch, silu_mul_torch
    from speedx.kernels.triton_layers import rms_norm_triton, rope_and_store_triton, silu_mul_triton
    from speedx.models.layers import RotaryEmbedding

    hidden, inter, pool = HEADS * HEAD_DIM, 14336, 8192
    rotary = RotaryEmbedding(HEAD_DIM, 8192, 500000.0, None).cuda()
    caches = torch.randn(2, pool, BLOCK, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    rows = []
    for tokens in (256, 8192):
        x, res = (torch.randn(tokens, hidden, device="cuda", dtype=DTYPE) for _ in range(2))
        weight = torch.rand(hidden, device="cuda", dtype=DTYPE)
        gate_up = torch.randn(tokens, 2 * inter, device="cuda", dtype=DTYPE)
        qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device="cuda", dtype=DTYPE)
        positions = torch.randint(0, 8192, (tokens,), device="cuda")
        slots = torch.randperm(pool * BLOCK, device="cuda")[:tokens]
        rope_args = (qkv, positions, rotary.cos_table, rotary.sin_table, caches[0], caches[1], slots, HEADS, KV_HEADS)
        cases = {
            "rms_norm + residual": (4 * x.numel() * 2, lambda: rms_norm_triton(x, weight, 1e-5, res),
                                    lambda: rms_norm_torch(x, weight, 1e-5, res)),
            "silu_mul": (1.5 * gate_up.numel() * 2, lambda: silu_mul_triton(gate_up), lambda: silu_mul_torch(gate_up)),
            "rope + kv store": (2 * qkv.numel() * 2, lambda: rope_and_store_triton(*rope_args),
                                lambda: rope_and_store_torch(*rope_args)),
        }
        for name, (moved, fused, twin) in cases.items():
            row = {"workload": f"{name}, {tokens} tokens"}
            for label, fn in [("triton", fused), ("torch_twin", twin)]:
                ms = bench(fn)
                row[label] = {"ms": ms, "GB/s": moved / ms / 1e6, "of_copy_bw": moved / (ms * 1e-3) / peak}
            rows.append(row)
            print(row["workload"], {k: round(v["ms"], 4) for k, v in row.items() if isinstance(v, dict)})
    return rows


def sampling_rows(peak: float) -> list[dict]:
    from speedx.engine.sampler import sample_tokens_torch
    from speedx.kernels.triton_sampling import sample_tokens_from_uniforms_triton

    rows = []
    for batch, label, params in [
        (256, "greedy", (0.0, 0, 1.0, 0.0)),
        (256, "temperature only", (0.8, 0, 1.0, 0.0)),
        (256, "top-k 50 + top-p 0.9 + min-p 0.05", (0.8, 50, 0.9, 0.05)),
        (32, "top-k 50 + top-p 0.9 + min-p 0.05", (0.8, 50, 0.9, 0.05)),
    ]:
        logits = torch.randn(batch, VOCAB, device="cuda") * 4
        t, k, p, m = params
        args = (
            torch.full((batch,), t, device="cuda"), torch.full((batch,), k, dtype=torch.int64, device="cuda"),
            torch.full((batch,), p, device="cuda"), torch.full((batch,), m, device="cuda"),
            torch.rand(batch, dtype=torch.float64, device="cuda"),
        )
        row = {"workload": f"sample {batch} x {VOCAB}, {label}"}
        for name, fn in [
            ("triton", lambda: sample_tokens_from_uniforms_triton(logits, *args)),
            ("torch_twin", lambda: sample_tokens_torch(logits, *args)),
        ]:
            ms = bench(fn)
            row[name] = {"ms": ms, "logits_GB/s_one_pass": logits.numel() * 4 / ms / 1e6}
        rows.append(row)
        print(row["workload"], {k: round(v["ms"], 4) for k, v in row.items() if isinstance(v, dict)})
    return rows


SECTIONS = {"attention": attention_rows, "prefill_tiles": lambda peak: prefill_tile_rows(),
            "decode_tiles": decode_tile_rows, "kv_store": kv_store_rows, "layers": layer_rows,
            "sampling": sampling_rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/kernels.json")
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), help="run only these sections")
    parser.add_argument("--decode-tiles-match", default="", metavar="TEXT",
                        help="decode_tiles: only the workloads whose name contains TEXT (each takes a minute)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu_kernels.py needs a CUDA GPU (the Triton kernels' CPU interpreter is for tests only); skipping.")
        sys.exit(0)
    import triton

    torch.manual_seed(0)
    peak = copy_bandwidth()
    device = torch.cuda.get_device_name()
    print(f"{device}: device-to-device copy {peak / 1e9:.0f} GB/s")
    report = {
        "device": device, "torch": torch.__version__, "triton": triton.__version__,
        "shapes": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "block_size": BLOCK, "vocab": VOCAB,
                   "kv_dtype": str(DTYPE)},
        "copy_GB/s": peak / 1e9,
    }
    for section in args.only or SECTIONS:
        if section == "decode_tiles":
            report[section] = decode_tile_rows(peak, args.decode_tiles_match)
        else:
            report[section] = SECTIONS[section](peak)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
