"""Feed one LLM's engine request by request, hand back outputs as they finish, and measure how
full its batches are."""

from __future__ import annotations

import time

from speedx.engine.outputs import RequestOutput


class EngineQueue:
    """Requests in, (tag, output) pairs out as each finishes; one request's error fails it alone."""

    def __init__(self, llm):
        self.llm = llm
        self.engine = llm.engine
        if self.engine.has_unfinished_requests():
            raise RuntimeError("the engine is busy with another generate call")
        self.max_batch = self.engine.stats().max_num_seqs
        self.capacity = 2 * self.max_batch  # a queue deep enough to keep batches full
        self.tags: dict[str, object] = {}
        self.errors: list = []
        self.submitted = 0
        self.occupancy = Occupancy()

    @property
    def busy(self) -> bool:
        return bool(self.tags or self.errors)

    @property
    def has_room(self) -> bool:
        return len(self.tags) < self.capacity

    @property
    def in_flight(self) -> int:
        return len(self.tags)

    def submit(self, messages: list, params, tag) -> str | None:
        """The request id, or None when the request failed at once (its error comes out of step())."""
        request_id = f"q{self.submitted}"
        self.submitted += 1
        try:
            self.engine.add_request(request_id, self.llm.apply_chat_template(messages), params)
        except ValueError as exc:  # e.g. a prompt longer than the model: this attempt fails alone
            self.errors.append((tag, RequestOutput.from_error(request_id, None, str(exc))))
            return None
        self.tags[request_id] = tag
        return request_id

    def step(self, target_batch: int) -> list:
        finished, self.errors = self.errors, []
        if self.tags:
            start = time.perf_counter()
            outputs, stats = self.engine.step()
            self.occupancy.add(stats.num_sequences, target_batch, time.perf_counter() - start)
            finished += [(self.tags.pop(out.request_id), out) for out in outputs]
        return finished

    def abort(self, request_id: str) -> None:
        """Drop one unfinished request; it produces no output."""
        self.engine.abort_request(request_id)
        self.tags.pop(request_id, None)

    def abort_all(self) -> None:
        self.engine.abort_all()
        self.tags.clear()


class Occupancy:
    """How full the engine's batches were against the batch the run aimed for, weighted by step time:
    in all and per tenth of the generating time, so a run whose tail idles the engine shows it."""

    def __init__(self):
        self.steps: list[tuple[float, float]] = []  # (seconds, min(1, batch / target))

    def add(self, batch: int, target: int, seconds: float) -> None:
        self.steps.append((seconds, min(1.0, batch / max(target, 1))))

    @property
    def mean(self) -> float | None:
        total = sum(s for s, _ in self.steps)
        return sum(s * f for s, f in self.steps) / total if total > 0 else None

    def by_tenth(self) -> list[float]:
        total = sum(s for s, _ in self.steps)
        if total <= 0:
            return []
        sums, weights, elapsed = [0.0] * 10, [0.0] * 10, 0.0
        for seconds, fill in self.steps:
            tenth = min(9, int(10 * (elapsed + seconds / 2) / total))
            sums[tenth] += seconds * fill
            weights[tenth] += seconds
            elapsed += seconds
        return [round(s / w, 3) if w else None for s, w in zip(sums, weights)]

    def report(self) -> dict:
        mean = self.mean
        return {"mean": None if mean is None else round(mean, 3), "by_tenth_of_time": self.by_tenth(),
                "steps": len(self.steps)}
