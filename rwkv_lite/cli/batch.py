"""`rwkv-lite batch`: an offline JSONL job, resumable, on this machine or on Ray (rwkv_lite.batch, rwkv_lite.ray)."""
from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import click

from ..batch.local import DEFAULT_MAX_BATCH
from . import common

MAX_BAD_LINES_SHOWN = 20
# Values of --ray that name a Ray cluster (anything else with no ":" is most likely a file name swallowed by --ray)
_RAY_WORDS = ("", "auto", "local")


@click.command()
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--model", "-m", "model_opt", type=click.Path(path_type=Path), default=None,
              help="The model file (same as the MODEL argument).")
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True,
              help="The JSONL file of results (OUTPUT.partial while the job runs; run again to resume).")
@click.option("--task", type=click.Choice(["generate", "perplexity"]), default="generate", show_default=True,
              help="generate: a completion per line; perplexity: score each line's 'text'.")
@click.option("--max-tokens", "-n", type=click.IntRange(min=0), default=100, show_default=True,
              help="Tokens to generate per line (a line's 'max_tokens' overrides it).")
@common.sampling_options
@click.option("--stop", multiple=True, help="Stop at this string (repeatable; added to each line's 'stop').")
@click.option("--max-batch", type=click.IntRange(1, 256), default=DEFAULT_MAX_BATCH, show_default=True,
              help="Lines generated at once (continuous batching; per Ray actor with --ray).")
@click.option("--strict", is_flag=True, help="Fail (exit 1) on the first bad input line instead of skipping it.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              help="Run on Ray Data (the 'ray' extra): no ADDRESS starts a local Ray instance; 'auto', "
                   "HOST:PORT or ray://HOST:PORT joins a cluster. Put it after the file arguments.")
@click.option("--ray-actors", type=click.IntRange(min=1), default=None,
              help="Ray actors, each mapping the model once (default: as many as the cluster's CPUs allow).")
