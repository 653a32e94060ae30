"""kv_cache_dtype="fp8": the twins store rows rounded to float8 e4m3 and widen them when attending,
the Triton kernels read (interpreter, CPU) and write (compiled, CUDA) the same cache, and the engine
holds twice the tokens of a 16-bit cache in the same memory."""

from __future__ import annotations

import pytest
import torch
from helpers import make_llm, random_prompts
from triton_marks import needs_cuda, needs_interpreter

from speedx import SamplingParams
from speedx.kernels.paged_attention import paged_attention_torch, store_kvcache_torch

FP8 = torch.float8_e4m3fn


def test_twin_store_rounds_rows_to_fp8_and_skips_padding():
    cache = torch.randn(2, 6, 4, 2, 8).to(FP8)  # [k/v, blocks, block_size, kv_heads, head_dim]
    before = cache.clone()
    k, v = torch.randn(3, 2, 8) * 5, torch.randn(3, 2, 8)
    slots = torch.tensor([13, -1, 2])
    store_kvcache_torch(k, v, cache[0], cache[1], slots)
    for rows, flat, old in ((k, cache[0].view(-1, 2, 8), before[0].view(-1, 2, 8)), (v, cache[1].view(-1, 2, 8), before[1].view(-1, 2, 8))):
        assert torch.equal(flat[[13, 2]].view(torch.uint8), rows[[0, 2]].to(FP8).view(torch.uint8))
        untouched = [i for i in range(flat.shape[0]) if i not in (13, 2)]
        assert torch.equal(flat[untouched].view(torch.uint8), old[untouched].view(torch.uint8))


def test_twin_attention_over_fp8_cache_is_attention_over_its_values():
    from test_triton_attention import MIXED, make_case

    q, k_cache, v_cache, table, cu, kv_lens = make_case(MIXED, 8, 2, 64, dtype=FP8)
    q = torch.randn(q.shape)
    out = paged_attention_torch(q, k_cache, v_cache, table, cu, kv_lens, 0.125)
    ref = paged_attention_torch(q, k_cache.float(), v_cache.float(), table, cu, kv_lens, 0.125)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def check_triton_attention_fp8(seqs, device, q_dtype, num_splits, v_layout="dims"):
    from test_triton_attention import make_case

    from speedx.kernels.triton_attention import paged_attention_triton

    q, k_cache, v_cache, table, cu, kv_lens = make_case(seqs, 8, 2, 128, dtype=FP8, device=device, v_layout=v_layout)
    q = torch.randn(q.shape, device=device).to(q_dtype)
    out = paged_attention_triton(q, k_cache, v_cache, table, cu, kv_lens, 128**-0.5, num_splits=num_splits)
    ref = paged_attention_torch(q.float(), k_cache, v_cache, table, cu, kv_lens, 128**-0.5)
    torch.testing.assert_close(out.float(), ref, atol=2e-5 if q_dtype == torch.float32 else 2e-2, rtol=0)


@needs_interpreter
@pytest.mark.parametrize("v_layout", ["dims", "keys"], ids=["v-dims-contiguous", "v-keys-contiguous"])
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-fp16-dots"])
@pytest.mark.parametrize("decode", [False, True], ids=["mixed", "decode-split"])
def test_triton_attention_reads_fp8_cache(decode, q_dtype, v_layout):
    """16-bit queries over an fp8 cache dot in fp16 (FP16_DOTS): within bf16 rounding of the twin, with
    V in either layout (model_runner.FP8_V_KEYS_CONTIGUOUS)."""
    from test_triton_attention import DECODE, MIXED

    check_triton_attention_fp8(DECODE if decode else MIXED, "cpu", q_dtype, 3 if decode else 1, v_layout)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("v_layout", ["dims", "keys"], ids=["v-dims-contiguous", "v-keys-contiguous"])
@pytest.mark.parametrize("decode", [False, True], ids=["mixed", "decode-split"])
def test_gpu_triton_attention_reads_fp8_cache(decode, v_layout):
    from test_triton_attention import DECODE, MIXED

    check_triton_attention_fp8(DECODE if decode else MIXED, "cuda", torch.bfloat16, 0 if decode else 1, v_layout)


