"""Conventional flags (as llama.cpp / mlx-lm users type them), their old spellings, and `perplexity` on long
texts: -f, the default token limit, the running score, and Ctrl-C keeping the partial score."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, shared_file
from test_cli import assert_one_line_error, run, tiny  # noqa: F401  (tiny: the converted tiny model fixture)


def _json(result) -> dict:
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


# ------------------------------------------------------------------------------------------------ sampling flags
def test_short_and_long_sampling_flags_mean_the_same(tiny):
    long = _json(run("generate", tiny, "--prompt", "The ", "--max-tokens", "12", "--temperature", "0.8",
                     "--top-p", "0.9", "--top-k", "20", "--min-p", "0.05", "--seed", "3", "--threads", "1", "--json"))
    short = _json(run("generate", "-m", tiny, "-p", "The ", "-n", "12", "--temp", "0.8", "--top-p", "0.9",
                      "--top-k", "20", "--min-p", "0.05", "-s", "3", "-t", "1", "--json"))
    assert short["tokens"] == long["tokens"] and short["params"] == long["params"]
    assert long["params"]["temperature"] == 0.8 and long["params"]["seed"] == 3 and long["params"]["top_k"] == 20
    other_seed = _json(run("generate", tiny, "-p", "The ", "-n", "12", "--temp", "0.8", "-s", "4", "--json"))
    assert other_seed["params"]["seed"] == 4


def test_temperature_zero_is_exactly_greedy(tiny):
    """Same parameters, same text; and it is the argmax even where the default penalties would change it."""
    prompt = ["-p", "the the the the the the ", "-n", "40", "--json"]
    greedy = _json(run("generate", tiny, *prompt, "--greedy"))
    zero = _json(run("generate", tiny, *prompt, "--temperature", "0"))
    temp = _json(run("generate", tiny, *prompt, "--temp", "0"))
    assert greedy["params"] == zero["params"] == temp["params"]
    assert greedy["text"] == zero["text"] == temp["text"]
    assert greedy["params"]["presence_penalty"] == 0 and greedy["params"]["frequency_penalty"] == 0
    penalised = _json(run("generate", tiny, *prompt, "--temperature", "0", "--presence-penalty", "0.2",
                          "--frequency-penalty", "0.2"))
    assert penalised["params"]["presence_penalty"] == 0.2           # penalties apply when asked for
    assert penalised == _json(run("generate", tiny, *prompt, "--greedy", "--presence-penalty", "0.2",
                                  "--frequency-penalty", "0.2")) | {"stats": penalised["stats"]}


def test_help_documents_the_conventional_flags():
    generate = run("generate", "--help").stdout
    for flag in ("-m, --model", "-p, --prompt", "-f, --file", "-n, --max-tokens", "--temperature, --temp",
                 "--top-p", "--top-k", "--min-p", "-s, --seed", "-t, --threads", "--prompt-ids"):
        assert flag in generate, flag
    assert "exactly as" in generate and "same as --temperature 0" in " ".join(generate.split())
    perplexity = run("perplexity", "--help").stdout
    for flag in ("-m, --model", "-f, --file", "-n, --max-tokens", "--quiet", "-t, --threads"):
        assert flag in perplexity, flag
    assert not re.search(r"-q\b", perplexity)
    assert "-q, --quant" in run("convert", "--help").stdout
    assert "-n, --decode-tokens" in run("bench", "--help").stdout
    assert "-n, --max-tokens" in run("calibrate", "--help").stdout
    for command in ("generate", "bench", "calibrate"):          # the ambiguous old name is no longer shown
        assert "--tokens " not in run(command, "--help").stdout


def test_old_spellings_still_work(tiny):
    by_ids = run("generate", tiny, "--tokens", "84 104 101 32", "-n", "6", "--greedy").stdout
    assert by_ids == run("generate", tiny, "--prompt-ids", "84 104 101 32", "-n", "6", "--greedy").stdout
    assert by_ids == run("generate", tiny, "-p", "The ", "-n", "6", "--greedy").stdout
    old = _json(run("bench", tiny, "--tokens", "3", "--prompt-lengths", "", "--no-probe", "--json"))
    new = _json(run("bench", tiny, "-n", "3", "--prompt-lengths", "", "--no-probe", "--json"))
    assert old["decode_tokens"] == new["decode_tokens"] == 3


def test_q_means_quantization_only(tiny, tmp_path):
    text = shared_file("text", "english-gpl3-8k.txt")
    assert run("perplexity", tiny, text, "-q").exit_code == 2
    out = tmp_path / "tiny-int8.safetensors"
    assert run("convert", tiny, out, "-q", "int8", "--quiet").exit_code == 0
    assert "int8" in run("info", out).stdout


# ------------------------------------------------------------------------------------------------ perplexity
def test_perplexity_file_option_and_limit_message(tiny):
    text = shared_file("text", "english-gpl3-8k.txt")
    positional = _json(run("perplexity", tiny, text, "-n", "300", "--json"))
    by_options = run("perplexity", "-m", tiny, "-f", text, "-n", "300")
    assert by_options.exit_code == 0
    assert "scoring the first 300 of 8,192 tokens" in by_options.stderr and "--max-tokens 0" in by_options.stderr
    assert re.search(rf"perplexity\s+{positional['perplexity']:.3f}", by_options.stdout)
    assert positional["tokens"] == 300 and positional["text_tokens"] == 8192 and positional["partial"] is False
    whole = _json(run("perplexity", tiny, "-f", text, "-n", "0", "--json"))
    assert whole["tokens"] == 8192


def test_perplexity_default_limit_on_a_long_text(tiny):
    book = shared_file("text", "kjv-bible.txt")
    result = run("perplexity", tiny, "-f", book, "--json")
    doc = _json(result)
    assert doc["tokens"] == 16384 and doc["text_tokens"] == book.stat().st_size      # byte-level model
    assert "the default limit" in result.stderr


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")         # utime + stime


def _wait_for_cpu_seconds(pid: int, seconds: float, deadline_s: float = 120.0) -> None:
    """Wait until the process has computed for `seconds` more CPU seconds: progress that a loaded machine
    (a test run under `nice`, other jobs on the cores) cannot fake the way wall-clock time can."""
    if not os.path.exists(f"/proc/{pid}/stat"):
        time.sleep(4 * seconds)
        return
    start, deadline = _cpu_seconds(pid), time.monotonic() + deadline_s
    while _cpu_seconds(pid) - start < seconds and time.monotonic() < deadline:
        time.sleep(0.1)


def test_perplexity_ctrl_c_prints_the_partial_score(tiny):
    """A real process and a real SIGINT while it scores a 4.4 MB text: the score so far, exit code 130."""
    book = shared_file("text", "kjv-bible.txt")
    # Compiled kernels first (into the cache the process reads), so that the SIGINT lands in the scoring; one
    # during the compile stops the run before any score (test_kernel_cache.py checks that).
    _json(run("perplexity", tiny, "-f", shared_file("text", "english-gpl3-8k.txt"), "-n", "3000", "--json"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "NUMBA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rwkv_lite.cli", "perplexity", str(tiny), "-f", str(book),
                             "-n", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)
    try:
        line = b""
        while b"scoring" not in line:                 # "scoring 4,404,412 tokens..." once the model is loaded
            line = proc.stderr.readline()
            assert line, "the process ended before scoring"
        _wait_for_cpu_seconds(proc.pid, 3.0)          # a few chunks (the whole text would take minutes)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    out, err = stdout.decode(), stderr.decode()
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err and "interrupted" in err
    assert re.search(r"interrupted after [\d,]+ of 4,404,412 tokens", out), (out, err)
    tokens = int(re.search(r"tokens\s+([\d,]+)", out)[1].replace(",", ""))
    ppl = float(re.search(r"perplexity\s+([\d.]+)", out)[1])
    assert 512 <= tokens < 4_404_412 and 1.0 < ppl < 30, out


@pytest.mark.skipif(os.name != "posix", reason="needs a pseudo-terminal")
def test_perplexity_progress_bar_shows_the_running_perplexity(tiny):
    """On a terminal the bar carries the perplexity so far; its last value is the final score."""
    import pty
    text = shared_file("text", "english-gpl3-8k.txt")
    pid, fd = pty.fork()
    if pid == 0:                                           # the child: the CLI with a terminal as stdout/stderr
        os.environ.update({"PYTHONPATH": str(REPO), "NUMBA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})
        os.execv(sys.executable, [sys.executable, "-m", "rwkv_lite.cli", "perplexity", str(tiny), "-f", str(text),
                                  "-n", "3000"])
    out = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 4096)
        except OSError:                                    # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    shown = out.decode("utf-8", errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, shown
    running = re.findall(r"scoring .*?perplexity (\d+\.\d{3})", shown)
    assert len(running) >= 2, shown                        # updated as chunks complete
    final = re.search(r"\nperplexity\s+(\d+\.\d{3})", shown.replace("\r", ""))[1]
    assert running[-1] == final