@click.option("--ray-cpus", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="CPUs per Ray actor (its kernel threads).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary line (problems are still shown).")
@common.json_option
@common.threads_option
@common.friendly_errors
def batch(paths, model_opt, output, task, max_tokens, temperature, top_p, top_k, min_p, presence_penalty,
          frequency_penalty, penalty_decay, seed, greedy, stop, max_batch, strict, ray_address, ray_actors, ray_cpus,
          quiet, as_json, threads):
    """Run a JSONL file of prompts through the model; results in OUTPUT in input order (docs/batch.md).

    Each input line is a JSON object: "prompt" (or "messages", as the chat API), optional "id" (default: the
    line number), "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "metadata". Each
    output line has the "id", the generated "text", "finish_reason" and token counts. Interrupted (Ctrl-C, a
    crash, a power cut), the same command resumes where it stopped; bad lines are reported and skipped.

    \b
    Examples:
      rwkv-lite batch g1-int4.safetensors prompts.jsonl -o results.jsonl --max-batch 8
      rwkv-lite batch g1-int4.safetensors corpus.jsonl -o scores.jsonl --task perplexity
      rwkv-lite batch g1-int4.safetensors prompts.jsonl -o results.jsonl --ray       # local Ray, 1 CPU per actor
      rwkv-lite batch /shared/g1.safetensors prompts.jsonl -o results.jsonl --ray auto --ray-cpus 4
    """
    from ..batch import BatchError, JobSettings, LocalRunner, run_job
    paths = list(paths)
    if ray_address is not None and ray_address not in _RAY_WORDS and ":" not in ray_address:
        raise click.UsageError(f"--ray took {ray_address!r} as the Ray address (auto, HOST:PORT or "
                               "ray://HOST:PORT); put --ray after the file arguments, or write --ray=ADDRESS")
    if len(paths) == 2 and model_opt is None:
        model, input_path = paths
    elif len(paths) == 1:
        model, input_path = None, paths[0]
    else:
        raise click.UsageError("expected [MODEL] INPUT.jsonl -o OUTPUT.jsonl: the model (optional) and the input")
    if ray_address is None and (ray_actors is not None or ray_cpus != 1.0):
        raise click.UsageError("--ray-actors and --ray-cpus need --ray")
    if ray_address is not None and threads is not None:
        raise click.UsageError("--threads sets this process's threads; on Ray each actor uses --ray-cpus threads")
    if task == "perplexity" and (stop or any(v is not None for v in (temperature, top_p, top_k, min_p, seed,
                                                                      presence_penalty, frequency_penalty,
                                                                      penalty_decay)) or greedy):
        raise click.UsageError("sampling options and --stop do not apply to --task perplexity")
    sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p,
                "presence_penalty": presence_penalty, "frequency_penalty": frequency_penalty,
                "penalty_decay": penalty_decay, "seed": seed}
    if greedy:
        if temperature not in (None, 0.0):
            raise click.UsageError("--greedy means temperature 0: drop one of --greedy and --temperature")
        sampling["temperature"] = 0.0
    try:
        settings = JobSettings(task=task, max_tokens=max_tokens, sampling=sampling, stop=tuple(stop))
    except BatchError as e:
        raise click.UsageError(str(e)) from None

    path = common.model_path(model, model_opt)
    common.require_model_file(path)             # before reading the input: the cheap check that fails most often
    if not path.is_file():
        common.fail(f"{path}: not a model file (a folder?)")
    if ray_address is not None:
        from ..ray import RayRunner, import_ray
        import_ray()                              # the extra is missing: say so before any work
        runner = RayRunner(path, address=ray_address or None, actors=ray_actors, cpus=ray_cpus,
                           max_batch=max_batch)
    else:
        common.set_threads(threads)
        runner = LocalRunner(lambda: common.load_model(path), max_batch=max_batch)

    bad_shown = []

    def on_bad_line(line: int, why: str) -> None:
        bad_shown.append(line)
        if len(bad_shown) <= MAX_BAD_LINES_SHOWN and not strict:
            click.echo(f"warning: {input_path}:{line}: {why} (line skipped)", err=True)

    def on_start(summary) -> None:
        if summary.dropped_bytes:
            click.echo(f"resuming: dropped a partial last line ({summary.dropped_bytes} bytes) left by an "
                       "interrupted run", err=True)
        if len(bad_shown) > MAX_BAD_LINES_SHOWN and not strict:
            click.echo(f"warning: {len(bad_shown) - MAX_BAD_LINES_SHOWN} more bad lines skipped", err=True)
        if not quiet and summary.already_done:
            click.echo(f"resuming: {summary.already_done} of {summary.total} lines already done", err=True)

    show_bar = not quiet and not as_json and sys.stderr.isatty()
    previous_term = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):
        raise KeyboardInterrupt               # stop as Ctrl-C does: what is computed gets written first
    signal.signal(signal.SIGTERM, on_term)
    try:
        with common.ProgressBar("generating" if task == "generate" else "scoring", hidden=not show_bar,
                                show_pos=True, show=lambda info: info) as bar:
            summary = run_job(input_path, output, settings, runner, strict=strict, on_bad_line=on_bad_line,
                              on_start=on_start, progress=bar)
    finally:
        signal.signal(signal.SIGTERM, previous_term)

    doc = {"input": str(input_path), "output": str(output), "task": task, "lines": summary.total,
           "done": summary.done, "done_now": summary.done_now, "already_done": summary.already_done,
           "bad_lines": len(summary.bad_lines), "failed": len(summary.failures), "tokens": summary.tokens,
           "seconds": summary.seconds,
           "tokens_per_s": summary.tokens / summary.seconds if summary.seconds > 0 else None,
           "complete": summary.complete, "interrupted": summary.interrupted}
    for failure in summary.failures[:MAX_BAD_LINES_SHOWN]:
        where = f"{input_path}:{failure.job.line}" if failure.job.line else f"id {json.dumps(failure.job.id)}"
        click.echo(f"error: {where}: {failure.message}", err=True)
    if as_json:
        common.print_json(doc)
    elif not quiet:
        if summary.done_now == 0 and summary.complete and not summary.interrupted:
            click.echo(f"nothing to do: {output} has a result for all {summary.total} lines", err=True)
        else:
            unit = "tokens generated" if task == "generate" else "tokens scored"
            rate = f", {doc['tokens_per_s']:.1f} tokens/s" if doc["tokens_per_s"] else ""
            click.echo(f"{summary.done} of {summary.total} lines done ({summary.done_now} now, {summary.tokens:,} "
                       f"{unit} in {summary.seconds:.1f} s{rate})"
                       + (f"; {len(summary.bad_lines)} bad lines skipped" if summary.bad_lines else ""), err=True)
    if summary.interrupted:
        common.fail(f"interrupted: {summary.done} of {summary.total} lines are in {output}.partial; run the same "
                    "command again to continue", 130)
    if summary.failures:
        common.fail(f"{len(summary.failures)} lines failed; the others are in {output}.partial; run the same "
                    "command again to retry the failed lines")
    if summary.extra_lines:
        click.echo(f"warning: {output} keeps {summary.extra_lines} results whose ids are not in {input_path} "
                   "(at the end)", err=True)
