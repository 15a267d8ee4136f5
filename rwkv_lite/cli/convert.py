"""`rwkv-lite convert` and `rwkv-lite convert-state`."""
from __future__ import annotations

import time
from pathlib import Path

import click

from ..errors import FormatError, RwkvLiteError
from . import common

QUANT_CHOICES = ["fp32", "fp16", "int8", "int4"]


@click.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--quant", "-q", type=click.Choice(QUANT_CHOICES), default="fp16",
              show_default=True, help="Storage of the large matrices.")
@click.option("--group", type=click.IntRange(8, 4096), default=None,
              help="int4 group size along the input dimension (default: the scheme's).")
@click.option("--head", type=click.Choice(QUANT_CHOICES), default=None,
              help="Storage of the output head, if different from --quant.")
@click.option("--vocab", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Tokenizer to embed: World vocab .txt or tokenizer.json (default: found beside SRC).")
@click.option("--calibration", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="A file from `rwkv-lite calibrate`: quantize the int4 matrices with GPTQ (better quality).")
@click.option("--lora", type=click.Path(path_type=Path), default=None,
              help="A LoRA adapter to merge into the weights before quantization: a .pth of *.lora_A/*.lora_B "
                   "(RWKV-PEFT, RWKV-LM-LoRA) or a Hugging Face PEFT folder.")
@click.option("--lora-alpha", type=click.FloatRange(min=0, min_open=True), default=None,
              help="The lora_alpha the adapter was trained with (RWKV-PEFT files do not store it; HF PEFT "
                   "folders do): merged as W + alpha/r * B A.")
@click.option("--force", is_flag=True, help="Replace DST if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@common.friendly_errors
def convert(src, dst, quant, group, head, vocab, calibration, lora, lora_alpha, force, quiet):
    """Convert a checkpoint to one compact, memory-mappable rwkv-lite file.

    SRC: a Hugging Face RWKV folder, a BlinkDL .pth or .safetensors, an rwkv.cpp .bin file, or an rwkv-lite
    fp32/fp16 file (to quantize it further). The tokenizer comes from --vocab, else a tokenizer file beside SRC,
    else the one shipped with rwkv-lite for the model's vocabulary (World: 65536 ids; GPT-NeoX 20B: RWKV-4
    Pile, 50277).

    \b
    Examples:
      rwkv-lite convert RWKV-5-World-7B-v2-20240128-ctx4096.pth eagle-fp16.safetensors
      rwkv-lite convert ./v5-Eagle-7B-HF eagle-int4.safetensors --quant int4
      rwkv-lite convert ./v5-Eagle-7B-HF eagle-int4.safetensors --quant int4 --calibration eagle.calib.npz
      rwkv-lite convert tiny-rwkv-5v2-730K-FP32.bin tiny.safetensors --quant fp32
      rwkv-lite convert eagle-fp16.safetensors eagle-int4.safetensors --quant int4
      rwkv-lite convert rwkv7-g1-1.5b.pth g1-poet-int8.safetensors --quant int8 --lora poet.pth --lora-alpha 32
    """
    from ..inspect import describe
    from ..quantize.convert import convert as run_convert, refuse_overwriting_an_input
    common.announce_compiles()
    if not src.exists():
        raise click.BadParameter(f"{src}: no such file or folder", param_hint="SRC")
    if lora_alpha is not None and lora is None:
        raise click.UsageError("--lora-alpha needs --lora")
    refuse_overwriting_an_input(dst, [src, vocab, calibration, lora])      # even with --force
    if dst.exists() and not dst.is_dir() and not force:
        raise RwkvLiteError(f"{dst}: already exists (add --force to replace it)")
    start = time.perf_counter()
    with common.ProgressBar("converting", hidden=quiet, show_pos=True) as bar:
        run_convert(src, dst, quant, vocab=vocab, group=group, head=head, calibration=calibration, lora=lora,
                    lora_alpha=lora_alpha, progress=bar)
    size = dst.stat().st_size
    click.echo(f"wrote {dst} ({size / 1e6:.1f} MB, {quant}) in {time.perf_counter() - start:.1f} s", err=True)
    if describe(dst)["tokenizer"] == "none":
        click.echo(f"note: {src} came without a tokenizer and rwkv-lite ships none for its vocabulary, so {dst} "
                   "runs on token ids only (give one with --vocab FILE to read and write text)", err=True)


@click.command("convert-state")
@click.argument("src", type=click.Path(path_type=Path, dir_okay=False))
@click.argument("dst", type=click.Path(path_type=Path, dir_okay=False))
@click.option("-m", "--model", "model_opt", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="The converted model the state was tuned for (its shape is checked).")
@common.friendly_errors
def convert_state(src, dst, model_opt):
    """Convert a state-tuned initial state (.pth of blocks.N.att.time_state) to an rwkv-lite state file.

    The result is checksummed and loads with --state on generate and chat (which also accept the .pth
    itself). A state tuned for another model shape is refused.

    \b
    Example:
      rwkv-lite convert-state rwkv7-g1-1.5b-state-poet.pth poet.state -m g1-1.5b-int8.safetensors
      rwkv-lite chat g1-1.5b-int8.safetensors --state poet.state
    """
    from ..quantize.state_file import is_state_tuning_file
    if not src.exists():
        raise click.BadParameter(f"{src}: no such file", param_hint="SRC")
    if not is_state_tuning_file(src):
        raise FormatError(f"{src}: not a state tuner's file (a .pth or .safetensors of blocks.N.att.time_state "
                          f"tensors)")
    with common.load_model(model_opt) as model:
        state = common.load_state_for(model, src)
        state.save(dst)
        n_layer = model.config["n_layer"]
    click.echo(f"wrote {dst} ({n_layer} layers, {state.nbytes() / 1e6:.2f} MB)", err=True)
