"""Compiled kernels go to a per-user cache folder, never into the installed package; with no writable folder the
kernels run uncached with one notice; a compile is announced on stderr, a cached run is silent."""
from __future__ import annotations

import os
import signal
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "rwkv_lite"
COMPILING = "compiling kernels"


def _numba_files_in_package() -> dict[str, float]:
    """Numba's cache files (index .nbi and data .nbc) anywhere under the package, with their mtimes."""
    return {str(p): p.stat().st_mtime for p in PACKAGE.rglob("*.nb[ic]")}


def _generate(env_changes: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "RWKV_LITE_CACHE_DIR",
                                                            "XDG_CACHE_HOME")}
    env.update({"PYTHONPATH": str(REPO), "NUMBA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", **env_changes})
    return subprocess.run([sys.executable, "-m", "rwkv_lite.cli", "generate", "-p", "And God said", "-n", "8",
                           "--greedy"], capture_output=True, env=env, timeout=600, cwd=tmp_path)


@pytest.mark.slow
def test_first_run_announces_compile_into_the_user_cache_and_second_run_is_silent(tmp_path):
    cache = tmp_path / "xdg-cache"
    before = _numba_files_in_package()
    first = _generate({"XDG_CACHE_HOME": str(cache), "HOME": str(tmp_path)}, tmp_path)
    stderr = first.stderr.decode()
    assert first.returncode == 0, stderr
    assert stderr.count(COMPILING) == 1, stderr
    assert sorted((cache / "rwkv-lite").rglob("*.nbi")), "no kernel index written into the user cache folder"
    assert _numba_files_in_package() == before, "Numba wrote cache files into the package folder"

    second = _generate({"XDG_CACHE_HOME": str(cache), "HOME": str(tmp_path)}, tmp_path)
    assert second.returncode == 0, second.stderr.decode()
    assert COMPILING not in second.stderr.decode()
    assert second.stdout == first.stdout and len(first.stdout) > 0


def _make_read_only(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)


def _make_writable(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


@pytest.mark.slow
def test_read_only_install_and_home_run_uncached_with_one_notice(tmp_path):
    """A service account: the installed package and HOME are read-only. The package is a read-only copy run from
    its own folder; HOME is a read-only folder, or, when running as root (which ignores mode bits), a path under
    a regular file, which cannot be created even by root. Nothing may be written into the package."""
    site = tmp_path / "site"
    shutil.copytree(PACKAGE, site / "rwkv_lite", ignore=shutil.ignore_patterns("__pycache__"))
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        blocker = tmp_path / "not-a-folder"
        blocker.write_text("")
        home = blocker / "home"
    else:
        home = tmp_path / "home"
        home.mkdir()
        home.chmod(0o555)
    _make_read_only(site)
    try:
        proc = _generate({"HOME": str(home), "PYTHONPATH": str(site), "PYTHONDONTWRITEBYTECODE": "1"}, tmp_path)
        written = sorted(str(p) for p in site.rglob("*") if p.suffix in (".nbi", ".nbc") or p.name == "__pycache__")
    finally:
        _make_writable(site)
        if home.parent == tmp_path:
            home.chmod(0o755)
    stderr = proc.stderr.decode()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    notices = [line for line in stderr.splitlines() if "kernel cache" in line]
    assert len(notices) == 1 and str(home) in notices[0], stderr
    assert "compiling kernels (not cached" in stderr
    assert len(proc.stdout.decode().strip()) > 0
    assert written == [], written


def test_cache_folder_preference(monkeypatch, tmp_path):
    from rwkv_lite import kernel_cache
    for var in ("RWKV_LITE_CACHE_DIR", "NUMBA_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    if sys.platform.startswith("linux"):
        assert kernel_cache.default_cache_dir() == tmp_path / "home" / ".cache" / "rwkv-lite"
        monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
        assert kernel_cache.default_cache_dir() == tmp_path / "home" / ".cache" / "rwkv-lite"
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert kernel_cache.default_cache_dir() == tmp_path / "xdg" / "rwkv-lite"
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "numba"))
    assert kernel_cache.default_cache_dir() == tmp_path / "numba"
    monkeypatch.setenv("RWKV_LITE_CACHE_DIR", str(tmp_path / "ours"))
    assert kernel_cache.default_cache_dir() == tmp_path / "ours"


