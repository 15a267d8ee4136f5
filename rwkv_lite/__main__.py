"""`python -m rwkv_lite` is the `rwkv-lite` command."""
from .cli import main

main(prog_name="rwkv-lite")
