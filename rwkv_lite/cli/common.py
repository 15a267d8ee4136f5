"""What every `rwkv-lite` command shares: error reporting, output helpers, the shared options, loading the model
and reading input text. Commands call these through the module (`common.load_model(...)`) so that tests can
replace one of them in one place."""
from __future__ import annotations

import functools
import json
import math
import os
import re
import sys
from pathlib import Path

import click

from ..errors import FormatError, RwkvLiteError

# Rough memory needed per byte of input text while it is tokenized and held as ids: the str (up to 4 bytes per
# character) and its UTF-8 copy, a Python list of ids (8-byte slots, plus 28-byte int objects for ids > 256) and
# the int64 array made from it. Generous on purpose: it only has to catch inputs that cannot possibly fit.
MEMORY_PER_INPUT_BYTE = 64


# ------------------------------------------------------------------------------------------------- errors
def fail(message: str, code: int = 1) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def friendly_errors(fn):
    """Turn expected failures into one line on stderr and exit code 1 (never a traceback)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RwkvLiteError as e:
            fail(str(e))
        except MemoryError:
            fail("out of memory (try a smaller model, a smaller --quant, or a shorter prompt)")
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except BrokenPipeError:
            quiet_exit_after_broken_pipe()
        except OSError as e:
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            fail(f"{where}{e.strerror or e}")
        except (ValueError, UnicodeError) as e:
            fail(str(e))
    return wrapper


def quiet_exit_after_broken_pipe() -> None:
    """The reader of stdout went away (`rwkv-lite generate ... | head`): stop quietly, exit code 0. Python would otherwise
    complain once more when it flushes stdout at exit, so point stdout at /dev/null first."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):     # (io.UnsupportedOperation is both OSError and ValueError)
        pass
    sys.exit(0)             # the reader took what it wanted, as with `cat file | head`: not a failure


# ------------------------------------------------------------------------------------------------- output
def utf8_stdout() -> None:
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


def write(text: str) -> None:
    """Generated text goes straight to stdout (click.echo would strip ANSI codes from it when piped)."""
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()


def json_safe(value):
    """Non-finite floats become null: the output must be strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


# A JSON array of numbers as pretty-printed by json.dumps: "[" and a newline can only start a real array (JSON
# strings hold no raw newlines), so collapsing these is safe.
_NUMBER_ARRAY = re.compile(r"\[\n[-+.\deE,\s]*\n\s*\]")


def print_json(doc) -> None:
    """Indented JSON, with arrays of numbers (token ids, shapes) kept on one line."""
    utf8_stdout()
    text = json.dumps(json_safe(doc), indent=2, ensure_ascii=False, allow_nan=False)
    text = _NUMBER_ARRAY.sub(lambda m: "[" + ", ".join(n.strip() for n in m[0][1:-1].split(",")) + "]", text)
    click.echo(text)


def listing(value) -> str:
    """A metadata value (normally a list of strings, but files are untrusted) as one comma-separated line."""
    if value is None:
        return ""
    items = value if isinstance(value, list) else [value]
    return ", ".join(str(item) for item in items)


def peak_rss_bytes() -> int:
    from ..benchmark import peak_rss_bytes as measure
    return measure()


class ProgressBar:
    """The one click adapter of rwkv_lite.progress's protocol: `progress(done, total, info)` drives a progress
    bar on stderr (created at the first call, since `total` is only known then). Use as a context manager;
    `hidden=True` keeps the callback working without drawing anything.

    `show(info)` turns the latest `info` into the text after the bar (None: nothing)."""

    def __init__(self, label: str, *, hidden: bool = False, show_pos: bool = False, show=None):
        self.label, self.hidden, self.show_pos, self.show = label, hidden, show_pos, show
        self._bar = None
        self._done = 0

    def __call__(self, done: int, total: int, info=None) -> None:
        if self._bar is None:
            item_show = None if self.show is None else (lambda item: self.show(item) if item is not None else "")
            self._bar = click.progressbar(length=max(int(total), 1), label=self.label, file=sys.stderr,
                                          hidden=self.hidden, show_pos=self.show_pos, item_show_func=item_show)
            self._bar.__enter__()
        step = int(done) - self._done
        self._done = int(done)
        if step > 0:
            self._bar.update(step, info)

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)


# ------------------------------------------------------------------------------------------------- input
def stdin_is_interactive() -> bool:
    stream = sys.stdin
    return stream is not None and hasattr(stream, "isatty") and stream.isatty()


def read_line(prompt: str) -> str:
    """One line from the terminal, with line editing where readline exists (a seam for the tests)."""
    return input(prompt)


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation, or None where unknown."""
    from ..model import memory_bytes
    return memory_bytes()[1] or None


def _max_input_bytes() -> int | None:
    available = available_memory()
    return None if available is None else available // MEMORY_PER_INPUT_BYTE


def _too_long(what: str, n_bytes: int, limit: int) -> RwkvLiteError:
    return RwkvLiteError(f"{what}: {n_bytes / 1e6:.1f} MB of text is too long for the memory available "
                         f"(about {n_bytes * MEMORY_PER_INPUT_BYTE / 1e9:.1f} GB needed to tokenize it, "
                         f"{limit * MEMORY_PER_INPUT_BYTE / 1e9:.1f} GB free)")