def test_this_process_caches_outside_the_package():
    import numba.core.config

    from rwkv_lite import kernel_cache
    assert kernel_cache.cache_dir is not None
    assert PACKAGE not in kernel_cache.cache_dir.parents
    assert numba.core.config.CACHE_DIR == str(kernel_cache.cache_dir)


def test_kernels_are_cached_per_version_of_the_sources(tmp_path):
    # Numba checks a cached kernel against its own file only, while kernels inline helpers from other files: a
    # folder per digest of all sources keeps a kernel compiled against an older helper from being loaded
    import shutil

    from rwkv_lite import kernel_cache
    assert kernel_cache.cache_dir.name == f"kernels-{kernel_cache.source_digest()}"
    copy = tmp_path / "pkg"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "data"))
    assert kernel_cache.source_digest(copy) == kernel_cache.source_digest()
    cli = copy / "cli" / "generate.py"                     # no Numba code: the kernels stay cached
    cli.write_text(cli.read_text(encoding="utf-8") + "\n# changed\n", encoding="utf-8")
    assert kernel_cache.source_digest(copy) == kernel_cache.source_digest()
    helper = copy / "kernels" / "pointwise.py"
    helper.write_text(helper.read_text(encoding="utf-8") + "\n# changed\n", encoding="utf-8")
    assert kernel_cache.source_digest(copy) != kernel_cache.source_digest()


def test_ctrl_c_during_a_compile_is_raised_when_the_compile_ends():
    """Python raises KeyboardInterrupt in whatever Python code runs next; during a compile that is often a weakref
    callback, where it is printed as "Exception ignored" and lost. Inside a (nested) compile event SIGINT is only
    recorded; the end of the outermost compile raises it."""
    from numba.core import event

    from rwkv_lite.kernel_cache import defer_ctrl_c_during_compiles

    defer_ctrl_c_during_compiles()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    steps = []
    with pytest.raises(KeyboardInterrupt):
        with event.trigger_event("numba:compile", data={}):
            with event.trigger_event("numba:compile", data={}):       # a kernel compiled for the one at hand
                signal.raise_signal(signal.SIGINT)
                steps.append("inner compile went on")
            steps.append("outer compile went on")
    assert steps == ["inner compile went on", "outer compile went on"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    with event.trigger_event("numba:compile", data={}):      # no Ctrl-C this time: the one above is used up, and
        pass                                                   # raising it again here would fail the test


def test_a_programs_own_ctrl_c_handler_is_left_alone_during_compiles():
    from numba.core import event

    from rwkv_lite.kernel_cache import defer_ctrl_c_during_compiles

    defer_ctrl_c_during_compiles()
    seen = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        with event.trigger_event("numba:compile", data={}):
            signal.raise_signal(signal.SIGINT)
            assert seen == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.skipif(os.name != "posix", reason="sends SIGINT")
def test_ctrl_c_while_the_first_run_compiles_stops_the_command(tmp_path):
    """The real thing: Ctrl-C one CPU second into the first run's kernel compile (an empty cache folder). The
    command stops with exit code 130 and one line, instead of losing the Ctrl-C and generating anyway."""
    from test_cli_flags import _wait_for_cpu_seconds

    env = {**os.environ, "PYTHONPATH": str(REPO), "NUMBA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "RWKV_LITE_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("NUMBA_CACHE_DIR", None)
    proc = subprocess.Popen([sys.executable, "-m", "rwkv_lite.cli", "generate", "-p", "And God said", "-n", "200"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    try:
        line = b""
        while COMPILING.encode() not in line:
            line = proc.stderr.readline()
            assert line, "the process ended before compiling"
        _wait_for_cpu_seconds(proc.pid, 1.0)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = stderr.decode()
    assert proc.returncode == 130, (stdout.decode(), err)
    assert "Traceback" not in err and "Exception ignored" not in err and "interrupted" in err, err
