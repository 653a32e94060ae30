"""The engine on the Triton kernels (SPEEDX_KERNELS=triton; interpreter on CPU) gives the torch path's
greedy tokens, and importing speedx never needs triton."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from helpers import make_llm, random_prompts
from triton_marks import needs_cuda, needs_interpreter

from speedx import SamplingParams



def generate(monkeypatch, mode, path, prompts, params, **llm_kwargs):
    monkeypatch.setenv("SPEEDX_KERNELS", mode)  # read when the model is built and per sampling call
    llm = make_llm(path, **llm_kwargs)
    return [[s.token_ids for s in out.outputs] for out in llm.generate(prompts, params, use_tqdm=False)]


@needs_interpreter
def test_greedy_engine_triton_equals_torch(monkeypatch, tiny_llama):
    path, _, tok = tiny_llama
    prompts = random_prompts(len(tok), [5, 11], seed=11)
    params = SamplingParams(temperature=0.0, max_tokens=4)
    # max_num_batched_tokens=7: chunked prefill, so steps mix decodes, chunks and whole prompts
    expected = generate(monkeypatch, "torch", path, prompts, params, max_num_batched_tokens=7)
    calls = spy_on_triton(monkeypatch)
    mixed = spy_on_mixed_attention(monkeypatch)
    assert generate(monkeypatch, "triton", path, prompts, params, max_num_batched_tokens=7) == expected
    assert all(calls.values()), calls  # the Triton kernels really ran
    assert mixed, "no step launched its decodes apart from its prompt chunks"


def spy_on_mixed_attention(monkeypatch) -> list[int]:
    """The first query row of each prompt-chunk launch that follows a step's decodes."""
    from speedx.kernels import triton_attention

    rows = []

    def prefill_launch(*args, first_row, _fn=triton_attention._prefill_launch):
        if first_row:
            rows.append(first_row)
        return _fn(*args, first_row=first_row)

    monkeypatch.setattr(triton_attention, "_prefill_launch", prefill_launch)
    return rows


def spy_on_triton(monkeypatch) -> dict[str, int]:
    from speedx.kernels import triton_attention, triton_layers, triton_sampling

    calls = {}
    for module, name in [
        (triton_attention, "paged_attention_triton"),
        (triton_layers, "rms_norm_triton"),
        (triton_layers, "silu_mul_triton"),
        (triton_layers, "rope_and_store_triton"),
        (triton_sampling, "sample_tokens_from_uniforms_triton"),
    ]:
        calls[name] = 0

        def counted(*args, _fn=getattr(module, name), _name=name, **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls


@needs_interpreter
def test_seeded_request_same_tokens_alone_or_batched(monkeypatch, tiny_llama):
    path, _, tok = tiny_llama
    prompts = random_prompts(len(tok), [6, 9], seed=12)
    params = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, max_tokens=3, seed=77)
    alone = generate(monkeypatch, "triton", path, prompts[:1], params)
    batched = generate(monkeypatch, "triton", path, prompts[::-1], params)
    assert batched[1] == alone[0]


JSON_SCHEMA = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 3}}, "required": ["a"],
               "additionalProperties": False}


def check_bitmask_route(monkeypatch, tiny_llama, triton_mode, **llm_kwargs):
    """A JSON-schema request and a free one: the Triton path gives the torch path's greedy tokens, and
    the grammar reaches the sampler kernel as its bitmask (all bits set in the free row)."""
    import json

    from speedx.kernels import triton_sampling

    path, _, tok = tiny_llama
    prompts = random_prompts(len(tok), [6, 9], seed=15)
    params = [SamplingParams(temperature=0.0, max_tokens=24, json_schema=JSON_SCHEMA), SamplingParams(temperature=0.0, max_tokens=5)]
    expected = generate(monkeypatch, "torch", path, prompts, params, **llm_kwargs)
    bitmasks = []
    real = triton_sampling.sample_tokens_from_uniforms_triton
    monkeypatch.setattr(triton_sampling, "sample_tokens_from_uniforms_triton",
                        lambda *a, bitmask=None: bitmasks.append(bitmask if bitmask is None else bitmask.cpu().clone())
                        or real(*a, bitmask=bitmask))  # (a copy: the engine refills its buffer each step)
    assert generate(monkeypatch, triton_mode, path, prompts, params, **llm_kwargs) == expected
    assert any(b is not None for b in bitmasks)
    # while both run, one row is the free request's: every bit set; the JSON row is restricted
    assert all(int((b == -1).all(dim=1).sum()) == 1 for b in bitmasks if b is not None and len(b) == 2)
    assert set(json.loads(tok.decode(expected[0][0]))) == {"a"}


@needs_interpreter
def test_json_schema_rows_reach_the_triton_sampler_as_a_bitmask(monkeypatch, tiny_llama):
    check_bitmask_route(monkeypatch, tiny_llama, "triton")


@pytest.mark.gpu
@needs_cuda
def test_json_schema_rows_reach_the_gpu_triton_sampler_as_a_bitmask(monkeypatch, tiny_llama):
    pytest.importorskip("xgrammar", reason="the GPU image lacks xgrammar (a core dependency everywhere else)")
    check_bitmask_route(monkeypatch, tiny_llama, "auto", device="cuda", block_size=16)  # decode steps replay graphs


