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
