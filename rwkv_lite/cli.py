"""The `rwkv-lite` command line: thin click commands over the Python API.

Every command reports a user-caused problem as one line on stderr ("error: ...") and exits 1 (2 for usage
errors, as click does); `--json` prints exactly one JSON document on stdout. See docs/cli.md.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

import click

from . import __version__
from .errors import RwkvLiteError


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def friendly_errors(fn):
    """Turn expected failures into one line on stderr and exit code 1 (never a traceback)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RwkvLiteError as e:
            _fail(str(e))
        except MemoryError:
            _fail("out of memory (try a smaller model, a smaller --quant, or a shorter prompt)")
        except OSError as e:
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            _fail(f"{where}{e.strerror or e}")
        except (ValueError, UnicodeError) as e:
            _fail(str(e))
    return wrapper


def _set_threads(threads: int | None) -> None:
    from .kernels.threads import set_threads
    set_threads(threads)


threads_option = click.option("--threads", "-t", type=click.IntRange(1, 1024), default=None,
                              help="Threads for the kernels and BLAS (default: all cores, or NUMBA_NUM_THREADS).")
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document (see docs/cli.md).")


def _print_json(doc) -> None:
    click.echo(json.dumps(doc, indent=2, ensure_ascii=False))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rwkv-lite")
def main():
    """Run RWKV language models on ordinary CPUs.

    \b
    Examples:
      rwkv-lite convert RWKV-5-World-7B.pth eagle-int8.safetensors --quant int8
      rwkv-lite generate eagle-int8.safetensors -p "The Eiffel tower is in" -n 40
      rwkv-lite chat eagle-int8.safetensors
      rwkv-lite info eagle-int8.safetensors
    """


# ------------------------------------------------------------------------------------------------- convert
@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--quant", "-q", type=click.Choice(["fp32", "fp16", "int8", "int4"]), default="fp16",
              show_default=True, help="Storage of the large matrices.")
@click.option("--group", type=click.IntRange(8, 4096), default=None,
              help="int4 group size along the input dimension (default: the scheme's).")
@click.option("--head", type=click.Choice(["fp32", "fp16", "int8", "int4"]), default=None,
              help="Storage of the output head, if different from --quant.")
@click.option("--vocab", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Tokenizer to embed: World vocab .txt or tokenizer.json (default: found beside SRC).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@friendly_errors
def convert(src, dst, quant, group, head, vocab, quiet):
    """Convert a checkpoint to one compact, memory-mappable rwkv-lite file.

    SRC: a Hugging Face RWKV folder, a BlinkDL .pth or .safetensors, or an rwkv.cpp .bin file.

    \b
    Examples:
      rwkv-lite convert RWKV-5-World-7B-v2-20240128-ctx4096.pth eagle-fp16.safetensors
      rwkv-lite convert ./v5-Eagle-7B-HF eagle-int4.safetensors --quant int4
      rwkv-lite convert tiny-rwkv-5v2-730K-FP32.bin tiny.safetensors --quant fp32
    """
    from .quantize.convert import convert as run_convert
    if not src.exists():
        raise click.BadParameter(f"{src}: no such file or folder", param_hint="SRC")
    start = time.perf_counter()
    bar = None

    def progress(done, total, name):
        nonlocal bar
        if quiet:
            return
        if bar is None:
            bar = click.progressbar(length=total, label="converting", file=sys.stderr, show_pos=True)
            bar.__enter__()
        bar.update(1)

    try:
        run_convert(src, dst, quant, vocab=vocab, group=group, head=head, progress=progress)
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    size = dst.stat().st_size
    click.echo(f"wrote {dst} ({size / 1e6:.1f} MB, {quant}) in {time.perf_counter() - start:.1f} s", err=True)


# ------------------------------------------------------------------------------------------------- info / verify
@main.command()
@click.argument("model", type=click.Path(path_type=Path), required=False)
@click.option("--model", "-m", "model_opt", type=click.Path(path_type=Path), default=None, hidden=True)
@click.option("--tensors", is_flag=True, help="List every tensor with its storage scheme.")
@json_option
@friendly_errors
def info(model, model_opt, tensors, as_json):
    """Describe a model file: architecture, parameters, storage, bits/weight, tokenizer, provenance.

    \b
    Examples:
      rwkv-lite info eagle-int8.safetensors
      rwkv-lite info eagle-int8.safetensors --tensors
      rwkv-lite info eagle-int8.safetensors --json
    """
    from .inspect import describe
    doc = describe(_model_path(model, model_opt))
    if as_json:
        _print_json(doc)
        return
    cfg = doc["config"]
    click.echo(f"file          {doc['path']} ({doc['file_bytes'] / 1e6:.1f} MB, format v{doc['format_version']})")
    click.echo(f"architecture  {doc['architecture']}: {cfg['n_layer']} layers x {cfg['n_embd']}, "
               f"vocab {cfg['vocab_size']}" + (f", {cfg['n_head']} heads of {cfg['head_size']}"
                                               if cfg.get('n_head') else "") + f", ffn {cfg.get('ffn_size')}")
    click.echo(f"parameters    {doc['parameters']:,}")
    click.echo("storage       " + ", ".join(f"{k}: {v:,}" for k, v in sorted(doc["parameters_by_scheme"].items())))
    click.echo(f"bits/weight   {doc['bits_per_weight']:.3f} overall, {doc['matrix_bits_per_weight']:.3f} "
               f"in matrices and embedding")
    click.echo(f"tokenizer     {doc['tokenizer']}")
    prov = doc["provenance"]
    if prov:
        click.echo(f"converted     by {prov.get('converter')} on {prov.get('created')} from {prov.get('source_kind')}: "
                   f"{', '.join(prov.get('source_files', []))}")
    if tensors:
        for t in doc["tensors"]:
            params = "".join(f" {k}={v}" for k, v in t["params"].items())
            click.echo(f"  {t['name']:<40} {str(t['shape']):<16} {t['scheme']}{params} "
                       f"({t['bits_per_weight']:.2f} b/w)")


@main.command()
@click.argument("model", type=click.Path(path_type=Path), required=False)
@click.option("--model", "-m", "model_opt", type=click.Path(path_type=Path), default=None, hidden=True)
@json_option
@friendly_errors
def verify(model, model_opt, as_json):
    """Check a model file's integrity: header, sizes and every array's checksum.

    \b
    Example:
      rwkv-lite verify eagle-int8.safetensors
    """
    from .format import read_model_file, verify_checksums
    path = _model_path(model, model_opt)
    mf = read_model_file(path)
    try:
        total = sum(b - a for n, (a, b) in mf.spans.items() if not n.startswith("__pad."))
        with click.progressbar(length=total, label="verifying", file=sys.stderr,
                               hidden=as_json) as bar:
            bad = verify_checksums(mf, bar.update)
    finally:
        mf.close()
    if as_json:
        _print_json({"path": str(path), "ok": not bad, "corrupted_arrays": bad})
    if bad:
        _fail(f"{path}: checksum mismatch in {len(bad)} array(s): {', '.join(bad[:5])}")
    if not as_json:
        click.echo(f"{path}: OK ({total / 1e6:.1f} MB checked)")


def _model_path(model, model_opt) -> Path:
    path = model_opt or model
    if path is None:
        from .demo import demo_model_path
        path = demo_model_path()
        click.echo(f"(no model given: using the built-in demo model {path.name})", err=True)
    return Path(path)


if __name__ == "__main__":      # pragma: no cover
    main()
