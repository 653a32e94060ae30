"""The interpreter is lenient (no loop-carried type checks, no register limits): compile the kernels
exactly as the wrappers configure them to sm_90 (H100/H200) and sm_80 cubins, no GPU needed."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

COMPILE = """
import os, subprocess, sys, tempfile
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from speedx.kernels import triton_attention as A, triton_kv_store as S, triton_sampling as P, triton_layers as L

def compile_for(cap, fn, types, consts, num_warps=4, num_stages=2, aligned=()):
    # aligned: the arguments that are multiples of 16 (pointers: 16-byte aligned), as the JIT
    # specializes them; without that hint loads of contiguous rows are not vectorized.
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n in aligned and n not in consts}
    options = dict(num_warps=num_warps, num_stages=num_stages)
    return triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", cap, 32),
                          options=options)

NVDISASM = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
CUOBJDUMP = NVDISASM.replace("nvdisasm", "cuobjdump")

def stack_bytes(compiled):
    # Per-thread stack of a cubin: above 0 when ptxas spilled registers.
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return int(usage.split("STACK:")[1].split()[0])

def sass(compiled):
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([NVDISASM, "-c", f.name], capture_output=True, text=True, check=True).stdout

def attention(cap, dtype, head_dim, group, all_decode, split, cache="same", v_keys=False):
    dt = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    types = {n: f"*{dt}" for n in ("out_ptr", "q_ptr")}
    types.update({n: f"*{dt if cache == 'same' else cache}" for n in ("k_cache_ptr", "v_cache_ptr")})
    types.update(block_tables_ptr="*i32", cu_seqlens_q_ptr="*i32", kv_lens_ptr="*i32", part_out_ptr="*fp32",
                 part_lse_ptr="*fp32", scale_log2="fp32", stride_kb="i64", stride_vb="i64")
    config = A.attention_config(dtype, head_dim, group, all_decode, torch.float8_e4m3fn if cache == "fp8e4nv" else None,
                                rows=64 if cap < 90 else None)  # prefill_rows
    options = dict(num_warps=config.pop("num_warps"), num_stages=config.pop("num_stages"))
    consts = dict(config, HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim), BLOCK_SIZE=16, SPLIT=split,
                  V_KEYS_CONTIGUOUS=v_keys)
    consts["stride_vs" if v_keys else "stride_vd"] = 1  # as the JIT specializes a stride of 1
    aligned = {n for n in A._paged_attention_kernel.arg_names if n.endswith("_ptr")} | {
        "stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_kb", "stride_ks", "stride_kh", "stride_vb",
        "stride_vh", "stride_vd" if v_keys else "stride_vs"}
    compiled = compile_for(cap, A._paged_attention_kernel, types, consts, aligned=aligned, **options)
    if os.path.exists(CUOBJDUMP):  # attention_config's tiles are chosen to fit the registers
        assert stack_bytes(compiled) == 0, f"ptxas spilled registers: sm_{cap} {dtype} {cache} cache, {config}"
    return compiled

