"""Shared test helpers: where the read-only fixtures in ../shared live, and skips when they are absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("RWKV_LITE_SHARED", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures"
TINY = FIXTURES / "rwkv-cpp-tiny"
TOKENIZERS = FIXTURES / "tokenizers"
TEXT = FIXTURES / "text"
LOCAL_FIXTURES = Path(__file__).resolve().parent / "fixtures"


def shared_file(*parts: str) -> Path:
    """Path to a file under ../shared/fixtures, skipping the test when it is absent."""
    path = FIXTURES.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared fixture {path} not present")
    return path


@pytest.fixture
def tiny_model_file():
    def get(name: str) -> Path:
        return shared_file("rwkv-cpp-tiny", name)
    return get


# ------------------------------------------------------------------------------------------------ converted models
@pytest.fixture(scope="session")
def convert_once(tmp_path_factory):
    """Converts a checkpoint once per test run: `convert_once(src, quant="fp32", **convert_kwargs) -> Path`.

    `src` is a path, or the name of a file in the shared tiny rwkv.cpp fixtures (skipped when absent). The same
    arguments give the same file for the whole run, so the returned file must be treated as read-only: a test
    that damages or rewrites a model copies it first."""
    import rwkv_lite
    made: dict = {}
    folder = tmp_path_factory.mktemp("converted")

    def get(src, quant: str = "fp32", **kwargs) -> Path:
        src = Path(src) if os.sep in str(src) else shared_file("rwkv-cpp-tiny", str(src))
        key = (str(src), quant, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
        if key not in made:
            dst = folder / f"{len(made)}-{src.stem}-{quant}.safetensors"
            rwkv_lite.convert(src, dst, quant=quant, **kwargs)
            made[key] = dst
        return made[key]
    return get


@pytest.fixture(scope="session")
def tiny_fp32(convert_once) -> Path:
    """The tiny byte-level RWKV-5 model (rwkv.cpp's 730K test model) converted to fp32, once per run."""
    return convert_once("tiny-rwkv-5v2-730K-FP32.bin", "fp32")
