"""The `rwkv-lite` command line: thin click commands over the Python API.

Every command reports a user-caused problem as one line on stderr ("error: ...") and exits 1 (2 for usage
errors, as click does; 130 after Ctrl-C); `--json` prints exactly one JSON document on stdout. Model-using
commands take the model as an optional first argument (or -m/--model); without one they use the built-in demo
model. See docs/cli.md.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path

import click

from . import __version__
from .errors import FormatError, RwkvLiteError

# Rough memory needed per byte of input text while it is tokenized and held as ids: the str (up to 4 bytes per
# character) and its UTF-8 copy, a Python list of ids (8-byte slots, plus 28-byte int objects for ids > 256) and
# the int64 array made from it. Generous on purpose: it only has to catch inputs that cannot possibly fit.
MEMORY_PER_INPUT_BYTE = 64


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


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
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except BrokenPipeError:
            _quiet_exit_after_broken_pipe()
        except OSError as e:
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            _fail(f"{where}{e.strerror or e}")
        except (ValueError, UnicodeError) as e:
            _fail(str(e))
    return wrapper


def _quiet_exit_after_broken_pipe() -> None:
    """The reader of stdout went away (`rwkv-lite generate ... | head`): stop quietly, exit code 0. Python would otherwise
    complain once more when it flushes stdout at exit, so point stdout at /dev/null first."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):     # (io.UnsupportedOperation is both OSError and ValueError)
        pass
    sys.exit(0)             # the reader took what it wanted, as with `cat file | head`: not a failure


def _set_threads(threads: int | None) -> None:
    from .kernels.threads import set_threads
    set_threads(threads)


def _utf8_stdout() -> None:
    """Generated text is printed as UTF-8 whatever the locale says (a pipe under LANG=C or a latin-1 terminal
    would otherwise raise UnicodeEncodeError on the first non-ASCII character). errors='strict' is safe: every
    string we print comes from valid UTF-8 or from the decoder, which only produces U+FFFD for bad bytes."""
    stream = sys.stdout
    encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "").replace("_", "")
    if encoding != "utf8" and hasattr(stream, "reconfigure"):
        try:
            stream.reconfigure(encoding="utf-8", errors="strict")
        except (ValueError, OSError):     # a stream that cannot change (already read from): leave it
            pass


def _write(text: str) -> None:
    """Generated text goes straight to stdout (click.echo would strip ANSI codes from it when piped)."""
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()


def _stdin_is_interactive() -> bool:
    stream = sys.stdin
    return stream is not None and hasattr(stream, "isatty") and stream.isatty()


def _read_line(prompt: str) -> str:
    """One line from the terminal, with line editing where readline exists (a seam for the tests)."""
    return input(prompt)


