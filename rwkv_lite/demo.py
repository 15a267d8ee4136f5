"""The built-in demo model: a small byte-level RWKV-5.2 trained on the King James Bible (docs/demo-model.md).

Shipped inside the package so that `rwkv-lite generate -p "And God said"` works offline on a fresh install."""
from __future__ import annotations

from pathlib import Path

from .errors import RwkvLiteError

DEMO_FILE = "demo-kjv-int8.safetensors"


def demo_model_path() -> Path:
    path = Path(__file__).resolve().parent / "data" / DEMO_FILE
    if not path.exists():
        raise RwkvLiteError(f"no model given, and this installation has no built-in demo model ({path})")
    return path
