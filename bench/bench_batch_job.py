"""Batch-job throughput: `rwkv-lite batch` (the continuous-batching engine) against the same prompts run one by one
through `generate`, and optionally the same job on Ray Data (2 actors of 1 CPU on a 2-core machine), with the
memory of the whole job (PSS: the model's pages shared by the actors count once).

    python bench/bench_batch_job.py MODEL [--prompts 64] [--sequential 8] [--prompt-tokens 64] [--new-tokens 64]
                                          [--max-batch 32 [16 ...]] [--rounds 1] [--ray] [--ray-actors 2]

Prompts are random token ids (seeded; `--prompt-tokens` each) and every line samples with its own seed at
temperature 1 (random weights make greedy decoding loop; a line may stop early at end-of-text, so tokens are
counted, not assumed). Tokens/s = generated tokens / wall seconds of the computation, prompt reading included, the
model already mapped (the Ray figure includes starting the actors, which map the model and load the kernels).
Also printed: tokens per CPU-second (this process's CPU time, plus the Ray workers' for the Ray run), which a busy
shared machine disturbs less than wall-clock rates (the OpenMP/Numba pool's spinning counts as CPU time).
The one-by-one rate is measured on the first `--sequential` prompts (each prompt costs the same, so the rate
carries over), half of them before the batch jobs of a round and half after. With --rounds > 1 the variants interleave and medians are printed. Prints the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

import rwkv_lite
from rwkv_lite.batch import JobSettings, LocalRunner, run_job
from rwkv_lite.generate import generate
from rwkv_lite.kernels.threads import set_threads
from rwkv_lite.sampling import SamplingParams


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def pss_bytes(pid: int) -> tuple[int, int]:
    """(proportional set size, its shared-memory part) of one process (Linux): shared pages divided among the
    processes mapping them; the shared-memory part is Ray's object store. One read of smaps_rollup, which walks
    the process's page tables: ~17 ms for a process with a 1.5B model mapped (2-core Zen 4), so it is sampled
    sparingly (PssSampler)."""
    pss = shmem = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
                elif line.startswith("Pss_Shmem:"):
                    shmem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return pss, shmem


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class PssSampler:
    """Samples, every `interval` s, the PSS of this process + Ray's worker processes (`ray::...`), and of Ray's own
    services (raylet, GCS, ...) apart; keeps the peaks of both sums. Reading PSS costs CPU time (pss_bytes): at a
    0.5 s interval the sampler took ~40% of one of the 2 cores during a Ray job and made that job 3x slower; the
    job's memory is flat after the start, so a sample every few seconds finds the same peak. The sampler's own
    CPU time is kept (cpu) and printed."""

    def __init__(self, interval: float = 5.0):
        self.interval = interval
        self.peak_job = self.peak_ray_services = 0
        self.peak_job_shmem = 0                      # the shared-memory part of peak_job's sample (object store)
        self.peak_workers = 0                        # Ray worker processes (actors and idle workers) in that sample
        self.worker_cpu: dict[int, float] = {}       # CPU seconds of each Ray worker, at its latest sample
        self._cpu_before: dict[int, float] = {}
        self.cpu = 0.0                               # CPU seconds the sampling itself took
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        me = os.getpid()
        self._stop.wait(1.0)                 # the first sample once the job's processes are up
        while not self._stop.is_set():
            cpu = time.thread_time()
            job, shmem = pss_bytes(me)
            services = workers = 0
            for name in os.listdir("/proc"):
                if not name.isdigit() or int(name) == me:
                    continue
                cmd = cmdline(int(name))
                if cmd.startswith("ray::"):
                    pss, pss_shmem = pss_bytes(int(name))
                    job += pss
                    shmem += pss_shmem
                    workers += 1
                    seconds = cpu_seconds(int(name))
                    self._cpu_before.setdefault(int(name), seconds)
                    self.worker_cpu[int(name)] = seconds - self._cpu_before[int(name)]
                elif "/ray/" in cmd and ("raylet" in cmd or "gcs_server" in cmd or "ray/_private" in cmd
                                         or "dashboard" in cmd or "log_monitor" in cmd):
                    services += pss_bytes(int(name))[0]
            self.cpu += time.thread_time() - cpu
            if job > self.peak_job:
                self.peak_job, self.peak_job_shmem, self.peak_workers = job, shmem, workers
            self.peak_ray_services = max(self.peak_ray_services, services)
            self._stop.wait(self.interval)


def make_input(path: Path, n: int, prompt_tokens: int, new_tokens: int, vocab: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = [{"id": i, "prompt": [int(t) for t in rng.integers(1, vocab, prompt_tokens)], "max_tokens": new_tokens,
             "seed": 1000 + i, "temperature": 1.0, "top_p": 1.0} for i in range(n)]
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return rows


def one_by_one(model, rows) -> tuple[int, float, float, float]:
    """(generated tokens, wall seconds, CPU seconds, seconds spent reading the prompts)."""
    tokens, prompt_seconds = 0, 0.0
    cpu = time.process_time()
    start = time.perf_counter()
    for row in rows:
        gen = generate(model, row["prompt"], max_tokens=row["max_tokens"],
                       params=SamplingParams(seed=row["seed"], temperature=1.0, top_p=1.0))
        for _ in gen:
            pass
        tokens += gen.stats.generated_tokens
        prompt_seconds += gen.stats.prompt_seconds
    return tokens, time.perf_counter() - start, time.process_time() - cpu, prompt_seconds


def batch_job(runner, src: Path, folder: Path, tag: str) -> tuple[int, float, float, list[str]]:
    out = folder / f"{tag}-{time.monotonic_ns()}.jsonl"
    cpu = time.process_time()
    summary = run_job(src, out, JobSettings(), runner)
    cpu = time.process_time() - cpu
    assert summary.complete and not summary.failures, summary
    texts = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    out.unlink()
    return summary.tokens, summary.seconds, cpu, texts


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--sequential", type=int, default=8, help="prompts run one by one for the baseline rate")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, nargs="+", default=[32],
                    help="the batch job's --max-batch; several values run interleaved in each round")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ray", action="store_true", help="also run the job on a local Ray instance")
    ap.add_argument("--ray-actors", type=int, default=2)
    ap.add_argument("--ray-cpus", type=float, default=1.0)
    args = ap.parse_args()

    set_threads(args.threads)
    model = rwkv_lite.load(args.model)
    folder = Path(tempfile.mkdtemp(prefix="bench-batch-job-"))
    src = folder / "in.jsonl"
    rows = make_input(src, args.prompts, args.prompt_tokens, args.new_tokens, model.tokenizer.vocab_size)
    print(f"{args.model.name}: {args.prompts} prompts x {args.prompt_tokens} tokens, {args.new_tokens} new tokens "
          f"each; max batch {args.max_batch}; {args.threads} threads; {cpu_name()}, {os.cpu_count()} CPUs")
    ray_runner = None
    if args.ray:
        import ray
        from rwkv_lite.ray import RayRunner

    # warm-up: compile/load the kernels of both paths
    generate_warm = generate(model, rows[0]["prompt"][:8], max_tokens=2)
    "".join(generate_warm)
    warm = folder / "warm.jsonl"
    make_input(warm, 2, 8, 2, model.tokenizer.vocab_size)
    run_job(warm, folder / "warm-out.jsonl", JobSettings(), LocalRunner(model, max_batch=args.max_batch[0]))

    batch_keys = [f"batch {mb}" if len(args.max_batch) > 1 else "batch" for mb in args.max_batch]
    results = {k: [] for k in ["one by one", *batch_keys, "ray"]}
    per_cpu = {k: [] for k in results}                 # tokens per CPU-second: less sensitive to load
    peaks = {"batch": 0, "ray": 0, "ray services": 0, "batch shmem": 0, "ray shmem": 0}
    reference_texts = None
    before, after = rows[:(args.sequential + 1) // 2], rows[(args.sequential + 1) // 2:args.sequential]
    prompt_rows, decode_rows, bounds = [], [], []     # engine seconds per prompt token / decode row; see below
    for r in range(args.rounds):
        # the one-by-one prompts bracket the batch jobs (half before, half after), so that a change of the
        # machine's speed during the round moves both sides of the ratio alike
        tokens, seconds, cpu, prompt_seconds = one_by_one(model, before)
        sampling_cpu = 0.0
        for key, max_batch in zip(batch_keys, args.max_batch):
            with PssSampler() as sampler:
                local_runner = LocalRunner(model, max_batch=max_batch)
                job_tokens, job_seconds, job_cpu, texts = batch_job(local_runner, src, folder, "local")
            sampling_cpu += sampler.cpu
            if sampler.peak_job > peaks["batch"]:
                peaks["batch"], peaks["batch shmem"] = sampler.peak_job, sampler.peak_job_shmem
            m = local_runner.metrics
            print(f"  round {r + 1}: {key} job engine time: prompts {m.prefill_seconds:.1f} s "
                  f"({m.prompt_tokens_read} tokens), decode {m.decode_seconds:.1f} s ({m.decode_steps} steps, "
                  f"{m.decode_rows / max(m.decode_steps, 1):.1f} rows per step on average)")
            results[key].append(job_tokens / job_seconds)
            prompt_rows.append(m.prefill_seconds / m.prompt_tokens_read)
            decode_rows.append(m.decode_seconds / max(m.decode_rows, 1))
            per_cpu[key].append(job_tokens / job_cpu)
            if reference_texts is not None and texts != reference_texts:
                print(f"  round {r + 1}: {key}: output differs from the first batch job's")
            reference_texts = texts
        if after:
            more = one_by_one(model, after)
            tokens, seconds, cpu, prompt_seconds = (a + b for a, b in zip((tokens, seconds, cpu, prompt_seconds), more))
        results["one by one"].append(tokens / seconds)
        per_cpu["one by one"].append(tokens / cpu)
        # The most any batching could give in this round: one-by-one seconds per prompt over the batch job's
        # if a decode row cost no more than a prompt row (the same products with the state in cache; a decode
        # row must also stream its sequence's state, and sample). Prompt rows run at the kernels' peak already.
        n_seq = len(before) + len(after)
        per_prompt_one = seconds / n_seq
        per_prompt_best = min(prompt_rows[-len(batch_keys):]) * (args.prompt_tokens + args.new_tokens)
        bounds.append(per_prompt_one / per_prompt_best)
        print(f"  round {r + 1}: one by one {1e3 * prompt_seconds / n_seq / args.prompt_tokens:.2f} ms per prompt "
              f"token, {1e3 * (seconds - prompt_seconds) / max(tokens, 1):.2f} ms per generated token; batch "
              f"job {1e3 * prompt_rows[-1]:.2f} ms per prompt token, {1e3 * decode_rows[-1]:.2f} ms per decode row; "
              f"bound on the ratio (decode rows at prompt-row cost) {bounds[-1]:.2f}x")
        if args.ray:
            if not ray.is_initialized():           # after the first local run, whose memory it would add to
                ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
            ray_runner = RayRunner(args.model, actors=args.ray_actors, cpus=args.ray_cpus,
                                   max_batch=args.max_batch[0])
            with PssSampler() as sampler:
                tokens, seconds, cpu, texts = batch_job(ray_runner, src, folder, "ray")
            sampling_cpu += sampler.cpu
            if sampler.peak_job > peaks["ray"]:
                peaks["ray"], peaks["ray shmem"] = sampler.peak_job, sampler.peak_job_shmem
                peaks["ray workers"] = sampler.peak_workers
            peaks["ray services"] = max(peaks["ray services"], sampler.peak_ray_services)
            results["ray"].append(tokens / seconds)
            per_cpu["ray"].append(tokens / (cpu + sum(sampler.worker_cpu.values())))
            same = texts == reference_texts
            print(f"  round {r + 1}: ray output identical to the local job: {same}")
        print(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} tok/s ({per_cpu[k][-1]:.1f} per CPU-s)"
                                               for k, v in results.items() if v)
              + f"; memory sampling {sampling_cpu:.1f} CPU-s; load {open('/proc/loadavg').read().split()[:3]}",
              flush=True)

    def med(v):
        return statistics.median(v) if v else float("nan")
    for k, v in per_cpu.items():
        if v:
            print(f"{k:12} {med(v):7.1f} tokens per CPU-second (min-max {min(v):.1f}-{max(v):.1f})")
    base = med(results["one by one"])
    print(f"one by one   {base:7.1f} tokens/s  (min-max {min(results['one by one']):.1f}-"
          f"{max(results['one by one']):.1f}, {args.sequential} prompts)")
    for key in batch_keys:
        b = med(results[key])
        print(f"{key + ' job':12} {b:7.1f} tokens/s  (min-max {min(results[key]):.1f}-{max(results[key]):.1f}) "
              f"= {b / base:.2f}x one by one (per round: "
              + ", ".join(f"{x / y:.2f}x" for x, y in zip(results[key], results["one by one"])) + ")")
    print(f"bound on the batch job's ratio in each round (one by one / (prompt-row cost x all tokens)): "
          + ", ".join(f"{b:.2f}x" for b in bounds))
    print(f"peak PSS of the batch jobs {peaks['batch'] / 2**30:.2f} GiB "
          f"(of which shared memory {peaks['batch shmem'] / 2**30:.2f} GiB)")
    b = med(results[batch_keys[0]])
    if args.ray:
        rr = med(results["ray"])
        print(f"ray job      {rr:7.1f} tokens/s  (min-max {min(results['ray']):.1f}-{max(results['ray']):.1f}) "
              f"= {rr / b:.2f}x the batch job; peak PSS driver + {peaks['ray workers']} Ray worker processes "
              f"{peaks['ray'] / 2**30:.2f} GiB (of which "
              f"shared memory, the object store, {peaks['ray shmem'] / 2**30:.2f} GiB), "
              f"Ray's services {peaks['ray services'] / 2**30:.2f} GiB")
    print(f"model file {args.model.stat().st_size / 2**30:.2f} GiB; load average {open('/proc/loadavg').read().strip()}")
    if args.ray:
        import ray
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
