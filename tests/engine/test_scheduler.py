"""The scheduler alone, over a real block pool and no model: admission, chunked prefill, preemption,
prefix-cache hits, aborts. A "step" here is schedule() followed by what the engine does with its
result: the scheduled tokens become computed, full blocks are offered to the prefix cache, and a
sequence whose prompt is done gets one more token."""

from __future__ import annotations

from speedx import SamplingParams
from speedx._C import BlockPool
from speedx.engine.scheduler import Scheduler
from speedx.engine.sequence import Request, Sequence, SequenceStatus

BLOCK = 4


def sequence(tokens: list[int], name: str = "r") -> Sequence:
    request = Request(name, None, list(tokens), SamplingParams(), 0, [], 100)
    seq = Sequence(request, list(tokens))
    request.sequences.append(seq)
    return seq


def run_step(scheduler: Scheduler) -> list[tuple[Sequence, int]]:
    batch = scheduler.schedule()
    for seq, count in zip(batch.sequences, batch.num_new_tokens):
        seq.num_computed_tokens += count
        scheduler.register_computed_blocks(seq)
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(1000 + seq.num_tokens)
    return list(zip(batch.sequences, batch.num_new_tokens))


def make(num_blocks=16, max_num_seqs=8, max_tokens=64, prefix_caching=True) -> Scheduler:
    return Scheduler(BlockPool(num_blocks, BLOCK, prefix_caching), max_num_seqs, max_tokens)


def test_admits_in_order_up_to_max_num_seqs_and_runs_decodes_first():
    scheduler = make(max_num_seqs=2)
    a, b, c = sequence([1, 2, 3], "a"), sequence([4, 5], "b"), sequence([6, 7, 8, 9, 10], "c")
    for seq in (a, b, c):
        scheduler.add(seq)
    assert run_step(scheduler) == [(a, 3), (b, 2)]  # c waits: two sequences run at most
    assert c.status is SequenceStatus.WAITING
    assert [s for s, _ in run_step(scheduler)] == [a, b]
    scheduler.finish(a)
    assert run_step(scheduler) == [(b, 1), (c, 5)]  # the decode first, then the new prompt


def test_a_long_prompt_is_prefilled_in_chunks_of_the_token_budget():
    scheduler = make(max_tokens=5)
    long, short = sequence(list(range(1, 13)), "long"), sequence([50, 51], "short")
    scheduler.add(long)
    scheduler.add(short)
    assert run_step(scheduler) == [(long, 5)]  # the budget is spent: short waits
    assert run_step(scheduler) == [(long, 5)]
    assert run_step(scheduler) == [(long, 2), (short, 2)]
    assert run_step(scheduler) == [(long, 1), (short, 1)]  # both decode now


def test_when_blocks_run_out_the_newest_running_sequence_is_preempted_and_recomputed():
    scheduler = make(num_blocks=3, max_tokens=64)
    old, new = sequence([1, 2, 3], "old"), sequence([4, 5, 6], "new")
    scheduler.add(old)
    scheduler.add(new)
    run_step(scheduler)
    run_step(scheduler)  # one block each holds 4 computed tokens; each has a 5th to compute
    assert run_step(scheduler) == [(old, 1)]  # one block is left for two: the newer one gives way
    assert new.status is SequenceStatus.WAITING and new.num_computed_tokens == 0
    assert list(scheduler.waiting) == [new] and scheduler.kv_cache_usage()[1] == 1
    scheduler.finish(old)
    assert run_step(scheduler) == [(new, 1)]  # of its 5 tokens, the full block comes back from the prefix cache
    assert new.request.num_cached_tokens == 0  # what the request reports: its prompt's first admission


def test_a_prompt_sharing_full_blocks_with_a_computed_one_starts_after_them():
    scheduler = make()
    first = sequence([1, 2, 3, 4, 5, 6, 7, 8, 9], "first")
    scheduler.add(first)
    run_step(scheduler)
    second = sequence([1, 2, 3, 4, 5, 6, 7, 8, 99, 98], "second")
    scheduler.add(second)
    assert run_step(scheduler) == [(first, 1), (second, 2)]  # 8 of its 10 tokens came from the cache
    assert second.request.num_cached_tokens == 8
    off = make(prefix_caching=False)
    first, second = sequence([1, 2, 3, 4, 5, 6, 7, 8, 9]), sequence([1, 2, 3, 4, 5, 6, 7, 8, 99, 98])
    off.add(first)
    run_step(off)
    off.add(second)
    assert run_step(off) == [(first, 1), (second, 10)]


def test_prompts_with_the_same_first_block_wait_for_the_first_to_fill_the_cache():
    scheduler = make()
    a, b = sequence([1, 2, 3, 4, 5, 6], "a"), sequence([1, 2, 3, 4, 7, 8], "b")
    scheduler.add(a)
    scheduler.add(b)
    assert run_step(scheduler) == [(a, 6)]  # b would prefill the shared block again
    assert run_step(scheduler) == [(a, 1), (b, 2)]


def test_abort_releases_blocks_wherever_the_sequence_is():
    scheduler = make(num_blocks=4, max_num_seqs=1)
    running, waiting = sequence([1, 2, 3, 4, 5], "running"), sequence([6, 7], "waiting")
    scheduler.add(running)
    scheduler.add(waiting)
    run_step(scheduler)
    assert scheduler.kv_cache_usage()[1] == 2
    scheduler.abort(waiting)
    scheduler.abort(running)
    assert not scheduler.running and not scheduler.waiting and scheduler.kv_cache_usage()[:2] == (4, 4)