def decode_utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RwkvLiteError(f"{what}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                            "convert it to UTF-8 first") from None


def read_text_file(path: Path, max_bytes: int | None = None) -> str:
    """A UTF-8 text file, refused in one line if it is missing, a folder, not UTF-8 or too large for memory.
    With `max_bytes`, only its first max_bytes bytes, less a character cut in half at the end."""
    import codecs
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise RwkvLiteError(f"{path}: no such file") from None
    if path.is_dir():
        raise RwkvLiteError(f"{path}: is a folder, not a text file")
    if max_bytes is not None:
        size = min(size, max_bytes)
    limit = _max_input_bytes()
    if limit is not None and size > limit:
        raise _too_long(str(path), size, limit)
    with open(path, "rb") as f:
        data = f.read() if max_bytes is None else f.read(max_bytes)
    if max_bytes is None:
        return decode_utf8(data, str(path))
    try:
        return codecs.getincrementaldecoder("utf-8")().decode(data, final=False)
    except UnicodeDecodeError:
        return decode_utf8(data, str(path))          # raises the usual one-line error with the offset


def read_stdin_text() -> str:
    stream = sys.stdin.buffer
    limit = _max_input_bytes()
    data = stream.read() if limit is None else stream.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise _too_long("stdin", len(data), limit)
    return decode_utf8(data, "stdin")


def parse_ids(text: str, vocab_size: int) -> list[int]:
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


def unescape(text: str) -> str:
    """--stop '\\n\\n' means two newlines: \\n, \\t, \\r and \\\\ are understood; other backslashes stay."""
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m[1], m[0]), text)


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


SAMPLING_OPTION_NAMES = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                         "penalty_decay", "seed")


def sampling_params(base: str, greedy: bool, **given):
    """SamplingParams from the command line: `base` defaults ('default' or 'chat'), then the options given."""
    from ..sampling import SamplingError, SamplingParams
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


# ------------------------------------------------------------------------------------------------- the model
def set_threads(threads: int | None) -> None:
    from ..kernels.threads import set_threads as set_kernel_threads
    set_kernel_threads(threads)


def model_path(model, model_opt) -> Path:
    if model is not None and model_opt is not None:
        raise click.UsageError("give the model once: as the MODEL argument or with --model, not both")
    path = model_opt or model
    if path is None:
        from ..demo import demo_model_path
        path = demo_model_path()
        click.echo(f"(no model given: using the built-in demo model {path.name})", err=True)
    return Path(path)


def announce_compiles() -> None:
    """One line on stderr when kernels are about to be compiled (first run), so the wait is explained; a Ctrl-C
    during that wait stops the command once the kernel at hand is compiled, instead of being lost."""
    from ..kernel_cache import announce_compiles as announce, defer_ctrl_c_during_compiles
    announce(lambda line: click.echo(line, err=True))
    defer_ctrl_c_during_compiles()


def require_model_file(path: Path) -> None:
    """A missing model file is reported before anything else is tried."""
    if not path.exists():
        looks_like_text = " " in str(path) or not path.suffix
        raise FormatError(f"{path}: no such model file" + (" (to give a prompt, use -p TEXT)" if looks_like_text
                                                            else ""))


def load_model(path: Path):
    """rwkv_lite.load, with the first-compile notice and a cold file's read-ahead shown on stderr."""
    from ..model import load
    announce_compiles()
    require_model_file(path)
    return load(path, progress=_disk_read_progress())


def _disk_read_progress():
    """A progress callback for a cold model file's read-ahead (called only once it has lasted 2 s)."""
    started = []

    def report(done: int, total: int, info=None) -> None:
        if sys.stderr.isatty():
            click.echo(f"\rreading the model file from disk: {done / 1e9:.2f} / {total / 1e9:.2f} GB", err=True,
                       nl=done >= total)
        elif not started:
            click.echo(f"reading the model file from disk ({total / 1e9:.2f} GB)...", err=True)
        started.append(done)
    return report


def load_state_for(model, path: Path):
    """A saved state or a state-tuned .pth, refused (one line) unless it fits `model`."""
    from ..state import State
    return State.load(path, model)


# ------------------------------------------------------------------------------------------------- reports
def stats_doc(stats) -> dict:
    return {
        "prompt_tokens": stats.prompt_tokens,
        "generated_tokens": stats.generated_tokens,
        "prompt_seconds": stats.prompt_seconds,
        "generation_seconds": stats.generation_seconds,
        "prompt_tokens_per_s": stats.prompt_tokens_per_second,
        "generation_tokens_per_s": stats.generation_tokens_per_second,
        "peak_rss_bytes": peak_rss_bytes(),
    }


def report_stats(stats) -> None:
    click.echo(f"prompt      {stats.prompt_tokens} tokens in {stats.prompt_seconds:.3f} s "
               f"({stats.prompt_tokens_per_second:.1f} tokens/s)", err=True)
    click.echo(f"generated   {stats.generated_tokens} tokens in {stats.generation_seconds:.3f} s "
               f"({stats.generation_tokens_per_second:.1f} tokens/s), stopped by {stats.stop_reason}", err=True)
    click.echo(f"peak RSS    {peak_rss_bytes() / 1e6:.1f} MB", err=True)
