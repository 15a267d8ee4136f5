"""The server is an optional extra: the base package never imports it, and `rwkv-lite serve` without it fails
with one clear line (exit 1), not a traceback."""
from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from rwkv_lite.cli import main


def test_base_package_and_engine_do_not_import_the_server_stack():
    code = ("import sys, rwkv_lite, rwkv_lite.engine, rwkv_lite.prefix_cache, rwkv_lite.cli; "
            "bad = [m for m in ('starlette', 'uvicorn', 'rwkv_lite.server') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_serve_without_the_extra_says_how_to_install_it(monkeypatch):
    monkeypatch.delitem(sys.modules, "rwkv_lite.server", raising=False)
    monkeypatch.setitem(sys.modules, "starlette", None)          # "not installed": import raises ImportError
    monkeypatch.setitem(sys.modules, "starlette.applications", None)
    result = CliRunner().invoke(main, ["serve", "--port", "1"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert lines == ["error: rwkv-lite serve needs the server extra (starlette is missing): "
                     "pip install 'rwkv-lite[server]'"]