@pytest.mark.gpu
@needs_cuda
def test_greedy_engine_gpu_triton_equals_torch(monkeypatch, tiny_llama):
    path, _, tok = tiny_llama
    prompts = random_prompts(len(tok), [5, 11, 40, 3], seed=13)
    params = SamplingParams(temperature=0.0, max_tokens=16)
    kwargs = dict(device="cuda", block_size=16, max_num_batched_tokens=24)
    expected = generate(monkeypatch, "torch", path, prompts, params, **kwargs)
    assert generate(monkeypatch, "auto", path, prompts, params, **kwargs) == expected


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_decode_equals_eager(monkeypatch, tiny_llama):
    """Graph replay (padded lanes, batch shrinking down the ladder, n=2 forks, seeded sampling) gives
    the eager engine's tokens."""
    from speedx.engine.cuda_graphs import DecodeGraphs

    path, _, tok = tiny_llama
    prompts = random_prompts(len(tok), [5, 11, 40, 3, 17, 9, 23, 6, 30, 12, 8, 2, 14], seed=14)
    params = [SamplingParams(temperature=0.0, max_tokens=4 + 3 * i) for i in range(len(prompts) - 2)]
    params += [SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=20, n=2),
               SamplingParams(temperature=1.0, top_k=10, seed=6, max_tokens=25)]
    kwargs = dict(device="cuda", max_num_seqs=12, max_num_batched_tokens=64)
    eager = generate(monkeypatch, "auto", path, prompts, params, enforce_eager=True, **kwargs)
    replays = []
    real_run = DecodeGraphs.run
    monkeypatch.setattr(DecodeGraphs, "run", lambda self, ids, *a: replays.append(len(ids)) or real_run(self, ids, *a))
    assert generate(monkeypatch, "auto", path, prompts, params, **kwargs) == eager
    assert len(set(replays)) > 3, replays  # many batch sizes, padded up to the captured ones


def test_graph_batch_ladder_covers_every_size():
    from speedx.engine.cuda_graphs import batch_size_ladder

    for max_batch in (1, 3, 16, 20, 256):
        sizes = batch_size_ladder(max_batch)
        assert sizes == sorted(set(sizes)) and sizes[-1] == max_batch
        assert all(next(s for s in sizes if s >= n) - n < 16 for n in range(1, max_batch + 1))


def test_speedx_imports_and_runs_on_cpu_without_triton():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # as if not installed: import fails, find_spec gives None
        import torch, speedx, speedx.kernels.registry, speedx.models.attention, speedx.engine.sampler
        from speedx.kernels import registry
        assert not registry.triton_available()
        assert registry.resolve_backend(torch.device("cuda"), "auto") == "torch"
        kernels = registry.select(torch.device("cpu"), torch.float32, torch.float32, "auto")
        assert kernels.backend == "cpu"
        from speedx.kernels.paged_attention import store_kvcache_torch
        k = torch.randn(3, 2, 8); cache = torch.zeros(4, 4, 2, 8)
        store_kvcache_torch(k, k, cache, cache.clone(), torch.tensor([0, -1, 5]))
        assert torch.equal(cache.view(-1, 2, 8)[5], k[2])
        try:
            registry.select(torch.device("cpu"), torch.float32, torch.float32, "triton")
        except RuntimeError as e:
            assert "triton" in str(e)
        else:
            raise AssertionError("kernel backend triton without triton must fail loudly")
        assert sys.modules["triton"] is None
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_cpu_path_never_imports_triton():
    code = textwrap.dedent(
        """
        import sys, torch
        from speedx.kernels.registry import select
        from speedx.kernels.paged_attention import store_kvcache_torch
        for dtype in (torch.float32, torch.bfloat16):
            kernels = select(torch.device("cpu"), dtype, dtype)
            cache = torch.zeros(4, 4, 2, 8, dtype=dtype)
            store_kvcache_torch(torch.randn(3, 2, 8), torch.randn(3, 2, 8), cache, cache.clone(), torch.tensor([0, 1, 2]))
            table, cu, lens = torch.tensor([[0]], dtype=torch.int32), torch.tensor([0, 3], dtype=torch.int32), torch.tensor([3], dtype=torch.int32)
            kernels.paged_attention(torch.randn(3, 4, 8, dtype=dtype), cache, cache, table, cu, lens, 0.3)
            kernels.rms_norm(torch.randn(3, 8, dtype=dtype), torch.ones(8, dtype=dtype), 1e-6)
            one = torch.ones(2)
            kernels.sample_tokens(torch.randn(2, 9), one, torch.zeros(2, dtype=torch.long), one, 0 * one, 0.5 * one.double())
        assert "triton" not in sys.modules, "the CPU path imported triton"
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_bad_mode_is_refused(monkeypatch):
    from speedx.kernels.registry import kernel_request

    monkeypatch.setenv("SPEEDX_KERNELS", "cuda")
    with pytest.raises(ValueError, match="SPEEDX_KERNELS"):
        kernel_request()
