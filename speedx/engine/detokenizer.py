"""A sequence's output text, decoded as its tokens arrive.

Stop strings are searched for in each token's new text, and streams hand that text out. Decoding
the whole output again at every token would cost time that grows with the output: 0.4 ms per
token at 1,000 tokens, about 100 ms of host time per step for a batch of 256. A fast tokenizer
decodes one token in about 3 microseconds through its own streaming decoder,
`tokenizers.decoders.DecodeStream`. Other tokenizers decode a window of the last few tokens
(vLLM's prefix/read offsets). Either way, text ending in U+FFFD (half of a multi-byte character)
is held back until the character is whole.
"""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool):
        self.text = ""  # the text of the tokens added so far
        backend = getattr(tokenizer, "_tokenizer", None)  # a fast tokenizer's Rust tokenizer
        if isinstance(backend, Tokenizer):
            self._backend, self._stream = backend, DecodeStream(skip_special_tokens=skip_special_tokens)
        else:
            self._backend = self._stream = None
            self._tokenizer, self._skip_special_tokens = tokenizer, skip_special_tokens
            self._ids: list[int] = []
            self._prefix_offset = self._read_offset = 0

    def add(self, token_id: int) -> str:
        """Append one token; returns the text it completes ("" while a character is unfinished)."""
        if self._stream is not None:
            piece = self._stream.step(self._backend, token_id) or ""
        else:
            piece = self._add_to_window(token_id)
        self.text += piece
        return piece

    def _add_to_window(self, token_id: int) -> str:
        # Decoding from a few tokens back keeps what depends on the previous token (a leading space)
        # right; the new text is what this token adds to the window's text.
        self._ids.append(token_id)
        window = self._ids[self._prefix_offset :]
        before = self._decode(window[: self._read_offset - self._prefix_offset])
        after = self._decode(window)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return after[len(before) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)
