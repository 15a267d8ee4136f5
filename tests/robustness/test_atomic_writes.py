"""Atomic outputs: a conversion or a state save writes `.NAME.tmp-PID` in the destination folder, fsyncs it and
renames it into place only when complete. Whatever stops it -- SIGKILL at any moment, a full disk at any write
or at fsync -- leaves no file under the destination name (an older file there stays intact), and the error is
one line naming the destination. A temporary left by a killed process is removed by the next write to the same
destination; a temporary of a process still alive is left alone.
"""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import rwkv_lite
import rwkv_lite.format as fmt
from conftest import shared_file
from robustness_helpers import REPO
from rwkv_lite import State


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


@pytest.fixture(scope="module")
def tiny_src():
    return shared_file("rwkv-cpp-tiny", "tiny-rwkv-5v2-730K-FP32.bin")


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory) -> Path:
    """A random RWKV-5.2 checkpoint (HF layout, bf16, 110 MB: 4 layers x 1024, vocab 256) whose conversion takes
    a couple of seconds, long enough to be killed mid-write. Written in a subprocess: bench/make_checkpoint.py
    registers stand-in `torch` modules to pickle the tensor names, which must not leak into this process."""
    out = tmp_path_factory.mktemp("big-checkpoint") / "hf"
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        sys.path.insert(0, {str(REPO / "bench")!r})
        from make_checkpoint import write_checkpoint
        write_checkpoint(Path({str(out)!r}), n_layer=4, C=1024, vocab=256)
    """)
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=300)
    return out


# ----------------------------------------------------------------------------------------------------------------
# SIGKILL mid-write

def allocated_bytes(path: Path) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def test_conversion_killed_mid_write_leaves_nothing_and_is_cleaned_up(big_checkpoint, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dst = out_dir / "model.safetensors"
    env = {**os.environ, "PYTHONPATH": str(REPO), "NUMBA_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rwkv_lite", "convert", str(big_checkpoint), str(dst),
                             "--quant", "int8", "--quiet"], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tmp = out_dir / f".{dst.name}.tmp-{proc.pid}"
    deadline = time.monotonic() + 240
    try:
        # the temporary is created at full (sparse) length; wait until 8 MB of its 55 MB hold data
        while allocated_bytes(tmp) < (8 << 20):
            assert proc.poll() is None, f"conversion ended before it could be killed: {proc.stderr.read()!r}"
            assert time.monotonic() < deadline, "conversion never started writing"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not dst.exists()
    assert temporaries(out_dir) == [tmp.name]                 # the killed writer's partial file, nothing else

    # a later conversion to the same destination succeeds, and removes the dead writer's temporary
    rwkv_lite.convert(big_checkpoint, dst, quant="int8")
    assert temporaries(out_dir) == []
    model = rwkv_lite.load(dst, verify=True)
    assert model.config["n_embd"] == 1024
    model.close()


def test_a_live_writers_temporary_is_left_alone(tiny_src, tmp_path):
    """Two conversions to one destination at once: neither deletes the other's temporary."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dst = tmp_path / "m.safetensors"
        live = tmp_path / f".m.safetensors.tmp-{sleeper.pid}"
        live.write_bytes(b"in progress")
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
        stale = tmp_path / f".m.safetensors.tmp-{int(dead.stdout)}"
        stale.write_bytes(b"left by a killed writer")
        rwkv_lite.convert(tiny_src, dst, quant="int8")
        assert live.exists() and not stale.exists() and dst.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


# ----------------------------------------------------------------------------------------------------------------
# Full disk

class FullDisk:
    """A file whose writes fail with ENOSPC once `budget` bytes have been written (like a filling disk). The
    failure may also be set for flush/fsync only (`at_sync`), where delayed allocation reports it."""

    def __init__(self, real, budget: int):
        self.real, self.budget, self.written = real, budget, 0

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        if self.written + n > self.budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.written += n
        return self.real.write(data)

    def __getattr__(self, name):
        return getattr(self.real, name)


