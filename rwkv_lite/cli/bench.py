"""`rwkv-lite bench`: speed and memory of a model on this machine."""
from __future__ import annotations

import click

from ..errors import FormatError
from . import common


class LengthList(click.ParamType):
    """A comma-separated list of prompt lengths, e.g. "128,1024" (empty: none)."""
    name = "N,N,..."

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            lengths = tuple(int(v) for v in str(value).replace(" ", "").split(",") if v)
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of whole numbers", param, ctx)
        if any(n < 1 for n in lengths):
            self.fail(f"{value!r}: prompt lengths must be at least 1", param, ctx)
        return lengths


@click.command()
@common.model_argument
@click.option("--decode-tokens", "-n", "decode_tokens", type=click.IntRange(min=1), default=16, show_default=True,
              help="Decode steps timed (the median is reported).")
@click.option("--prompt-lengths", type=LengthList(), default="128,1024", show_default=True,
              help="Prompt lengths (tokens) whose sequence-mode speed is measured; empty to skip.")
@click.option("--no-probe", is_flag=True,
              help="Skip the memory-bandwidth probe (which puts decode speed against its memory-bound floor).")
@common.json_option
@common.threads_option
@common.old_spelling("--tokens", "decode_tokens", type=click.IntRange(min=1))
@common.friendly_errors
def bench(model, model_opt, decode_tokens, prompt_lengths, no_probe, as_json, threads):
    """Measure speed and memory: load time, prompt tokens/s, decode ms/token, peak RSS.

    Decode time is the median over --decode-tokens single-token steps after two warm-up steps. The bandwidth probe
    measures how fast this machine streams weights from RAM: the decode floor is bytes read per token / bandwidth.

    \b
    Examples:
      rwkv-lite bench eagle-int8.safetensors
      rwkv-lite bench eagle-int4.safetensors -t 4 -n 32 --json
      rwkv-lite bench tiny.safetensors --decode-tokens 4 --prompt-lengths 16 --no-probe
    """
    from .. import benchmark
    from ..format import read_model_file
    path = common.model_path(model, model_opt)
    if not path.exists():
        raise FormatError(f"{path}: no such model file")
    read_model_file(path).close()      # a bad file is reported now, not after the bandwidth probe
    common.announce_compiles()
    progress = None if as_json else (lambda done, total, info: click.echo(f"(measuring {info})", err=True))
    doc = benchmark.run(path, threads=threads, decode_tokens=decode_tokens, prompt_lengths=prompt_lengths,
                        probe=not no_probe, progress=progress)
    if as_json:
        common.print_json(doc)
        return
    rows = [
        ("model", f"{doc['model']} ({doc['file_bytes'] / 1e6:.1f} MB, {doc['architecture']})"),
        ("threads", str(doc["threads"])),
        ("load", f"{doc['load_s'] * 1e3:.1f} ms (first logits after {doc['load_to_first_logits_s'] * 1e3:.1f} ms)"),
        ("decode", f"{doc['decode_ms_per_token']:.2f} ms/token (median of {doc['decode_tokens']}; "
                   f"min {doc['decode_ms_min']:.2f}, max {doc['decode_ms_max']:.2f}, "
                   f"spread max/median {doc['decode_spread']:.2f})"),
    ]
    rows += [(f"prompt {n}", f"{speed:,.1f} tokens/s") for n, speed in doc["prompt_tokens_per_s"].items()]
    rows.append(("weights/token", f"{doc['bytes_read_per_token'] / 1e6:.1f} MB read per decode step"))
    if "bandwidth_gb_s" in doc:
        rows.append(("bandwidth", f"{doc['bandwidth_gb_s']:.1f} GB/s: floor {doc['bandwidth_floor_ms']:.2f} ms/token, "
                                  f"decode is {doc['decode_vs_bandwidth_floor']:.1f}x the floor"))
    rows.append(("peak RSS", f"{doc['peak_rss_bytes'] / 1e6:.1f} MB"))
    for name, value in rows:
        click.echo(f"{name:<14}{value}")
