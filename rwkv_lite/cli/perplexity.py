"""`rwkv-lite perplexity`: score a text file."""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import click

from ..errors import RwkvLiteError
from . import common

PERPLEXITY_DEFAULT_TOKENS = 16384


@click.command()
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path), metavar="[MODEL] [FILE]")
@click.option("--model", "-m", "model_opt", type=click.Path(path_type=Path), default=None,
              help="The model file (same as the MODEL argument).")
@click.option("--file", "-f", "file_opt", type=click.Path(path_type=Path), default=None,
              help="The UTF-8 text file to score (same as the FILE argument).")
@click.option("--max-tokens", "-n", type=click.IntRange(min=0), default=PERPLEXITY_DEFAULT_TOKENS,
              show_default=True, help="Score only the first N tokens of the text (0: all of it).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@common.json_option
@common.threads_option
@common.friendly_errors
def perplexity(paths, model_opt, file_opt, max_tokens, quiet, as_json, threads):
    """Score a UTF-8 text file: tokens, mean negative log-likelihood, perplexity and bits per byte.

    The model reads the text from its initial state in sequence mode and predicts every token after the first.
    Lower is better; bits per byte compares models with different tokenizers. Long texts are cut at
    --max-tokens (the output says so). The progress bar shows the perplexity so far; Ctrl-C stops and prints
    the score of the tokens read until then (exit code 130).

    \b
    Examples:
      rwkv-lite perplexity -m eagle-int8.safetensors -f book.txt
      rwkv-lite perplexity eagle-int8.safetensors book.txt --max-tokens 0     # the whole book
      rwkv-lite perplexity eagle-int4.safetensors book.txt -n 4096 --json
      rwkv-lite perplexity held-out.txt                          # the built-in demo model
    """
    from ..evaluate import perplexity_result, scoring_steps
    paths = list(paths)
    if file_opt is not None:
        paths.append(file_opt)
    if len(paths) == 2 and model_opt is None:
        model, text_file = paths
    elif len(paths) == 1:
        model, text_file = None, paths[0]
    else:
        raise click.UsageError("expected [MODEL] FILE (or -m MODEL -f FILE): the model (optional) and the text "
                               "file to score")
    path = common.model_path(model, model_opt)
    text = common.read_text_file(text_file)           # before loading the model: cheap checks first
    common.set_threads(threads)
    llm = common.load_model(path)
    if llm.tokenizer is None:
        raise RwkvLiteError(f"{path}: this model has no tokenizer, so it cannot score text")
    ids = llm.tokenizer.encode(text)
    del text
    text_tokens = len(ids)
    if max_tokens and text_tokens > max_tokens:
        ids = ids[:max_tokens]
        click.echo(f"scoring the first {max_tokens:,} of {text_tokens:,} tokens"
                   + (" (the default limit)" if max_tokens == PERPLEXITY_DEFAULT_TOKENS else "")
                   + "; --max-tokens 0 scores the whole text", err=True)
    if len(ids) < 2:
        raise RwkvLiteError(f"{text_file}: too short: perplexity needs at least 2 tokens of text")
    show_bar = not quiet and not as_json and sys.stderr.isatty()
    if not show_bar and not as_json and not quiet:
        click.echo(f"scoring {len(ids):,} tokens...", err=True)
    start = time.perf_counter()
    read = 0
    total = 0.0
    interrupted = False
    with common.ProgressBar("scoring", hidden=not show_bar, show=lambda info: info) as bar:
        try:
            for n, total in scoring_steps(llm, ids):
                read += n
                bar(read, len(ids), f"perplexity {math.exp(total / (read - 1)):.3f}" if read > 1 else "")
        except KeyboardInterrupt:
            interrupted = True
    seconds = time.perf_counter() - start
    if read < 2:
        common.fail("interrupted before any token was scored", 130)
    n_bytes = len(llm.tokenizer.decode_bytes(ids[1:read]))   # the bytes of the scored tokens (all but the first)
    result = perplexity_result(read, read - 1, total, n_bytes)
    doc = {"model": str(path), "file": str(text_file), **result.as_dict(), "bytes": n_bytes,
           "text_tokens": text_tokens, "partial": interrupted,
           "seconds": seconds, "tokens_per_s": result.tokens / seconds if seconds > 0 else None}
    if as_json:
        common.print_json(doc)
    else:
        if interrupted:
            click.echo(f"partial       interrupted after {read:,} of {len(ids):,} tokens: the score so far")
        click.echo(f"tokens        {result.tokens:,} ({result.predicted:,} predicted, {n_bytes:,} bytes)")
        click.echo(f"mean NLL      {result.nll:.4f} nats/token")
        click.echo(f"perplexity    {result.perplexity:.3f}")
        if result.bits_per_byte is not None:
            click.echo(f"bits/byte     {result.bits_per_byte:.4f}")
        click.echo(f"speed         {doc['tokens_per_s'] or 0:.1f} tokens/s ({seconds:.1f} s)")
    if interrupted:
        common.fail("interrupted", 130)
