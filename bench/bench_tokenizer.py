"""World tokenizer speed: encode throughput (ours vs the reference TRIE_TOKENIZER) and vocabulary load time.

    python bench/bench_tokenizer.py [--repeats 5]

Texts: the KJV Bible (4.4 MB, English ASCII), the gettext translations of the committed test corpus (41 locales,
~0.2 MB, repeated 10x to ~2 MB) and the two together. Throughput is UTF-8 input bytes per second of
encode(str) -> list[int], median of the repeats with the min..max spread. Load time is measured in a fresh
interpreter (first load: parse + trie + Numba's one-time start-up and cache load) and warm (repeat loads).
"""
from __future__ import annotations

import argparse
import json
import lzma
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "fixtures"
VOCAB = SHARED / "tokenizers" / "rwkv_vocab_v20230424.txt"
BIBLE = SHARED / "text" / "kjv-bible.txt"
CORPUS = REPO / "tests" / "fixtures" / "tokenizer" / "world_corpus.json.xz"


def timings(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def summary(seconds: list[float], scale: float = 1.0, unit: str = "s") -> str:
    values = sorted(scale / s if unit == "MB/s" else s * scale for s in seconds)
    return f"{statistics.median(values):8.2f} {unit} ({values[0]:.2f}..{values[-1]:.2f})"


def fresh_process_load_seconds() -> tuple[float, float]:
    """(import of rwkv_lite.tokenizer, first vocabulary load) in a new interpreter. The first load includes
    Numba's one-time initialisation (~0.3 s here), which the model's own kernels would otherwise pay."""
    code = ("import time; t0 = time.perf_counter(); from rwkv_lite.tokenizer import tokenizer_from_file; "
            f"t1 = time.perf_counter(); tokenizer_from_file({str(VOCAB)!r}).encode('warm'); "
            "print(t1 - t0, time.perf_counter() - t1)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    import_s, load_s = map(float, out.stdout.split())
    return import_s, load_s


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-reference", action="store_true", help="skip the (slow) reference tokenizer")
    args = parser.parse_args()

    from rwkv_lite.tokenizer import tokenizer_from_file

    fresh = [fresh_process_load_seconds() for _ in range(args.repeats + 1)][1:]   # the first may compile
    print(f"{'import rwkv_lite.tokenizer, fresh interpreter':50s}: {summary([f[0] for f in fresh])}")
    print(f"{'first World load, fresh interpreter (+Numba init)':50s}: {summary([f[1] for f in fresh])}")
    ours = tokenizer_from_file(VOCAB)
    warm = timings(lambda: tokenizer_from_file(VOCAB), args.repeats)
    print(f"{'World load, warm (parse + trie)':50s}: {summary(warm)}")

    reference = None
    if not args.no_reference:
        from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
        start = time.perf_counter()
        reference = TRIE_TOKENIZER(str(VOCAB))
        print(f"{'load, reference TRIE_TOKENIZER':50s}: {time.perf_counter() - start:8.2f} s")

    documents = json.loads(lzma.decompress(CORPUS.read_bytes()))["documents"]
    multilingual = "\n".join(d["text"] for d in documents if d["name"].startswith("gettext/")) * 10
    bible = BIBLE.read_text(encoding="utf-8")
    texts = {"kjv-bible": bible, "multilingual x10": multilingual, "bible+multilingual": bible + multilingual}

    print(f"\n{'text':20s} {'MB':>6s}  {'ours':>30s}  {'reference':>30s}  speed-up")
    for name, text in texts.items():
        megabytes = len(text.encode("utf-8")) / 1e6
        ours_s = timings(lambda: ours.encode(text), args.repeats)
        line = f"{name:20s} {megabytes:6.2f}  {summary(ours_s, megabytes, 'MB/s'):>30s}"
        if reference is not None:
            assert ours.encode(text) == reference.encode(text)
            ref_s = timings(lambda: reference.encode(text), max(3, args.repeats // 2))
            line += (f"  {summary(ref_s, megabytes, 'MB/s'):>30s}  "
                     f"{statistics.median(ref_s) / statistics.median(ours_s):6.1f}x")
        print(line)

    ids = ours.encode(bible)
    decode_s = timings(lambda: ours.decode(ids), args.repeats)
    print(f"\ndecode kjv-bible ({len(ids)} ids): {summary(decode_s, len(bible.encode()) / 1e6, 'MB/s')}")


if __name__ == "__main__":
    main()
