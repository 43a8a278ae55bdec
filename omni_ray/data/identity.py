"""Count repeated sample ids without holding every id.

Ids identify samples for the user (reports, rejects), never for training: two files that
both number ids from "0" are two different samples each. ``data prepare`` and ``data check``
still count repeats, because a repeated id often means a file was listed twice.

Ids are kept as 64-bit hashes in sorted numpy arrays (16 bytes per row with its position),
merged in growing chunks, so ten million rows cost ~160 MB at most and no Python object per
row; the ids of the pending chunk are kept as text, which is where the examples come from.
"""

from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["DuplicateIds"]


def _hash(sample_id: str) -> int:
    digest = hashlib.blake2b(sample_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


class DuplicateIds:
    """``add(id, row)`` for each row; ``report()`` -> ``{"count": n, "examples": [...]}``.

    ``count`` is the number of rows whose id an earlier row already had; each example names
    the id and the rows of its first and repeated occurrence. (A 64-bit hash collision would
    count one false repeat in ~10^11 pairs; the examples show the real ids.)
    """

    def __init__(self, max_examples: int = 5, chunk: int = 1 << 16) -> None:
        self.max_examples = max_examples
        self._min_chunk = chunk
        self._hashes = np.empty(0, np.int64)  # sorted; first occurrence of each id
        self._rows = np.empty(0, np.int64)
        self._pending: list[tuple[int, int, str]] = []
        self.count = 0
        self.examples: list[dict] = []

    def add(self, sample_id: str, row: int) -> None:
        self._pending.append((_hash(sample_id), int(row), sample_id))
        # Chunks grow with the table so merging costs O(N log N) overall, not O(N^2).
        if len(self._pending) >= max(self._min_chunk, len(self._hashes) // 4):
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        hashes = np.fromiter((p[0] for p in pending), np.int64, len(pending))
        idx = np.searchsorted(self._hashes, hashes)
        hit = idx < len(self._hashes)
        hit[hit] = self._hashes[idx[hit]] == hashes[hit]
        fresh: dict[int, int] = {}  # hash -> first row, among this chunk's new ids
        for k, (h, row, sample_id) in enumerate(pending):
            first = int(self._rows[idx[k]]) if hit[k] else fresh.get(h)
            if first is None:
                fresh[h] = row
                continue
            self.count += 1
            if len(self.examples) < self.max_examples:
                self.examples.append({"id": sample_id, "rows": [first, row]})
        if fresh:
            merged_h = np.concatenate([self._hashes, np.fromiter(fresh.keys(), np.int64, len(fresh))])
            merged_r = np.concatenate([self._rows, np.fromiter(fresh.values(), np.int64, len(fresh))])
            order = np.argsort(merged_h, kind="stable")
            self._hashes, self._rows = merged_h[order], merged_r[order]

    def report(self) -> dict:
        self._flush()
        return {"count": self.count, "examples": list(self.examples)}