def fp8_rounding_cases(dtype) -> torch.Tensor:
    """Every finite bf16 value in `dtype`; in fp32 also each midpoint between neighbouring fp8 values
    (a tie) and the fp32 values either side of it."""
    bf16 = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    values = bf16[torch.isfinite(bf16)].to(dtype)
    if dtype == torch.float32:
        grid = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8).float()
        grid = grid[torch.isfinite(grid)].unique()  # sorted
        ties = (grid[1:] + grid[:-1]) / 2  # exact in fp32
        values = torch.cat([values, ties, torch.nextafter(ties, ties + 1), torch.nextafter(ties, ties - 1)])
    return values


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_triton_store_rounds_to_fp8_like_the_twin(dtype):
    """The Triton KV store into an fp8 cache, bit for bit as the twin (and the GPU's cvt.rn.satfinite):
    to nearest, ties to even, carries into the exponent, subnormals, -0.0, saturation at 448. The
    interpreter's own conversion gets carries and ties wrong (triton-lang/triton#8322), so the
    kernels round onto the fp8 grid themselves there (kernels/triton_fp8.py)."""
    from speedx.kernels.triton_kv_store import store_kvcache_triton

    values = fp8_rounding_cases(dtype)
    heads, dim = 2, 64
    tokens = -(-values.numel() // (heads * dim))
    k = torch.cat([values, values.new_zeros(tokens * heads * dim - values.numel())]).view(tokens, heads, dim)
    cache = torch.zeros(2, -(-tokens // 16), 16, heads, dim, dtype=FP8)
    ref = cache.clone()
    slots = torch.arange(tokens)
    store_kvcache_triton(k, -k, cache[0], cache[1], slots)
    store_kvcache_torch(k, -k, ref[0], ref[1], slots)
    assert torch.equal(cache.view(torch.uint8), ref.view(torch.uint8))


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=needs_interpreter),
                                    pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])])
def test_rope_and_store_rounds_to_fp8_like_the_twin(device):
    """RoPE + KV store into an fp8 cache, in bf16 on a GPU; in fp32 in the interpreter, whose own
    fp32 -> bf16 conversion truncates (so the layers' bf16 tests are GPU-only too)."""
    from test_triton_layers import rope_case

    from speedx.kernels.layers_torch import rope_and_store_torch
    from speedx.kernels.triton_layers import rope_and_store_triton

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    qkv, positions, cos, sin, cache, slots = rope_case(37, 32, 8, 128, dtype, device)
    cache = cache.to(FP8)
    ref_cache = cache.clone()
    q = rope_and_store_triton(qkv, positions, cos, sin, cache[0], cache[1], slots, 32, 8)
    ref_q = rope_and_store_torch(qkv, positions, cos, sin, ref_cache[0], ref_cache[1], slots, 32, 8)
    assert torch.equal(q, ref_q)
    torch.testing.assert_close(cache.float(), ref_cache.float(), atol=0, rtol=2**-3)  # at most one fp8 step
    assert (cache.view(torch.uint8) != ref_cache.view(torch.uint8)).float().mean() < 0.01


def test_llm_fp8_cache_holds_twice_the_tokens_and_generates(tiny_llama):
    path, _, tok = tiny_llama
    half = make_llm(path, dtype="bfloat16", kv_cache_memory="1MiB")
    fp8 = make_llm(path, dtype="bfloat16", kv_cache_memory="1MiB", kv_cache_dtype="fp8")
    assert fp8.engine.runner.kv_cache.dtype == FP8
    assert 0 <= fp8.engine.stats().kv_cache_blocks - 2 * half.engine.stats().kv_cache_blocks <= 1  # (rounded down to whole blocks)
    prompts = random_prompts(len(tok), [7, 19], seed=3)
    outputs = fp8.generate(prompts + prompts[:1], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [6, 6, 6]
    assert outputs[0].outputs[0].token_ids == outputs[2].outputs[0].token_ids  # same prompt, prefix-cache hit


def test_fp8_cache_on_a_gpu_without_fp8_conversions_is_a_clear_error(monkeypatch):
    from speedx.kernels import registry

    monkeypatch.setattr(registry, "triton_available", lambda: True)
    monkeypatch.setattr(registry, "_load", lambda name: (lambda *args, **kwargs: None))  # no CUDA kernels here
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA A100-SXM4-80GB")
    cuda = torch.device("cuda")
    with pytest.raises(ValueError, match="A100.*kv_cache_dtype='auto'"):
        registry.select(cuda, torch.bfloat16, FP8, "auto")
    assert registry.select(cuda, torch.bfloat16, torch.bfloat16, "auto").backend == "triton"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    assert registry.select(cuda, torch.bfloat16, FP8, "auto").backend == "triton"


def test_unknown_kv_cache_dtype_is_a_clear_error(tiny_llama):
    with pytest.raises(ValueError, match="kv_cache_dtype='int4': expected one of auto, fp8"):
        make_llm(tiny_llama[0], kv_cache_dtype="int4")


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=needs_interpreter),
                                    pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])])
