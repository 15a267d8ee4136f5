"""What a batch job writes: the result record of each task (generation_record, perplexity_record), and the
resumable output file (ResultFile): lines appended to OUTPUT.partial, flushed and fsynced; on resume a torn last
line is cut off and every complete line's id counts as done; OUTPUT appears, by rename and in input order, only
when every line has its result.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .schema import BatchError, Job, id_key

PARTIAL_SUFFIX = ".partial"
# What marks a result line of each task (used to refuse resuming one task's output with the other task)
_RESULT_MARK = {"generate": "finish_reason", "perplexity": "perplexity"}


def generation_record(job: Job, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict:
    record = {"id": job.id, "text": text, "finish_reason": finish_reason, "prompt_tokens": int(prompt_tokens),
              "completion_tokens": int(completion_tokens)}
    return _with_metadata(job, record)


def perplexity_record(job: Job, tokens: int, total_nll: float, n_bytes: int) -> dict:
    """Scores of ids[1:] given the tokens before (the model starts from its initial state, as `rwkv-lite
    perplexity`); a one-token text has nothing scored, so its scores are null."""
    predicted = max(0, tokens - 1)
    nll = total_nll / predicted if predicted else None
    record = {"id": job.id, "tokens": int(tokens), "predicted": predicted,
              "logprob": -total_nll if predicted else None, "nll": nll,
              "perplexity": math.exp(nll) if nll is not None and nll < 700 else (None if nll is None else math.inf),
              "bits_per_byte": total_nll / math.log(2) / n_bytes if predicted and n_bytes else None}
    return _with_metadata(job, record)



def _with_metadata(job: Job, record: dict) -> dict:
    if "metadata" in job.fields:
        record["metadata"] = job.fields["metadata"]
    return record


def result_line(record: dict) -> bytes:
    """One output line. Non-finite numbers become null (strict JSON); U+2028/2029 stay raw (JSONL splits on \\n)."""
    return (json.dumps(_finite(record), ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


@dataclass
class OpenedOutput:
    done: set[str]                 # ids (as keys) that already have a result line
    resumed_lines: int = 0         # complete lines found in an earlier run's file
    dropped_bytes: int = 0         # a torn last line cut off (bytes)
    complete_file: bool = False    # the results came from a finished OUTPUT (not OUTPUT.partial)


class ResultFile:
    """The job's output: lines accumulate in OUTPUT.partial (appended, flushed, fsynced) and OUTPUT appears, by
    rename, only once every line is done. One writer at a time (an exclusive lock on OUTPUT.partial)."""

    def __init__(self, path: str | os.PathLike, task: str):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        self.task = task
        self._file = None

    # -- opening and resuming ----------------------------------------------------------------------------------
    def open(self) -> OpenedOutput:
        """Find what is done; the file for appending is opened by begin() (not needed when nothing is to do)."""
        if self.path.is_dir():
            raise BatchError(f"{self.path}: is a folder; give the output file's path")
        if not self.path.parent.is_dir():
            raise BatchError(f"{self.path}: the folder {self.path.parent} does not exist")
        if self.partial.exists():
            keys, dropped = self._scan(self.partial, may_be_torn=True)
            return OpenedOutput(set(keys), len(keys), dropped)
        if self.path.exists():
            keys, _ = self._scan(self.path, may_be_torn=False)
            return OpenedOutput(set(keys), len(keys), 0, complete_file=True)
        return OpenedOutput(set())

    def _scan(self, path: Path, may_be_torn: bool) -> tuple[list[str], int]:
        """The ids of the complete result lines of `path`; a torn last line (no newline: the writer died
        mid-line) is cut off when `may_be_torn`, so the file ends with a whole line before anything is added."""
        try:
            data = path.read_bytes()
        except OSError as e:
            raise BatchError(f"{path}: cannot read the earlier results: {e.strerror or e}") from None
        body, sep, tail = data.rpartition(b"\n")
        if not sep:
            body, tail = b"", data
        if tail and not may_be_torn:
            raise BatchError(f"{path}: exists and does not end with a complete line, so it is not a finished "
                             "result file of this command; give another output path or move it away")
        keys = []
        mark = _RESULT_MARK[self.task]
        for number, raw in enumerate(body.split(b"\n") if body else [], 1):
            doc = None
            try:
                doc = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError):
                pass
            if not (isinstance(doc, dict) and "id" in doc and mark in doc):
                other = [t for t, m in _RESULT_MARK.items() if t != self.task and isinstance(doc, dict) and m in doc]
                why = (f"it holds results of --task {other[0]}, not {self.task}" if other else
                       f"line {number} is not a result line of --task {self.task}")
                raise BatchError(f"{path}: {why}; give another output path or move the file away")
            keys.append(id_key(doc["id"]))
        if tail:
            with open(path, "r+b") as f:
                f.truncate(len(data) - len(tail))
                f.flush()
                os.fsync(f.fileno())
        return keys, len(tail)

    def begin(self, opened: OpenedOutput) -> None:
        """Open OUTPUT.partial for appending (a finished OUTPUT whose input has grown becomes the partial file)."""
        if opened.complete_file:
            os.replace(self.path, self.partial)
        self._file = open(self.partial, "ab")
        try:
            _lock(self._file, self.partial)
        except BaseException:
            self._file.close()
            self._file = None
            raise
        _fsync_folder(self.partial.parent)

    # -- writing -----------------------------------------------------------------------------------------------
    def append(self, records: Iterable[dict]) -> None:
        data = b"".join(result_line(r) for r in records)
        if data:
            self._file.write(data)
            self._file.flush()
            os.fsync(self._file.fileno())

    def finish(self, keys_in_order: Sequence[str]) -> int:
        """Every input id has its line: make OUTPUT (in input order) and remove the partial file. Returns the
        number of lines whose id is not in the input (kept, at the end)."""
        self.close()
        data = self.partial.read_bytes()
        lines = [raw + b"\n" for raw in data.split(b"\n")[:-1]]
        keys = [id_key(json.loads(raw)["id"]) for raw in lines]
        wanted = set(keys_in_order)
        extra = [line for line, k in zip(lines, keys) if k not in wanted]
        if keys != list(keys_in_order):       # a resumed run appended retried lines after later ones: reorder
            by_key = {}
            for line, k in zip(lines, keys):
                by_key.setdefault(k, line)
            ordered = b"".join(by_key[k] for k in keys_in_order) + b"".join(extra)
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "wb") as f:
                f.write(ordered)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            os.unlink(self.partial)
        else:
            os.replace(self.partial, self.path)
        _fsync_folder(self.path.parent)
        return len(extra)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _lock(handle, path: Path) -> None:
    try:
        import fcntl
    except ImportError:                        # Windows: no advisory locks here; one job per output is on the user
        return
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise BatchError(f"{path}: another batch job is writing this output right now") from None


def _fsync_folder(folder: Path) -> None:
    """Make a created or renamed file's name durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
