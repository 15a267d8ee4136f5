"""Offline batch jobs: a JSONL file of prompts in, a JSONL file of results out, resumable (docs/batch.md).

    settings = JobSettings(task="generate", max_tokens=64, sampling={"temperature": 0})
    summary = run_job("prompts.jsonl", "results.jsonl", settings, LocalRunner(model_path, max_batch=16))

The steps of run_job:
  1. read_jobs() validates every input line (JSON object, known fields of the right types, unique ids) before any
     model work: a bad line is reported with its line number and skipped (or, strict, fails the job at once);
  2. ResultFile opens the output: results accumulate in OUTPUT.partial, and when a run finds one it resumes: a torn
     last line (the process died mid-write) is cut off, every complete line's id counts as done and is not redone;
  3. a runner (LocalRunner here: the continuous-batching engine; rwkv_lite.ray: Ray Data actors) computes the
     pending lines and hands back results in input order; they are appended, flushed and fsynced in groups
     (at least every FLUSH_SECONDS), so a crash loses at most the last group, and never leaves a torn line behind
     that a later run would keep;
  4. when every valid input line has a result, OUTPUT.partial becomes OUTPUT (renamed; rewritten first in input
     order if a resumed run's retried lines came after later ones). OUTPUT therefore exists only when complete.

A line's result does not depend on the other lines or on how the job was split: it equals
`rwkv_lite.generate.generate(model, prompt, ...)` with the same options and seed (the engine's rows equal the
single-sequence forward; see rwkv_lite/engine.py), so a resumed or distributed job writes what one run would.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .chat_format import CHAT_STOP, ChatFormatError, chat_prompt_ids
from .errors import RwkvLiteError
from .sampling import SamplingError, SamplingParams

TASKS = ("generate", "perplexity")
DEFAULT_MAX_TOKENS = 100          # as `rwkv-lite generate`
FLUSH_SECONDS = 0.5               # results are written and fsynced at least this often while lines complete
PARTIAL_SUFFIX = ".partial"

# Per-line sampling fields (SamplingParams' names) and what each must be
_NUMBERS = {"temperature": (0.0, math.inf), "top_p": (0.0, 1.0), "min_p": (0.0, 1.0),
            "presence_penalty": (-math.inf, math.inf), "frequency_penalty": (-math.inf, math.inf),
            "penalty_decay": (0.0, 1.0)}
_WHOLE = ("top_k", "seed")
SAMPLING_FIELDS = tuple(_NUMBERS) + _WHOLE
GENERATE_FIELDS = ("id", "prompt", "messages", "max_tokens", "stop", "metadata") + SAMPLING_FIELDS
PERPLEXITY_FIELDS = ("id", "text", "metadata")
# What marks a result line of each task (used to refuse resuming one task's output with the other task)
_RESULT_MARK = {"generate": "finish_reason", "perplexity": "perplexity"}


class BatchError(RwkvLiteError):
    """A batch job that cannot run or continue: unreadable input, a strict job's bad line, a foreign output file."""


class LineError(RwkvLiteError, ValueError):
    """One input line (or Ray row) that is not a valid job; the message says why."""


# ------------------------------------------------------------------------------------------------------- input
@dataclass
class Job:
    """One valid input line. `key` is the id as JSON text: ids 5 and "5" are different ids."""
    line: int                      # 1-based line number in the input file (0: not from a file)
    id: int | str
    fields: dict                   # the validated fields other than `id`

    @property
    def key(self) -> str:
        return id_key(self.id)

    def as_row(self) -> dict:
        return {"id": self.id, **self.fields}


def id_key(value) -> str:
    return json.dumps(value, ensure_ascii=False)


@dataclass
class InputScan:
    jobs: list[Job]
    bad: list[tuple[int, str]]     # (line number, why) of every line skipped
    blank: int = 0                 # empty or whitespace-only lines (ignored, not reported)


