"""The command samples in docs/cli.md and docs/demo-model.md are what the commands print today.

tools/doc_samples.py writes them; here every sample must be filled in by it, and the greedy ones (deterministic)
must still match the program's output exactly."""
from __future__ import annotations

import shlex
import sys

import pytest

from conftest import REPO, shared_file
import rwkv_lite
from test_cli import run

sys.path.insert(0, str(REPO / "tools"))
import doc_samples  # noqa: E402


def _all_samples():
    for doc in doc_samples.DOCS:
        for match, command in doc_samples.samples(doc.read_text(encoding="utf-8")):
            yield doc, match, command


def test_every_sample_was_made_by_the_tool():
    found = list(_all_samples())
    assert len(found) >= 10
    for doc, match, command in found:
        assert match["body"].startswith(f"$ {command}\n"), (doc.name, command)
        assert len(match["body"]) > len(command) + 3, (doc.name, command, "no output")


def _greedy(doc_name: str):
    return [(m, c) for d, m, c in _all_samples() if d.name == doc_name and doc_samples.deterministic(c)]


def _printed(match, command) -> str:
    return match["body"][len(f"$ {command}\n"):]


def test_demo_model_greedy_sample_matches():
    samples = _greedy("demo-model.md")
    assert samples
    for match, command in samples:
        args = shlex.split(command)
        assert args[0] == "rwkv-lite"
        result = run(*args[1:])
        assert result.exit_code == 0, result.stderr
        assert result.stdout + ("" if result.stdout.endswith("\n") else "\n") == _printed(match, command)


def test_cli_greedy_sample_matches(tmp_path, monkeypatch):
    rwkv_lite.convert(shared_file("rwkv-cpp-tiny", "tiny-rwkv-5v2-730K-FP32.bin"), tmp_path / "tiny.safetensors",
                      quant="fp32")
    monkeypatch.chdir(tmp_path)
    samples = _greedy("cli.md")
    assert samples
    for match, command in samples:
        args = shlex.split(command)
        result = run(*args[1:])
        assert result.exit_code == 0, result.stderr
        assert result.stdout + ("" if result.stdout.endswith("\n") else "\n") == _printed(match, command)
