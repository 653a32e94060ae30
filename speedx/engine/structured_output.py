"""JSON-schema-constrained decoding with xgrammar.

Each distinct schema is compiled once, in a background thread, against the engine's vocabulary;
each constrained sequence owns a GrammarMatcher; each step fills one token bitmask for all
constrained rows and masks their logits to -inf before sampling (greedy included).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    import xgrammar


def _xgr():
    import xgrammar  # imported on first use: it costs about a second and most runs never need it

    return xgrammar


class StructuredOutputs:
    """Per engine: the tokenizer info, the grammar compiler and the compiled schemas."""

    MAX_SCHEMAS = 512  # distinct schemas remembered (oldest dropped first); xgrammar caches too

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]):
        xgr = _xgr()
        # vocab_size is the model's (lm_head rows), which may exceed len(tokenizer): padded ids
        # are then masked off like any other token the grammar does not allow.
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids))
        self.compiler = xgr.GrammarCompiler(info, max_threads=min(8, os.cpu_count() or 1), cache_enabled=True)
        # One worker: xgrammar compiles with its own threads and releases the GIL meanwhile.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="speedx-grammar")
        self._grammars: OrderedDict[str, Future] = OrderedDict()
        self._row = xgr.allocate_token_bitmask(1, vocab_size)
        self._not_stop = _bits(stop_token_ids, self._row.shape[1], invert=True)
        # Compact JSON never holds a raw byte < 0x20, but xgrammar (<= 0.2.8, issue #800) lets
        # strings with minLength/maxLength take them: such tokens stay masked in every row.
        stops = set(stop_token_ids)
        unsafe = [t for t, text in enumerate(info.decoded_vocab) if text and min(text) < 0x20 and t not in stops]
        self.mask = GrammarMask(_bits(unsafe, self._row.shape[1], invert=True).view(np.int32))

    def grammar(self, schema_text: str) -> Future:
        """The compiled grammar of a schema, as a Future: compiled once, in the background.

        The schema is converted to a grammar here, which is quick and is where xgrammar rejects
        bad or unsupported schemas, so those fail now with a ValueError; the slow part (masks
        precomputed over the vocabulary) runs in the worker thread.
        """
        future = self._grammars.get(schema_text)
        if future is not None:
            self._grammars.move_to_end(schema_text)
            return future
        try:
            # Compact JSON: any whitespace lets small models emit blank lines until max_tokens.
            grammar = _xgr().Grammar.from_json_schema(schema_text, any_whitespace=False)
        except Exception as exc:  # xgrammar reports schema errors as RuntimeError
            raise ValueError(f"the JSON schema is not supported: {_first_line(exc)}") from None
        future = self._executor.submit(self._compile, grammar)
        self._grammars[schema_text] = future
        if len(self._grammars) > self.MAX_SCHEMAS:
            self._grammars.popitem(last=False)
        return future

    def _compile(self, grammar: "xgrammar.Grammar") -> "xgrammar.CompiledGrammar":
        return self.compiler.compile_grammar(grammar)

    def matcher(self, compiled: "xgrammar.CompiledGrammar") -> "xgrammar.GrammarMatcher":
        return _xgr().GrammarMatcher(compiled)

    def json_complete(self, matcher: "xgrammar.GrammarMatcher") -> bool:
        """True once the output is complete JSON that nothing but a stop token could extend
        (a closed object); the sequence then ends without spending a step on the EOS token."""
        if matcher.is_terminated():  # it accepted a stop token
            return True
        if not matcher.is_completed():
            return False
        matcher.fill_next_token_bitmask(self._row)
        return not (self._row.numpy().view(np.uint32)[0] & self._not_stop).any()


class GrammarMask:
    """Per model runner: one reusable bitmask, filled for the constrained rows of each step."""

    def __init__(self, allowed: np.ndarray):
        self._allowed = allowed  # int32 words: bits of the tokens any row may take
        self._bitmask: torch.Tensor | None = None
        self._batch: "xgrammar.BatchGrammarMatcher | None" = None

    def apply(self, logits: torch.Tensor, matchers: list) -> None:
        """Set to -inf the logits, in the rows whose matcher is not None, of every token the
        grammar does not allow next."""
        filled = self._fill(logits, matchers)
        if filled is not None:
            bitmask, rows = filled
            bitmask = bitmask.to(logits.device, non_blocking=True)
            _xgr().apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[1], indices=rows)

    def row_bitmask(self, logits: torch.Tensor, matchers: list) -> torch.Tensor | None:
        """The same constraint as an int32 [rows, ceil(vocab / 32)] bitmask on logits' device, every
        bit set in the unconstrained rows (what the Triton sampler takes); None if no row is constrained."""
        filled = self._fill(logits, matchers)
        if filled is None:
            return None
        bitmask, rows = filled
        free = sorted(set(range(len(matchers))) - set(rows))
        if free:
            bitmask[free] = -1
        return bitmask.to(logits.device, non_blocking=True)

    def _fill(self, logits: torch.Tensor, matchers: list) -> tuple[torch.Tensor, list[int]] | None:
        """Fills the host bitmask rows of the constrained sequences (a parent and its pending forks
        share a matcher: one fill, then a copy). Returns it and those rows, or None if there are none."""
        first_row: dict[int, int] = {}
        fill, fill_rows, copy_to, copy_from = [], [], [], []
        for r, matcher in enumerate(matchers):
            if matcher is None:
                continue
            if id(matcher) in first_row:
                copy_to.append(r)
                copy_from.append(first_row[id(matcher)])
            else:
                first_row[id(matcher)] = r
                fill.append(matcher)
                fill_rows.append(r)
        if not fill:
            return None
        xgr = _xgr()
        rows, vocab = logits.shape
        if self._bitmask is None or self._bitmask.shape[0] < rows or self._bitmask.shape[1] * 32 < vocab:
            self._bitmask = xgr.allocate_token_bitmask(max(rows, 64), vocab)
            if logits.is_cuda:
                self._bitmask = self._bitmask.pin_memory()
        if self._batch is None:
            self._batch = xgr.BatchGrammarMatcher()
        self._batch.batch_fill_next_token_bitmask(fill, self._bitmask, fill_rows)
        bitmask = self._bitmask[:rows]
        words = bitmask.numpy()  # numpy: single-threaded, so no OpenMP hand-off for a tiny op
        np.bitwise_and(words, self._allowed, out=words)  # rows left unfilled are never applied
        if copy_to:
            bitmask[copy_to] = bitmask[copy_from]
        return bitmask, sorted(fill_rows + copy_to)


def _bits(token_ids, words: int, invert: bool = False) -> np.ndarray:
    """A one-row bitmask (uint32 words) with the bits of token_ids set, or with all others set."""
    bits = np.zeros(words, dtype=np.uint32)
    for t in token_ids:
        if 0 <= t < words * 32:
            bits[t >> 5] |= np.uint32(1 << (t & 31))
    return ~bits if invert else bits


def _first_line(exc: Exception) -> str:
    # xgrammar prefixes messages with a timestamp and its source file; keep the message itself.
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.split(": ", 1)[1] if text.startswith("[") and ": " in text else text