class _NoTokens:
    """A tokenizer that encodes everything to nothing: lets the chat formatter check a messages list's shape
    without a model."""
    @staticmethod
    def encode(text: str) -> list[int]:
        return []


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_fields(doc, task: str) -> dict:
    """The job fields of one input object (without `id`), validated; raises LineError naming the problem."""
    if not isinstance(doc, dict):
        raise LineError(f"expected a JSON object, got {type(doc).__name__ if doc is not None else 'null'}")
    known = GENERATE_FIELDS if task == "generate" else PERPLEXITY_FIELDS
    unknown = [k for k in doc if k not in known]
    if unknown:
        if task == "perplexity" and "text" not in doc:
            raise LineError(f"no 'text' to score (--task perplexity reads 'text'; this line has {unknown[0]!r})")
        listed = ", ".join(k for k in known if k != "metadata")
        raise LineError(f"unknown field {unknown[0]!r} (known: {listed}; anything else goes under 'metadata')")
    fields = {k: v for k, v in doc.items() if k != "id" and v is not None}
    if task == "perplexity":
        text = fields.get("text")
        if not isinstance(text, str) or not text:
            raise LineError("'text' must be a non-empty string (the text to score)")
        return fields
    if ("prompt" in fields) == ("messages" in fields):
        raise LineError("give exactly one of 'prompt' (text) and 'messages' (a chat)")
    if "prompt" in fields:
        prompt = fields["prompt"]
        if not isinstance(prompt, str) and not (isinstance(prompt, list) and prompt
                                                and all(_is_int(t) and t >= 0 for t in prompt)):
            raise LineError("'prompt' must be a string or a non-empty list of token ids")
    else:
        try:
            chat_prompt_ids(_NoTokens, fields["messages"])
        except ChatFormatError as e:
            raise LineError(str(e)) from None
    if "max_tokens" in fields and (not _is_int(fields["max_tokens"]) or fields["max_tokens"] < 0):
        raise LineError(f"'max_tokens' must be a whole number >= 0, got {fields['max_tokens']!r}")
    if "stop" in fields:
        stop = fields["stop"]
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or any(not isinstance(s, str) or not s for s in stop):
            raise LineError("'stop' must be a non-empty string or a list of them")
        fields["stop"] = stop
    for name, (low, high) in _NUMBERS.items():
        v = fields.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                              or not low <= v <= high):
            bounds = f"in [{low:g}, {high:g}]" if math.isfinite(high) else (f">= {low:g}" if math.isfinite(low)
                                                                            else "finite")
            raise LineError(f"'{name}' must be a number {bounds}, got {v!r}")
    for name in _WHOLE:
        v = fields.get(name)
        if v is not None and (not _is_int(v) or v < 0):
            raise LineError(f"'{name}' must be a whole number >= 0, got {v!r}")
    return fields


def check_id(doc: dict, line: int):
    value = doc.get("id")
    if value is None:
        return line
    if not (isinstance(value, str) or _is_int(value)):
        raise LineError(f"'id' must be a string or an integer, got {value!r}")
    return value


def read_jobs(path: str | os.PathLike, task: str = "generate") -> InputScan:
    """Every line of a JSONL file checked (nothing is tokenized or computed). Raises BatchError when the file
    cannot be read at all; a bad line goes to `bad` with its number and the reason."""
    if task not in TASKS:
        raise BatchError(f"unknown task {task!r} (tasks: {', '.join(TASKS)})")
    path = Path(path)
    try:
        handle = open(path, "rb")
    except IsADirectoryError:
        raise BatchError(f"{path}: is a folder, not a JSONL file") from None
    except OSError as e:
        raise BatchError(f"{path}: cannot read the input: {e.strerror or e}") from None
    scan = InputScan([], [])
    first_line_of: dict[str, int] = {}
    with handle:
        for number, raw in enumerate(handle, 1):
            if not raw.strip():
                scan.blank += 1
                continue
            try:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise LineError("not valid UTF-8") from None
                if number == 1 and text.startswith("\ufeff"):
                    text = text[1:]                      # a byte-order mark some editors write
                try:
                    doc = json.loads(text)
                except json.JSONDecodeError as e:
                    raise LineError(f"not valid JSON ({e.msg} at column {e.colno})") from None
                fields = check_fields(doc, task)
                job = Job(number, check_id(doc, number), fields)
                earlier = first_line_of.get(job.key)
                if earlier is not None:
                    raise LineError(f"duplicate id {job.key} (first used on line {earlier}); ids must be unique "
                                    "because a resumed job skips the ids it has done")
                first_line_of[job.key] = number
                scan.jobs.append(job)
            except LineError as e:
                scan.bad.append((number, str(e)))
    return scan


