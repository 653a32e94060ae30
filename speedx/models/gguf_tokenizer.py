"""The tokenizer of a GGUF file, converted once and then kept on disk.

transformers rebuilds a fast tokenizer from a GGUF's vocabulary and merges on every load (~5 s
for SmolLM2's 49K tokens, most of `LLM("default")`'s start-up). The converted tokenizer is saved
under the speedx cache directory, keyed by the file's path, size and modification time and the
transformers version, and later loads read it back in ~0.2 s. A cache that cannot be written
is skipped; a damaged entry is rebuilt.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """$SPEEDX_CACHE_DIR, else $XDG_CACHE_HOME/speedx, else ~/.cache/speedx."""
    if os.environ.get("SPEEDX_CACHE_DIR"):
        return Path(os.environ["SPEEDX_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "speedx"


def load_gguf_tokenizer(path: Path):
    import transformers
    from transformers import AutoTokenizer

    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    entry = cache_dir() / "tokenizers" / hashlib.sha256(key.encode()).hexdigest()[:24]
    if entry.is_dir():
        try:
            return AutoTokenizer.from_pretrained(str(entry))
        except (OSError, ValueError):
            shutil.rmtree(entry, ignore_errors=True)  # damaged: rebuild it below
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    _save(tokenizer, entry)
    return tokenizer


def _save(tokenizer, entry: Path) -> None:
    """Written to a temporary directory, then renamed: a reader never sees half an entry."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    except OSError:
        return  # read-only: the next load converts again
    try:
        tokenizer.save_pretrained(str(tmp))
        os.rename(tmp, entry)
    except OSError:  # a full disk, or another process got there first (its entry stays)
        shutil.rmtree(tmp, ignore_errors=True)
