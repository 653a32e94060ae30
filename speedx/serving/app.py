"""The OpenAI-compatible HTTP API over one LLM: /v1/chat/completions, /v1/completions, /v1/models, /health.

Every request becomes one engine request per prompt, run by the AsyncEngine thread together with
everyone else's (continuous batching). Streaming answers are server-sent events; a client that
disconnects has its requests aborted, which frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from speedx.engine.outputs import RequestOutput
from speedx.serving.async_engine import AsyncEngine, Delta, Failure
from speedx.serving.protocol import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_MAX_TOKENS_LIMIT,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingRequest,
    validation_error,
)

_DRAIN_LIMIT = 64 * 2**20  # bytes of a rejected body still read so the client sees the error, not a reset


def build_app(llm, model_name: str | None = None, api_key: str | None = None,
              max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
              max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT, engine_thread: bool = True) -> FastAPI:
    """The FastAPI app serving `llm` (a speedx LLM) as `model_name` (default: llm.model_name).

    api_key: when set, /v1/* needs `Authorization: Bearer <api_key>` (/health stays open).
    app.state.engine is the AsyncEngine: with engine_thread its loop starts in a background thread
    with the app's lifespan; without, the caller runs app.state.engine.run() itself (on the main
    thread, the faster place on CPU). The app's shutdown stops it either way.
    While the app runs it owns llm.engine: do not call llm.generate meanwhile.
    """
    # The event loop encodes prompts while the engine thread decodes. A fast tokenizer mutates
    # itself on its first encode only if its file configures truncation/padding: do that now.
    llm.tokenizer.encode("warm-up")
    engine = AsyncEngine(llm.engine)
    api = _API(llm, engine, model_name or llm.model_name, max_tokens_limit)

    @asynccontextmanager
    async def lifespan(app):
        if engine_thread:
            engine.start()
        yield
        engine.close()

    app = FastAPI(title="speedx", summary="OpenAI-compatible server over the speedx engine", lifespan=lifespan)
    app.state.engine = engine
    app.state.model_name = api.model_name
    app.add_middleware(_Gate, api_key=api_key, max_bytes=max_request_bytes)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        return _error_response(validation_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):  # unknown route, wrong method
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return _error_response(APIError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):
        return _error_response(APIError(500, f"internal server error: {exc}"))

    @app.get("/health")
    async def health():
        if not engine.alive:
            return _error_response(APIError(503, engine.error or "the engine is not running"))
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [api.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        api.check_model(model_id)
        return api.model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        api.check_model(body.model)
        try:
            prompt = llm.apply_chat_template([m.template_dict() for m in body.messages])
        except Exception as exc:  # no template, or the template rejected the conversation
            raise APIError(400, f"cannot apply the chat template: {exc}", "messages") from None
        return await api.run(request, body, [prompt], chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        api.check_model(body.model)
        prompts = [llm.tokenizer.encode(p) if isinstance(p, str) else p for p in body.prompts()]
        return await api.run(request, body, prompts, chat=False)

    return app


class _API:
    def __init__(self, llm, engine: AsyncEngine, model_name: str, max_tokens_limit: int):
        self.engine = engine
        self.model_name = model_name
        self.max_model_len = llm.max_model_len
        self.sampling_defaults = llm.get_default_sampling_params()
        self.max_tokens_limit = min(max_tokens_limit, llm.max_model_len)
        self.created = int(time.time())

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "speedx",
                "max_model_len": self.max_model_len}

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves `{self.model_name}`",
                           "model", "model_not_found")

    def max_tokens(self, body: SamplingRequest, prompts: list[list[int]], chat: bool) -> int:
        """The request's max_tokens, checked against the server limit and the context length."""
        param = "messages" if chat else "prompt"
        longest = max(len(p) for p in prompts)
        if longest >= self.max_model_len:
            raise APIError(400, f"the prompt has {longest} tokens, but this model's maximum context length is "
                                f"{self.max_model_len} tokens", param, "context_length_exceeded")
        requested = body.requested_max_tokens
        if requested is not None and requested > self.max_tokens_limit:
            raise APIError(400, f"max_tokens={requested} is over this server's limit of {self.max_tokens_limit}",
                           "max_tokens")
        if requested is None:  # OpenAI: chat fills the context, legacy completions default to 16
            requested = self.max_tokens_limit if chat else DEFAULT_COMPLETION_MAX_TOKENS
            return max(1, min(requested, self.max_model_len - longest))
        return requested  # a longer answer stops at the context end with finish_reason "length"

    async def run(self, request: Request, body: SamplingRequest, prompts: list[list[int]], chat: bool):
        params = body.sampling_params(self.max_tokens(body, prompts, chat), self.sampling_defaults)
        response_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        ids = [f"{response_id}-{i}" for i in range(len(prompts))]
        queue: asyncio.Queue = asyncio.Queue()
        self.engine.add_requests(list(zip(ids, prompts)), params, queue, stream=body.stream)
        first = await queue.get()  # Accepted, or a Failure (then nothing was queued)
        if isinstance(first, Failure):
            raise _engine_error(first.message, first.status, chat)
        reply = _Reply(self.model_name, response_id, ids, body.n, chat)
        if body.stream:
            return StreamingResponse(self._stream(queue, reply, body.include_usage, ids), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        outputs = await self._collect(request, queue, ids, chat)
        if outputs is None:  # nobody reads this; 499 is nginx's "client closed request"
            return Response(status_code=499)
        return JSONResponse(reply.complete(outputs))

    async def _collect(self, request: Request, queue: asyncio.Queue, ids: list[str],
                       chat: bool) -> list[RequestOutput] | None:
        """Wait for every output; abort the requests and return None if the client disconnects first."""
        outputs: dict[str, RequestOutput] = {}
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            while len(outputs) < len(ids):
                get = asyncio.ensure_future(queue.get())
                await asyncio.wait((get, gone), return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    return None
                event = get.result()
                if isinstance(event, Failure):
                    raise _engine_error(event.message, event.status, chat)
                if isinstance(event, RequestOutput):
                    if event.error:
                        raise _engine_error(event.error, 400, chat)
                    outputs[event.request_id] = event
        finally:
            gone.cancel()
            if len(outputs) < len(ids):
                for request_id in ids:
                    self.engine.abort(request_id)
        return [outputs[i] for i in ids]

    async def _stream(self, queue: asyncio.Queue, reply: _Reply, include_usage: bool, ids: list[str]):
        done: list[RequestOutput] = []
        try:
            for chunk in reply.opening_chunks():
                yield _sse(chunk)
            while len(done) < len(ids):
                event = await queue.get()  # cancelled here when the client disconnects
                if isinstance(event, Delta):
                    yield _sse(reply.delta_chunk(event))
                elif isinstance(event, Failure) or event.error:
                    failure = event if isinstance(event, Failure) else Failure(event.request_id, event.error)
                    yield _sse(_engine_error(failure.message, failure.status, reply.chat).body())
                    break
                else:
                    done.append(event)
            else:
                if include_usage:
                    yield _sse(reply.usage_chunk(done))
            yield "data: [DONE]\n\n"
        finally:
            if len(done) < len(ids):  # disconnected or failed: free what is still running
                for request_id in ids:
                    self.engine.abort(request_id)


class _Reply:
    """Builds the response bodies (chat.completion / text_completion and their chunks) of one request."""

    def __init__(self, model: str, response_id: str, ids: list[str], n: int, chat: bool):
        self.model, self.id, self.n, self.chat = model, response_id, n, chat
        self.base_index = {request_id: i * n for i, request_id in enumerate(ids)}  # choice index of sample 0
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.num_choices = len(ids) * n

    def _envelope(self, obj: str, choices: list) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def complete(self, outputs: list[RequestOutput]) -> dict:
        choices = []
        for output in outputs:
            for sample in output.outputs:
                index = self.base_index[output.request_id] + sample.index
                if self.chat:
                    choices.append({"index": index, "message": {"role": "assistant", "content": sample.text},
                                    "logprobs": None, "finish_reason": sample.finish_reason})
                else:
                    choices.append({"index": index, "text": sample.text, "logprobs": None,
                                    "finish_reason": sample.finish_reason})
        body = self._envelope(self.object, choices)
        body["usage"] = _usage(outputs)
        return body

    def opening_chunks(self) -> list[dict]:
        if not self.chat:
            return []
        return [self._envelope("chat.completion.chunk", [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
            for i in range(self.num_choices)]

    def delta_chunk(self, delta: Delta) -> dict:
        index = self.base_index[delta.request_id] + delta.index
        if self.chat:
            choice = {"index": index, "delta": {"content": delta.text} if delta.text else {}, "logprobs": None,
                      "finish_reason": delta.finish_reason}
            return self._envelope("chat.completion.chunk", [choice])
        return self._envelope("text_completion", [
            {"index": index, "text": delta.text, "logprobs": None, "finish_reason": delta.finish_reason}])

    def usage_chunk(self, outputs: list[RequestOutput]) -> dict:
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        body["usage"] = _usage(outputs)
        return body


def _engine_error(message: str, status: int, chat: bool) -> APIError:
    """An engine ValueError ("request ID: the prompt is empty...") as an APIError naming the likely param."""
    message = re.sub(r"^request \S+: ", "", message)
    param = "response_format" if "JSON schema" in message or "schema" in message.split(":")[0] else (
        "messages" if chat else "prompt")
    return APIError(status, message, param if status == 400 else None)


def _usage(outputs: list[RequestOutput]) -> dict:
    prompt = sum(o.num_prompt_tokens for o in outputs)
    completion = sum(o.num_output_tokens for o in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (the body is already read, so receive() only reports that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


class _Gate:
    """ASGI middleware run before FastAPI parses anything: the API key check on /v1/* (401) and the
    request body size limit (413). The body is read here (it is small) and replayed to the app."""

    def __init__(self, app, api_key: str | None, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.expected is not None and scope["path"].startswith("/v1"):
            given = headers.get(b"authorization")
            if given is None or not hmac.compare_digest(given.strip(), self.expected):
                message = ("Incorrect API key provided" if given else
                           "Missing API key: send the header 'Authorization: Bearer <key>'")
                return await self._reject(APIError(401, message, code="invalid_api_key"), scope, receive, send)
        too_large = APIError(413, f"the request body is over this server's limit of {self.max_bytes} bytes",
                             code="request_too_large")
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(too_large, scope, receive, send)
        body, more = bytearray(), True
        while more:  # chunked bodies have no content-length: count what arrives
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._reject(too_large, scope, receive, send, drained=len(body), more=more)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: passes on http.disconnect
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    @staticmethod
    async def _reject(error: APIError, scope, receive, send, drained: int = 0, more: bool = True):
        while more and drained < _DRAIN_LIMIT:  # read the unread body: closing on it would reset the socket
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            drained += len(message.get("body", b""))
            more = message.get("more_body", False)
        await _error_response(error)(scope, receive, send)
