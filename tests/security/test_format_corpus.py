"""Regression corpus for rwkv-lite's own files: every input here once crashed the interpreter, corrupted memory,
escaped as a non-RwkvLiteError exception, or silently ran with wrong shapes (see docs/reliability.md). Each is
replayed in a subprocess (a regression to a segfault then fails one test instead of killing the run) and must
now be refused with the message fragment listed below.

    model-*.safetensors   edits of a 2-layer synthetic RWKV-5.2 model (n_embd 16, 2 heads of 8, vocab 16)
    state-*.safetensors   edits of a state file of the tiny rwkv.cpp 5v2 model (the fixture)

`python tests/security/test_format_corpus.py` rewrites the files (deterministic); the readers' corpus test
(test_reader_fuzz.py) replays them too, as safetensors checkpoints.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
TESTS = HERE.parent

# file -> (where it must fail, fragment of the one-line message)
MODEL_CASES = {
    "model-config-n_head-above-decays.safetensors": ("load", "n_head=4 x head_size=8 does not make n_embd=16"),
    "model-config-head_size-huge.safetensors": ("load", "does not make n_embd=16"),
    "model-config-n_layer-negative.safetensors": ("load", "n_layer=-1 is not a positive integer"),
    "model-config-n_layer-too-small.safetensors": ("load", "outside the n_layer=1 layers"),
    "model-config-vocab-larger.safetensors": ("load", "'emb.weight' has shape [16, 16] but the config implies"),
    "model-config-ln_x_eps-missing.safetensors": ("load", "ln_x_eps=None"),
    "model-config-version-unknown.safetensors": ("load", "unknown RWKV version"),
    "model-header-deeply-nested.safetensors": ("load", "header is not valid JSON (nested too deeply)"),
    "model-metadata-long-integer.safetensors": ("load", "metadata 'config' is not valid JSON"),
    "model-tensor-record-not-object.safetensors": ("load", "malformed record"),
    "model-tensor-shape-not-list.safetensors": ("load", "malformed record"),
    "model-tensor-shape-infinite.safetensors": ("load", "malformed record"),
    "model-vector-reshaped-consistently.safetensors": ("load", "'blocks.0.ln1.weight' has shape [4, 4]"),
    "model-tokenizer-metadata-list.safetensors": ("load", "metadata 'tokenizer' is not a JSON object"),
}
STATE_CASES = {
    "state-wkv-fewer-heads.safetensors": ("forward", "state array 'wkv' is float32[12, 4, 8, 8]"),
    "state-flipped-byte.safetensors": ("load", "checksum mismatch in state array(s) wkv"),
}

REPLAY = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path[:0] = [sys.argv[1], sys.argv[1] + "/security"]
    import rwkv_lite
    from rwkv_lite.errors import RwkvLiteError
    from rwkv_lite.kernels.threads import set_threads
    set_threads(1)
    tiny = rwkv_lite.load(sys.argv[2]) if sys.argv[2] != "-" else None
    for name in sys.argv[3:]:
        path = Path(name)
        print("FILE", path.name, flush=True)
        stage = "load"
        try:
            if path.name.startswith("state-"):
                state = rwkv_lite.State.load(path)
                stage = "forward"
                tiny.forward([1], state)
            else:
                model = rwkv_lite.load(path)
                stage = "forward"
                model.forward([0, 1])
                stage = "tokenizer"
                model.tokenizer
            print("RESULT", path.name, "accepted", flush=True)
        except RwkvLiteError as e:
            print("RESULT", path.name, stage, str(e).replace(chr(10), "<newline>"), flush=True)
""")


