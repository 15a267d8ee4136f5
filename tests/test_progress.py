"""Every long operation reports progress through one protocol: progress(done, total, info), done never
decreasing and reaching total at the end (rwkv_lite/progress.py)."""
from __future__ import annotations

import rwkv_lite
from conftest import shared_file
from rwkv_lite import benchmark
from rwkv_lite.evaluate import perplexity


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, done, total, info=None):
        self.calls.append((done, total, info))

    def check(self, final_total=None):
        assert self.calls, "progress was never reported"
        dones = [d for d, _, _ in self.calls]
        assert dones == sorted(dones)
        totals = {t for _, t, _ in self.calls}
        assert len(totals) == 1
        if final_total is not None:
            assert totals == {final_total}


def test_convert_reports_tensors(tmp_path):
    progress = Recorder()
    rwkv_lite.convert(shared_file("rwkv-cpp-tiny", "tiny-rwkv-5v2-730K-FP32.bin"), tmp_path / "m.safetensors",
                      quant="fp32", progress=progress)
    progress.check()
    done, total, name = progress.calls[-1]
    assert done == total and isinstance(name, str) and name


def test_verify_perplexity_and_bench_report_on_one_protocol(tiny_fp32):
    progress = Recorder()
    result = rwkv_lite.verify(tiny_fp32, progress)
    progress.check(result.bytes_checked)
    assert progress.calls[-1][0] == result.bytes_checked

    progress = Recorder()
    with rwkv_lite.load(tiny_fp32) as model:
        ids = model.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 30)
        score = perplexity(model, ids, chunk=256, progress=progress)
    progress.check(len(ids))
    assert progress.calls[-1][0] == len(ids)
    assert progress.calls[-1][2] == f"perplexity {score.perplexity:.3f}"

    progress = Recorder()
    benchmark.run(tiny_fp32, threads=1, decode_tokens=2, prompt_lengths=(4, 8), probe=False, progress=progress)
    assert [info for _, _, info in progress.calls] == ["decode", "prompt 4", "prompt 8"]
    progress.check(3)
