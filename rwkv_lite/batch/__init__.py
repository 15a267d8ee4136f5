"""Offline batch jobs: a JSONL file of prompts in, a JSONL file of results out, resumable (docs/batch.md).

    settings = JobSettings(task="generate", max_tokens=64, sampling={"temperature": 0})
    summary = run_job("prompts.jsonl", "results.jsonl", settings, LocalRunner(model_path))

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

The modules: schema.py (the input schema, validation, JobSettings), output.py (result records and the resumable
ResultFile), local.py (LocalRunner), job.py (run_job).
"""
from .job import FLUSH_SECONDS, JobSummary, run_job
from .local import DEFAULT_MAX_BATCH, LocalRunner
from .output import PARTIAL_SUFFIX, OpenedOutput, ResultFile, generation_record, perplexity_record, result_line
from .schema import (DEFAULT_MAX_TOKENS, GENERATE_FIELDS, PERPLEXITY_FIELDS, SAMPLING_FIELDS, TASKS, BatchError,
                     Failure, InputScan, Job, JobSettings, LineError, check_fields, check_id, id_key, read_jobs)

__all__ = ["TASKS", "DEFAULT_MAX_TOKENS", "DEFAULT_MAX_BATCH", "FLUSH_SECONDS", "PARTIAL_SUFFIX", "SAMPLING_FIELDS",
           "GENERATE_FIELDS", "PERPLEXITY_FIELDS", "BatchError", "LineError", "Job", "InputScan", "Failure",
           "JobSettings", "id_key", "check_fields", "check_id", "read_jobs", "LocalRunner", "generation_record", "perplexity_record",
           "result_line", "OpenedOutput", "ResultFile", "JobSummary", "run_job"]