@pytest.mark.parametrize("tile", [(32, 4, 3), (64, 4, 2), (256, 8, 2)], ids=str)
def test_fp8_decode_tiles_over_v_with_keys_contiguous(monkeypatch, device, tile):
    """FP8_DECODE_TILE candidates the GPU suite times (bench/gpu_kernels.py decode_tiles): tiles of 2, 4 and 16
    whole cache blocks of V with keys contiguous, with and without split-KV."""
    from test_triton_attention import DECODE

    from speedx.kernels import triton_attention

    monkeypatch.setattr(triton_attention, "FP8_DECODE_TILE", tile)
    config = triton_attention.attention_config(torch.bfloat16, 128, 4, True, FP8)
    assert (config["BLOCK_N"], config["num_warps"], config["num_stages"]) == tile
    for num_splits in (1, 3):
        check_triton_attention_fp8(DECODE, device, torch.bfloat16, num_splits, "keys")


def test_prefill_rows_by_device(monkeypatch):
    """128-row prefill tiles on sm_90+ and in the interpreter; 64 on sm_80, which spills registers at 128."""
    from speedx.kernels import triton_attention

    capability = {0: (8, 0), 1: (9, 0)}
    monkeypatch.setattr(triton_attention, "_capability", capability.__getitem__)
    assert triton_attention.prefill_rows(torch.device("cuda", 0)) == 64
    assert triton_attention.prefill_rows(torch.device("cuda", 1)) == triton_attention.PREFILL_ROWS == 128
    assert triton_attention.prefill_rows(torch.device("cpu")) == 128
    assert triton_attention.attention_config(torch.bfloat16, 128, 4, False, FP8)["BLOCK_Q"] == 32
    assert triton_attention.attention_config(torch.bfloat16, 128, 4, False, FP8, rows=64)["BLOCK_Q"] == 16


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=needs_interpreter),
                                    pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])])
def test_prefill_tiles_of_64_rows(monkeypatch, device):
    """The prefill tile below sm_90 (prefill_rows): 16 tokens x a group of 4 per tile. (16-bit queries,
    which the interpreter computes right over an fp8 cache's fp16 dots.)"""
    from test_triton_attention import DECODES_FIRST, check_attention

    from speedx.kernels import triton_attention

    monkeypatch.setattr(triton_attention, "prefill_rows", lambda device: 64)
    check_triton_attention_fp8(DECODES_FIRST, device, torch.bfloat16, 1)
    if device == "cuda":
        check_attention(DECODES_FIRST, 8, 2, 128, 2e-2, num_splits=0, num_decodes=37, dtype=torch.bfloat16, device=device)


def generate_with_v_keys_contiguous(monkeypatch, path, prompts, params, on, device):
    """The Triton engine over an fp8 cache, FP8_V_KEYS_CONTIGUOUS on or off; returns its tokens and
    whether the attention read V a whole block at a time."""
    from test_triton_engine import generate

    from speedx.engine import model_runner
    from speedx.kernels import triton_attention

    monkeypatch.setattr(model_runner, "FP8_V_KEYS_CONTIGUOUS", on)
    whole_blocks = []
    real = triton_attention.v_keys_contiguous
    monkeypatch.setattr(triton_attention, "v_keys_contiguous", lambda *a: whole_blocks.append(real(*a)) or whole_blocks[-1])
    tokens = generate(monkeypatch, "triton" if device == "cpu" else "auto", path, prompts, params, device=device,
                      kv_cache_dtype="fp8", block_size=16, max_num_batched_tokens=24)
    return tokens, any(whole_blocks)


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=needs_interpreter),
                                    pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])])
def test_engine_fp8_cache_with_v_keys_contiguous(monkeypatch, tiny_llama, device):
    """model_runner.FP8_V_KEYS_CONTIGUOUS lays V out with each head's keys contiguous (the views keep
    their shape): the same greedy tokens as the usual layout, with V read whole blocks at a time."""
    path, _, tok = tiny_llama
    prompts = random_prompts(len(tok), [5, 11, 40, 3], seed=13)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    usual, usual_whole = generate_with_v_keys_contiguous(monkeypatch, path, prompts, params, False, device)
    keys, keys_whole = generate_with_v_keys_contiguous(monkeypatch, path, prompts, params, True, device)
    assert keys == usual and keys_whole and not usual_whole


@pytest.mark.gpu
@needs_cuda
def test_gpu_engine_fp8_cache_triton_equals_twins(monkeypatch, tiny_llama):
    from test_triton_engine import generate

    path, _, tok = tiny_llama
    prompts = random_prompts(len(tok), [5, 11, 40, 3], seed=13)
    params = SamplingParams(temperature=0.0, max_tokens=16)
    kwargs = dict(device="cuda", block_size=16, max_num_batched_tokens=24, kv_cache_dtype="fp8")
    assert generate(monkeypatch, "auto", path, prompts, params, **kwargs) == generate(monkeypatch, "torch", path, prompts, params, **kwargs)