# ---------------------------------------------------------------------------------------------------- settings
@dataclass
class JobSettings:
    """Job-wide defaults that every line may override with its own fields.

    sampling   SamplingParams values given for the whole job (the command line's --temperature, --seed...);
               absent ones take SamplingParams' defaults. A line whose temperature comes out 0 is greedy with
               the repetition penalties off unless given (as `rwkv-lite generate --temperature 0`).
    """
    task: str = "generate"
    max_tokens: int = DEFAULT_MAX_TOKENS
    sampling: dict = field(default_factory=dict)
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if self.task not in TASKS:
            raise BatchError(f"unknown task {self.task!r} (tasks: {', '.join(TASKS)})")
        unknown = [k for k in self.sampling if k not in SAMPLING_FIELDS]
        if unknown:
            raise BatchError(f"unknown sampling setting {unknown[0]!r} (settings: {', '.join(SAMPLING_FIELDS)})")
        self.sampling = {k: v for k, v in self.sampling.items() if v is not None}
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        try:
            self.params_for({})
        except SamplingError as e:
            raise BatchError(str(e)) from None

    def params_for(self, fields: dict) -> SamplingParams:
        given = {**self.sampling, **{k: fields[k] for k in SAMPLING_FIELDS if k in fields}}
        if given.get("temperature") == 0:
            return SamplingParams.greedy(**given)
        return SamplingParams(**given)

    def request_for(self, fields: dict, tokenizer) -> dict:
        """engine.submit() arguments for one line: prompt, max_tokens, params, stop."""
        stop = tuple(self.stop) + tuple(fields.get("stop", ()))
        if "messages" in fields:
            prompt, _ = chat_prompt_ids(tokenizer, fields["messages"])
            stop = (CHAT_STOP,) + stop
        else:
            prompt = fields["prompt"]
        return {"prompt": prompt, "max_tokens": int(fields.get("max_tokens", self.max_tokens)),
                "params": self.params_for(fields), "stop": stop}

    def as_dict(self) -> dict:
        return {"task": self.task, "max_tokens": self.max_tokens, "sampling": dict(self.sampling),
                "stop": list(self.stop)}


# ------------------------------------------------------------------------------------------------ computing
@dataclass
class Failure:
    job: Job
    message: str


