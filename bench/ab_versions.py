"""Speed of two rwkv-lite source trees on the same model files, interleaved: the no-regression check of a refactor.

    git worktree add /tmp/before <commit>
    python bench/ab_versions.py /tmp/before . --models eagle-1b5-int8.st eagle-7b-int8.st --rounds 6

Each tree gets one worker process per model (PYTHONPATH=<tree>, so that tree's `rwkv_lite` is imported; the
worker prints which file it loaded). Workers stay up for the whole run: the model is loaded and the kernels
compiled once, the page cache is warm. A round asks every worker in turn (the order reversed every other round)
for --tokens single-token decode steps continuing one state (the way that tree's generate() takes them:
rwkv_lite.benchmark.DecodeSteps, where the tree has it) and one --prompt-token prompt from a fresh state
(--prompt 0: none).
Reported per model and tree: the median decode ms/token over all steps and prompt tokens/s over all rounds, and
the median over rounds of the per-round ratio B / A (decode: > 1 means B is slower; prompt: > 1 means B is
faster), which survives a load that drifts between rounds, and the same for the process's CPU time per token
(with --threads 1 that is the work itself, nearly independent of other processes' load; with more threads it
includes the pool's spinning). The CPUs' busy share before each round is printed: trust wall-clock figures only
when it is low.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_decode import cpu_busy_share, cpu_model  # noqa: E402

_WORKER = r"""
import json, os, sys, time
import numpy as np
import rwkv_lite
from rwkv_lite.kernels.threads import set_threads
try:                                        # decode steps the way that tree's generate() takes them
    from rwkv_lite.benchmark import DecodeSteps
except ImportError:                         # trees from before it: forward() with a fresh state each step
    DecodeSteps = None
threads = set_threads(int(sys.argv[2]) if sys.argv[2] != "0" else None)
model = rwkv_lite.load(sys.argv[1])
rng = np.random.default_rng(0)
vocab = model.config.vocab_size if hasattr(model.config, "vocab_size") else model.config["vocab_size"]
if DecodeSteps is not None:
    decoder = DecodeSteps(model, 1)
    step = decoder.step
    logits = decoder.logits
else:
    logits, state = model.forward([1])
    def step(token):
        global state
        out, state = model.forward([token], state)
        return out
for _ in range(2):
    logits = step(int(np.argmax(logits)))
model.forward(rng.integers(0, vocab, 16).tolist())
print(json.dumps({"ready": rwkv_lite.__file__, "threads": threads}), flush=True)
for line in sys.stdin:
    tokens, prompt = json.loads(line)
    steps, cpu = [], []
    for _ in range(tokens):
        t, c = time.perf_counter(), time.process_time()
        logits = step(int(np.argmax(logits)))
        steps.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    prompt_s = prompt_cpu = 0.0
    if prompt:
        ids = rng.integers(0, vocab, prompt).tolist()
        t, c = time.perf_counter(), time.process_time()
        model.forward(ids)
        prompt_s, prompt_cpu = time.perf_counter() - t, time.process_time() - c
    print(json.dumps({"steps": steps, "cpu": cpu, "prompt_s": prompt_s, "prompt_cpu": prompt_cpu}), flush=True)
"""


class Worker:
    def __init__(self, tree: str, model: str, threads: int):
        env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER, model, str(threads)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     cwd=os.path.abspath(tree))
        hello = json.loads(self.proc.stdout.readline())
        self.loaded_from = hello["ready"]
        self.steps: list[float] = []
        self.round_decode: list[float] = []
        self.round_prompt: list[float] = []
        self.round_decode_cpu: list[float] = []
        self.round_prompt_cpu: list[float] = []

    def round(self, tokens: int, prompt: int) -> None:
        self.proc.stdin.write(json.dumps([tokens, prompt]) + "\n")
        self.proc.stdin.flush()
        out = json.loads(self.proc.stdout.readline())
        self.steps += out["steps"]
        self.round_decode.append(statistics.median(out["steps"]))
        self.round_decode_cpu.append(statistics.median(out["cpu"]))
        if prompt:
            self.round_prompt.append(prompt / out["prompt_s"])
            self.round_prompt_cpu.append(out["prompt_cpu"] / prompt)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tree_a", help="source tree A (the baseline), holding rwkv_lite/")
    ap.add_argument("tree_b", help="source tree B (the change)")
    ap.add_argument("--models", nargs="+", required=True)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=8, help="decode steps per worker per round")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens per worker per round (0: none)")
    ap.add_argument("--threads", type=int, default=0, help="threads per worker (default: every core)")
    args = ap.parse_args()

    print(f"CPU: {cpu_model()}, {os.cpu_count()} CPUs, NUMBA_CPU_NAME={os.environ.get('NUMBA_CPU_NAME', '(host)')}")
    for model in args.models:
        a, b = Worker(args.tree_a, model, args.threads), Worker(args.tree_b, model, args.threads)
        print(f"{os.path.basename(model)}: A = {a.loaded_from}, B = {b.loaded_from}")
        for i in range(args.rounds):
            busy = cpu_busy_share()
            for w in ((a, b) if i % 2 == 0 else (b, a)):
                w.round(args.tokens, args.prompt)
            prompts = (f", prompt A {a.round_prompt[-1]:.1f} B {b.round_prompt[-1]:.1f} tok/s" if args.prompt
                       else "")
            print(f"  round {i + 1}/{args.rounds} (CPUs {busy:.0%} busy before, load {os.getloadavg()[0]:.2f}): "
                  f"decode A {1e3 * a.round_decode[-1]:.1f} B {1e3 * b.round_decode[-1]:.1f} ms{prompts}", flush=True)
        dec = statistics.median(y / x for x, y in zip(a.round_decode, b.round_decode))
        print(f"  decode ms/token: A {1e3 * statistics.median(a.steps):.1f}, B {1e3 * statistics.median(b.steps):.1f}; "
              f"B/A per round (median) {dec:.3f}")
        dc = statistics.median(y / x for x, y in zip(a.round_decode_cpu, b.round_decode_cpu))
        cpu_line = (f"  CPU time (all of the process's threads; with --threads 1 the work itself, whatever the load): "
                    f"decode A {1e3 * statistics.median(a.round_decode_cpu):.1f} B "
                    f"{1e3 * statistics.median(b.round_decode_cpu):.1f} ms/token, B/A {dc:.3f}")
        if args.prompt:
            pro = statistics.median(y / x for x, y in zip(a.round_prompt, b.round_prompt))
            print(f"  prompt tok/s:    A {statistics.median(a.round_prompt):.1f}, "
                  f"B {statistics.median(b.round_prompt):.1f}; B/A per round (median) {pro:.3f}", flush=True)
            pc = statistics.median(y / x for x, y in zip(a.round_prompt_cpu, b.round_prompt_cpu))
            cpu_line += (f"; prompt A {1e3 * statistics.median(a.round_prompt_cpu):.1f} B "
                         f"{1e3 * statistics.median(b.round_prompt_cpu):.1f} ms/token, B/A {pc:.3f}")
        print(cpu_line, flush=True)
        a.close(), b.close()


if __name__ == "__main__":
    main()
