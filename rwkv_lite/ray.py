"""Batch generation and scoring on Ray Data (the `ray` extra: pip install 'rwkv-lite[ray]'); docs/batch.md.

    import ray
    from rwkv_lite.ray import generate_dataset
    ds = ray.data.read_parquet("s3://bucket/prompts/")     # a `prompt` or `messages` column, optional parameters
    out = generate_dataset(ds, "/models/g1-1.5b-int4.safetensors", concurrency=4, num_cpus=2, max_tokens=64)
    out.write_parquet("s3://bucket/results/")

Each actor of the pool maps the model file once (every actor on a node shares the same page-cache copy of the
weights) and runs its batches through the continuous-batching engine with its kernel threads set to the CPUs Ray
gave it, so actors do not fight over cores. The model file must be readable at the same path on every node (and
rwkv-lite installed there); generate_dataset checks both on every node before it builds the pipeline.

`rwkv-lite batch ... --ray [ADDRESS]` runs a JSONL job this way (RayRunner): the driver reads and validates the
input, keeps the resumable output (rwkv_lite/batch/output.py) and writes results in input order.
"""
from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path
from typing import Sequence

from .batch import (DEFAULT_MAX_BATCH, GENERATE_FIELDS, PERPLEXITY_FIELDS, BatchError, Failure, Job, JobSettings,
                    LineError, LocalRunner, check_fields)
from .errors import RwkvLiteError

RESULT_TYPES = {
    "generate": (("text", "string"), ("finish_reason", "string"), ("prompt_tokens", "int64"),
                 ("completion_tokens", "int64"), ("error", "string")),
    "perplexity": (("tokens", "int64"), ("predicted", "int64"), ("logprob", "float64"), ("nll", "float64"),
                   ("perplexity", "float64"), ("bits_per_byte", "float64"), ("error", "string")),
}
_ENCODED_JOB = "_rwkv_lite_job"          # the JSONL runner's rows: one JSON-encoded job each (any field types)
_ENCODED_RESULT = "_rwkv_lite_result"