def fill_disk_after(monkeypatch, budget: int) -> None:
    real_open = open

    def open_on_full_disk(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return FullDisk(f, budget) if "w" in mode else f
    monkeypatch.setattr(fmt, "open", open_on_full_disk, raising=False)


def fail_fsync(monkeypatch) -> None:
    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(fmt.os, "fsync", fsync)


@pytest.mark.parametrize("budget", [0, 100, 200_000, 800_000])     # header, mid-header, mid-data, last arrays
def test_conversion_on_a_full_disk(tiny_src, tmp_path, monkeypatch, budget):
    dst = tmp_path / "m.safetensors"
    fill_disk_after(monkeypatch, budget)
    with pytest.raises(OSError) as info:
        rwkv_lite.convert(tiny_src, dst, quant="int8")
    assert info.value.errno == errno.ENOSPC
    assert str(dst) in str(info.value) and "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []                       # no destination, no temporary


def test_conversion_failing_at_fsync(tiny_src, tmp_path, monkeypatch):
    dst = tmp_path / "m.safetensors"
    dst.write_bytes(b"the previous model")
    fail_fsync(monkeypatch)
    with pytest.raises(OSError) as info:
        rwkv_lite.convert(tiny_src, dst, quant="int8")
    assert info.value.errno == errno.ENOSPC and str(dst) in str(info.value)
    assert dst.read_bytes() == b"the previous model"             # the old file is untouched
    assert temporaries(tmp_path) == []


def test_cli_reports_a_full_disk_in_one_line(tiny_src, tmp_path, monkeypatch, capsys):
    from rwkv_lite import cli as cli_module
    dst = tmp_path / "m.safetensors"
    fill_disk_after(monkeypatch, 300_000)
    with pytest.raises(SystemExit) as exit_info:
        cli_module.main(["convert", str(tiny_src), str(dst), "--quant", "int8", "--quiet"], standalone_mode=True)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {dst}: No space left on device"]
    assert list(tmp_path.iterdir()) == []


def test_conversion_on_a_real_small_tmpfs(tiny_src, tmp_path):
    """A 256 KiB tmpfs mounted in a private user+mount namespace (`unshare -rm`; nothing is mounted outside the
    child): the 0.9 MB int8 model cannot fit."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare")
    mnt = tmp_path / "small"
    mnt.mkdir()
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=256k none {mnt}"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.strip()}")
    dst = mnt / "m.safetensors"
    script = (f"mount -t tmpfs -o size=256k none {mnt} && "
              f"NUMBA_NUM_THREADS=1 PYTHONPATH={REPO} {sys.executable} -m rwkv_lite convert {tiny_src} {dst} "
              f"--quant int8 --quiet; echo \"exit=$?\"; ls -A {mnt}")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    out = proc.stdout.strip().splitlines()
    assert out == ["exit=1"], (proc.stdout, proc.stderr)         # nothing left on the full filesystem
    assert proc.stderr.strip().splitlines() == [f"error: {dst}: No space left on device"], proc.stderr


# ----------------------------------------------------------------------------------------------------------------
# State saves

@pytest.fixture(scope="module")
def state():
    return State({"arch": "rwkv5.2", "n_layer": 2, "n_embd": 64, "n_head": 8, "head_size": 8, "vocab_size": 256},
                 {"att_x": np.ones((2, 64), np.float32), "ffn_x": np.ones((2, 64), np.float32),
                  "wkv": np.full((2, 8, 8, 8), 0.5, np.float32)})


@pytest.mark.parametrize("budget", [0, 1000, 5000])
def test_state_save_on_a_full_disk_keeps_the_old_state(state, tmp_path, monkeypatch, budget):
    dst = tmp_path / "chat.state"
    state.save(dst)
    before = dst.read_bytes()
    changed = State(state.config, {k: a * 2 for k, a in state.arrays.items()})
    fill_disk_after(monkeypatch, budget)
    with pytest.raises(OSError) as info:
        changed.save(dst)
    assert info.value.errno == errno.ENOSPC and str(dst) in str(info.value)
    assert dst.read_bytes() == before and temporaries(tmp_path) == []
    monkeypatch.undo()
    np.testing.assert_array_equal(State.load(dst)["wkv"], state["wkv"])


def test_state_save_failing_at_fsync(state, tmp_path, monkeypatch):
    dst = tmp_path / "chat.state"
    fail_fsync(monkeypatch)
    with pytest.raises(OSError):
        state.save(dst)
    assert list(tmp_path.iterdir()) == []


def test_state_save_interrupted_by_an_exception(state, tmp_path, monkeypatch):
    """Any exception mid-save (here: Ctrl-C between two arrays) removes the temporary."""
    calls = []
    real_append = fmt.ModelWriter.append

    def append(self, name, data):
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_append(self, name, data)
    monkeypatch.setattr(fmt.ModelWriter, "append", append)
    with pytest.raises(KeyboardInterrupt):
        state.save(tmp_path / "chat.state")
    assert list(tmp_path.iterdir()) == []


def test_state_save_killed_leaves_no_file_and_is_cleaned_up(state, tmp_path):
    """A save killed mid-write (simulated: the writer process dies between two arrays) leaves only its
    temporary; the next save to the same name removes it."""
    dst = tmp_path / "chat.state"
    code = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        import numpy as np
        import rwkv_lite.format as fmt
        from rwkv_lite import State
        real_append = fmt.ModelWriter.append
        def append(self, name, data):
            real_append(self, name, data)
            os.kill(os.getpid(), signal.SIGKILL)          # dies right after writing the first array
        fmt.ModelWriter.append = append
        State({state.config!r}, {{"att_x": np.ones((2, 64), np.float32), "ffn_x": np.ones((2, 64), np.float32),
                                 "wkv": np.zeros((2, 8, 8, 8), np.float32)}}).save({str(dst)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not dst.exists() and len(temporaries(tmp_path)) == 1
    state.save(dst)
    assert temporaries(tmp_path) == [] and State.load(dst).config == state.config


def test_cli_save_state_on_a_full_disk(tmp_path, tiny_src):
    """`generate --save-state` into a full tmpfs: one line, no partial state file."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare")
    model = rwkv_lite.convert(tiny_src, tmp_path / "tiny.safetensors", quant="int8")
    mnt = tmp_path / "small"
    mnt.mkdir()
    dst = mnt / "chat.state"
    script = (f"mount -t tmpfs -o size=16k none {mnt} && "
              f"NUMBA_NUM_THREADS=1 PYTHONPATH={REPO} {sys.executable} -m rwkv_lite generate {model} -p Hi -n 2 "
              f"--greedy --save-state {dst} >/dev/null; echo \"exit=$?\"; ls -A {mnt}")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    if "exit=" not in proc.stdout:                           # unshare or mount refused: never got to run
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    assert proc.stdout.strip().splitlines() == ["exit=1"], (proc.stdout, proc.stderr)
    assert proc.stderr.strip().splitlines()[-1] == f"error: {dst}: No space left on device", proc.stderr