class LocalRunner:
    """Computes jobs in this process: generation with the continuous-batching engine (`max_batch` sequences
    decoded together), perplexity one text at a time in sequence mode.

    `model`: a loaded Model, a model file's path, or a function returning a Model; a path or function is used
    on first need (a job with nothing left to do never maps the model)."""

    def __init__(self, model, *, max_batch: int = 16):
        self._model = self._load = None
        if isinstance(model, (str, os.PathLike)):
            path = Path(model)

            def load():
                import rwkv_lite
                return rwkv_lite.load(path)
            self._load = load
        elif callable(model) and not hasattr(model, "forward_batch"):
            self._load = model
        else:
            self._model = model
        if int(max_batch) < 1:
            raise BatchError(f"max_batch must be >= 1, got {max_batch!r}")
        self.max_batch = int(max_batch)
        self.metrics = None            # the engine's counters (EngineMetrics) of the last generation run

    @property
    def model(self):
        if self._model is None:
            self._model = self._load()
            if self._model.tokenizer is None:
                raise BatchError(f"{self._model.path}: the model has no tokenizer, so it cannot read text")
        return self._model

    def run(self, jobs: Sequence[Job], settings: JobSettings, emit: Callable[[list[dict]], None],
            fail: Callable[[Failure], None]) -> None:
        """Compute `jobs`; call emit(records) with results in job order (possibly several at a time) and
        fail(Failure) for a line whose computation failed (no record for it)."""
        if settings.task == "perplexity":
            self._perplexity(jobs, emit, fail)
        else:
            self._generate(jobs, settings, emit, fail)

    def _generate(self, jobs, settings, emit, fail) -> None:
        from .engine import Engine
        from .model import CHUNK_TOKENS
        model = self.model
        # Prompts are read as generate() reads them (chunks of CHUNK_TOKENS), so each line's text is the same
        engine = Engine(model, max_batch=self.max_batch, max_queue=None, prefill_chunk=CHUNK_TOKENS)
        self.metrics = engine.metrics
        window = max(4 * self.max_batch, 32)       # lines submitted but not yet emitted: bounds held results
        pending: list[tuple[Job, object]] = []     # (job, Request or Failure) in job order
        todo = iter(jobs)
        exhausted = False
        try:
            while True:
                while not exhausted and len(pending) < window:
                    job = next(todo, None)
                    if job is None:
                        exhausted = True
                        break
                    try:
                        pending.append((job, engine.submit(**settings.request_for(job.fields, model.tokenizer))))
                    except RwkvLiteError as e:    # e.g. a token id outside this model's vocabulary
                        pending.append((job, Failure(job, str(e))))
                if not pending:
                    return
                if engine.has_work():
                    engine.step()
                done = 0
                while done < len(pending) and (isinstance(pending[done][1], Failure)
                                               or pending[done][1].finish_reason is not None):
                    done += 1
                if done:
                    records = []
                    for job, outcome in pending[:done]:
                        if isinstance(outcome, Failure):
                            fail(outcome)
                        elif outcome.finish_reason in ("stop", "length"):
                            records.append(generation_record(job, outcome.text, outcome.finish_reason,
                                                             outcome.usage.prompt_tokens,
                                                             outcome.usage.completion_tokens))
                        else:
                            fail(Failure(job, outcome.error or f"generation ended: {outcome.finish_reason}"))
                    del pending[:done]
                    if records:
                        emit(records)
        finally:
            for _, outcome in pending:
                if not isinstance(outcome, Failure):
                    outcome.cancel()

    def _perplexity(self, jobs, emit, fail) -> None:
        from .evaluate import scoring_steps
        model = self.model
        for job in jobs:
            try:
                ids = model.tokenizer.encode(job.fields["text"])
                total = 0.0
                if len(ids) >= 2:
                    for _, total in scoring_steps(model, ids):
                        pass
                n_bytes = len(model.tokenizer.decode_bytes(ids[1:]))
            except RwkvLiteError as e:
                fail(Failure(job, str(e)))
                continue
            emit([perplexity_record(job, len(ids), total, n_bytes)])


