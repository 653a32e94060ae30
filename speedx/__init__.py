"""speedx: synthesize text-embedding training data with small open LLMs on a paged-KV engine."""

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]


def __getattr__(name):
    # Lazy so that `import speedx` stays cheap and never touches torch or a GPU driver.
    if name == "LLM":
        from speedx.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from speedx.engine.sampling_params import SamplingParams

        return SamplingParams
    if name in ("RequestOutput", "CompletionOutput"):
        from speedx.engine import outputs

        return getattr(outputs, name)
    raise AttributeError(f"module 'speedx' has no attribute {name!r}")
