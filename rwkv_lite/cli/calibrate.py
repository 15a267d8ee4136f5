"""`rwkv-lite calibrate`: record matrix inputs on sample text for GPTQ int4 conversion."""
from __future__ import annotations

import time
from pathlib import Path

import click

from ..errors import RwkvLiteError
from . import common


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("text_file", type=click.Path(path_type=Path), metavar="TEXT")
@click.option("--output", "-o", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="The calibration file to write (.npz).")
@click.option("--max-tokens", "-n", "tokens", type=click.IntRange(min=2), default=2048, show_default=True,
              help="Tokens of TEXT to run (a 7B model's inputs take 2.75 MB per token on disk).")
@click.option("--max-bytes", type=click.IntRange(min=1), default=None,
              help="Read only the first N bytes of TEXT (default: all of it; --max-tokens still applies).")
@common.threads_option
@common.old_spelling("--tokens", "tokens", type=click.IntRange(min=2))
@common.friendly_errors
def calibrate(model, text_file, output, tokens, max_bytes, threads):
    """Record what each weight matrix's inputs look like on sample text, for `convert --calibration`.

    MODEL is any rwkv-lite file of the checkpoint you will quantize (fp16 or int8 are fine); TEXT is UTF-8 text
    like the model's use, and not the text you will evaluate on. The inputs are staged in a temporary folder
    beside the output file.

    \b
    Examples:
      rwkv-lite calibrate eagle-int8.safetensors sample.txt -o eagle.calib.npz
      rwkv-lite calibrate tiny-int8.safetensors kjv-bible.txt -o tiny.calib.npz --max-bytes 16384
      rwkv-lite convert ./v5-Eagle-7B-HF eagle-int4.safetensors --quant int4 --calibration eagle.calib.npz
    """
    from ..quantize.calibrate import calibrate as run_calibrate
    text = common.read_text_file(text_file, max_bytes)
    if output.exists() and output.is_dir():
        raise RwkvLiteError(f"{output}: is a folder; give the output file name")
    output_folder = output.resolve().parent
    if not output_folder.is_dir():
        raise RwkvLiteError(f"{output_folder}: output folder does not exist")
    common.set_threads(threads)
    llm = common.load_model(model)
    start = time.perf_counter()
    calib = run_calibrate(llm, text, tokens=tokens, text_name=text_file.name, workdir=output_folder)
    calib.save(output)
    click.echo(f"wrote {output} ({calib.tokens} tokens, {len(calib.names())} matrices, "
               f"{output.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - start:.1f} s", err=True)
