"""Run the reference `rwkv` package (cpu fp32) on one BlinkDL .pth in a fresh interpreter: the live oracle for the
checkpoint layouts of tests/test_checkpoints_today.py.

    run_reference(pth, version, tokens, workdir, deep_embed=False, time_state=None) -> {logits_serial, logits_seq}

The reference picks its RWKV-7 class (RWKV_V7_ON=1) and its DeepEmbed channel mix (RWKV_DE_VERSION=1) from the
environment when `rwkv.model` is imported, hence the subprocess. `time_state`: a .pth of blocks.N.att.time_state
tensors that the worker installs as the initial WKV state the way the reference's loaders do (time_state
transposed on its last two axes), for the v7 class, which has no loader of its own; the v4-v6 class reads
time_state from the model file itself, so v6 tests put it there instead.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np


def run_reference(pth: Path, version: str, tokens, workdir: Path, deep_embed: bool = False,
                  time_state: Path | None = None) -> dict[str, np.ndarray]:
    workdir = Path(workdir)
    tok_path, out_path = workdir / "oracle_tokens.npy", workdir / "oracle_out.npz"
    np.save(tok_path, np.asarray(tokens, dtype=np.int64))
    env = dict(os.environ, RWKV_V7_ON="1" if version == "7" else "0", RWKV_JIT_ON="1", RWKV_CUDA_ON="0",
               OMP_NUM_THREADS="1")
    env.pop("RWKV_RESCALE_LAYER", None)
    env.pop("RWKV_DE_VERSION", None)
    if deep_embed:
        env["RWKV_DE_VERSION"] = "1"
    cmd = [sys.executable, str(Path(__file__).resolve()), str(pth), version, str(tok_path), str(out_path),
           str(time_state or "")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"reference run failed on {pth} (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n"
                           f"{proc.stderr[-4000:]}")
    with np.load(out_path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _worker(pth: str, version: str, tokens_path: str, out_path: str, time_state: str) -> None:
    import torch
    torch.set_num_threads(1)
    import rwkv.model as reference

    tokens = [int(t) for t in np.load(tokens_path)]
    if version == "7":
        model = reference.RWKV(model=pth[: -len(".pth")], strategy="cpu fp32")
    else:
        model = reference.RWKV(model=pth, strategy="cpu fp32", verbose=False)

    def initial_state():
        if not time_state:
            return None
        state = model.generate_zero_state()
        ts = torch.load(time_state, map_location="cpu", weights_only=True)
        for i in range(model.n_layer):
            state[i * 3 + 1] = ts[f"blocks.{i}.att.time_state"].float().transpose(1, 2).contiguous()
        return state

    state, serial = initial_state(), []
    for tok in tokens:
        out, state = model.forward([tok], state)
        serial.append(out.detach().float().numpy().copy())
    seq, _ = model.forward(tokens, initial_state(), full_output=True)
    np.savez(out_path, logits_serial=np.stack(serial).astype(np.float32),
             logits_seq=seq.detach().float().numpy().astype(np.float32))


if __name__ == "__main__":
    _worker(*sys.argv[1:6])
