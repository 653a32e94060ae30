"""speedx: synthesize text-embedding training data with small open LLMs on a paged-KV engine."""

__version__ = "0.1.0"

__all__ = ["LLM", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]


def _check_built() -> None:
    """Stop at once, saying why, when this is a source folder without the built parts: after a plain
    `pip install .`, Python started in the repository root imports ./speedx (the working directory
    comes first on sys.path), which has neither the C++ extension nor the kernels (they live in the
    top-level kernels/ folder and are installed as speedx.kernels)."""
    from importlib.util import find_spec

    missing = [name for name in ("speedx._C", "speedx.kernels") if find_spec(name) is None]
    if missing:
        raise ImportError(
            f"speedx was imported from {__path__[0]}, which lacks {' and '.join(missing)} (they are built and "
            "installed by pip). If speedx is installed (`pip install .`), run Python outside the speedx "
            "repository, whose speedx/ folder shadows the installed one; to run inside it, install it "
            "editable there: `pip install -e .`"
        )


_check_built()


def __getattr__(name):
    # Lazy so that `import speedx` stays cheap and never touches torch or a GPU driver.
    if name == "LLM":
        from speedx.engine.llm import LLM

        return LLM
    if name == "EngineConfig":
        from speedx.engine.config import EngineConfig

        return EngineConfig
    if name == "SamplingParams":
        from speedx.engine.sampling_params import SamplingParams

        return SamplingParams
    if name in ("RequestOutput", "CompletionOutput"):
        from speedx.engine import outputs

        return getattr(outputs, name)
    raise AttributeError(f"module 'speedx' has no attribute {name!r}")
