"""The `rwkv-lite` command line: thin click commands over the Python API, one module per command.

Every command reports a user-caused problem as one line on stderr ("error: ...") and exits 1 (2 for usage
errors, as click does; 130 after Ctrl-C); `--json` prints exactly one JSON document on stdout. Model-using
commands take the model as an optional first argument (or -m/--model); without one they use the built-in demo
model. See docs/cli.md. What the commands share (options, error handling, loading, the progress bar) is in
common.py; a new command is a module with one click command, added to COMMANDS below.
"""
from __future__ import annotations

import importlib

import click

from .. import __version__

# (module, command function) of every command, in --help order.
COMMANDS = [
    ("convert", "convert"),
    ("convert", "convert_state"),
    ("calibrate", "calibrate"),
    ("generate", "generate"),
    ("chat", "chat"),
    ("perplexity", "perplexity"),
    ("bench", "bench"),
    ("info", "info"),
    ("verify", "verify"),
    ("serve", "serve"),
    ("batch", "batch"),
]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rwkv-lite")
def main():
    """Run RWKV language models on ordinary CPUs.

    Commands that use a model take it as their first argument (or -m/--model); without one they use the
    built-in demo model. `rwkv-lite COMMAND --help` shows each command's options and examples.

    \b
    Examples:
      rwkv-lite convert RWKV-5-World-7B.pth eagle-int8.safetensors --quant int8
      rwkv-lite generate eagle-int8.safetensors -p "The Eiffel tower is in" -n 40
      rwkv-lite chat eagle-int8.safetensors
      rwkv-lite perplexity eagle-int8.safetensors book.txt
      rwkv-lite bench eagle-int8.safetensors
      rwkv-lite info eagle-int8.safetensors
    """


for _module, _function in COMMANDS:
    main.add_command(getattr(importlib.import_module(f"{__name__}.{_module}"), _function))