def import_ray():
    """The ray module, or a clear error naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise RwkvLiteError("Ray is not installed: pip install 'rwkv-lite[ray]' (Ray Data is needed)") from None
    return ray


class BatchWorker:
    """A Ray Data actor: maps the model once, then computes each batch of rows with the engine."""

    def __init__(self, model_path: str, settings: dict, max_batch: int, threads: int, encoded: bool):
        from .kernels.threads import set_threads
        set_threads(threads)                   # only the CPUs Ray reserved for this actor
        self.settings = JobSettings(**settings)
        self.encoded = encoded
        try:
            self.runner = LocalRunner(model_path, max_batch=max_batch)
            self.runner.model                  # map it now: a bad file fails the actor, not a batch
        except RwkvLiteError as e:
            raise RwkvLiteError(f"on node {socket.gethostname()}: {e}") from None

    def __call__(self, table):
        import pyarrow as pa
        rows = table.to_pylist()
        jobs, errors = [], {}
        for i, row in enumerate(rows):
            try:
                if self.encoded:
                    doc = json.loads(row[_ENCODED_JOB])
                    jobs.append(Job(doc["line"], i, doc["fields"]))
                else:
                    jobs.append(Job(0, i, row_fields(row, self.settings.task)))
            except LineError as e:
                errors[i] = str(e)
        records: dict[int, dict] = {}

        def emit(batch):
            for record in batch:
                records[record["id"]] = record

        def fail(failure: Failure):
            errors[failure.job.id] = failure.message

        self.runner.run(jobs, self.settings, emit, fail)
        if self.encoded:
            results = []
            for i, row in enumerate(rows):
                if i in records:
                    record = records[i]
                    record["id"] = json.loads(row[_ENCODED_JOB])["id"]
                    results.append(json.dumps(record, ensure_ascii=False))
                else:
                    results.append(None)
            return pa.table({_ENCODED_RESULT: pa.array(results, pa.string()),
                             "_rwkv_lite_error": pa.array([errors.get(i) for i in range(len(rows))], pa.string())})
        columns = RESULT_TYPES[self.settings.task]
        out = table.drop_columns([name for name, _ in columns if name in table.column_names])
        for name, kind in columns:
            if name == "error":
                values = [errors.get(i) for i in range(len(rows))]
            else:
                values = [records[i].get(name) if i in records else None for i in range(len(rows))]
                if kind == "float64":
                    values = [None if v is None or not math.isfinite(v) else float(v) for v in values]
            out = out.append_column(name, pa.array(values, getattr(pa, kind)()))
        return out


def row_fields(row: dict, task: str) -> dict:
    """The job fields of a dataset row: the columns this task knows (other columns are carried through)."""
    known = GENERATE_FIELDS if task == "generate" else PERPLEXITY_FIELDS
    return check_fields({k: row[k] for k in known if k in row and k not in ("id", "metadata")}, task)


def generate_dataset(ds, model_path: str | os.PathLike, *, task: str = "generate", max_tokens: int = 100,
                     sampling: dict | None = None, stop: Sequence[str] = (), max_batch: int = DEFAULT_MAX_BATCH,
                     concurrency: int = 1, num_cpus: float = 1, batch_size: int | None = None,
                     check_model: bool = True):
    """A Ray Dataset of results: every input column kept, plus for task "generate" `text`, `finish_reason`,
    `prompt_tokens`, `completion_tokens` and `error` (null unless the row was invalid or failed), and for task
    "perplexity" `tokens`, `predicted`, `logprob`, `nll`, `perplexity`, `bits_per_byte`, `error`.

    Rows have a `prompt` (text or token ids) or `messages` (chat) column, or `text` for perplexity, and may carry
    the per-row parameters of a JSONL line (max_tokens, temperature, top_p, top_k, min_p, seed, stop, ...);
    `max_tokens`, `sampling` (SamplingParams values) and `stop` are the defaults for rows without them.
    `concurrency` actors of `num_cpus` CPUs each (kernel threads = num_cpus), `max_batch` sequences decoded
    together in each, `batch_size` rows per call (default 4 x max_batch). Lazy, as Ray Datasets are: nothing runs
    until the result is consumed (but the model file is checked on every node now, unless check_model=False)."""
    return _map(ds, model_path, JobSettings(task=task, max_tokens=max_tokens, sampling=dict(sampling or {}),
                                            stop=tuple(stop)),
                max_batch=max_batch, concurrency=concurrency, num_cpus=num_cpus, batch_size=batch_size,
                check_model=check_model, encoded=False)


def _map(ds, model_path, settings: JobSettings, *, max_batch, concurrency, num_cpus, batch_size, check_model,
         encoded):
    ray = import_ray()
    if int(max_batch) < 1 or int(concurrency) < 1 or not num_cpus > 0:
        raise BatchError("max_batch and concurrency must be >= 1 and num_cpus > 0")
    model_path = str(Path(model_path).absolute())
    if check_model:
        check_model_on_nodes(model_path)
    threads = max(1, int(num_cpus))
    return ds.map_batches(
        BatchWorker, batch_format="pyarrow", batch_size=batch_size or 4 * int(max_batch),
        fn_constructor_kwargs=dict(model_path=model_path, settings=settings.as_dict(), max_batch=int(max_batch),
                                   threads=threads, encoded=encoded),
        # One batch in flight per actor: by default Ray Data queues up to 4 on the first actor that is ready, and
        # with few batches (256 lines at 32 per step and 2 actors: 2 batches of 128) one actor then did all the
        # work while the other idled (0.59x the local job's speed on a 2-core machine).
        compute=ray.data.ActorPoolStrategy(size=int(concurrency), max_tasks_in_flight_per_actor=1),
        num_cpus=num_cpus,
        # The actor's threads must match its CPUs: Ray gives OMP_NUM_THREADS; Numba is set in BatchWorker
        runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads)}})


def _probe_model_file(path: str) -> str | None:
    """Runs on one node: why the model file cannot be used there, or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        return e.strerror or str(e)
    if len(head) < 8:
        return "the file is too short to be a model file"
    return None


