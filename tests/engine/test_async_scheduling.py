"""async_scheduling: decode steps launched before the previous step's tokens reach the host give the
same outputs as the synchronous loop (stops, seeds, forks, preemption, aborts), and really run ahead."""

from __future__ import annotations

import pytest
from helpers import count_preemptions, llm_bytes_per_token, make_llm, random_prompts

from speedx import SamplingParams


def spy_on_launches(llm) -> list[bool]:
    """Per runner.launch call: whether it was a step launched ahead (its inputs on the device)."""
    launches: list[bool] = []
    real = llm.engine.runner.launch

    def launch(batch, follows=None):
        launches.append(follows is not None)
        return real(batch, follows)

    llm.engine.runner.launch = launch
    return launches


def outputs_of(llm, prompts, params):
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [[(s.token_ids, s.finish_reason, s.stop_reason, s.text) for s in out.outputs] for out in outs]


def mixed_params(sync_llm, prompts):
    """Requests that stop in every way, some on tokens and text the model really produces mid-run."""
    greedy = [out.outputs[0] for out in sync_llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16),
                                                           use_tqdm=False)]
    stop_token = greedy[0].token_ids[5]
    text = greedy[1].text
    stop_text = text[len(text) // 2 : len(text) // 2 + 2]
    # min_tokens ends where prompt 4's greedy run first shows a token, which then stops it: the EOS/stop
    # ban must lift exactly there, also in a step launched a token ahead
    first = next(k for k, t in enumerate(greedy[4].token_ids) if k >= 3 and t not in greedy[4].token_ids[:k])
    return [
        SamplingParams(temperature=0.0, max_tokens=16, stop_token_ids=[stop_token]),
        SamplingParams(temperature=0.0, max_tokens=16, stop=[stop_text]) if stop_text.strip() else
        SamplingParams(temperature=0.0, max_tokens=11),
        SamplingParams(temperature=0.8, top_p=0.9, max_tokens=9, seed=7),
        SamplingParams(temperature=1.0, max_tokens=7, n=2, seed=3),
        SamplingParams(temperature=0.0, max_tokens=16, min_tokens=first, stop_token_ids=[greedy[4].token_ids[first]]),
        SamplingParams(temperature=0.7, max_tokens=14),
    ]


@pytest.mark.parametrize("llm_kwargs", [dict(max_num_seqs=3), dict(max_num_seqs=8, max_num_batched_tokens=9)],
                         ids=["prompts-wait", "chunked-prefill"])
def test_same_outputs_as_sync(tiny_llama, llm_kwargs):
    path, _, tok = tiny_llama
    prompts = random_prompts(len(tok), [5, 9, 3, 12, 7, 4], seed=21)
    params = mixed_params(make_llm(path, async_scheduling=False, **llm_kwargs), prompts)
    expected = outputs_of(make_llm(path, async_scheduling=False, **llm_kwargs), prompts, params)  # unseeded requests: the same draws
    llm = make_llm(path, async_scheduling=True, **llm_kwargs)
    launches = spy_on_launches(llm)
    assert outputs_of(llm, prompts, params) == expected
    assert any(launches), "no decode step was launched ahead"


def test_preemption_same_as_sync(tiny_llama):
    """A KV pool too small for all sequences: launching ahead stops where a block is missing, and the
    scheduler preempts as in the synchronous loop."""
    path, model, tok = tiny_llama
    prompts = random_prompts(len(tok), [30, 12, 25, 7, 19, 28], seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=24)
    kwargs = dict(kv_cache_memory=16 * 4 * llm_bytes_per_token(model))  # 16 blocks of 4 tokens
    sync = make_llm(path, async_scheduling=False, **kwargs)
    preempted = count_preemptions(sync)
    expected = outputs_of(sync, prompts, params)
    assert sum(preempted) > 0, "the pool was meant to run dry"
    llm = make_llm(path, async_scheduling=True, **kwargs)
    launches = spy_on_launches(llm)
    assert outputs_of(llm, prompts, params) == expected
    assert any(launches)
    assert llm.engine.stats().kv_cache_free_blocks == 16  # nothing leaked


def test_abort_while_a_step_runs_ahead(tiny_llama):
    path, _, tok = tiny_llama
    prompts = random_prompts(len(tok), [6, 8, 5], seed=9)
    params = SamplingParams(temperature=0.0, max_tokens=10)
    expected = outputs_of(make_llm(path, async_scheduling=False), [prompts[0], prompts[2]], params)
    engine = make_llm(path, async_scheduling=True).engine
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    while engine._ahead is None:
        engine.step()
    assert engine.abort_request("1")
    done = {}
    while engine.has_unfinished_requests():
        done |= {out.request_id: out for out in engine.step()[0]}
    got = [[(s.token_ids, s.finish_reason, s.stop_reason, s.text) for s in done[i].outputs] for i in ("0", "2")]
    assert got == expected
    assert "1" not in done


def test_on_by_default_on_a_gpu_only(tiny_llama):
    """As vLLM: on where decode steps are short enough for host work to matter (CUDA), off on CPU."""
    llm = make_llm(tiny_llama[0])
    assert llm.engine.async_scheduling == (llm.device.type == "cuda")
    assert make_llm(tiny_llama[0], async_scheduling=True).engine.async_scheduling
