"""Hostile pickle checkpoints: every trick is refused with UnsafeCheckpointError naming the file and what was asked
for, and a sentinel file that the payload would create proves nothing ran."""
from __future__ import annotations

import io
import os
import pickle
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from checkpoint_writers import _p_global, _p_int, _p_str, _state_dict_pickle, save_pth, write_torch_zip
from conftest import REPO
from rwkv_lite.errors import FormatError, UnsafeCheckpointError
from rwkv_lite.quantize.readers import open_checkpoint

STORAGE = np.arange(6, dtype="<f4").tobytes()     # data/0 for pickles that also carry a real tensor


@pytest.fixture
def sentinel(tmp_path):
    """A file the payloads would create; each test asserts it never appears."""
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a payload from the checkpoint was executed"


def shell(sentinel) -> str:
    return f"touch {sentinel}"


def python_code(sentinel) -> str:
    return f"open({str(sentinel)!r}, 'w').write('x')"


def pth_with_pickle(tmp_path, pkl: bytes, name="evil.pth") -> os.PathLike:
    return write_torch_zip(tmp_path / name, {"data.pkl": pkl, "data/0": STORAGE, "version": b"3\n"})


def refused(path, *fragments):
    with pytest.raises(UnsafeCheckpointError) as e:
        with open_checkpoint(path) as ckpt:
            for ref in ckpt.tensors.values():
                ref.load()
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    for f in fragments:
        assert f in msg, msg
    return msg


