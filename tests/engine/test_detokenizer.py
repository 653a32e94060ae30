"""IncrementalDetokenizer: text decoded a token at a time equals the whole output's decode."""

from __future__ import annotations

import random

import pytest

from speedx.engine.detokenizer import IncrementalDetokenizer


class WindowOnly:
    """A tokenizer without a Rust backend to stream from: the detokenizer decodes windows."""

    def __init__(self, tokenizer):
        self.decode = tokenizer.decode


@pytest.mark.parametrize("path", ["stream", "window"])
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_incremental_text_is_the_whole_decode(tiny_llama, path, skip_special_tokens):
    tok = tiny_llama[2]
    rng = random.Random()
    multibyte = tok.encode("é ü 日本 🙂", add_special_tokens=False)  # characters split across tokens
    assert any("\ufffd" in tok.decode(multibyte[:i]) for i in range(len(multibyte)))
    for _ in range(50):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 40))]
        at = rng.randint(0, len(ids))
        ids[at:at] = multibyte + [tok.eos_token_id, tok.bos_token_id]
        detokenizer = IncrementalDetokenizer(tok if path == "stream" else WindowOnly(tok), skip_special_tokens)
        assert (detokenizer._stream is not None) == (path == "stream")
        pieces = [detokenizer.add(token) for token in ids]
        whole = tok.decode(ids, skip_special_tokens=skip_special_tokens)
        assert "".join(pieces) == detokenizer.text
        # Bytes that do not make a whole character yet, at the end, are held back; nothing else is.
        assert detokenizer.text == whole.rstrip("\ufffd")
        assert not any(piece.endswith("\ufffd") for piece in pieces)
