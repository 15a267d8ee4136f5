"""One batch job from start to end (run_job): read and check the input, open or resume the output, hand the
pending lines to a runner, write its results in groups, and make OUTPUT once every line is done (JobSummary says
what happened).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .output import PARTIAL_SUFFIX, ResultFile
from .schema import BatchError, Failure, JobSettings, read_jobs

FLUSH_SECONDS = 0.5               # results are written and fsynced at least this often while lines complete


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