class Reduce:
    """An object whose pickle calls `func(*args)` on load (the classic __reduce__ payload)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class SetState:
    """An object whose __setstate__ (run by BUILD in a normal unpickler) would execute the payload."""

    def __init__(self, code):
        self.code = code

    def __setstate__(self, state):
        exec(state["code"])


# --- the classic payloads, through pickle's own encoder at every protocol -----------------------------------------

@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_os_system_via_reduce_at_every_protocol(tmp_path, sentinel, protocol):
    pkl = pickle.dumps({"w": Reduce(os.system, shell(sentinel))}, protocol=protocol)   # 4, 5: STACK_GLOBAL
    msg = refused(pth_with_pickle(tmp_path, pkl), f"{os.system.__module__}.system", "nothing was executed")
    assert "data.pkl" in msg


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("func", [eval, exec])
def test_builtins_eval_and_exec(tmp_path, sentinel, func, protocol):
    pkl = pickle.dumps(Reduce(func, python_code(sentinel)), protocol=protocol)
    # protocol 2 spells the module '__builtin__' (Python 2 compatible names), protocol 4 'builtins'
    refused(pth_with_pickle(tmp_path, pkl), "builtin", f".{func.__name__}")


@pytest.mark.parametrize("module,name", [
    ("subprocess", "check_call"), ("subprocess", "Popen"), ("os", "system"), ("nt", "system"), ("posix", "system"),
    ("builtins", "getattr"), ("__builtin__", "eval"), ("functools", "partial"), ("pickle", "loads"),
    ("torch", "load"), ("torch.serialization", "load"), ("torch._utils", "_rebuild_tensor_v4"),
    ("numpy.core.multiarray", "_reconstruct"), ("collections", "defaultdict"), ("runpy", "_run_code"),
    ("copyreg", "_reconstructor"), ("torch", "Storage"), ("torch.nn.modules.linear", "Linear"),
])
def test_unknown_globals_are_refused_by_name(tmp_path, sentinel, module, name):
    pkl = b"\x80\x02" + _p_global(module, name) + _p_str(shell(sentinel)) + b"\x85R."
    refused(pth_with_pickle(tmp_path, pkl), f"{module}.{name}")


def test_stack_global_with_non_string_names(tmp_path):
    pkl = b"\x80\x04" + _p_int(1) + _p_int(2) + b"\x93."
    refused(pth_with_pickle(tmp_path, pkl), "STACK_GLOBAL")


def test_inst_opcode(tmp_path, sentinel):
    pkl = b"\x80\x02(" + _p_str(shell(sentinel)) + b"ios\nsystem\n."
    refused(pth_with_pickle(tmp_path, pkl), "INST", "os.system")


@pytest.mark.parametrize("opcode,label", [(b"\x81", "NEWOBJ"), (b"\x92", "NEWOBJ_EX"), (b"o", "OBJ"),
                                          (b"\x82\x01", "EXT1"), (b"\x83\x01\x00", "EXT2"),
                                          (b"Pabc\n", "PERSID")])
def test_object_building_opcodes(tmp_path, opcode, label):
    pkl = b"\x80\x02(" + b"))" + opcode + b"."
    refused(pth_with_pickle(tmp_path, pkl), label)


def test_setstate_payload_is_refused_before_build(tmp_path, sentinel):
    pkl = pickle.dumps(SetState(python_code(sentinel)), protocol=2)    # GLOBAL of the class, NEWOBJ, BUILD
    refused(pth_with_pickle(tmp_path, pkl), "SetState")


# --- allowed names used the wrong way --------------------------------------------------------------------------

def _tensor_record(key="0", numel=6) -> bytes:
    """_rebuild_tensor_v2 of a (2, 3) float32 storage: the legitimate building block."""
    return (_p_global("torch._utils", "_rebuild_tensor_v2") + b"(" + b"(" + _p_str("storage")
            + _p_global("torch", "FloatStorage") + _p_str(key) + _p_str("cpu") + _p_int(numel) + b"tQ"
            + _p_int(0) + _p_int(2) + _p_int(3) + b"\x86" + _p_int(3) + _p_int(1) + b"\x86" + b"\x89"
            + _p_global("collections", "OrderedDict") + b")R" + b"tR")


@pytest.mark.parametrize("case,fragment", [
    ("build_on_tensor", "BUILD"), ("build_on_list", "BUILD"), ("build_on_class", "BUILD"),
    ("build_bad_state", "non-dict state"), ("call_storage_type", "torch.FloatStorage"),
    ("call_tensor", "calls a tensor"), ("ordered_dict_args", "OrderedDict with arguments"),
    ("persid_not_storage", "persistent id"), ("storage_is_not_storage", "as tensor storage"),
    ("append_to_dict", "appends to a dict"), ("setitem_on_list", "sets items on a list"),
    ("from_type_evil", "_rebuild_from_type_v2"),
])
def test_allowed_names_misused(tmp_path, sentinel, case, fragment):
    od = _p_global("collections", "OrderedDict") + b")R"
    body = {
        "build_on_tensor": _tensor_record() + b"}" + _p_str("__class__") + _p_str("x") + b"sb",
        "build_on_list": b"]}b",
        "build_on_class": _p_global("collections", "OrderedDict") + b"}b",
        "build_bad_state": od + b"]b",
        "call_storage_type": _p_global("torch", "FloatStorage") + _p_str(shell(sentinel)) + b"\x85R",
        "call_tensor": _tensor_record() + b")R",
        "ordered_dict_args": _p_global("collections", "OrderedDict") + b"]\x85R",
        "persid_not_storage": b"(" + _p_str("module") + _p_str("os") + b"tQ",
        "storage_is_not_storage": _p_global("torch._utils", "_rebuild_tensor_v2") + b"(" + _p_str("x")
                                  + _p_int(0) + b")" + b")" + b"\x89" + od + b"tR",
        "append_to_dict": b"}" + _p_int(1) + b"a",
        "setitem_on_list": b"]" + _p_int(1) + _p_int(2) + b"s",
        "from_type_evil": _p_global("torch._tensor", "_rebuild_from_type_v2") + b"(" + _p_global("os", "system"),
    }[case]
    if case == "from_type_evil":     # the evil inner global is refused first: also fine
        fragment = "os.system"
    refused(pth_with_pickle(tmp_path, b"\x80\x02" + body + b"."), fragment)


def test_from_type_v2_with_non_tensor_type(tmp_path):
    od = _p_global("collections", "OrderedDict") + b")R"
    pkl = (b"\x80\x02" + _p_global("torch._tensor", "_rebuild_from_type_v2") + b"("
           + _p_global("torch._utils", "_rebuild_tensor_v2") + od + b")" + b"}" + b"tR.")
    refused(pth_with_pickle(tmp_path, pkl), "_rebuild_from_type_v2")


def test_payload_hidden_among_real_tensors(tmp_path, sentinel):
    """A valid state dict whose last entry smuggles os.system: the whole file is refused."""
    good = _state_dict_pickle([("w", "0", "f32", (2, 3))])
    evil_item = _p_str("evil") + _p_global("posix", "system") + _p_str(shell(sentinel)) + b"\x85R"
    pkl = good[:-2] + b"(" + evil_item + b"u" + good[-2:] if good.endswith(b"u.") else None
    assert pkl is not None
    refused(pth_with_pickle(tmp_path, pkl), "posix.system")


def test_payload_in_a_real_torch_save_file(tmp_path, sentinel):
    torch = pytest.importorskip("torch")
    path = tmp_path / "torch_evil.pth"
    torch.save({"w": torch.ones(2, 3), "evil": Reduce(os.system, shell(sentinel))}, path)
    refused(path, f"{os.system.__module__}.system")


# --- nested archives and odd records -------------------------------------------------------------------------

def _evil_pth_bytes(tmp_path, sentinel) -> bytes:
    inner = pth_with_pickle(tmp_path, pickle.dumps(Reduce(os.system, shell(sentinel)), protocol=2), "inner.pth")
    return inner.read_bytes()


def test_data_pkl_that_is_itself_an_archive(tmp_path, sentinel):
    path = write_torch_zip(tmp_path / "nested.pth", {"data.pkl": _evil_pth_bytes(tmp_path, sentinel),
                                                     "version": b"3\n"})
    refused(path, "nested archive")


def test_zip_wrapping_a_checkpoint(tmp_path, sentinel):
    path = tmp_path / "wrapped.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("model/model.pth", _evil_pth_bytes(tmp_path, sentinel))
    refused(path, "nested archive", "model/model.pth")


def test_extra_records_hiding_archives_or_pickles(tmp_path, sentinel):
    good = {"data.pkl": _state_dict_pickle([("w", "0", "f32", (2, 3))]), "data/0": STORAGE, "version": b"3\n"}
    gz = io.BytesIO()
    import gzip
    with gzip.GzipFile(fileobj=gz, mode="wb") as g:
        g.write(_evil_pth_bytes(tmp_path, sentinel))
    cases = {"gzip.pth": ("notes", gz.getvalue(), "nested archive"),
             "pickle.pth": ("extra", pickle.dumps(Reduce(os.system, shell(sentinel)), protocol=2), "extra pickle"),
             "zipname.pth": ("weights.zip", b"not even a zip", "nested archive")}
    for name, (record, content, fragment) in cases.items():
        path = write_torch_zip(tmp_path / name, {**good, record: content})
        refused(path, fragment)


def test_deflated_records_still_checked(tmp_path, sentinel):
    """Compression does not hide a payload (and a compressed storage is still read correctly)."""
    path = tmp_path / "deflated.pth"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", pickle.dumps(Reduce(os.system, shell(sentinel)), protocol=2))
    refused(path, "system")
    ok = tmp_path / "deflated_ok.pth"
    with zipfile.ZipFile(ok, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", _state_dict_pickle([("w", "0", "f32", (2, 3))]))
        zf.writestr("archive/data/0", STORAGE)
    with open_checkpoint(ok) as ckpt:
        assert np.array_equal(ckpt.tensors["w"].load(), np.arange(6, dtype=np.float32).reshape(2, 3))


# --- resource attacks: refused cleanly, no crash, no huge allocation -------------------------------------------------

@pytest.mark.parametrize("case", ["unicode_4gb", "long4_huge", "bytes8_huge", "memo_missing", "unbalanced"])
def test_malformed_pickles_are_format_errors(tmp_path, case):
    pkl = {
        "unicode_4gb": b"\x80\x02X\xff\xff\xff\xffabc.",
        "long4_huge": b"\x80\x02\x8b\xff\xff\xff\x7f" + b"\x01" * 16 + b".",
        "bytes8_huge": b"\x80\x04\x8e" + struct.pack("<Q", 1 << 60) + b"x.",
        "memo_missing": b"\x80\x02h\x07.",
        "unbalanced": b"\x80\x02((.",
    }[case]
    path = pth_with_pickle(tmp_path, pkl)
    with pytest.raises(FormatError) as e:
        open_checkpoint(path)
    assert not isinstance(e.value, UnsafeCheckpointError)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_deeply_nested_dict_key_does_not_crash(tmp_path):
    """Hashing a million nested tuples overflows CPython's C stack; such keys must be refused, not hashed."""
    depth = 1_000_000
    pkl = b"\x80\x02}" + b")" + b"\x85" * depth + _p_int(1) + b"s."
    path = pth_with_pickle(tmp_path, pkl)
    code = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
from rwkv_lite.errors import FormatError
from rwkv_lite.quantize.readers import open_checkpoint
try:
    open_checkpoint({str(path)!r})
except FormatError as e:
    print("refused:", e)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, (res.returncode, res.stderr[-500:])
    assert "refused:" in res.stdout and "key" in res.stdout


def test_self_referencing_containers_are_harmless(tmp_path):
    """A list appended to itself (a cycle) must not make the reader loop or recurse."""
    pkl = b"\x80\x02}" + _p_str("loop") + b"]q\x00h\x00ah\x00a" + b"s" + _p_str("w") + _tensor_record() + b"s."
    with open_checkpoint(pth_with_pickle(tmp_path, pkl)) as ckpt:
        assert list(ckpt.tensors) == ["w"] and ckpt.info["ignored_entries"] == ["loop"]
        assert ckpt.tensors["w"].load().shape == (2, 3)


def test_legit_checkpoint_still_loads_after_all_this(tmp_path):
    path = save_pth({"w": np.ones((2, 3), np.float32)}, tmp_path / "ok.pth")
    with open_checkpoint(path) as ckpt:
        assert np.array_equal(ckpt.tensors["w"].load(), np.ones((2, 3), np.float32))
