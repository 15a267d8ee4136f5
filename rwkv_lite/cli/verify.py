"""`rwkv-lite verify`: check a model file's integrity (rwkv_lite.verify, rwkv_lite.integrity)."""
from __future__ import annotations

import click

from . import common


@click.command()
@common.model_argument
@common.json_option
@common.friendly_errors
def verify(model, model_opt, as_json):
    """Check a model file's integrity: header, sizes, every array's checksum, and that the safetensors library
    reads its header and tensor index.

    \b
    Examples:
      rwkv-lite verify eagle-int8.safetensors
      rwkv-lite verify eagle-int8.safetensors --json
    """
    from ..integrity import verify_file
    path = common.model_path(model, model_opt)
    with common.ProgressBar("verifying", hidden=as_json) as bar:
        result = verify_file(path, progress=bar)
    if as_json:
        common.print_json({"path": str(path), "ok": result.ok, "corrupted_arrays": result.corrupted_arrays,
                           "safetensors_error": result.safetensors_error})
    problems = result.problems()
    for line in problems[1:]:
        click.echo(f"error: {line}", err=True)
    if problems:
        common.fail(problems[0])
    if not as_json:
        click.echo(f"{path}: OK ({result.bytes_checked / 1e6:.1f} MB checked)")
