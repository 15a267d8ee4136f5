"""Batch jobs on Ray Data (rwkv_lite/ray.py, `rwkv-lite batch --ray`), against a local Ray instance this module
starts (ray.init(num_cpus=2)): the distributed job writes exactly the local job's output, the Dataset API gives
each row the text `generate` gives it alone, and a model file missing on the nodes is one clear error. Skipped
when Ray is not installed (the `ray` extra)."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

import rwkv_lite  # noqa: E402
from rwkv_lite.batch import JobSettings, LocalRunner, run_job  # noqa: E402
from rwkv_lite.cli import main as cli_main  # noqa: E402
from rwkv_lite.demo import demo_model_path  # noqa: E402
from rwkv_lite.errors import RwkvLiteError  # noqa: E402
from rwkv_lite.generate import generate_text  # noqa: E402
from rwkv_lite.ray import check_model_on_nodes, generate_dataset  # noqa: E402
from rwkv_lite.sampling import SamplingParams  # noqa: E402

PROMPTS = ["And God said", "In the beginning", "The LORD is my shepherd", "Blessed are the",
           "And it came to pass, when", "Jesus wept.", "Then", "Verily, verily, I say unto you"]


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray instance for the whole module (starting one takes seconds)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model():
    m = rwkv_lite.load(demo_model_path())
    yield m
    m.close()


def test_cli_ray_job_writes_what_the_local_job_writes(ray_instance, model, tmp_path):
    rows = [{"prompt": p, "max_tokens": 8 + i} for i, p in enumerate(PROMPTS)]
    rows += [{"id": f"s{i}", "prompt": p, "seed": 40 + i, "temperature": 0.8, "max_tokens": 12}
             for i, p in enumerate(PROMPTS[:4])]
    rows += [{"id": "chat", "messages": [{"role": "user", "content": "Who wept?"}], "max_tokens": 16,
              "metadata": {"k": [1, "x"]}}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
    local = tmp_path / "local.jsonl"
    run_job(src, local, JobSettings(max_tokens=10, sampling={"temperature": 0}), LocalRunner(model, max_batch=3))
    distributed = tmp_path / "ray.jsonl"
    result = CliRunner().invoke(cli_main, ["batch", str(src), "-o", str(distributed), "--greedy", "-n", "10",
                                           "--max-batch", "3", "--ray", "--ray-actors", "2", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["done"] == len(rows) and doc["bad_lines"] == 1 and doc["complete"]
    assert f"{src}:{len(rows) + 1}: not valid JSON" in result.stderr
    assert distributed.read_bytes() == local.read_bytes()
    assert ray.is_initialized()                     # the test's instance is used, and left running


def test_generate_dataset_rows_equal_generate_alone(ray_instance, model):
    items = [{"prompt": p, "seed": 3 + i, "top_p": 0.9, "max_tokens": 10, "label": f"row{i}"}
             for i, p in enumerate(PROMPTS[:5])]
    items.append({"prompt": None, "seed": None, "top_p": None, "max_tokens": None, "label": "empty"})
    ds = ray.data.from_items(items)
    out = generate_dataset(ds, demo_model_path(), max_tokens=4, max_batch=2, concurrency=1, num_cpus=1,
                           batch_size=3)
    rows = sorted(out.take_all(), key=lambda r: r["label"])
    by_label = {r["label"]: r for r in rows}
    for i, p in enumerate(PROMPTS[:5]):
        r = by_label[f"row{i}"]
        assert r["text"] == generate_text(model, p, max_tokens=10, params=SamplingParams(seed=3 + i, top_p=0.9))
        assert r["finish_reason"] == "length" and r["completion_tokens"] == 10 and r["error"] is None
        assert r["prompt"] == p                      # input columns are kept
    bad = by_label["empty"]
    assert bad["text"] is None and "exactly one of 'prompt'" in bad["error"]


def test_model_file_checked_on_every_node(ray_instance, tmp_path):
    missing = tmp_path / "not-here.safetensors"
    with pytest.raises(RwkvLiteError, match="readable at this path on every Ray node; node .*No such file"):
        check_model_on_nodes(str(missing))
    with pytest.raises(RwkvLiteError, match="every Ray node"):
        generate_dataset(ray.data.from_items([{"prompt": "x"}]), missing)