for cap in (90, 80):
    attention(cap, torch.bfloat16, 128, 4, False, False)  # Llama-3-8B prefill / mixed
    attention(cap, torch.bfloat16, 128, 4, True, True)    # decode, split-KV
    if cap == 80:
        continue
    attention(cap, torch.bfloat16, 128, 4, True, False)
    attention(cap, torch.bfloat16, 128, 4, False, False, cache="fp8e4nv")  # kv_cache_dtype="fp8" (sm_89+)
    attention(cap, torch.bfloat16, 128, 4, True, True, cache="fp8e4nv")
    attention(cap, torch.bfloat16, 128, 4, False, False, cache="fp8e4nv", v_keys=True)  # FP8_V_KEYS_CONTIGUOUS
    decode = attention(cap, torch.bfloat16, 128, 4, True, False, cache="fp8e4nv", v_keys=True)
    if os.path.exists(NVDISASM):  # the point of that layout: V reaches P V with no byte-wise shared loads
        assert "LDS.U8" not in sass(decode), "fp8 decode over V with keys contiguous reads V one byte at a time"
    compile_for(cap, L._rope_and_store_kernel, {n: "*bf16" for n in ("q_out_ptr", "qkv_ptr")}
                | {n: "*fp8e4nv" for n in ("k_cache_ptr", "v_cache_ptr")}
                | dict(positions_ptr="*i64", slot_ptr="*i64", cos_ptr="*fp32", sin_ptr="*fp32", stride_kcb="i64", stride_vcb="i64"),
                dict(NUM_HEADS=32, NUM_KV_HEADS=8, HEADS_PAD=32, KV_HEADS_PAD=8, HEAD_DIM=128, HALF_PAD=64, BLOCK_SIZE=16,
                     FP8_ROUND_IN_SOFTWARE=False))
    attention(cap, torch.bfloat16, 80, 5, False, False)  # padded head_dim, odd group
    attention(cap, torch.float32, 64, 1, False, False)   # the fp32 GPU tests
    compile_for(cap, A._merge_splits_kernel, dict(out_ptr="*bf16", part_out_ptr="*fp32", part_lse_ptr="*fp32"),
                dict(HEAD_DIM=128, HEAD_DIM_PAD=128, SPLITS_PAD=8))
    compile_for(cap, S._store_kvcache_kernel, {n: "*bf16" for n in ("k_ptr", "v_ptr", "k_cache_ptr", "v_cache_ptr")}
                | dict(slot_ptr="*i64"), dict(NUM_KV_HEADS=8, HEAD_DIM=128, HEADS_PAD=8, HEAD_DIM_PAD=128, BLOCK_SIZE=16,
                     FP8_ROUND_IN_SOFTWARE=False))
    for dt in ("bf16", "fp32"):  # the decoder's fused elementwise layers, Llama-3-8B shapes
        compile_for(cap, L._rms_norm_kernel, {n: f"*{dt}" for n in ("out_ptr", "sum_ptr", "x_ptr", "residual_ptr", "weight_ptr")}
                    | dict(eps="fp32"), dict(HAS_RESIDUAL=True, BLOCK=4096), num_warps=16)
        compile_for(cap, L._silu_mul_kernel, dict(out_ptr=f"*{dt}", in_ptr=f"*{dt}"), dict(BLOCK=1024))
        compile_for(cap, L._rope_and_store_kernel, {n: f"*{dt}" for n in ("q_out_ptr", "k_cache_ptr", "v_cache_ptr", "qkv_ptr")}
                    | dict(positions_ptr="*i64", slot_ptr="*i64", cos_ptr="*fp32", sin_ptr="*fp32", stride_kcb="i64", stride_vcb="i64"),
                    dict(NUM_HEADS=32, NUM_KV_HEADS=8, HEADS_PAD=32, KV_HEADS_PAD=8, HEAD_DIM=128, HALF_PAD=64, BLOCK_SIZE=16,
                     FP8_ROUND_IN_SOFTWARE=False))
    types = {n: "*i64" for n in ("top_k_ptr", "key_ptr", "seed_ptr", "sample_index_ptr", "position_ptr", "tokens_ptr")}
    types.update({n: "*fp32" for n in ("logits_ptr", "temperature_ptr", "top_p_ptr", "min_p_ptr", "masked_ptr")})
    types.update(bitmask_ptr="*i32")
    for has_bitmask, hash_keys, draw in [(False, False, True), (True, True, True), (True, True, False)]:
        consts = dict(HAS_BITMASK=has_bitmask, HASH_KEYS=hash_keys, DRAW=draw, WRITE_MASKED=not draw,
                      BLOCK_V=P._block_v(128256), RADIX_BITS=P.RADIX_BITS)
        compile_for(cap, P._sample_kernel, types, consts, num_warps=P.NUM_WARPS)
"""


def test_kernels_compile_for_gpus(tmp_path):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled mode in the child
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences triton 3.9's notice; the default anyway
    subprocess.run([sys.executable, "-c", COMPILE], check=True, env=env, timeout=600)
