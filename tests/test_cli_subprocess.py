"""The command line as users run it: a real process (`python -m rwkv_lite.cli`), real pipes, real exit codes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, shared_file
import rwkv_lite
from test_cli import english_fraction


@pytest.fixture(scope="module")
def tiny(tiny_fp32) -> Path:
    return tiny_fp32


def rwkv_lite_cli(*args, input: bytes | str | None = None, env: dict | None = None, timeout: float = 120):
    """Run `python -m rwkv_lite.cli ARGS`. One thread for Numba and BLAS: the tiny model's 64-wide matrices gain
    nothing from threads, and on a busy machine a thread pool costs them 10-30x."""
    if isinstance(input, str):
        input = input.encode("utf-8")
    environment = {**os.environ, "PYTHONPATH": str(REPO), "NUMBA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                   **(env or {})}
    return subprocess.run([sys.executable, "-m", "rwkv_lite.cli", *map(str, args)], input=input,
                          capture_output=True, env=environment, timeout=timeout, cwd=REPO)


def one_line_error(proc, code: int, *needles: str) -> None:
    stderr = proc.stderr.decode("utf-8", errors="replace")
    assert proc.returncode == code, (proc.returncode, stderr)
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_generate_streams_english_and_json_parses(tiny):
    proc = rwkv_lite_cli("generate", tiny, "-p", "The ", "-n", "80", "--greedy")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout.decode("utf-8")
    assert english_fraction(text) >= 0.6, text
    proc = rwkv_lite_cli("generate", tiny, "-p", "The ", "-n", "80", "--greedy", "--json")
    doc = json.loads(proc.stdout)
    assert doc["text"] == text and doc["stats"]["generated_tokens"] == 80


def test_output_is_utf8_under_a_non_utf8_locale(tiny):
    """Byte-level output can be any text (including U+FFFD for bytes that are not UTF-8): it must reach a pipe
    as UTF-8 even when Python would pick latin-1 for stdout."""
    proc = rwkv_lite_cli("generate", tiny, "-n", "60", "--temperature", "3", "--top-p", "1", "--seed", "2",
                         input="Café — naïve ", env={"PYTHONIOENCODING": "latin-1", "LC_ALL": "C"})
    assert proc.returncode == 0, proc.stderr
    proc.stdout.decode("utf-8")                         # strict: raises if anything else was written
    doc = json.loads(rwkv_lite_cli("generate", tiny, "-p", "Café ", "-n", "4", "--json",
                                   env={"PYTHONIOENCODING": "latin-1"}).stdout.decode("utf-8"))
    assert doc["prompt"] == "Café "


def test_stop_strings_through_a_pipe(tiny):
    full = rwkv_lite_cli("generate", tiny, "-p", "The ", "-n", "60", "--greedy").stdout.decode()
    stop = full[30:33]
    proc = rwkv_lite_cli("generate", tiny, "-p", "The ", "-n", "60", "--greedy", "--stop", stop)
    assert proc.stdout.decode() == full[:full.index(stop)]


def test_chat_with_piped_stdin_three_turns(tiny, tmp_path):
    state = tmp_path / "chat.state"
    proc = rwkv_lite_cli("chat", tiny, "--seed", "1", "-n", "24",
                         input=f"Hello\nWhat is the GNU license?\nThanks\n/save {state}\n")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.decode("utf-8")
    assert out.endswith("\n\n") and len(out[:-2].split("\n\n")) == 3
    assert "User:" not in out and state.exists()


def test_info_perplexity_bench_json(tiny):
    info = json.loads(rwkv_lite_cli("info", tiny, "--json").stdout)
    assert info["parameters"] > 500_000 and info["tokenizer"] == "bytes"
    text = shared_file("text", "english-gpl3-8k.txt")
    ppl = json.loads(rwkv_lite_cli("perplexity", tiny, text, "--json", "--max-tokens", "2000").stdout)
    assert ppl["tokens"] == 2000 and 1 < ppl["perplexity"] < 20
    bench = rwkv_lite_cli("bench", tiny, "--tokens", "4", "--prompt-lengths", "16", "--no-probe", "--json")
    assert bench.returncode == 0, bench.stderr
    doc = json.loads(bench.stdout)
    assert doc["decode_ms_per_token"] > 0 and doc["prompt_tokens_per_s"]["16"] > 0


def test_errors_are_one_line_with_the_right_exit_code(tiny, tmp_path):
    missing = tmp_path / "missing.safetensors"
    one_line_error(rwkv_lite_cli("generate", missing, "-p", "x"), 1, str(missing))
    text = shared_file("text", "english-gpl3-8k.txt")
    one_line_error(rwkv_lite_cli("generate", text, "-p", "x"), 1, str(text))
    bad = rwkv_lite_cli("generate", tiny, "-p", "x", "--temperature", "-1")
    assert bad.returncode == 2 and b"Traceback" not in bad.stderr and b"--temperature" in bad.stderr


def test_closed_pipe_ends_quietly(tiny):
    """`rwkv-lite generate ... | head -c 5`: no traceback when the reader goes away."""
    proc = subprocess.Popen([sys.executable, "-m", "rwkv_lite.cli", "generate", str(tiny), "-p", "The ",
                             "-n", "100000", "--greedy"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO), "NUMBA_NUM_THREADS": "1"}, cwd=REPO)
    assert len(proc.stdout.read(5)) == 5
    proc.stdout.close()
    _, stderr = proc.communicate(timeout=60)
    assert b"Traceback" not in stderr and b"Exception ignored" not in stderr, stderr
    assert proc.returncode == 0
