"""What a batch job reads: the JSONL input schema of each task, every line validated before any model work
(read_jobs, check_fields), and the job-wide settings a line's own fields override (JobSettings), which turn a line
into engine.submit() arguments. Also the errors of batch jobs and the Failure a runner reports for a line.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..chat_format import CHAT_STOP, ChatFormatError, chat_prompt_ids
from ..errors import RwkvLiteError
from ..sampling import SamplingError, SamplingParams

TASKS = ("generate", "perplexity")
DEFAULT_MAX_TOKENS = 100          # as `rwkv-lite generate`

# Per-line sampling fields (SamplingParams' names) and what each must be
_NUMBERS = {"temperature": (0.0, math.inf), "top_p": (0.0, 1.0), "min_p": (0.0, 1.0),
            "presence_penalty": (-math.inf, math.inf), "frequency_penalty": (-math.inf, math.inf),
            "penalty_decay": (0.0, 1.0)}
_WHOLE = ("top_k", "seed")
SAMPLING_FIELDS = tuple(_NUMBERS) + _WHOLE
GENERATE_FIELDS = ("id", "prompt", "messages", "max_tokens", "stop", "metadata") + SAMPLING_FIELDS
PERPLEXITY_FIELDS = ("id", "text", "metadata")


class BatchError(RwkvLiteError):
    """A batch job that cannot run or continue: unreadable input, a strict job's bad line, a foreign output file."""


class LineError(RwkvLiteError, ValueError):
    """One input line (or Ray row) that is not a valid job; the message says why."""



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



@dataclass
class Failure:
    """A line whose computation failed (it gets no result line; the job stays incomplete)."""
    job: Job
    message: str
