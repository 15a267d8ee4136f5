"""`rwkv-lite verify`: check a model file's integrity (rwkv_lite.verify)."""
from __future__ import annotations

import click

from . import common


@click.command()
@common.model_argument
@common.json_option
@common.friendly_errors
def verify(model, model_opt, as_json):
    """Check a model file's integrity: header, sizes and every array's checksum.

    \b
    Examples:
      rwkv-lite verify eagle-int8.safetensors
      rwkv-lite verify eagle-int8.safetensors --json
    """
    from ..verify import verify_checksums_of
    path = common.model_path(model, model_opt)
    with common.ProgressBar("verifying", hidden=as_json) as bar:
        bad, total = verify_checksums_of(path, progress=bar)
    if as_json:
        common.print_json({"path": str(path), "ok": not bad, "corrupted_arrays": bad})
    if bad:
        common.fail(f"{path}: checksum mismatch in {len(bad)} array(s): {', '.join(bad[:5])}")
    if not as_json:
        click.echo(f"{path}: OK ({total / 1e6:.1f} MB checked)")