def check_model_on_nodes(model_path: str) -> None:
    """Raise RwkvLiteError unless the model file opens at `model_path` on every alive node with CPUs (and
    rwkv-lite imports there: the probe is a function of this module)."""
    ray = import_ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    probe = ray.remote(num_cpus=0)(_probe_model_file)
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
        model_path) for n in nodes]
    problems = []
    for node, ref in zip(nodes, refs):
        where = node.get("NodeManagerAddress", node["NodeID"][:12])
        try:
            why = ray.get(ref, timeout=300)
        except Exception as e:                  # noqa: BLE001 - e.g. rwkv-lite not importable on that node
            why = f"the check could not run there ({type(e).__name__}: {_first_line(e)}); is rwkv-lite installed?"
        if why:
            problems.append(f"node {where}: {why}")
    if problems:
        more = f" (and {len(problems) - 1} more nodes)" if len(problems) > 1 else ""
        raise RwkvLiteError(f"{model_path}: the model file must be readable at this path on every Ray node; "
                            f"{problems[0]}{more}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__


class RayRunner:
    """Runs a JSONL job's pending lines on Ray (the `rwkv-lite batch --ray` path); see batch.LocalRunner.

    address    None: join the Ray instance this process already uses, else start a local one; "auto", a
               "host:port" or "ray://host:port": connect there
    actors     pool size (None: as many as the cluster's CPUs allow at `cpus` each)"""

    def __init__(self, model_path, *, address: str | None = None, actors: int | None = None, cpus: float = 1,
                 max_batch: int = DEFAULT_MAX_BATCH):
        self.model_path = str(Path(model_path).absolute())
        self.address = address
        self.actors = actors
        self.cpus = cpus
        self.max_batch = int(max_batch)
        self.started_ray = False

    def connect(self):
        ray = import_ray()
        import logging
        if not ray.is_initialized():
            try:
                ray.init(address=self.address or None, include_dashboard=False, log_to_driver=False,
                         logging_level=logging.ERROR, configure_logging=True)
            except Exception as e:              # noqa: BLE001 - ConnectionError and Ray's own errors alike
                where = f"the Ray cluster at {self.address}" if self.address else "a local Ray instance"
                raise RwkvLiteError(f"cannot start or join {where}: {_first_line(e)}") from None
            self.started_ray = True
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        ctx.execution_options.preserve_order = True
        ctx.raise_original_map_exception = True
        cluster_cpus = ray.cluster_resources().get("CPU", 0)
        if self.actors is None:
            self.actors = max(1, int(cluster_cpus // self.cpus))
        if self.actors * self.cpus > cluster_cpus:
            raise BatchError(f"{self.actors} actors of {self.cpus:g} CPUs need {self.actors * self.cpus:g} CPUs; "
                             f"the Ray cluster has {cluster_cpus:g}")
        check_model_on_nodes(self.model_path)
        return ray

    def close(self) -> None:
        if self.started_ray:
            import ray
            ray.shutdown()
            self.started_ray = False

    def run(self, jobs: Sequence[Job], settings: JobSettings, emit, fail) -> None:
        ray = self.connect()
        try:
            items = [{_ENCODED_JOB: json.dumps({"line": j.line, "id": j.id, "fields": j.fields}, ensure_ascii=False)}
                     for j in jobs]
            # Batches small enough that every actor gets work, at most 4 x max_batch rows (a batch's results
            # come back when its slowest line ends)
            batch_size = max(1, min(4 * self.max_batch, math.ceil(len(jobs) / self.actors)))
            ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(jobs) / batch_size)))
            out = _map(ds, self.model_path, settings, max_batch=self.max_batch, concurrency=self.actors,
                       num_cpus=self.cpus, batch_size=batch_size, check_model=False, encoded=True)
            index = 0
            for batch in out.iter_batches(batch_format="pyarrow", batch_size=None):
                records = []
                for result, error in zip(batch.column(_ENCODED_RESULT).to_pylist(),
                                         batch.column("_rwkv_lite_error").to_pylist()):
                    job = jobs[index]
                    index += 1
                    if result is not None:
                        records.append(json.loads(result))
                    else:
                        fail(Failure(job, error or "no result"))
                if records:
                    emit(records)
        except (RwkvLiteError, KeyboardInterrupt):
            raise
        except Exception as e:                  # noqa: BLE001 - Ray wraps a worker's error; show its last line
            raise RwkvLiteError(f"the Ray job failed: {_first_line(e)}") from None
        finally:
            self.close()
