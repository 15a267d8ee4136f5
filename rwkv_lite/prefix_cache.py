"""Prefix state cache: the model state after a prompt prefix, so a prompt that extends it reads only the rest.

RWKV's whole context is a fixed-size state, so "the KV cache of a prefix" is one small object (a few MB for a 7B
model). Entries are keyed by the exact token ids of the prefix and hold the state after them plus the logits of
their last token (so a prompt that IS a cached prefix needs no forward pass at all). Least recently used entries
are evicted to keep the total under `max_bytes`.

A lookup finds the longest cached prefix of a prompt. Keys are grouped by length, and each length is probed with
one dictionary lookup of the prompt's prefix of that length, so the cost grows with the number of distinct
cached lengths, not with the number of entries.
"""
from __future__ import annotations

import collections
import threading

import numpy as np


class PrefixCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._entries: collections.OrderedDict[tuple, tuple] = collections.OrderedDict()
        self._lengths: collections.Counter = collections.Counter()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def store(self, ids, state, logits) -> None:
        """Keep (a copy of) `state` and `logits` as the result of reading `ids` from the initial state."""
        key = tuple(int(t) for t in ids)
        if not key:
            return
        size = state.nbytes() + np.asarray(logits).nbytes + 8 * len(key) + 200
        if size > self.max_bytes:
            return
        entry = (state.copy(), np.array(logits, dtype=np.float32), size)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[2]
                self._lengths[len(key)] -= 1
            self._entries[key] = entry
            self._lengths[len(key)] += 1
            self._bytes += size
            while self._bytes > self.max_bytes:
                k, (_, _, s) = self._entries.popitem(last=False)
                self._bytes -= s
                self._lengths[len(k)] -= 1
                if not self._lengths[len(k)]:
                    del self._lengths[len(k)]
                self.evictions += 1

    def lookup(self, ids):
        """(n, state copy, logits) for the longest cached prefix ids[:n] (n >= 1), or None."""
        ids = tuple(int(t) for t in ids)
        with self._lock:
            for n in sorted((n for n in self._lengths if n <= len(ids)), reverse=True):
                entry = self._entries.get(ids[:n])
                if entry is not None:
                    self._entries.move_to_end(ids[:n])
                    self.hits += 1
                    return n, entry[0].copy(), entry[1].copy()
            self.misses += 1
            return None