def replay(files: list[Path], tiny_model: Path | None) -> dict[str, tuple[str, str]]:
    res = subprocess.run([sys.executable, "-c", REPLAY, str(TESTS), str(tiny_model or "-"), *map(str, files)],
                         capture_output=True, text=True, timeout=300)
    started = [line.split()[1] for line in res.stdout.splitlines() if line.startswith("FILE ")]
    assert res.returncode == 0, (f"replay died (exit {res.returncode}) on {started[-1] if started else '?'}:\n"
                                 f"{res.stderr[-3000:]}")
    out = {}
    for line in res.stdout.splitlines():
        if line.startswith("RESULT "):
            _, name, stage, *msg = line.split(" ", 3)
            out[name] = (stage, msg[0] if msg else "")
    return out


def test_model_corpus_is_refused():
    files = [CORPUS / name for name in MODEL_CASES]
    missing = [f.name for f in files if not f.exists()]
    assert not missing, f"corpus files missing: {missing}"
    results = replay(files, None)
    for name, (stage, fragment) in MODEL_CASES.items():
        got_stage, msg = results[name]
        assert (got_stage, fragment in msg) == (stage, True), (name, got_stage, msg)
        assert str(CORPUS / name) in msg, msg                 # the one line names the file


def test_state_corpus_is_refused(tmp_path):
    from conftest import shared_file

    import rwkv_lite
    tiny = rwkv_lite.convert(shared_file("rwkv-cpp-tiny", "tiny-rwkv-5v2-730K-FP32.bin"),
                             tmp_path / "tiny.safetensors", quant="fp32")
    results = replay([CORPUS / name for name in STATE_CASES], tiny)
    for name, (stage, fragment) in STATE_CASES.items():
        got_stage, msg = results[name]
        assert (got_stage, fragment in msg) == (stage, True), (name, got_stage, msg)


def test_corpus_has_no_unlisted_model_or_state_files():
    listed = set(MODEL_CASES) | set(STATE_CASES)
    present = {f.name for f in CORPUS.glob("model-*")} | {f.name for f in CORPUS.glob("state-*")}
    assert present == listed


# ----------------------------------------------------------------------------------------------------------------
# How the corpus was made (python tests/security/test_format_corpus.py)

def small_v52_state_dict(C=16, H=2, L=2, V=16, F=32, seed=0) -> dict[str, np.ndarray]:
    """A random RWKV-5.2 checkpoint in BlinkDL names, shaped and scaled like a trained one."""
    rng = np.random.default_rng(seed)
    N = C // H
    sd = {"emb.weight": rng.standard_normal((V, C)), "blocks.0.ln0.weight": np.ones(C), "blocks.0.ln0.bias":
          np.zeros(C), "ln_out.weight": np.ones(C), "ln_out.bias": np.zeros(C),
          "head.weight": rng.standard_normal((V, C)) / np.sqrt(C)}
    for l in range(L):
        p = f"blocks.{l}."
        for n in ("ln1", "ln2", "att.ln_x"):
            sd[p + n + ".weight"], sd[p + n + ".bias"] = np.ones(C), np.zeros(C)
        for m in "kvrg":
            sd[p + f"att.time_mix_{m}"] = rng.uniform(0.1, 0.9, (1, 1, C))
        sd[p + "att.time_decay"] = rng.uniform(-6, 1, (H, N))
        sd[p + "att.time_faaaa"] = 0.5 * rng.standard_normal((H, N))
        for m in ("receptance", "key", "value", "gate", "output"):
            sd[p + f"att.{m}.weight"] = rng.standard_normal((C, C)) / np.sqrt(C)
        sd[p + "ffn.time_mix_k"], sd[p + "ffn.time_mix_r"] = rng.uniform(0.1, 0.9, (2, 1, 1, C))
        sd[p + "ffn.key.weight"] = rng.standard_normal((F, C)) / np.sqrt(C)
        sd[p + "ffn.receptance.weight"] = rng.standard_normal((C, C)) / np.sqrt(C)
        sd[p + "ffn.value.weight"] = rng.standard_normal((C, F)) / np.sqrt(F)
    return {k: np.asarray(v, np.float32) for k, v in sd.items()}


