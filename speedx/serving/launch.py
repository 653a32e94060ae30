"""Run the server in a background thread of this process (a local teacher for the alignment
pipeline, tests, demos): `with start_server(llm) as server: OpenAI(base_url=server.url, ...)`."""

from __future__ import annotations

import logging
import socket
import threading
import time

logger = logging.getLogger("speedx")


class RunningServer:
    """A uvicorn server in a daemon thread. url: the OpenAI base URL (http://HOST:PORT/v1)."""

    def __init__(self, llm, app, sock: socket.socket, api_key: str | None):
        import uvicorn

        self.llm, self.app, self.api_key = llm, app, api_key
        self.host, self.port = sock.getsockname()[:2]
        self.model = app.state.model_name
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._sock = sock
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="speedx-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:  # uvicorn sets it once the lifespan startup ran and it listens
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("the server did not start; see the log above")
            time.sleep(0.01)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def close(self) -> None:
        """Fail what is in flight (503), stop the engine thread and the server. Idempotent."""
        self.app.state.engine.close()
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._sock.close()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start_server(llm_or_model="default", host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
                 served_model_name: str | None = None, max_tokens_limit: int | None = None,
                 max_request_bytes: int | None = None, **llm_kwargs) -> RunningServer:
    """Serve an LLM (or a model path/"default", loaded with llm_kwargs) on host:port (0 = a free port).

    While it runs the server owns the LLM's engine: don't call llm.generate until close().
    The engine loop runs in a background thread, which on a CPU with few cores costs 10-25% of
    throughput (see speedx/serving/async_engine.py); `python -m speedx.serve` has no such cost.
    """
    from speedx.engine.llm import LLM
    from speedx.serving.app import build_app
    from speedx.serving.protocol import (
        DEFAULT_MAX_REQUEST_BYTES,
        DEFAULT_MAX_TOKENS_LIMIT,
    )

    llm = llm_or_model if isinstance(llm_or_model, LLM) else LLM(llm_or_model, **llm_kwargs)
    app = build_app(llm, served_model_name, api_key, max_request_bytes or DEFAULT_MAX_REQUEST_BYTES,
                    max_tokens_limit or DEFAULT_MAX_TOKENS_LIMIT)
    sock = bind_socket(host, port)
    return RunningServer(llm, app, sock, api_key)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready bound socket (binding here, not in uvicorn, tells us port 0's real port at once)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock
