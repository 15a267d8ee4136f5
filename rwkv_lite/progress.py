"""The one progress protocol of every long operation: convert, verify, perplexity, bench, the batch job.

    def progress(done: int, total: int, info: str | None = None) -> None: ...

`done` counts units finished out of `total` (tensors for convert, bytes for verify and a cold file's read-ahead,
tokens for perplexity, stages for bench); `info` names what was just done or what starts now (a tensor name, a
stage, a running score), or is None. Calls come from the thread doing the work; `done` never decreases.
The command line turns it into a progress bar (rwkv_lite/cli/common.py, ProgressBar)."""
from __future__ import annotations

from typing import Optional, Protocol


class Progress(Protocol):
    def __call__(self, done: int, total: int, info: Optional[str] = None) -> None: ...
