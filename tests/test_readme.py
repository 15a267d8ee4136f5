"""The README's "Two commands", run in order in one fresh virtual environment on a clean clone.

The venv is made from the interpreter running the tests and sees its installed packages (numpy, numba, torch...)
through a .pth file, so nothing is downloaded (PIP_NO_INDEX). `pip` in the venv is a two-line script that runs
this interpreter's pip against the venv's python, so the README's lines run as written, through bash, with the
venv first on PATH. The first run once wrote Numba's cache into site-packages, and the editable reinstall then
left a bare `rwkv_lite` folder behind that broke every later command: checked here."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from conftest import REPO


def readme_two_commands() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Two commands\n(.*?)^## ", text, re.S | re.M)
    assert section, "README has no '## Two commands' section"
    blocks = re.findall(r"```bash\n(.*?)\n```", section[1], re.S)
    assert len(blocks) == 2, blocks
    return [b.strip() for b in blocks]


def test_readme_commands_are_the_ones_this_test_runs():
    first, second = readme_two_commands()
    assert first.startswith("pip install . && rwkv-lite generate -p ")
    assert second.startswith("pip install -e '.[test,reference,server,ray]' && ")


@pytest.mark.slow
def test_readme_two_commands_in_order_in_one_fresh_venv(tmp_path):
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout")
    try:
        import pip  # noqa: F401
    except ImportError:
        pytest.skip("the interpreter running the tests has no pip")
    first, second = readme_two_commands()
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    bin_dir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    py = bin_dir / "python"
    site_packages = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        capture_output=True, text=True, check=True).stdout.strip())
    ours = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]
    (site_packages / "_packages_of_the_test_interpreter.pth").write_text("\n".join(ours) + "\n")
    pip = bin_dir / "pip"
    pip.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m pip --python "{py}" "$@"\n')
    pip.chmod(0o755)

    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "NUMBA_CACHE_DIR", "RWKV_LITE_CACHE_DIR", "VIRTUAL_ENV")}
    env.update({"PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "PIP_NO_INDEX": "1", "PIP_QUIET": "1",
                "PIP_NO_BUILD_ISOLATION": "0",     # (sic: pip reads this variable inverted) build with what is here
                "XDG_CACHE_HOME": str(tmp_path / "cache"), "NUMBA_NUM_THREADS": "1"})

    def bash(command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", command], capture_output=True, text=True, cwd=clone, env=env,
                              timeout=600)

    def where_is_rwkv_lite() -> str:
        return subprocess.run([str(py), "-c", "import rwkv_lite; print(rwkv_lite.__file__)"], capture_output=True,
                              text=True, check=True, cwd=tmp_path, env=env).stdout.strip()

    one = bash(first + " -n 30")
    assert one.returncode == 0, one.stderr
    assert len(one.stdout.split()) >= 3 and "demo" in one.stderr, (one.stdout, one.stderr)
    assert where_is_rwkv_lite().startswith(str(site_packages)), "not the installed copy"
    assert not list((site_packages / "rwkv_lite").rglob("*.nb[ic]")), "Numba cached into site-packages"
    for shipped in ("rwkv_vocab_v20230424.txt", "20B_tokenizer.json", "demo-kjv-int8.safetensors"):
        assert (site_packages / "rwkv_lite" / "data" / shipped).is_file(), f"{shipped} not installed"
    assert list((tmp_path / "cache" / "rwkv-lite").rglob("*.nbi")), "no kernel cache in the user cache folder"

    install = bash(second.split(" && ")[0])
    assert install.returncode == 0, install.stderr
    assert not (site_packages / "rwkv_lite").exists(), "the non-editable copy left a folder behind"
    assert where_is_rwkv_lite() == str(clone / "rwkv_lite" / "__init__.py")
    assert shutil.which("rwkv-lite", path=env["PATH"]) == str(bin_dir / "rwkv-lite")
    help_text = bash("rwkv-lite --help")
    assert help_text.returncode == 0 and "Run RWKV language models" in help_text.stdout, help_text.stderr
    two = bash(first.split(" && ")[1] + " -n 30")
    assert two.returncode == 0, two.stderr
    assert len(two.stdout.split()) >= 3 and "Traceback" not in two.stderr


def test_readme_python_api_example_runs(tmp_path, monkeypatch, capsys):
    """The "Python API" example, run as written on the built-in demo model instead of the 7B file."""
    from rwkv_lite.demo import demo_model_path
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Python API\n(.*?)^## ", text, re.S | re.M)
    assert section, "README has no '## Python API' section"
    (code,) = re.findall(r"```python\n(.*?)\n```", section[1], re.S)
    assert "eagle-7b-int8.safetensors" in code
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace("eagle-7b-int8.safetensors", str(demo_model_path())), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.count("\n(") == 1 and ("(stop)" in printed or "(length)" in printed)
    assert (tmp_path / "conversation.state").is_file()
