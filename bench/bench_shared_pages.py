"""Do two processes running the same model share its pages? RSS and PSS of two concurrent `rwkv-lite generate`.

    python bench/bench_shared_pages.py                     # 16 x 2048, vocab 65536, int8: a 1.2 GB model file
    python bench/bench_shared_pages.py --layers 24 --quant fp16 --tokens 64 --json

Writes a random RWKV-5.2 checkpoint (bench/make_checkpoint.py, bf16) into a temporary folder, converts it, deletes
the checkpoint, then starts two `rwkv-lite generate MODEL --tokens ... -n N --greedy` processes at once (one thread
each) and samples /proc/PID/smaps_rollup (whole process) and /proc/PID/smaps (the model file's mapping alone)
every 0.2 s while both run. Weights are mapped read-only from the file, so both processes map the same page-cache
pages: each process's RSS includes the whole model, but its PSS (proportional set size: a page shared by n
processes counts 1/n) should hold about half of it. The model file is deleted at the end (unless --keep).

Reported per process, at the sample where the two model mappings were most resident together: RSS and PSS of
the process, and Rss / Pss / Shared_Clean of the model mapping; also the model file size and the sum of PSS
(what the two cost the machine together).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MB = 1e6


def write_checkpoint(folder: Path, n_layer: int, C: int, vocab: int) -> None:
    """bench/make_checkpoint.py in a subprocess (it registers stand-in `torch` modules to write the pickle)."""
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        sys.path.insert(0, {str(REPO / "bench")!r})
        from make_checkpoint import write_checkpoint
        write_checkpoint(Path({str(folder)!r}), {n_layer}, {C}, {vocab})
    """)
    subprocess.run([sys.executable, "-c", code], check=True, stderr=subprocess.DEVNULL)


def smaps_rollup(pid: int) -> dict[str, int]:
    """Whole-process memory counters (bytes) from /proc/PID/smaps_rollup."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out


def mapping_counters(pid: int, path: Path) -> dict[str, int]:
    """Counters (bytes) summed over the mappings of `path` in /proc/PID/smaps."""
    out: dict[str, int] = {}
    target = str(path)
    inside = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if parts and "-" in parts[0] and len(parts) >= 5 and not parts[0].endswith(":"):
                inside = len(parts) >= 6 and " ".join(parts[5:]) == target
            elif inside and len(parts) == 3 and parts[2] == "kB":
                key = parts[0].rstrip(":")
                out[key] = out.get(key, 0) + int(parts[1]) * 1024
    return out


def run_pair(model: Path, tokens: int) -> tuple[list[dict], float]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "NUMBA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "rwkv_lite", "generate", str(model), "--tokens", "34 105 110", "-n", str(tokens),
           "--greedy"]
    start = time.perf_counter()
    procs = [subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for _ in range(2)]
    best, best_rss = None, -1
    try:
        while all(p.poll() is None for p in procs):
            try:
                sample = [{"process": smaps_rollup(p.pid), "model": mapping_counters(p.pid, model)} for p in procs]
            except (FileNotFoundError, ProcessLookupError):
                break                                            # one just exited
            together = sum(s["model"].get("Rss", 0) for s in sample)
            if together >= best_rss:
                best, best_rss = sample, together
            time.sleep(0.2)
    finally:
        for p in procs:
            _, err = p.communicate()
            if p.returncode != 0:
                raise SystemExit(f"generate failed ({p.returncode}): {err.decode()[-2000:]}")
    return best, time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--embd", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--quant", default="int8", choices=["fp32", "fp16", "int8", "int4"])
    ap.add_argument("--tokens", type=int, default=48, help="tokens each process generates")
    ap.add_argument("--workdir", type=Path, default=None, help="where to put the checkpoint and model (default: "
                                                                 "a temporary folder under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the converted model")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    sys.path.insert(0, str(REPO))
    import rwkv_lite

    work = Path(tempfile.mkdtemp(prefix="rwkv-lite-shared-pages-", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        write_checkpoint(work / "hf", args.layers, args.embd, args.vocab)
        model = rwkv_lite.convert(work / "hf", work / f"model-{args.quant}.safetensors", quant=args.quant)
        shutil.rmtree(work / "hf")
        prepare_s = time.perf_counter() - t0
        size = model.stat().st_size
        sample, run_s = run_pair(model, args.tokens)
        result = {
            "model": {"layers": args.layers, "n_embd": args.embd, "vocab": args.vocab, "quant": args.quant,
                      "file_bytes": size},
            "tokens_per_process": args.tokens, "prepare_s": round(prepare_s, 1), "run_s": round(run_s, 1),
            "processes": [{"rss": s["process"].get("Rss", 0), "pss": s["process"].get("Pss", 0),
                           "model_rss": s["model"].get("Rss", 0), "model_pss": s["model"].get("Pss", 0),
                           "model_shared_clean": s["model"].get("Shared_Clean", 0),
                           "model_private": s["model"].get("Private_Clean", 0) + s["model"].get("Private_Dirty", 0)}
                          for s in sample],
        }
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(f"model: {args.layers} x {args.embd}, vocab {args.vocab}, {args.quant}: {size / MB:.0f} MB "
                  f"(prepared in {prepare_s:.0f} s); two `generate -n {args.tokens}` ran {run_s:.0f} s together")
            print("| process | RSS MB | PSS MB | model mapping: Rss MB | Pss MB | Shared_Clean MB | private MB |")
            print("| --- | --- | --- | --- | --- | --- | --- |")
            for i, p in enumerate(result["processes"], 1):
                print(f"| {i} | {p['rss'] / MB:.0f} | {p['pss'] / MB:.0f} | {p['model_rss'] / MB:.0f} | "
                      f"{p['model_pss'] / MB:.0f} | {p['model_shared_clean'] / MB:.0f} | "
                      f"{p['model_private'] / MB:.0f} |")
            total_pss = sum(p["pss"] for p in result["processes"])
            print(f"sum of PSS {total_pss / MB:.0f} MB; sum of RSS "
                  f"{sum(p['rss'] for p in result['processes']) / MB:.0f} MB; model file {size / MB:.0f} MB")
        if args.keep:
            print(f"kept {model}", file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
