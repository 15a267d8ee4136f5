"""`python -m rwkv_lite.cli` is the `rwkv-lite` command."""
from . import main

main(prog_name="rwkv-lite")
