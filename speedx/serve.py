"""`python -m speedx.serve`: an OpenAI-compatible HTTP server over the speedx engine.

Endpoints: /v1/chat/completions, /v1/completions (streaming with "stream": true), /v1/models,
/health. With --api-key (or env SPEEDX_API_KEY) every /v1 request needs
`Authorization: Bearer <key>`. Binds to 127.0.0.1 unless --host says otherwise.

  python -m speedx.serve --model default --port 8000
  curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}'
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from speedx.engine.config import EngineConfig

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def build_parser() -> argparse.ArgumentParser:
    from speedx.serving.protocol import (
        DEFAULT_MAX_REQUEST_BYTES,
        DEFAULT_MAX_TOKENS_LIMIT,
    )

    p = _Parser(prog="python -m speedx.serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0 = any free one; default 8000)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: env SPEEDX_API_KEY; "
                   "none = open). Prefer the env: flags show up in process lists")
    p.add_argument("--served-model-name", default=None, help="the model name clients send and /v1/models lists "
                   "(default: the --model value)")
    p.add_argument("--max-tokens-limit", type=int, default=DEFAULT_MAX_TOKENS_LIMIT,
                   help=f"largest max_tokens a request may ask for (default {DEFAULT_MAX_TOKENS_LIMIT}, "
                        "and never more than the context length)")
    p.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                   help=f"largest request body; bigger ones get 413 (default {DEFAULT_MAX_REQUEST_BYTES})")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level")
    EngineConfig.add_cli_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in [0, 65535], got {args.port}")
    for name in ("max_tokens_limit", "max_request_bytes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    api_key = args.api_key or os.environ.get("SPEEDX_API_KEY") or None

    import uvicorn

    from speedx.engine.llm import LLM
    from speedx.serving.app import build_app
    from speedx.serving.launch import bind_socket

    try:
        sock = bind_socket(args.host, args.port)  # before loading the model: a busy port fails fast
    except OSError as exc:
        print(f"error: cannot bind {args.host}:{args.port}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        llm = LLM.from_config(EngineConfig.from_cli_args(args))
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    app = build_app(llm, args.served_model_name or args.model, api_key, args.max_request_bytes, args.max_tokens_limit,
                    engine_thread=False)
    host, port = sock.getsockname()[:2]
    print(f"speedx: serving {app.state.model_name!r} at http://{host}:{port}/v1"
          f"{' (API key required)' if api_key else ''}", file=sys.stderr, flush=True)
    # HTTP in a background thread, the engine loop here on the main thread: PyTorch's parallel CPU
    # ops run slower in a second thread (see speedx/serving/async_engine.py).
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5))
    http = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="speedx-server", daemon=True)
    engine = app.state.engine
    signal.signal(signal.SIGTERM, lambda *_: engine.close())  # like Ctrl-C: finish cleanly
    http.start()
    try:
        engine.run()  # until Ctrl-C, SIGTERM, or the HTTP server stopping (its shutdown closes the engine)
    except KeyboardInterrupt:
        pass
    finally:
        engine.close()
        server.should_exit = True
        http.join(timeout=10)
    return 0

if __name__ == "__main__":
    sys.exit(main())
