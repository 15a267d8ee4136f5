"""Offline batch jobs (rwkv_lite/batch/, `rwkv-lite batch`) on the built-in demo model: every output line equals
the same prompt run alone through rwkv_lite.generate with the same options and seed, in input order; a job killed
with SIGKILL and run again ends with exactly one line per input id; bad lines are reported with their line number
and skipped (or fail the job with --strict); the output guards hold. Ray is not needed here (test_batch_ray.py)."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import rwkv_lite
from conftest import REPO
from rwkv_lite.batch import (BatchError, JobSettings, LineError, LocalRunner, ResultFile, check_fields, read_jobs,
                             run_job)
from rwkv_lite.chat_format import CHAT_STOP, chat_prompt_ids
from rwkv_lite.cli import main as cli_main
from rwkv_lite.demo import demo_model_path
from rwkv_lite.evaluate import perplexity
from rwkv_lite.generate import generate_text
from rwkv_lite.sampling import SamplingParams

PROMPTS = ["And God said", "In the beginning", "The LORD is my shepherd", "Blessed are the",
           "And it came to pass, when", "Jesus wept.", "Then", "Verily, verily, I say unto you"]


@pytest.fixture(scope="module")
def model():
    m = rwkv_lite.load(demo_model_path())
    yield m
    m.close()


def write_jsonl(path: Path, rows) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else json.dumps(row) + "\n")
    return path


def read_results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().split(b"\n") if line]


def test_each_line_equals_generate_alone_greedy_seeded_and_chat(model, tmp_path):
    chat = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who said let there be light?"}]
    rows = [{"prompt": p, "max_tokens": 10 + i} for i, p in enumerate(PROMPTS[:4])]               # job-level greedy
    rows += [{"prompt": p, "seed": 20 + i, "temperature": 0.9, "top_p": 0.95, "max_tokens": 16}
             for i, p in enumerate(PROMPTS[4:])]                                                 # seeded sampling
    rows += [{"id": "chat", "messages": chat, "max_tokens": 20, "stop": ["."]},
             {"id": "ids", "prompt": [65, 110, 100], "max_tokens": 6, "metadata": {"source": "ids", "n": [1, 2]}}]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    summary = run_job(src, out, JobSettings(max_tokens=12, sampling={"temperature": 0}),
                      LocalRunner(model, max_batch=3))
    assert summary.complete and summary.done == len(rows) and not summary.failures
    assert not out.with_name("out.jsonl.partial").exists()
    results = read_results(out)
    assert [r["id"] for r in results] == [1, 2, 3, 4, 5, 6, 7, 8, "chat", "ids"]     # input order; line numbers
    greedy = SamplingParams.greedy()
    for i, (row, result) in enumerate(zip(rows[:4], results)):
        assert result["text"] == generate_text(model, row["prompt"], max_tokens=10 + i, params=greedy)
        assert result["finish_reason"] == "length" and result["completion_tokens"] == 10 + i
        assert result["prompt_tokens"] == len(model.tokenizer.encode(row["prompt"]))
    for row, result in zip(rows[4:8], results[4:8]):
        # a line's temperature replaces the job's 0, so the default penalties apply, as `generate --temp 0.9`
        params = SamplingParams(seed=row["seed"], temperature=0.9, top_p=0.95)
        assert result["text"] == generate_text(model, row["prompt"], max_tokens=16, params=params)
    ids, _ = chat_prompt_ids(model.tokenizer, chat)
    assert results[8]["text"] == generate_text(model, ids, max_tokens=20, params=greedy, stop=[CHAT_STOP, "."])
    assert results[8]["prompt_tokens"] == len(ids)
    assert results[9]["text"] == generate_text(model, [65, 110, 100], max_tokens=6, params=greedy)
    assert results[9]["metadata"] == {"source": "ids", "n": [1, 2]}


def test_job_seed_applies_to_lines_without_one(model, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": p} for p in PROMPTS[:3]] + [{"prompt": PROMPTS[3], "seed": 5}])
    out = tmp_path / "out.jsonl"
    run_job(src, out, JobSettings(max_tokens=14, sampling={"seed": 9, "top_p": 0.9}), LocalRunner(model, max_batch=2))
    results = read_results(out)
    for p, seed, r in zip(PROMPTS[:4], (9, 9, 9, 5), results):
        assert r["text"] == generate_text(model, p, max_tokens=14, params=SamplingParams(seed=seed, top_p=0.9))


def test_perplexity_task_equals_evaluate(model, tmp_path):
    texts = ["In the beginning God created the heaven and the earth.", "Jesus wept.", "A"]
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": f"t{i}", "text": t} for i, t in enumerate(texts)])
    out = tmp_path / "scores.jsonl"
    summary = run_job(src, out, JobSettings(task="perplexity"), LocalRunner(model))
    assert summary.complete
    results = read_results(out)
    assert [r["id"] for r in results] == ["t0", "t1", "t2"]
    for text, r in zip(texts[:2], results):
        ids = model.tokenizer.encode(text)
        expected = perplexity(model, ids, n_bytes=len(model.tokenizer.decode_bytes(ids[1:])))
        assert r["tokens"] == len(ids) and r["predicted"] == len(ids) - 1
        assert r["nll"] == pytest.approx(expected.nll, rel=1e-9)
        assert r["perplexity"] == pytest.approx(expected.perplexity, rel=1e-9)
        assert r["bits_per_byte"] == pytest.approx(expected.bits_per_byte, rel=1e-9)
        assert r["logprob"] == pytest.approx(-expected.nll * (len(ids) - 1), rel=1e-9)
    assert results[2]["tokens"] == 1 and results[2]["perplexity"] is None       # nothing to score in one token


def test_line_checks():
    good = check_fields({"prompt": "x", "stop": "\n", "seed": 3, "temperature": 0}, "generate")
    assert good["stop"] == ["\n"]
    for doc, needle in [
        ([1, 2], "JSON object"), ({}, "exactly one of 'prompt'"), ({"prompt": "a", "messages": []}, "exactly one"),
        ({"prompt": 5}, "'prompt' must be"), ({"prompt": [1, -2]}, "'prompt' must be"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "role 'robot'"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "text parts"),
        ({"prompt": "a", "seed": True}, "'seed'"), ({"prompt": "a", "seed": 1.5}, "'seed'"),
        ({"prompt": "a", "temperature": "hot"}, "'temperature'"), ({"prompt": "a", "top_p": 2}, "'top_p'"),
        ({"prompt": "a", "max_tokens": -1}, "'max_tokens'"), ({"prompt": "a", "stop": [""]}, "'stop'"),
        ({"prompt": "a", "max_token": 5}, "unknown field 'max_token'"),
    ]:
        with pytest.raises(LineError, match=needle):
            check_fields(doc, "generate")
    with pytest.raises(LineError, match="no 'text'"):
        check_fields({"prompt": "a"}, "perplexity")


def test_bad_lines_reported_with_line_numbers_and_skipped(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [
        {"prompt": "And God said", "max_tokens": 4},
        "{not json\n",
        "\n",                                                   # blank: ignored, not an error
        {"prompt": "Then", "temperature": -1},
        b"\xff\xfe{}\n".decode("latin-1"),                      # (written as UTF-8 of those characters: valid)
        {"id": "x", "prompt": "Jesus wept."},
        {"id": "x", "prompt": "duplicate"},
        '["a list"]\n',
        {"prompt": "In the beginning", "max_tokens": 3},
    ])
    with open(src, "ab") as f:
        f.write(b'{"prompt": "\xff"}\n')                          # line 10: not UTF-8
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(cli_main, ["batch", str(src), "-o", str(out), "--greedy", "-n", "5"])
    assert result.exit_code == 0, result.output
    stderr = result.stderr
    for line, needle in [(2, "not valid JSON"), (4, "'temperature'"), (5, "JSON"), (7, "duplicate id \"x\""),
                         (8, "JSON object"), (10, "UTF-8")]:
        assert f"in.jsonl:{line}: " in stderr and needle in stderr.split(f"in.jsonl:{line}: ")[1].splitlines()[0]
    assert "in.jsonl:3:" not in stderr and "Traceback" not in stderr
    assert "6 bad lines skipped" in stderr
    assert [r["id"] for r in read_results(out)] == [1, "x", 9]

    strict_out = tmp_path / "strict.jsonl"
    result = CliRunner().invoke(cli_main, ["batch", str(src), "-o", str(strict_out), "--strict"])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {src}:2: not valid JSON")
    assert "(and 5 more bad lines)" in result.stderr
    assert not strict_out.exists() and not strict_out.with_name("strict.jsonl.partial").exists()


def test_completed_ids_are_kept_and_never_redone_and_order_restored(model, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": p, "max_tokens": 6} for p in PROMPTS[:4]])
    out = tmp_path / "out.jsonl"
    partial = tmp_path / "out.jsonl.partial"
    # an earlier run finished line 3 (kept as it is: not recomputed) and died writing line 1
    partial.write_bytes(b'{"id": 3, "text": "KEPT", "finish_reason": "length", "prompt_tokens": 1, '
                        b'"completion_tokens": 1}\n{"id": 1, "text": "torn')
    summary = run_job(src, out, JobSettings(sampling={"temperature": 0}), LocalRunner(model, max_batch=2))
    assert summary.dropped_bytes == len(b'{"id": 1, "text": "torn')
    assert summary.already_done == 1 and summary.done_now == 3 and summary.complete
    results = read_results(out)
    assert [r["id"] for r in results] == [1, 2, 3, 4]                      # rewritten in input order
    assert results[2]["text"] == "KEPT"
    assert results[0]["text"] == generate_text(model, PROMPTS[0], max_tokens=6, params=SamplingParams.greedy())
    assert not partial.exists()

    # the finished output is left alone when nothing is to do; a grown input only adds the new lines
    before = out.read_bytes()
    assert run_job(src, out, JobSettings(), LocalRunner(model)).done_now == 0 and out.read_bytes() == before
    with open(src, "a") as f:
        f.write(json.dumps({"id": "new", "prompt": "Amen", "max_tokens": 3}) + "\n")
    summary = run_job(src, out, JobSettings(sampling={"temperature": 0}), LocalRunner(model))
    assert summary.already_done == 4 and summary.done_now == 1
    assert out.read_bytes().startswith(before) and read_results(out)[-1]["id"] == "new"


def test_output_guards(model, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Then", "max_tokens": 2}])
    foreign = tmp_path / "notes.jsonl"
    foreign.write_text("my own notes\n")
    with pytest.raises(BatchError, match="not a result line"):
        run_job(src, foreign, JobSettings(), LocalRunner(model))
    assert foreign.read_text() == "my own notes\n"
    with pytest.raises(BatchError, match="must not be the input"):
        run_job(src, src, JobSettings(), LocalRunner(model))
    scores = tmp_path / "scores.jsonl"
    scores.write_text('{"id": 1, "tokens": 2, "perplexity": 3.0}\n')
    with pytest.raises(BatchError, match="results of --task perplexity"):
        run_job(src, scores, JobSettings(), LocalRunner(model))
    busy = ResultFile(tmp_path / "busy.jsonl", "generate")
    busy.begin(busy.open())                                  # another job holds the output
    try:
        if sys.platform != "win32":
            with pytest.raises(BatchError, match="another batch job"):
                run_job(src, tmp_path / "busy.jsonl", JobSettings(), LocalRunner(model))
    finally:
        busy.close()
    with pytest.raises(BatchError, match="cannot read the input"):
        read_jobs(tmp_path / "missing.jsonl")


def test_cli_errors_are_one_line(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Then"}])
    runner = CliRunner()
    for args, code, needle in [
        (["batch", str(tmp_path / "no-model.safetensors"), str(src), "-o", str(tmp_path / "o.jsonl")], 1,
         "no such model file"),
        (["batch", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "o.jsonl")], 1, "cannot read the input"),
        (["batch", str(src)], 2, "--output"),
        (["batch", "--ray", str(src), "-o", str(tmp_path / "o.jsonl")], 2, "put --ray after"),
        (["batch", str(src), "-o", str(tmp_path / "o.jsonl"), "--task", "perplexity", "--temp", "1"], 2,
         "do not apply"),
        (["batch", str(src), "-o", str(tmp_path / "nowhere" / "o.jsonl")], 1, "does not exist"),
        (["batch", str(src), "-o", str(tmp_path / "o.jsonl"), "--ray", "-t", "2"], 2, "--ray-cpus"),
        (["batch", str(src), "-o", str(tmp_path / "o.jsonl"), "--ray-actors", "2"], 2, "need --ray"),
    ]:
        result = runner.invoke(cli_main, args)
        assert result.exit_code == code, (args, result.output)
        assert needle in result.output and "Traceback" not in result.output


def test_ray_extra_is_optional(tmp_path, monkeypatch):
    code = ("import sys, rwkv_lite.batch, rwkv_lite.ray, rwkv_lite.cli.batch; "
            "print('ray' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.stdout.strip() == "False", proc.stderr              # importing ours never imports Ray
    monkeypatch.setitem(sys.modules, "ray", None)                   # as if Ray were not installed
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Then"}])
    result = CliRunner().invoke(cli_main, ["batch", str(src), "-o", str(tmp_path / "o.jsonl"), "--ray"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        "error: Ray is not installed: pip install 'rwkv-lite[ray]' (Ray Data is needed)")


def test_resume_after_sigkill_gives_one_line_per_id(model, tmp_path):
    """A real process killed with SIGKILL mid-job, then the same command again: every id exactly once, the
    text of an uninterrupted run, and the lines done before the kill not recomputed."""
    if not hasattr(signal, "SIGKILL"):
        pytest.skip("no SIGKILL on this platform")
    # long enough lines that the job is still running when the test sees its first lines, however fast the
    # machine (results are written every 0.5 s: with 16-20 tokens a line a fast CI machine ran the whole job
    # before its first write)
    n = 24
    rows = [{"id": f"p{i}", "prompt": PROMPTS[i % len(PROMPTS)] + f" {i}", "max_tokens": 200 + i % 5}
            for i in range(n)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    partial = tmp_path / "out.jsonl.partial"
    env = {**os.environ, "PYTHONPATH": str(REPO), "NUMBA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "rwkv_lite", "batch", str(src), "-o", str(out), "--greedy", "--max-batch", "2",
           "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if partial.exists() and partial.read_bytes().count(b"\n") >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the job ended before it could be killed: " + proc.stderr.read().decode()
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert not out.exists()
    kept = partial.read_bytes()
    done_before = kept.count(b"\n")
    assert 3 <= done_before < n
    with open(partial, "ab") as f:                 # as if the kill had landed in the middle of a write
        f.write(b'{"id": "p23", "text": "half a li')
    resumed = subprocess.run(cmd, capture_output=True, env=env, cwd=REPO, timeout=600)
    assert resumed.returncode == 0, resumed.stderr.decode()
    doc = json.loads(resumed.stdout)
    assert doc["already_done"] == done_before and doc["done_now"] == n - done_before and doc["complete"]
    assert "dropped a partial last line" in resumed.stderr.decode()
    results = read_results(out)
    assert [r["id"] for r in results] == [r["id"] for r in rows]          # one line per id, in input order
    assert out.read_bytes().startswith(kept)                             # the lines done before: untouched
    reference = tmp_path / "reference.jsonl"
    run_job(src, reference, JobSettings(sampling={"temperature": 0}), LocalRunner(model, max_batch=5))
    assert out.read_bytes() == reference.read_bytes()
    assert all(math.isfinite(r["completion_tokens"]) for r in results)
