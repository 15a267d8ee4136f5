"""A decode step never calls into BLAS (one owner of the cores: kernels/threads.py, kernels/lowrank.py).

BLAS is reached from numpy through matmul (`@`, np.matmul) and the dot family (np.dot, np.inner, np.vdot,
np.tensordot, np.einsum). Every array the forward pass reads from the model (vectors, LoRA factors, stored matrix
parts) is swapped for a view of a subclass that fails the test on any of those, so a decode step that multiplied
a weight through numpy would be caught; sequence mode (prompts) is allowed to use BLAS and is checked to do so,
which proves the trap works.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

import checkpoint_writers as cw
import reference_models as rm
import rwkv_lite
from rwkv_lite.kernels.linear import Matrix

BLAS_FUNCTIONS = {np.dot, np.inner, np.vdot, np.tensordot, np.einsum, np.matmul}


class BlasCall(AssertionError):
    pass


class NoBlas(np.ndarray):
    """An ndarray view that raises BlasCall when numpy would hand it to BLAS."""

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if ufunc is np.matmul:
            raise BlasCall(f"np.matmul on a model array of shape {self.shape}")
        inputs = tuple(np.asarray(i) if isinstance(i, NoBlas) else i for i in inputs)
        if "out" in kwargs:
            kwargs["out"] = tuple(np.asarray(o) if isinstance(o, NoBlas) else o for o in kwargs["out"])
        return getattr(ufunc, method)(*inputs, **kwargs)

    def __array_function__(self, func, types, args, kwargs):
        if func in BLAS_FUNCTIONS:
            raise BlasCall(f"{func.__name__} on a model array of shape {self.shape}")
        return super().__array_function__(func, (np.ndarray,), _plain(args), _plain(kwargs))


def _plain(obj):
    if isinstance(obj, NoBlas):
        return obj.view(np.ndarray)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def _trap(obj):
    """Replace every ndarray held by obj (and by its Matrix / list / tuple attributes) with a NoBlas view."""
    if isinstance(obj, np.ndarray):
        return obj.view(NoBlas)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_trap(o) for o in obj)
    if isinstance(obj, Matrix) or hasattr(obj, "__dict__"):
        for name, value in vars(obj).items():
            if isinstance(value, (np.ndarray, list, tuple, Matrix)) or hasattr(value, "__dict__"):
                setattr(obj, name, _trap(value))
        return obj
    return obj


def _model(tmp_path, spec_name: str, quant: str):
    spec = rm.SPECS_BY_NAME[spec_name]
    src = cw.save_pth(rm.make_state_dict(spec), tmp_path / "model.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rwkv_lite.convert(src, tmp_path / "model.st", quant=quant)
    return rwkv_lite.load(tmp_path / "model.st")


@pytest.mark.parametrize("spec_name", ["v6_a", "v7_b", "v52_a"])
@pytest.mark.parametrize("quant", ["fp32", "int8", "int4"])
def test_decode_step_never_calls_blas(tmp_path, spec_name, quant):
    model = _model(tmp_path, spec_name, quant)
    expected, state = model.forward([1, 2, 3])
    after_prompt = state.copy()
    logits_plain, _ = model.forward([4], after_prompt)

    W = model.weights
    for L in W.layers:
        _trap(L)
    _trap(W)

    logits, _ = model.forward([4], state.copy())        # one decode step through the trapped weights
    np.testing.assert_array_equal(logits, logits_plain)
    if quant == "fp32":                                 # the trap fires where BLAS meets a weight: prompts through
        with pytest.raises(BlasCall):                   # fp32 matrices (int8/int4 matrices and RWKV-6/7's int8
            model.forward([5, 6, 7, 8], state.copy())   # LoRA factors run the integer kernels, no BLAS)
