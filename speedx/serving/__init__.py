"""OpenAI-compatible serving of a speedx LLM: `python -m speedx.serve`, or `start_server` in-process."""

from speedx.serving.launch import RunningServer, start_server

__all__ = ["RunningServer", "build_app", "start_server"]


def __getattr__(name):  # build_app imports FastAPI: only when asked for
    if name == "build_app":
        from speedx.serving.app import build_app

        return build_app
    raise AttributeError(name)