def generation_record(job: Job, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict:
    record = {"id": job.id, "text": text, "finish_reason": finish_reason, "prompt_tokens": int(prompt_tokens),
              "completion_tokens": int(completion_tokens)}
    if "metadata" in job.fields:
        record["metadata"] = job.fields["metadata"]
    return record


def perplexity_record(job: Job, tokens: int, total_nll: float, n_bytes: int) -> dict:
    """Scores of ids[1:] given the tokens before (the model starts from its initial state, as `rwkv-lite
    perplexity`); a one-token text has nothing scored, so its scores are null."""
    predicted = max(0, tokens - 1)
    nll = total_nll / predicted if predicted else None
    record = {"id": job.id, "tokens": int(tokens), "predicted": predicted,
              "logprob": -total_nll if predicted else None, "nll": nll,
              "perplexity": math.exp(nll) if nll is not None and nll < 700 else (None if nll is None else math.inf),
              "bits_per_byte": total_nll / math.log(2) / n_bytes if predicted and n_bytes else None}
    if "metadata" in job.fields:
        record["metadata"] = job.fields["metadata"]
    return record


# ---------------------------------------------------------------------------------------------------- output
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


# -------------------------------------------------------------------------------------------------- the job
@dataclass
class JobSummary:
    input: Path
    output: Path
    total: int = 0                 # valid input lines
    bad_lines: list[tuple[int, str]] = field(default_factory=list)
    already_done: int = 0          # lines found done when the job started
    done_now: int = 0              # lines completed by this run
    failures: list[Failure] = field(default_factory=list)
    tokens: int = 0                # generated (generate) or scored (perplexity) tokens in this run
    seconds: float = 0.0
    dropped_bytes: int = 0         # a torn last line removed when resuming
    extra_lines: int = 0           # output lines whose id is not in the input
    interrupted: bool = False
    complete: bool = False         # OUTPUT holds a line for every valid input line

    @property
    def done(self) -> int:
        return self.already_done + self.done_now


def run_job(input_path, output_path, settings: JobSettings, runner, *, strict: bool = False,
            on_bad_line: Callable[[int, str], None] | None = None,
            on_start: Callable[[JobSummary], None] | None = None, progress=None) -> JobSummary:
    """Run (or resume) a batch job; see the module docstring. `runner` has run(jobs, settings, emit, fail), as
    LocalRunner. Bad lines go to on_bad_line(line, why) (strict: BatchError before anything is computed).
    on_start(summary) is called once the input is read and the output opened. `progress(done, total, info)`
    (rwkv_lite.progress) counts this run's lines: `total` those left to do, `info` the tokens/s so far; it is
    called after each group of results is written. Ctrl-C stops the job with what is done kept
    (summary.interrupted)."""
    input_path, output_path = Path(input_path), Path(output_path)
    if input_path.resolve() == output_path.resolve() or \
            input_path.resolve() == output_path.with_name(output_path.name + PARTIAL_SUFFIX).resolve():
        raise BatchError(f"{output_path}: the output must not be the input file")
    scan = read_jobs(input_path, settings.task)
    summary = JobSummary(input_path, output_path, total=len(scan.jobs), bad_lines=scan.bad)
    for line, why in scan.bad:
        if on_bad_line is not None:
            on_bad_line(line, why)
    if scan.bad and strict:
        line, why = scan.bad[0]
        more = len(scan.bad) - 1
        raise BatchError(f"{input_path}:{line}: {why}"
                         + (f" (and {more} more bad line{'s' if more > 1 else ''})" if more else ""))
    if scan.bad and not scan.jobs:
        raise BatchError(f"{input_path}: no valid line (all {len(scan.bad)} were bad, e.g. line {scan.bad[0][0]}: "
                         f"{scan.bad[0][1]})")
    out = ResultFile(output_path, settings.task)
    opened = out.open()
    summary.dropped_bytes = opened.dropped_bytes
    todo = [job for job in scan.jobs if job.key not in opened.done]
    summary.already_done = len(scan.jobs) - len(todo)
    if on_start is not None:
        on_start(summary)
    keys_in_order = [job.key for job in scan.jobs]
    if not todo:
        if not opened.complete_file:           # everything was done but the rename had not happened
            out.begin(opened)
            summary.extra_lines = out.finish(keys_in_order)
        summary.complete = True
        return summary
    out.begin(opened)
    if progress is not None:
        progress(0, len(todo), None)
    start = time.perf_counter()
    buffer: list[dict] = []
    last_flush = [time.monotonic()]

    def flush() -> None:
        if buffer:
            out.append(buffer)
            summary.done_now += len(buffer)
            buffer.clear()
        last_flush[0] = time.monotonic()
        summary.seconds = time.perf_counter() - start
        if progress is not None:
            rate = summary.tokens / summary.seconds if summary.seconds > 0 else 0.0
            progress(summary.done_now, len(todo), f"{rate:.1f} tokens/s")

    def emit(records: list[dict]) -> None:
        buffer.extend(records)
        summary.tokens += sum(int(r.get("completion_tokens", r.get("tokens", 0)) or 0) for r in records)
        if time.monotonic() - last_flush[0] >= FLUSH_SECONDS:
            flush()

    def fail(failure: Failure) -> None:
        summary.failures.append(failure)

    try:
        runner.run(todo, settings, emit, fail)
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        try:
            flush()
        finally:
            summary.seconds = time.perf_counter() - start
            if summary.interrupted or summary.failures or summary.done < summary.total:
                out.close()
    if not summary.interrupted and not summary.failures and summary.done == summary.total:
        summary.extra_lines = out.finish(keys_in_order)
        summary.complete = True
    return summary