def _regenerate(work: Path) -> None:
    import struct
    import warnings

    sys.path.insert(0, str(TESTS))
    import rwkv_lite
    from checkpoint_writers import save_safetensors
    from conftest import TINY

    def split(data):
        (n,) = struct.unpack("<Q", data[:8])
        return json.loads(data[8:8 + n]), data[8 + n:]

    def join(header, body, raw=None):
        raw = raw if raw is not None else json.dumps(header).encode()
        return struct.pack("<Q", len(raw)) + raw + body

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                    # "no tokenizer found": vocab 16 has none
        small = rwkv_lite.convert(save_safetensors(small_v52_state_dict(), work / "small-src.safetensors"),
                                  work / "small.safetensors", quant="fp32")
    header, body = split(small.read_bytes())

    def edited(section, fn):
        h = json.loads(json.dumps(header))
        value = json.loads(h["__metadata__"][section])
        value = fn(value)
        h["__metadata__"][section] = value if isinstance(value, str) else json.dumps(value)
        return join(h, body)

    def config(**changes):
        return edited("config", lambda c: {k: v for k, v in {**c, **changes}.items() if v is not ...})

    def record(name, **changes):
        return edited("tensors", lambda t: {**t, name: {**t[name], **changes}})

    files = {
        "model-config-n_head-above-decays.safetensors": config(n_head=4),
        "model-config-head_size-huge.safetensors": config(head_size=1 << 20),
        "model-config-n_layer-negative.safetensors": config(n_layer=-1),
        "model-config-n_layer-too-small.safetensors": config(n_layer=1),
        "model-config-vocab-larger.safetensors": config(vocab_size=4096),
        "model-config-ln_x_eps-missing.safetensors": config(ln_x_eps=...),
        "model-config-version-unknown.safetensors": config(version=...),
        "model-header-deeply-nested.safetensors": join(None, body, b'{"a":' + b"[" * 3000 + b"]" * 3000 + b"}"),
        "model-metadata-long-integer.safetensors": edited("config", lambda c: "1" * 5000),
        "model-tensor-record-not-object.safetensors": edited("tensors", lambda t: {**t, "blocks.0.att.decay": "x"}),
        "model-tensor-shape-not-list.safetensors": record("blocks.0.att.key.weight", shape=5),
        "model-tensor-shape-infinite.safetensors": record("blocks.0.att.key.weight", shape=[16, 1e400]),
        "model-tokenizer-metadata-list.safetensors": edited("tokenizer", lambda t: [1]),
    }
    h = json.loads(json.dumps(header))                     # the same lie in the header and the record
    h["blocks.0.ln1.weight"]["shape"] = [4, 4]
    tensors = json.loads(h["__metadata__"]["tensors"])
    tensors["blocks.0.ln1.weight"]["shape"] = [4, 4]
    h["__metadata__"]["tensors"] = json.dumps(tensors)
    files["model-vector-reshaped-consistently.safetensors"] = join(h, body)

    tiny = rwkv_lite.load(rwkv_lite.convert(TINY / "tiny-rwkv-5v2-730K-FP32.bin", work / "tiny.safetensors",
                                            quant="fp32"))
    _, state = tiny.forward(list(b"Hello"))
    state.save(work / "state.safetensors")
    good = (work / "state.safetensors").read_bytes()
    fewer = rwkv_lite.State(state.config, {**state.arrays, "wkv": state.arrays["wkv"][:, :4].copy()})
    fewer.save(work / "fewer.safetensors")
    files["state-wkv-fewer-heads.safetensors"] = (work / "fewer.safetensors").read_bytes()
    flipped = bytearray(good)
    flipped[-100] ^= 0x10                                  # inside the last array (wkv)
    files["state-flipped-byte.safetensors"] = bytes(flipped)

    for name, data in files.items():
        (CORPUS / name).write_bytes(data)
        print(f"{name}: {len(data)} bytes")


if __name__ == "__main__":
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        _regenerate(Path(tmp))
