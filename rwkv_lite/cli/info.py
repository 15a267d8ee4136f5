"""`rwkv-lite info`: describe a model file from its header."""
from __future__ import annotations

import click

from ..errors import FormatError
from . import common


@click.command()
@common.model_argument
@click.option("--tensors", is_flag=True, help="List every tensor with its storage scheme.")
@common.json_option
@common.friendly_errors
def info(model, model_opt, tensors, as_json):
    """Describe a model file: architecture, parameters, storage, bits/weight, tokenizer, provenance.

    Only the file's header is read, so this is instant even for a 15 GB model.

    \b
    Examples:
      rwkv-lite info eagle-int8.safetensors
      rwkv-lite info eagle-int8.safetensors --tensors
      rwkv-lite info eagle-int8.safetensors --json
    """
    from ..inspect import describe
    path = common.model_path(model, model_opt)
    if not path.exists():
        raise FormatError(f"{path}: no such model file")
    doc = describe(path)
    if as_json:
        common.print_json(doc)
        return
    cfg = doc["config"]
    click.echo(f"file          {doc['path']} ({doc['file_bytes'] / 1e6:.1f} MB, format v{doc['format_version']})")
    click.echo(f"architecture  {doc['architecture']}: {cfg['n_layer']} layers x {cfg['n_embd']}, "
               f"vocab {cfg['vocab_size']}" + (f", {cfg['n_head']} heads of {cfg['head_size']}"
                                               if cfg.get('n_head') else "") + f", ffn {cfg.get('ffn_size')}"
               + (f", DeepEmbed {cfg['d_de']}x{cfg['d_de']}" if cfg.get("d_de") else ""))
    click.echo(f"parameters    {doc['parameters']:,}")
    click.echo("storage       " + ", ".join(f"{k}: {v:,}" for k, v in sorted(doc["parameters_by_scheme"].items())))
    click.echo(f"bits/weight   {doc['bits_per_weight']:.3f} overall, {doc['matrix_bits_per_weight']:.3f} "
               f"in matrices and embedding")
    click.echo(f"tokenizer     {doc['tokenizer']}" + (f": {doc['tokenizer_file']}" if doc.get("tokenizer_file") else ""))
    prov = doc["provenance"]
    if prov:
        click.echo(f"converted     by {prov.get('converter')} on {prov.get('created')} from {prov.get('source_kind')}: "
                   f"{common.listing(prov.get('source_files'))}")
        calib = prov.get("calibration")
        if isinstance(calib, dict):
            click.echo(f"calibrated    int4 by GPTQ on {calib.get('tokens')} tokens of {calib.get('text')} "
                       f"(inputs recorded from {calib.get('model')})")
    if tensors:
        for t in doc["tensors"]:
            params = "".join(f" {k}={v}" for k, v in t["params"].items())
            click.echo(f"  {t['name']:<40} {str(t['shape']):<16} {t['scheme']}{params} "
                       f"({t['bits_per_weight']:.2f} b/w)")
