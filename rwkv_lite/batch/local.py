"""The batch runner that computes in this process (LocalRunner): generation on the continuous-batching engine
(rwkv_lite/engine.py), perplexity one text at a time in sequence mode. rwkv_lite/ray.py has the Ray Data runner
with the same run(jobs, settings, emit, fail) interface.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

from ..errors import RwkvLiteError
from .output import generation_record, perplexity_record
from .schema import BatchError, Failure, Job, JobSettings


# Sequences decoded together by default. A batch job has no latency to protect, so it takes more than the server's
# default: on a 2-core Zen 5 VM, 256 prompts of the 1.5B int4 shape ran 3.15x one by one at 32 against 3.05x at 16
# (docs/performance.md), for one more state per sequence (12.6 MB at 1.5B, 34 MB at 7B).
DEFAULT_MAX_BATCH = 32


class LocalRunner:
    """Computes jobs in this process: generation with the continuous-batching engine (`max_batch` sequences
    decoded together), perplexity one text at a time in sequence mode.

    `model`: a loaded Model, a model file's path, or a function returning a Model; a path or function is used
    on first need (a job with nothing left to do never maps the model)."""

    def __init__(self, model, *, max_batch: int = DEFAULT_MAX_BATCH):
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
        from ..engine import Engine
        from ..model import CHUNK_TOKENS
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
        from ..evaluate import scoring_steps
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
