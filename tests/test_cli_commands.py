"""The command-line package: every command is one module of rwkv_lite.cli, registered on the group, and answers
--help; a smoke run of each command that needs no extra is in test_cli.py, test_cli_convert.py,
test_calibrate.py, test_checkpoints_today.py (convert-state) and test_serve_cli.py."""
from __future__ import annotations

import importlib

import pytest
from click.testing import CliRunner

from rwkv_lite import cli


def test_every_listed_command_is_registered_from_its_own_module():
    names = {cmd.name for cmd in cli.main.commands.values()}
    for module, function in cli.COMMANDS:
        command = getattr(importlib.import_module(f"rwkv_lite.cli.{module}"), function)
        assert cli.main.commands[command.name] is command
        assert command.callback.__module__ == f"rwkv_lite.cli.{module}"
    assert {"convert", "convert-state", "calibrate", "generate", "chat", "perplexity", "bench", "info", "verify",
            "serve"} <= names


@pytest.mark.parametrize("name", sorted(cli.main.commands))
def test_every_command_answers_help(name):
    result = CliRunner().invoke(cli.main, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: main {name} ") or result.output.startswith("Usage: ")
    assert "Traceback" not in result.output


def test_shared_helpers_live_in_one_module():
    from rwkv_lite.cli import common
    for name in ("friendly_errors", "model_argument", "sampling_options", "threads_option", "json_option",
                 "load_model", "ProgressBar", "read_text_file"):
        assert hasattr(common, name)
