"""Helpers shared by the tokenizers: UTF-8 encoding with a clear error, and token id validation."""
from __future__ import annotations

import numpy as np


def utf8_encode(text: str) -> bytes:
    """UTF-8 bytes of `text`; a lone surrogate (not encodable) is a ValueError naming its position."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"text contains an unpaired surrogate U+{ord(text[err.start]):04X} at index {err.start}; "
            "it has no UTF-8 encoding (the reference tokenizer raises too)") from None
    except AttributeError:
        raise TypeError(f"encode() takes a str, not {type(text).__name__}") from None


def check_ids(ids, n_ids: int, what: str):
    """Return `ids` as a list or tuple of ints in [0, n_ids); ValueError naming an id outside that range."""
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise ValueError(f"token ids must be a 1-D integer array, got {ids.dtype} with shape {ids.shape}")
        bad = np.flatnonzero((ids < 0) | (ids >= n_ids))
        if bad.size:
            raise ValueError(f"token id {int(ids[bad[0]])} is not in the {what} (ids 0..{n_ids - 1})")
        return ids.tolist()
    if not isinstance(ids, (list, tuple)):
        ids = list(ids)
    if ids:
        low, high = min(ids), max(ids)
        if low < 0 or high >= n_ids:
            bad = low if low < 0 else high
            raise ValueError(f"token id {bad} is not in the {what} (ids 0..{n_ids - 1})")
    return ids