def _json_safe(value):
    """Non-finite floats become null: the output must be strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# A JSON array of numbers as pretty-printed by json.dumps: "[" and a newline can only start a real array (JSON
# strings hold no raw newlines), so collapsing these is safe.
_NUMBER_ARRAY = re.compile(r"\[\n[-+.\deE,\s]*\n\s*\]")


def _print_json(doc) -> None:
    """Indented JSON, with arrays of numbers (token ids, shapes) kept on one line."""
    _utf8_stdout()
    text = json.dumps(_json_safe(doc), indent=2, ensure_ascii=False, allow_nan=False)
    text = _NUMBER_ARRAY.sub(lambda m: "[" + ", ".join(n.strip() for n in m[0][1:-1].split(",")) + "]", text)
    click.echo(text)


# ------------------------------------------------------------------------------------------------- shared options
threads_option = click.option("--threads", "-t", type=click.IntRange(1, 1024), default=None,
                              help="Threads for the kernels and BLAS (default: all cores, or NUMBA_NUM_THREADS).")
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document (see docs/cli.md).")


def old_spelling(flag: str, dest: str, **option_kwargs):
    """Keep an earlier spelling of an option working without showing it in --help: a hidden option whose value,
    when given, is passed on as `dest` (the current option's parameter)."""
    hidden_dest = "old_spelling_" + dest

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            value = kwargs.pop(hidden_dest, None)
            if value is not None:
                kwargs[dest] = value
            return fn(*args, **kwargs)
        return click.option(flag, hidden_dest, hidden=True, default=None, **option_kwargs)(wrapper)
    return decorate


def model_argument(fn):
    """MODEL as an optional first argument, with -m/--model as an alias (absent: the built-in demo model)."""
    fn = click.option("--model", "-m", "model_opt", type=click.Path(path_type=Path), default=None,
                      help="The model file (same as the MODEL argument).")(fn)
    return click.argument("model", type=click.Path(path_type=Path), required=False)(fn)


def _model_path(model, model_opt) -> Path:
    if model is not None and model_opt is not None:
        raise click.UsageError("give the model once: as the MODEL argument or with --model, not both")
    path = model_opt or model
    if path is None:
        from .demo import demo_model_path
        path = demo_model_path()
        click.echo(f"(no model given: using the built-in demo model {path.name})", err=True)
    return Path(path)


def _announce_compiles() -> None:
    """One line on stderr when kernels are about to be compiled (first run), so the wait is explained."""
    from .kernel_cache import announce_compiles
    announce_compiles(lambda line: click.echo(line, err=True))


def _load_model(path: Path):
    """rwkv_lite.load, with a missing file reported before anything else is tried."""
    import rwkv_lite
    _announce_compiles()
    if not path.exists():
        looks_like_text = " " in str(path) or not path.suffix
        raise FormatError(f"{path}: no such model file" + (" (to give a prompt, use -p TEXT)" if looks_like_text
                                                            else ""))
    return rwkv_lite.load(path, progress=_disk_read_progress())


def _disk_read_progress():
    """A progress callback for a cold model file's read-ahead (called only once it has lasted 2 s)."""
    started = []

    def report(done: int, total: int) -> None:
        if sys.stderr.isatty():
            click.echo(f"\rreading the model file from disk: {done / 1e9:.2f} / {total / 1e9:.2f} GB", err=True,
                       nl=done >= total)
        elif not started:
            click.echo(f"reading the model file from disk ({total / 1e9:.2f} GB)...", err=True)
        started.append(done)
    return report


def sampling_options(fn):
    """The sampling options shared by generate and chat (defaults: see each command's help)."""
    options = [
        click.option("--temperature", "--temp", "temperature", type=click.FloatRange(min=0.0), default=None,
                     help="Sharpness: 1 = the model's distribution, higher = flatter; 0 = greedy, exactly as "
                          "--greedy."),
        click.option("--top-p", type=click.FloatRange(0.0, 1.0), default=None,
                     help="Keep the smallest set of most probable tokens whose probability reaches P (1 = off)."),
        click.option("--top-k", type=click.IntRange(min=0), default=None,
                     help="Keep the K most probable tokens (0 = off)."),
        click.option("--min-p", type=click.FloatRange(0.0, 1.0), default=None,
                     help="Keep tokens at least P times as probable as the most probable one (0 = off)."),
        click.option("--presence-penalty", type=float, default=None,
                     help="Subtracted from the logit of every token already generated."),
        click.option("--frequency-penalty", type=float, default=None,
                     help="Also subtracted per (decayed) occurrence of a generated token."),
        click.option("--penalty-decay", type=click.FloatRange(0.0, 1.0), default=None,
                     help="Occurrence counts are multiplied by this after every token."),
        click.option("--seed", "-s", type=click.IntRange(min=0), default=None,
                     help="Random seed: the same seed, model and options give the same text."),
        click.option("--greedy", is_flag=True,
                     help="Always pick the most probable token; repetition penalties off unless given "
                          "(same as --temperature 0)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _sampling_params(base: str, greedy: bool, **given):
    """SamplingParams from the command line: `base` defaults ('default' or 'chat'), then the options given."""
    from .sampling import SamplingError, SamplingParams
    given = {k: v for k, v in given.items() if v is not None}
    if greedy and given.get("temperature", 0.0) != 0.0:
        raise click.UsageError("--greedy means temperature 0: drop one of --greedy and --temperature")
    greedy = greedy or given.get("temperature") == 0.0     # one meaning: argmax, penalties off unless given
    try:
        if greedy:
            return SamplingParams.greedy(**given)
        return SamplingParams.chat(**given) if base == "chat" else SamplingParams(**given)
    except SamplingError as e:          # e.g. --temperature nan: a bad option value, so a usage error (exit 2)
        raise click.UsageError(str(e)) from None


def _available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _max_input_bytes() -> int | None:
    available = _available_memory()
    return None if available is None else available // MEMORY_PER_INPUT_BYTE


def _too_long(what: str, n_bytes: int, limit: int) -> RwkvLiteError:
    return RwkvLiteError(f"{what}: {n_bytes / 1e6:.1f} MB of text is too long for the memory available "
                         f"(about {n_bytes * MEMORY_PER_INPUT_BYTE / 1e9:.1f} GB needed to tokenize it, "
                         f"{limit * MEMORY_PER_INPUT_BYTE / 1e9:.1f} GB free)")


def _decode_utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RwkvLiteError(f"{what}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                            "convert it to UTF-8 first") from None


def _read_text_file(path: Path) -> str:
    """A UTF-8 text file, refused in one line if it is missing, not UTF-8 or too large for memory."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise RwkvLiteError(f"{path}: no such file") from None
    if path.is_dir():
        raise RwkvLiteError(f"{path}: is a folder, not a text file")
    limit = _max_input_bytes()
    if limit is not None and size > limit:
        raise _too_long(str(path), size, limit)
    return _decode_utf8(path.read_bytes(), str(path))


def _read_stdin_text() -> str:
    stream = sys.stdin.buffer
    limit = _max_input_bytes()
    data = stream.read() if limit is None else stream.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise _too_long("stdin", len(data), limit)
    return _decode_utf8(data, "stdin")


def _parse_ids(text: str, vocab_size: int) -> list[int]:
    """--prompt-ids "1 2 3" (spaces and/or commas) -> [1, 2, 3], each checked against the vocabulary."""
    parts = [p for p in re.split(r"[\s,]+", text.strip()) if p]
    if not parts:
        raise click.BadParameter("give at least one token id", param_hint="--prompt-ids")
    ids = []
    for p in parts:
        if not (p.isascii() and p.isdigit()):
            raise click.BadParameter(f"{p!r} is not a token id (whole numbers separated by spaces)",
                                     param_hint="--prompt-ids")
        if int(p) >= vocab_size:
            raise click.BadParameter(f"token id {p} is outside the vocabulary (0..{vocab_size - 1})",
                                     param_hint="--prompt-ids")
        ids.append(int(p))
    return ids


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def _unescape(text: str) -> str:
    """--stop '\\n\\n' means two newlines: \\n, \\t, \\r and \\\\ are understood; other backslashes stay."""
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m[1], m[0]), text)


def _peak_rss_bytes() -> int:
    from .benchmark import peak_rss_bytes
    return peak_rss_bytes()


class _IdsTokenizer:
    """Stands in for the tokenizer of a model that has none: output ids are printed as "12 345 6 ".

    The prompt must then be given as ids (--prompt-ids); there is no text to encode."""

    kind = "ids"
    eot_id = None

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        raise RwkvLiteError("this model has no tokenizer: give the prompt as token ids with --prompt-ids")

    def decode_bytes(self, ids) -> bytes:
        return "".join(f"{int(i)} " for i in ids).encode()

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode()


class _WithIdsTokenizer:
    """A model whose missing tokenizer is replaced by _IdsTokenizer (forward() is the model's own)."""

    def __init__(self, model):
        self._model = model
        self.config = model.config
        self.tokenizer = _IdsTokenizer(model.config["vocab_size"])

    def forward(self, *args, **kwargs):
        return self._model.forward(*args, **kwargs)


def _stats_doc(stats) -> dict:
    return {
        "prompt_tokens": stats.prompt_tokens,
        "generated_tokens": stats.generated_tokens,
        "prompt_seconds": stats.prompt_seconds,
        "generation_seconds": stats.generation_seconds,
        "prompt_tokens_per_s": stats.prompt_tokens_per_second,
        "generation_tokens_per_s": stats.generation_tokens_per_second,
        "peak_rss_bytes": _peak_rss_bytes(),
    }


def _report_stats(stats) -> None:
    click.echo(f"prompt      {stats.prompt_tokens} tokens in {stats.prompt_seconds:.3f} s "
               f"({stats.prompt_tokens_per_second:.1f} tokens/s)", err=True)
    click.echo(f"generated   {stats.generated_tokens} tokens in {stats.generation_seconds:.3f} s "
               f"({stats.generation_tokens_per_second:.1f} tokens/s), stopped by {stats.stop_reason}", err=True)
    click.echo(f"peak RSS    {_peak_rss_bytes() / 1e6:.1f} MB", err=True)


def _load_state_for(model, path: Path):
    """A saved state or a state-tuned .pth, refused (one line) unless it fits `model`."""
    from .state import State
    return State.load(path, model)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rwkv-lite")
def main():
    """Run RWKV language models on ordinary CPUs.

    Commands that use a model take it as their first argument (or -m/--model); without one they use the
    built-in demo model. `rwkv-lite COMMAND --help` shows each command's options and examples.

    \b
    Examples:
      rwkv-lite convert RWKV-5-World-7B.pth eagle-int8.safetensors --quant int8
      rwkv-lite generate eagle-int8.safetensors -p "The Eiffel tower is in" -n 40
      rwkv-lite chat eagle-int8.safetensors
      rwkv-lite perplexity eagle-int8.safetensors book.txt
      rwkv-lite bench eagle-int8.safetensors
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
@click.option("--calibration", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="A file from `rwkv-lite calibrate`: quantize the int4 matrices with GPTQ (better quality).")
@click.option("--lora", type=click.Path(path_type=Path), default=None,
              help="A LoRA adapter to merge into the weights before quantization: a .pth of *.lora_A/*.lora_B "
                   "(RWKV-PEFT, RWKV-LM-LoRA) or a Hugging Face PEFT folder.")
@click.option("--lora-alpha", type=click.FloatRange(min=0, min_open=True), default=None,
              help="The lora_alpha the adapter was trained with (RWKV-PEFT files do not store it; HF PEFT "
                   "folders do): merged as W + alpha/r * B A.")
@click.option("--force", is_flag=True, help="Replace DST if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@friendly_errors
def convert(src, dst, quant, group, head, vocab, calibration, lora, lora_alpha, force, quiet):
    """Convert a checkpoint to one compact, memory-mappable rwkv-lite file.

    SRC: a Hugging Face RWKV folder, a BlinkDL .pth or .safetensors, an rwkv.cpp .bin file, or an rwkv-lite
    fp32/fp16 file (to quantize it further). The tokenizer comes from --vocab, else a tokenizer file beside SRC,
    else the one shipped with rwkv-lite for the model's vocabulary (World: 65536 ids; GPT-NeoX 20B: RWKV-4
    Pile, 50277).

    \b
    Examples:
      rwkv-lite convert RWKV-5-World-7B-v2-20240128-ctx4096.pth eagle-fp16.safetensors
      rwkv-lite convert ./v5-Eagle-7B-HF eagle-int4.safetensors --quant int4
      rwkv-lite convert ./v5-Eagle-7B-HF eagle-int4.safetensors --quant int4 --calibration eagle.calib.npz
      rwkv-lite convert tiny-rwkv-5v2-730K-FP32.bin tiny.safetensors --quant fp32
      rwkv-lite convert eagle-fp16.safetensors eagle-int4.safetensors --quant int4
      rwkv-lite convert rwkv7-g1-1.5b.pth g1-poet-int8.safetensors --quant int8 --lora poet.pth --lora-alpha 32
    """
    from .quantize.convert import convert as run_convert, refuse_overwriting_an_input
    _announce_compiles()
    if not src.exists():
        raise click.BadParameter(f"{src}: no such file or folder", param_hint="SRC")
    if lora_alpha is not None and lora is None:
        raise click.UsageError("--lora-alpha needs --lora")
    refuse_overwriting_an_input(dst, [src, vocab, calibration, lora])      # even with --force
    if dst.exists() and not dst.is_dir() and not force:
        raise RwkvLiteError(f"{dst}: already exists (add --force to replace it)")
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
        run_convert(src, dst, quant, vocab=vocab, group=group, head=head, calibration=calibration, lora=lora,
                    lora_alpha=lora_alpha, progress=progress)
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    size = dst.stat().st_size
    click.echo(f"wrote {dst} ({size / 1e6:.1f} MB, {quant}) in {time.perf_counter() - start:.1f} s", err=True)
    from .inspect import describe
    if describe(dst)["tokenizer"] == "none":
        click.echo(f"note: {src} came without a tokenizer and rwkv-lite ships none for its vocabulary, so {dst} "
                   "runs on token ids only (give one with --vocab FILE to read and write text)", err=True)


@main.command("convert-state")
@click.argument("src", type=click.Path(path_type=Path, dir_okay=False))
@click.argument("dst", type=click.Path(path_type=Path, dir_okay=False))
@click.option("-m", "--model", "model_opt", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="The converted model the state was tuned for (its shape is checked).")
@friendly_errors
def convert_state(src, dst, model_opt):
    """Convert a state-tuned initial state (.pth of blocks.N.att.time_state) to an rwkv-lite state file.

    The result is checksummed and loads with --state on generate and chat (which also accept the .pth
    itself). A state tuned for another model shape is refused.

    \b
    Example:
      rwkv-lite convert-state rwkv7-g1-1.5b-state-poet.pth poet.state -m g1-1.5b-int8.safetensors
      rwkv-lite chat g1-1.5b-int8.safetensors --state poet.state
    """
    from .quantize.state_file import is_state_tuning_file
    if not src.exists():
        raise click.BadParameter(f"{src}: no such file", param_hint="SRC")
    if not is_state_tuning_file(src):
        raise FormatError(f"{src}: not a state tuner's file (a .pth or .safetensors of blocks.N.att.time_state "
                          f"tensors)")
    model = _load_model(model_opt)
    try:
        state = _load_state_for(model, src)
        state.save(dst)
    finally:
        model.close()
    click.echo(f"wrote {dst} ({model.config['n_layer']} layers, {state.nbytes() / 1e6:.2f} MB)", err=True)


# ------------------------------------------------------------------------------------------------- calibrate
@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("text_file", type=click.Path(path_type=Path), metavar="TEXT")
@click.option("--output", "-o", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="The calibration file to write (.npz).")
@click.option("--max-tokens", "-n", "tokens", type=click.IntRange(min=2), default=2048, show_default=True,
              help="Tokens of TEXT to run (a 7B model's inputs take 2.75 MB per token on disk).")
@click.option("--max-bytes", type=click.IntRange(min=1), default=None,
              help="Read only the first N bytes of TEXT (default: all of it; --max-tokens still applies).")
@threads_option
@old_spelling("--tokens", "tokens", type=click.IntRange(min=2))
@friendly_errors
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
    from .quantize.calibrate import calibrate as run_calibrate
    text = _read_text_file(text_file) if max_bytes is None else _read_text_prefix(text_file, max_bytes)
    if output.exists() and output.is_dir():
        raise RwkvLiteError(f"{output}: is a folder; give the output file name")
    output_folder = output.resolve().parent
    if not output_folder.is_dir():
        raise RwkvLiteError(f"{output_folder}: output folder does not exist")
    _set_threads(threads)
    llm = _load_model(model)
    start = time.perf_counter()
    calib = run_calibrate(llm, text, tokens=tokens, text_name=text_file.name, workdir=output_folder)
    calib.save(output)
    click.echo(f"wrote {output} ({calib.tokens} tokens, {len(calib.names())} matrices, "
               f"{output.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - start:.1f} s", err=True)


def _read_text_prefix(path: Path, max_bytes: int) -> str:
    """The first `max_bytes` bytes of a UTF-8 text file, less a character cut in half at the end."""
    import codecs
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes)
    except FileNotFoundError:
        raise RwkvLiteError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise RwkvLiteError(f"{path}: is a folder, not a text file") from None
    try:
        return codecs.getincrementaldecoder("utf-8")().decode(data, final=False)
    except UnicodeDecodeError:
        return _decode_utf8(data, str(path))          # raises the usual one-line error with the offset


# ------------------------------------------------------------------------------------------------- generate
@main.command()
@model_argument
@click.option("--prompt", "-p", default=None, help="The text to continue.")
@click.option("--file", "-f", "prompt_file", type=click.Path(path_type=Path), default=None,
              help="Read the prompt from a UTF-8 text file.")
@click.option("--prompt-ids", "prompt_ids", default=None, metavar="IDS",
              help='The prompt as token ids, e.g. "34 105 110" (for models without a tokenizer).')
@click.option("--max-tokens", "-n", type=click.IntRange(min=0), default=100, show_default=True,
              help="Generate at most this many tokens.")
@sampling_options
@click.option("--stop", "stops", multiple=True, metavar="TEXT",
              help=r"Stop when this text appears (not printed). Repeatable; \n, \t, \\ are understood.")
@click.option("--state", "state_in", type=click.Path(path_type=Path), default=None,
              help="Continue from a state saved with --save-state or chat's /save, or start from a state-tuned "
                   ".pth (blocks.N.att.time_state).")
@click.option("--save-state", "state_out", type=click.Path(path_type=Path), default=None,
              help="Save the state after the prompt and the generated text to this file.")
@json_option
@click.option("--verbose", "-v", is_flag=True,
              help="At the end, print tokens/s of the prompt and of generation, and peak memory, to stderr.")
@threads_option
@old_spelling("--tokens", "prompt_ids", metavar="IDS")
@friendly_errors
def generate(model, model_opt, prompt, prompt_file, prompt_ids, max_tokens, temperature, top_p, top_k, min_p,
             presence_penalty, frequency_penalty, penalty_decay, seed, greedy, stops, state_in, state_out,
             as_json, verbose, threads):
    """Continue a prompt, streaming the generated text to stdout.

    The prompt comes from -p, -f FILE, --prompt-ids, or stdin when it is piped. Defaults are the reference's
    sampling settings (temperature 1, top-p 0.85, presence and frequency penalties 0.2, decay 0.996).

    \b
    Examples:
      rwkv-lite generate -p "And God said"                      # the built-in demo model
      rwkv-lite generate eagle-int8.safetensors -p "The Eiffel tower is in" -n 40 --greedy
      rwkv-lite generate eagle-int8.safetensors -f story.txt --temp 0.8 --top-p 0.9 -s 7
      echo "Q: What is 2+2?" | rwkv-lite generate eagle-int8.safetensors --stop '\\n' --json
      rwkv-lite generate tiny.safetensors --prompt-ids "34 105 110" -n 8
    """
    from .generate import generate as run_generate
    given = [name for name, value in (("-p", prompt), ("-f", prompt_file), ("--prompt-ids", prompt_ids))
             if value is not None]
    if len(given) > 1:
        raise click.UsageError(f"give the prompt one way: {' and '.join(given)} were both given")
    if not given and _stdin_is_interactive():
        raise click.UsageError("no prompt: give one with -p TEXT or -f FILE, or pipe it on stdin")
    params = _sampling_params("default", greedy, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                              presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                              penalty_decay=penalty_decay, seed=seed)
    stops = [_unescape(s) for s in stops]
    if any(not s for s in stops):
        raise click.BadParameter("stop strings cannot be empty", param_hint="--stop")

    path = _model_path(model, model_opt)
    _set_threads(threads)
    llm = _load_model(path)
    if prompt_ids is not None:
        prompt_value = _parse_ids(prompt_ids, llm.config["vocab_size"])
    elif prompt_file is not None:
        prompt_value = _read_text_file(prompt_file)
    elif prompt is not None:
        prompt_value = prompt
    else:
        prompt_value = _read_stdin_text()
    if llm.tokenizer is None:
        if isinstance(prompt_value, str):
            raise RwkvLiteError(f"{path}: this model has no tokenizer, so it cannot read text: give the prompt as "
                                "token ids with --prompt-ids (or convert it again with --vocab)")
        llm = _WithIdsTokenizer(llm)
    state = _load_state_for(llm, state_in) if state_in is not None else None

    gen = run_generate(llm, prompt_value, max_tokens=max_tokens, params=params, stop=stops, state=state)
    _utf8_stdout()
    interrupted = False
    try:
        for piece in gen:
            if not as_json:
                _write(piece)
    except KeyboardInterrupt:
        gen.close()
        interrupted = True
    if not as_json and sys.stdout.isatty() and gen.text and not gen.text.endswith("\n"):
        _write("\n")        # leave the terminal's prompt on a line of its own (pipes get the exact text)
    if state_out is not None and not interrupted:
        gen.state.save(state_out)
    if as_json:
        _print_json({
            "model": str(path),
            "prompt": prompt_value if isinstance(prompt_value, str) else None,
            "prompt_ids": None if isinstance(prompt_value, str) else prompt_value,
            "text": gen.text,
            "tokens": gen.tokens,
            "stop_reason": gen.stats.stop_reason,
            "params": {**asdict(params), "banned_tokens": list(params.banned_tokens)},
            "stats": _stats_doc(gen.stats),
        })
    elif verbose:
        _report_stats(gen.stats)
    if interrupted:
        _fail("interrupted", 130)


# ------------------------------------------------------------------------------------------------- chat
CHAT_HELP = """\
Commands (type them as a message):
  /reset        forget the conversation (back to the start, preamble included)
  /save FILE    save the conversation's state to FILE
  /load FILE    continue from a state saved with /save (same model)
  /quit         leave (also /exit, Ctrl-D, or Ctrl-C twice at the prompt)
  /help         this list
  //text        send "/text" as a message
Ctrl-C while the model answers stops the answer, not the chat."""


class _ReplyPrinter:
    """Prints a streamed reply without its leading and trailing whitespace (held back until more text comes)."""

    def __init__(self):
        self.started = False
        self.pending_space = ""

    def push(self, piece: str) -> None:
        if not self.started:
            piece = piece.lstrip()
            if not piece:
                return
            self.started = True
        piece = self.pending_space + piece
        shown = piece.rstrip()
        self.pending_space = piece[len(shown):]
        _write(shown)


class _ChatCommandError(RwkvLiteError):
    """A chat command that cannot be run (unknown command, missing argument)."""


@main.command()
@model_argument
@sampling_options
@click.option("--max-tokens", "-n", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Longest reply, in tokens.")
@click.option("--preamble", default=None,
              help="Text read before the first message (default: a short greeting exchange, as in the "
                   "reference chat demo).")
@click.option("--no-preamble", is_flag=True, help="Start from the empty state.")
@click.option("--state", "state_in", type=click.Path(path_type=Path), default=None,
              help="Start from a state saved with /save (like /load FILE as the first command), or from a "
                   "state-tuned .pth (blocks.N.att.time_state).")
@click.option("--think", is_flag=True,
              help="RWKV-7 G1 think mode: start each reply with <think, so the model reasons before it answers.")
@click.option("--hide-thinking", is_flag=True, help="With --think, show only the answer, not the reasoning.")
@click.option("--verbose", "-v", is_flag=True, help="After each reply, print its tokens and tokens/s to stderr.")
@threads_option
@friendly_errors
def chat(model, model_opt, temperature, top_p, top_k, min_p, presence_penalty, frequency_penalty, penalty_decay,
         seed, greedy, max_tokens, preamble, no_preamble, state_in, think, hide_thinking, verbose, threads):
    """Chat with a model in the World chat format ("User: ...\\n\\nAssistant: ...").

    The model's state is kept between turns, so history is never read twice. Defaults are the reference chat
    demo's settings (temperature 1, top-p 0.3, presence and frequency penalties 0.5, decay 0.996).

    With piped stdin each line is one message (or command) and stdout gets each reply followed by an empty
    line (replies never contain one), so a chat can be scripted.

    RWKV-7 G1 models can think before answering: with --think each reply starts with "<think", the model writes
    its reasoning up to "</think>" and then the answer (--hide-thinking prints only the answer).

    \b
    Commands (type them as a message):
      /reset        forget the conversation
      /save FILE    save the conversation's state
      /load FILE    continue from a saved state
      /quit         leave (also Ctrl-D, or Ctrl-C twice)
      /help         list the commands

    \b
    Examples:
      rwkv-lite chat eagle-int8.safetensors
      rwkv-lite chat eagle-int8.safetensors --seed 1 --temperature 0.7
      printf 'Hi!\\nWhat is the capital of France?\\n/save paris.state\\n' | rwkv-lite chat eagle-int8.safetensors
      rwkv-lite chat eagle-int8.safetensors --state paris.state
      rwkv-lite chat g1-2.9b-int8.safetensors --think --hide-thinking
    """
    from .generate import DEFAULT_PREAMBLE, ChatSession
    if preamble is not None and no_preamble:
        raise click.UsageError("--preamble and --no-preamble cannot be used together")
    if hide_thinking and not think:
        raise click.UsageError("--hide-thinking needs --think")
    params = _sampling_params("chat", greedy, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                              presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                              penalty_decay=penalty_decay, seed=seed)
    path = _model_path(model, model_opt)
    _set_threads(threads)
    llm = _load_model(path)
    if llm.tokenizer is None:
        raise RwkvLiteError(f"{path}: this model has no tokenizer, so it cannot chat")
    session = ChatSession(llm, params=params, max_reply_tokens=max_tokens, think=think,
                          preamble="" if no_preamble else (DEFAULT_PREAMBLE if preamble is None else preamble))
    if state_in is not None:
        _load_state_for(llm, state_in)      # checks that it fits this model
        session.load_state(state_in)
    _utf8_stdout()
    interactive = _stdin_is_interactive()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        click.echo(f"Chatting with {path.name}. /help lists the commands; /quit or Ctrl-D leaves.", err=True)
        lines = _terminal_lines()
    else:
        lines = _piped_lines()

    for line in lines:
        message = line.strip()
        if not message:
            continue
        try:
            if message.startswith("/") and not message.startswith("//"):
                if not _chat_command(session, llm, message):
                    break
                continue
            if message.startswith("//"):
                message = message[1:]
            _chat_turn(session, message, interactive, verbose, show_thinking=not hide_thinking)
        except KeyboardInterrupt:           # between two steps of a turn or a command: drop it, keep chatting
            if not interactive:
                raise
            click.echo("\n(stopped)", err=True)
        except (RwkvLiteError, ValueError) as e:
            if not interactive:
                raise                       # a script should fail loudly
            click.echo(f"error: {e}", err=True)
        except OSError as e:                # /save into a missing folder, ...
            if not interactive:
                raise
            click.echo(f"error: {e.filename + ': ' if e.filename else ''}{e.strerror or e}", err=True)


def _terminal_lines():
    """Lines typed at the terminal. Ctrl-C at the prompt asks for confirmation; a second one (or Ctrl-D) ends."""
    interrupted = False
    while True:
        try:
            line = _read_line("User: ")
        except EOFError:
            click.echo("", err=True)
            return
        except KeyboardInterrupt:
            if interrupted:
                click.echo("", err=True)
                return
            interrupted = True
            click.echo("\n(Ctrl-C again or Ctrl-D to quit)", err=True)
            continue
        except UnicodeDecodeError as e:     # a terminal that does not send what its locale says
            click.echo(f"error: that line is not valid {e.encoding} text", err=True)
            continue
        interrupted = False
        yield line


def _piped_lines():
    """Lines of piped stdin, one message each, decoded as UTF-8 (one line naming the line if it is not)."""
    for number, raw in enumerate(sys.stdin.buffer, start=1):
        yield _decode_utf8(raw.rstrip(b"\r\n"), f"stdin line {number}")


def _chat_command(session, llm, message: str) -> bool:
    """Run a /command; returns False when the chat should end."""
    name, _, arg = message.partition(" ")
    arg = arg.strip()
    name = name.lower()
    if name in ("/quit", "/exit", "/q"):
        return False
    if name == "/help":
        click.echo(CHAT_HELP, err=True)
    elif name == "/reset":
        session.reset()
        click.echo("(conversation reset)", err=True)
    elif name in ("/save", "/load"):
        if not arg:
            raise _ChatCommandError(f"{name} needs a file name, e.g. {name} chat.state")
        target = Path(arg).expanduser()
        if name == "/save":
            session.save_state(target)
            click.echo(f"(state saved to {target})", err=True)
        else:
            _load_state_for(llm, target)
            session.load_state(target)
            click.echo(f"(state loaded from {target})", err=True)
    else:
        raise _ChatCommandError(f"unknown command {name} (/help lists the commands; //text sends \"/text\")")
    return True


def _chat_turn(session, message: str, interactive: bool, verbose: bool, show_thinking: bool = True) -> None:
    from .generate import ThinkingSplitter
    gen = session.reply(message)
    printer = _ReplyPrinter()
    splitter = ThinkingSplitter() if session.think else None
    if interactive:
        _write("Assistant: ")
    if splitter is not None and show_thinking:
        _write("<think")

    answering = []

    def show(parts):
        for kind, text in parts:
            if kind == "answer":
                if show_thinking and not answering:
                    answering.append(True)
                    _write("\n")           # the answer starts on its own line, after the shown reasoning
                printer.push(text)
            elif show_thinking:
                _write(text)
    try:
        for piece in gen:
            if splitter is None:
                printer.push(piece)
            else:
                show(splitter.push(piece))
        if splitter is not None:
            show(splitter.flush())
    except KeyboardInterrupt:
        gen.close()                 # the partial reply stays in the conversation, closed as a finished turn
        if not interactive:
            raise
        _write("\n")
        click.echo("(answer stopped)", err=True)
        _write("\n")
    else:
        _write("\n\n")
    if verbose:
        s = gen.stats
        click.echo(f"({s.prompt_tokens} tokens read at {s.prompt_tokens_per_second:.1f}/s, {s.generated_tokens} "
                   f"generated at {s.generation_tokens_per_second:.1f}/s, stopped by {s.stop_reason})", err=True)


# ------------------------------------------------------------------------------------------------- perplexity
PERPLEXITY_DEFAULT_TOKENS = 16384


@main.command()
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path), metavar="[MODEL] [FILE]")
@click.option("--model", "-m", "model_opt", type=click.Path(path_type=Path), default=None,
              help="The model file (same as the MODEL argument).")
@click.option("--file", "-f", "file_opt", type=click.Path(path_type=Path), default=None,
              help="The UTF-8 text file to score (same as the FILE argument).")
@click.option("--max-tokens", "-n", type=click.IntRange(min=0), default=PERPLEXITY_DEFAULT_TOKENS,
              show_default=True, help="Score only the first N tokens of the text (0: all of it).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@json_option
@threads_option
@friendly_errors
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
    from .evaluate import perplexity_result, scoring_steps
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
    path = _model_path(model, model_opt)
    text = _read_text_file(text_file)           # before loading the model: cheap checks first
    _set_threads(threads)
    llm = _load_model(path)
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

    def running(_):
        return f"perplexity {math.exp(total / (read - 1)):.3f}" if read > 1 else ""
    with click.progressbar(length=len(ids), label="scoring", file=sys.stderr, hidden=not show_bar,
                           item_show_func=running) as bar:
        try:
            for n, total in scoring_steps(llm, ids):
                read += n
                bar.update(n, read)
        except KeyboardInterrupt:
            interrupted = True
    seconds = time.perf_counter() - start
    if read < 2:
        _fail("interrupted before any token was scored", 130)
    n_bytes = len(llm.tokenizer.decode_bytes(ids[1:read]))   # the bytes of the scored tokens (all but the first)
    result = perplexity_result(read, read - 1, total, n_bytes)
    doc = {"model": str(path), "file": str(text_file), **result.as_dict(), "bytes": n_bytes,
           "text_tokens": text_tokens, "partial": interrupted,
           "seconds": seconds, "tokens_per_s": result.tokens / seconds if seconds > 0 else None}
    if as_json:
        _print_json(doc)
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
        _fail("interrupted", 130)


# ------------------------------------------------------------------------------------------------- bench
class _LengthList(click.ParamType):
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


@main.command()
@model_argument
@click.option("--decode-tokens", "-n", "decode_tokens", type=click.IntRange(min=1), default=16, show_default=True,
              help="Decode steps timed (the median is reported).")
@click.option("--prompt-lengths", type=_LengthList(), default="128,1024", show_default=True,
              help="Prompt lengths (tokens) whose sequence-mode speed is measured; empty to skip.")
@click.option("--no-probe", is_flag=True,
              help="Skip the memory-bandwidth probe (which puts decode speed against its memory-bound floor).")
@json_option
@threads_option
@old_spelling("--tokens", "decode_tokens", type=click.IntRange(min=1))
@friendly_errors
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
    from . import benchmark
    from .format import read_model_file
    path = _model_path(model, model_opt)
    if not path.exists():
        raise FormatError(f"{path}: no such model file")
    read_model_file(path).close()      # a bad file is reported now, not after the bandwidth probe
    _announce_compiles()
    progress = None if as_json else (lambda msg: click.echo(f"(measuring {msg})", err=True))
    doc = benchmark.run(path, threads=threads, decode_tokens=decode_tokens, prompt_lengths=prompt_lengths,
                        probe=not no_probe, progress=progress)
    if as_json:
        _print_json(doc)
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


# ------------------------------------------------------------------------------------------------- info / verify
@main.command()
@model_argument
@click.option("--tensors", is_flag=True, help="List every tensor with its storage scheme.")
@json_option
@friendly_errors
def info(model, model_opt, tensors, as_json):
    """Describe a model file: architecture, parameters, storage, bits/weight, tokenizer, provenance.

    Only the file's header is read, so this is instant even for a 15 GB model.

    \b
    Examples:
      rwkv-lite info eagle-int8.safetensors
      rwkv-lite info eagle-int8.safetensors --tensors
      rwkv-lite info eagle-int8.safetensors --json
    """
    from .inspect import describe
    path = _model_path(model, model_opt)
    if not path.exists():
        raise FormatError(f"{path}: no such model file")
    doc = describe(path)
    if as_json:
        _print_json(doc)
        return
    cfg = doc["config"]
    click.echo(f"file          {doc['path']} ({doc['file_bytes'] / 1e6:.1f} MB, format v{doc['format_version']})")
    click.echo(f"architecture  {doc['architecture']}: {cfg['n_layer']} layers x {cfg['n_embd']}, "
               f"vocab {cfg['vocab_size']}" + (f", {cfg['n_head']} heads of {cfg['head_size']}"
                                               if cfg.get('n_head') else "") + f", ffn {cfg.get('ffn_size')}"
               + (f", DeepEmbed {cfg['d_de']}x{cfg['d_de']}" if cfg.get("d_de") else ""))
    click.echo(f"parameters    {doc['parameters']:,}")
    click.echo("storage       " + ", ".join(f"{k}: {v:,}" for k, v in sorted(doc["parameters_by_scheme"].items())))
    click.echo(f"bits/weight   {doc['bits_per_weight']:.3f} overall, {doc['matrix_bits_per_weight']:.3f} "
               f"in matrices and embedding")
    click.echo(f"tokenizer     {doc['tokenizer']}" + (f": {doc['tokenizer_file']}" if doc.get("tokenizer_file") else ""))
    prov = doc["provenance"]
    if prov:
        click.echo(f"converted     by {prov.get('converter')} on {prov.get('created')} from {prov.get('source_kind')}: "
                   f"{_listing(prov.get('source_files'))}")
        calib = prov.get("calibration")
        if isinstance(calib, dict):
            click.echo(f"calibrated    int4 by GPTQ on {calib.get('tokens')} tokens of {calib.get('text')} "
                       f"(inputs recorded from {calib.get('model')})")
    if tensors:
        for t in doc["tensors"]:
            params = "".join(f" {k}={v}" for k, v in t["params"].items())
            click.echo(f"  {t['name']:<40} {str(t['shape']):<16} {t['scheme']}{params} "
                       f"({t['bits_per_weight']:.2f} b/w)")


@main.command()
@model_argument
@json_option
@friendly_errors
def verify(model, model_opt, as_json):
    """Check a model file's integrity: header, sizes and every array's checksum.

    \b
    Examples:
      rwkv-lite verify eagle-int8.safetensors
      rwkv-lite verify eagle-int8.safetensors --json
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


@main.command()
@model_argument
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; then set --api-key).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--max-batch", type=click.IntRange(1, 256), default=8, show_default=True,
              help="Requests generating at once (continuous batching).")
@click.option("--max-queue", type=click.IntRange(0, 100000), default=64, show_default=True,
              help="Requests waiting for a slot; beyond it the server answers 503 with Retry-After.")
@click.option("--api-key", envvar="RWKV_LITE_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on every route but /health (env RWKV_LITE_API_KEY).")
@click.option("--cache-mb", type=click.FloatRange(0), default=512, show_default=True,
              help="Memory for the prefix state cache (0: off).")
@click.option("--max-prompt-tokens", type=click.IntRange(1), default=8192, show_default=True,
              help="Longer prompts are refused (413).")
@click.option("--max-tokens", "max_tokens_limit", type=click.IntRange(1), default=2048, show_default=True,
              help="Largest max_tokens a request may ask for (and the chat default).")
@click.option("--prefill-chunk", type=click.IntRange(1), default=128, show_default=True,
              help="Prompt tokens read per engine step (bounds how long a new prompt pauses running streams).")
@click.option("--model-name", default=None, help="The model id clients use (default: the file name's stem).")
@click.option("--shutdown-timeout", type=click.FloatRange(0), default=30, show_default=True,
              help="On SIGTERM/Ctrl-C, seconds open streams may take to finish before they are cancelled.")
@click.option("--state", "state_in", type=click.Path(path_type=Path), default=None,
              help="Start every request from this state (a state-tuned .pth, or a saved state) instead of the "
                   "model's initial one.")
@threads_option
@friendly_errors
def serve(model, model_opt, host, port, max_batch, max_queue, api_key, cache_mb, max_prompt_tokens,
          max_tokens_limit, prefill_chunk, model_name, shutdown_timeout, state_in, threads):
    """An OpenAI-compatible HTTP server (needs the 'server' extra); see docs/server.md.

    \b
      pip install 'rwkv-lite[server]'
      rwkv-lite serve eagle-7b-int8.safetensors --port 8000 --max-batch 8
      curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
           -d '{"prompt": "The Eiffel tower is in", "max_tokens": 20}'
    """
    try:
        from . import server as server_module
    except ImportError as e:
        missing = (e.name or "a dependency").split(".")[0]
        _fail(f"rwkv-lite serve needs the server extra ({missing} is missing): pip install 'rwkv-lite[server]'")
    _set_threads(threads)
    path = _model_path(model, model_opt)
    loaded = _load_model(path)
    if state_in is not None:
        loaded.initial_state = _load_state_for(loaded, state_in)
    name = model_name or path.stem                # "RWKV-x070-World-2.9B-v3.st" -> "RWKV-x070-World-2.9B-v3"

    def ready(srv):
        click.echo(f"serving {name} ({path.name}) on http://{host}:{port}/v1 (max batch {max_batch}"
                   f"{', API key required' if api_key else ''})", err=True)
    server_module.serve(loaded, host=host, port=port, model_name=name, max_batch=max_batch, max_queue=max_queue,
                        api_key=api_key, cache_mb=cache_mb, max_prompt_tokens=max_prompt_tokens,
                        max_tokens=max_tokens_limit, prefill_chunk=prefill_chunk,
                        shutdown_timeout=shutdown_timeout, ready=ready)


def _listing(value) -> str:
    """A metadata value (normally a list of strings, but files are untrusted) as one comma-separated line."""
    if value is None:
        return ""
    items = value if isinstance(value, list) else [value]
    return ", ".join(str(item) for item in items)


if __name__ == "__main__":      # pragma: no cover
    main(prog_name="rwkv-lite")
