"""The engine behind an asyncio server: one thread owns the LLMEngine and steps it while there is
work, so requests from many HTTP clients share each batch (continuous batching).

That thread is either a background thread (`start()`) or the caller's (`run()`, which blocks).
On a small CPU box prefer the main thread, with the HTTP server in a background thread: once the
main thread has an OpenMP team (it has: the model was loaded there), a second thread's team makes
libgomp manage more threads than there are cores, and it then stops spin-waiting between parallel
regions; every op pays a futex wake-up and the engine runs 10-25% slower (2 cores, measured).
`python -m speedx.serve` does that; `start_server` (in-process, the caller keeps its thread) cannot.

Handlers call `add_requests` / `abort` from the event loop; both only queue a command for the
engine thread, so the engine itself is never touched by two threads. Results travel back through
each handler's asyncio.Queue via `loop.call_soon_threadsafe`: an `Accepted` or a `Failure` first,
then (streaming only) `Delta`s as tokens arrive, and finally the request's `RequestOutput`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from dataclasses import dataclass, field

from speedx.engine.detokenizer import IncrementalDetokenizer
from speedx.engine.llm_engine import LLMEngine
from speedx.engine.outputs import RequestOutput
from speedx.engine.sampling_params import SamplingParams

logger = logging.getLogger("speedx")


@dataclass
class Accepted:
    request_id: str


@dataclass
class Failure:
    request_id: str
    message: str
    status: int = 400  # 400: the request cannot be served; 500: the engine failed; 503: shutting down


@dataclass
class Delta:
    """New text of one sample since its previous Delta; finish_reason is set on the sample's last one."""

    request_id: str
    index: int
    text: str
    finish_reason: str | None = None


class IncrementalText:
    """A sample's text, handed out piece by piece as tokens arrive (speedx.engine.detokenizer).

    Holds back the last len(longest stop string) - 1 characters: they may begin a stop string the
    engine will cut.
    """

    def __init__(self, tokenizer, params: SamplingParams):
        self.detokenizer = IncrementalDetokenizer(tokenizer, params.skip_special_tokens)
        self.holdback = max((len(s) for s in params.stop_strings), default=1) - 1
        self.num_tokens = 0  # output tokens decoded
        self.sent = 0  # characters of the text handed out

    @property
    def text(self) -> str:
        return self.detokenizer.text

    def update(self, token_ids: list[int]) -> str:
        """token_ids: the sample's output so far -> the text to hand out now."""
        for token in token_ids[self.num_tokens :]:
            self.detokenizer.add(token)
        self.num_tokens = len(token_ids)
        end = len(self.text) - self.holdback
        if end <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent : end], end
        return piece

    def finish(self, final_text: str) -> str:
        """The rest of the engine's final text (which is authoritative: cut at a stop string)."""
        if not final_text.startswith(self.text[: self.sent]):  # window and full decode disagree: rare
            logger.warning("streamed text diverged from the final text; the stream may differ from it")
        return final_text[self.sent :]


@dataclass(eq=False)
class _Client:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    stream: bool
    texts: dict[int, IncrementalText] = field(default_factory=dict)  # by seq_id


