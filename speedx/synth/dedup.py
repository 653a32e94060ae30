"""Exact and near-duplicate detection for synthesized examples (MinHash LSH over word shingles)."""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib

import numpy as np
from datasketch import MinHash, MinHashLSH

# Unicode punctuation (category P*) in the BMP: scanning it takes ~10 ms at import, the full range ~200 ms
# for a few rare historic scripts. Symbols (S*) are kept so "C++" != "C".
_P = re.escape("".join(c for c in map(chr, range(0x10000)) if unicodedata.category(c).startswith("P")))
# A token: whitespace-free run that starts and ends with a non-punctuation character (edge punctuation dropped).
_TOKEN = re.compile(rf"[^\s{_P}](?:\S*[^\s{_P}])?")


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(unicodedata.normalize("NFKC", text).casefold())


def normalize_text(text: str) -> str:
    """NFKC, casefold, collapse whitespace, strip punctuation at token edges: "Hello, World!" -> "hello world"."""
    return " ".join(_tokens(text))


class Deduplicator:
    """Flags a text as "exact" (same normalized text) or "near" (estimated Jaccard of word shingles >= threshold).

    The LSH index is tuned for recall (few missed candidates) and every candidate is then verified against
    its stored signature, so `threshold` means what it says instead of following LSH's soft S-curve
    (datasketch's default banding finds only ~46% of pairs at exactly J=0.85).
    """

    def __init__(self, threshold: float = 0.85, num_perm: int = 128, shingle_size: int = 3, seed: int = 1):
        self.threshold, self.num_perm, self.shingle_size = threshold, num_perm, shingle_size
        # Permutations are built once and copied per text. crc32 is stable across processes (unlike hash())
        # and ~8x faster than datasketch's default sha1; both give 32-bit shingle hashes.
        self._template = MinHash(num_perm=num_perm, seed=seed, hashfunc=zlib.crc32)
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.02, 0.98))
        self._exact: set[bytes] = set()
        self._sigs: dict[str, np.ndarray] = {}  # key -> MinHash values, for candidate verification
        self._keys: set[str] = set()

    def _prepare(self, text: str) -> tuple[bytes, MinHash | None]:
        toks = _tokens(text)
        digest = hashlib.blake2b(" ".join(toks).encode(), digest_size=16).digest()
        if not toks:
            return digest, None  # empty text: only the exact set applies
        k = self.shingle_size
        shingles = [" ".join(toks[i : i + k]) for i in range(max(1, len(toks) - k + 1))]
        mh = self._template.copy()
        mh.update_batch([s.encode() for s in shingles])
        return digest, mh

    def _check(self, digest: bytes, mh: MinHash | None) -> str | None:
        if digest in self._exact:
            return "exact"
        if mh is not None:
            for cand in self._lsh.query(mh):
                if np.count_nonzero(self._sigs[cand] == mh.hashvalues) >= self.threshold * self.num_perm:
                    return "near"
        return None

    def _add(self, key: str, digest: bytes, mh: MinHash | None) -> None:
        if key in self._keys:
            return
        self._keys.add(key)
        self._exact.add(digest)
        if mh is not None:
            self._lsh.insert(key, mh, check_duplication=False)
            self._sigs[key] = mh.hashvalues

    def check(self, key: str, text: str) -> str | None:
        """None if `text` is new (it is not added), else "exact" or "near". `key` is unused (kept for symmetry)."""
        return self._check(*self._prepare(text))

    def add(self, key: str, text: str) -> None:
        """Record `text` under `key`; a key already in the index is ignored."""
        self._add(key, *self._prepare(text))

    def check_and_add(self, key: str, text: str) -> str | None:
        digest, mh = self._prepare(text)
        reason = self._check(digest, mh)
        if reason is None:
            self._add(key, digest, mh)
        return reason

    def __len__(self) -> int:
        return len(self._keys)
