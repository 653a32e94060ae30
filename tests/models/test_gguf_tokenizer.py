"""The GGUF tokenizer cache: the default model's tokenizer, converted once, then read back from disk."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from speedx.models import gguf_tokenizer
from speedx.models.default_model import default_model_path
from speedx.models.loader import load_tokenizer

TEXTS = ["Hello there!", "JSON {\"a\": [1, 2]} ünïcödé 🚀", "<|im_start|>user\nhi<|im_end|>", "  spaces\tand\nlines  "]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]


@pytest.fixture(scope="module")
def converted():
    """What transformers itself makes of the GGUF (the slow path the cache skips)."""
    path = default_model_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def assert_same_tokenizer(tok, ref):
    assert len(tok) == len(ref)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text)
        assert tok.decode(ref.encode(text)) == ref.decode(ref.encode(text))
    for kwargs in ({"tokenize": False}, {"tokenize": True}, {"tokenize": False, "add_generation_prompt": True}):
        assert tok.apply_chat_template(CHAT, **kwargs) == ref.apply_chat_template(CHAT, **kwargs)


def test_first_load_converts_and_caches_then_loads_from_the_cache(converted, tmp_path, monkeypatch):
    monkeypatch.setenv("SPEEDX_CACHE_DIR", str(tmp_path))
    assert_same_tokenizer(load_tokenizer(default_model_path()), converted)
    entries = list((tmp_path / "tokenizers").iterdir())
    assert len(entries) == 1 and (entries[0] / "tokenizer.json").is_file()

    calls = []
    original = AutoTokenizer.from_pretrained

    def spy(name, *args, **kwargs):
        calls.append(kwargs.get("gguf_file"))
        return original(name, *args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", spy)
    assert_same_tokenizer(load_tokenizer(default_model_path()), converted)
    assert calls == [None]  # read back from the cache entry, not converted from the GGUF


def test_a_damaged_entry_is_rebuilt(converted, tmp_path, monkeypatch):
    monkeypatch.setenv("SPEEDX_CACHE_DIR", str(tmp_path))
    load_tokenizer(default_model_path())
    (entry,) = (tmp_path / "tokenizers").iterdir()
    (entry / "tokenizer.json").write_text("{not json")
    assert_same_tokenizer(load_tokenizer(default_model_path()), converted)
    assert AutoTokenizer.from_pretrained(str(entry)).encode("Hello there!") == converted.encode("Hello there!")


def test_an_unwritable_cache_is_skipped(tmp_path):
    class Tokenizer:
        def save_pretrained(self, path):
            raise AssertionError("must not be reached: the cache directory cannot be created")

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    gguf_tokenizer._save(Tokenizer(), blocker / "tokenizers" / "entry")  # mkdir under a file fails
    assert blocker.is_file()


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("SPEEDX_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert gguf_tokenizer.cache_dir() == tmp_path / "speedx"
    monkeypatch.setenv("SPEEDX_CACHE_DIR", str(tmp_path / "mine"))
    assert gguf_tokenizer.cache_dir() == tmp_path / "mine"