class AsyncEngine:
    """Owns an LLMEngine in a background thread; see the module docstring."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: deque[tuple] = deque()  # ("add", ...) / ("abort", id), appended by the event loop
        self._wake = threading.Event()
        self._clients: dict[str, _Client] = {}  # engine thread only
        self._thread: threading.Thread | None = None  # set by start()
        self._running = False  # the loop is running (in a background thread or the caller's)
        self._closing = False
        self.error: str | None = None  # set when the engine thread died

    # ------------------------------------------------------------------ event-loop side

    def start(self) -> None:
        """Run the engine loop in a background thread (no-op if it is running)."""
        if not self._running:
            self._closing, self._running = False, True  # alive from now on, for requests racing the start
            self._thread = threading.Thread(target=self.run, name="speedx-engine", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the loop; unfinished requests get a 503 Failure and are aborted. Safe from any thread
        (and from a signal handler): it waits for a background thread, never for the caller's own."""
        self._closing = True
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    @property
    def alive(self) -> bool:
        return self._running and not self._closing

    def add_requests(self, requests: list[tuple[str, str | list[int]]], params: SamplingParams,
                     queue: asyncio.Queue, stream: bool = False) -> None:
        """Queue (request_id, prompt) pairs that share params and one queue (call from the event loop).

        All or none are added: the queue first gets one Accepted, or one Failure (then none run).
        """
        if self._closing:  # stopped (or died): nobody would ever answer
            queue.put_nowait(Failure(requests[0][0], self.error or "the server is shutting down", 503))
            return
        client = _Client(asyncio.get_running_loop(), queue, stream)
        self._command(("add", requests, params, client))

    def abort(self, request_id: str) -> None:
        """Drop a request (its client went away); no further events are sent for it."""
        self._command(("abort", request_id))

    def _command(self, command: tuple) -> None:
        self._commands.append(command)  # deque.append is atomic: no lock needed
        self._wake.set()

    # ------------------------------------------------------------------ engine thread

    def run(self) -> None:
        """The engine loop, in the calling thread, until close() (from a handler, signal or thread)."""
        engine = self.engine
        self._running = True
        try:
            while not self._closing:
                self._wake.clear()  # before draining: a command queued after this sets it again
                self._drain_commands()
                if not engine.has_unfinished_requests():
                    self._wake.wait()
                    continue
                try:
                    finished, _ = engine.step()
                except Exception as exc:  # fail what is in flight, keep serving
                    logger.exception("engine step failed")
                    self._fail_all(f"the engine failed: {exc}", 500)
                    continue
                self._publish(finished)
        except Exception as exc:  # pragma: no cover - a bug in this loop; make /health report it
            self.error = repr(exc)
            logger.exception("the engine loop died")
        finally:  # also on KeyboardInterrupt, which then propagates
            self._running, self._closing = False, True
            self._drain_commands()
            self._fail_all("the server is shutting down", 503)

    def _drain_commands(self) -> None:
        while self._commands:
            command = self._commands.popleft()
            if command[0] == "abort":
                self._clients.pop(command[1], None)
                self.engine.abort_request(command[1])
                continue
            _, requests, params, client = command
            first_id = requests[0][0]
            if self._closing:
                _send(client, [Failure(first_id, "the server is shutting down", 503)])
                continue
            added = []
            try:
                for request_id, prompt in requests:
                    self.engine.add_request(request_id, prompt, params)
                    added.append(request_id)
            except Exception as exc:  # ValueError: this request cannot be served; anything else is ours
                for request_id in added:
                    self.engine.abort_request(request_id)
                _send(client, [Failure(first_id, str(exc), 400 if isinstance(exc, ValueError) else 500)])
                continue
            for request_id in added:
                self._clients[request_id] = client
            _send(client, [Accepted(first_id)])

    def _publish(self, finished: list[RequestOutput]) -> None:
        events: dict[str, list] = {}
        for seq in self.engine.step_sequences:
            request_id = seq.request.request_id
            client = self._clients.get(request_id)
            if client is None or not client.stream:
                continue
            text = client.texts.get(seq.seq_id)
            if text is None:
                text = client.texts[seq.seq_id] = IncrementalText(self.engine.tokenizer, seq.params)
            if seq.is_finished:
                piece = text.finish(self.engine.output_text(seq))
                events.setdefault(request_id, []).append(Delta(request_id, seq.sample_index, piece, seq.finish_reason))
            else:
                piece = text.update(seq.output_token_ids)
                if piece:
                    events.setdefault(request_id, []).append(Delta(request_id, seq.sample_index, piece))
        for output in finished:
            events.setdefault(output.request_id, []).append(output)
        for request_id, batch in events.items():
            client = self._clients.get(request_id)
            if client is not None:
                _send(client, batch)
        for output in finished:
            self._clients.pop(output.request_id, None)

    def _fail_all(self, message: str, status: int) -> None:
        for request_id, client in self._clients.items():  # a client with several requests gets several
            _send(client, [Failure(request_id, message, status)])
        self._clients.clear()
        self.engine.abort_all()


def _send(client: _Client, events: list) -> None:
    try:
        client.loop.call_soon_threadsafe(_put_all, client.queue, events)
    except RuntimeError:  # the client's event loop is closed: nobody is listening any more
        pass


def _put_all(queue: asyncio.Queue, events: list) -> None:
    for event in events:
        queue.put_nowait(event)
