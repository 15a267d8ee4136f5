"""The arch contract (rwkv_lite/arch/): every version module exposes the same pieces, its tensor_shapes and
state_shapes describe exactly what conversion writes and what the forward pass carries, and a file whose config
disagrees with a tensor is refused naming that tensor."""
from __future__ import annotations

import dataclasses
import json
import struct

import pytest

import checkpoint_writers as cw
import reference_models as rm
import rwkv_lite
from rwkv_lite.arch import KNOWN_VERSIONS, common, module_for
from rwkv_lite.errors import FormatError

CONTRACT = ("VERSIONS", "Config", "infer_config", "plan", "tensor_shapes", "state_shapes", "init_state", "Layer",
            "load_weights", "time_mix", "channel_mix", "forward", "time_mix_batch", "channel_mix_batch",
            "forward_batch")
# one reference-model spec per version string (tests/reference_models.py)
SPECS = {"4": "v4_a", "5.0": "v50_a", "5.1": "v51_a", "5.2": "v52_a", "6": "v6_a", "7": "v7_b"}


@pytest.mark.parametrize("version", KNOWN_VERSIONS)
def test_every_version_module_exposes_the_contract(version):
    arch = module_for(version)
    missing = [name for name in CONTRACT if not hasattr(arch, name)]
    assert not missing, f"arch for {version} lacks {missing}"
    assert version in arch.VERSIONS
    assert dataclasses.is_dataclass(arch.Config) and issubclass(arch.Config, common.Config)
    for name in CONTRACT[2:]:
        assert callable(getattr(arch, name)), name


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    files = {}

    def get(version):
        if version not in files:
            folder = tmp_path_factory.mktemp(f"contract-{version}")
            src = cw.save_pth(rm.make_state_dict(rm.SPECS_BY_NAME[SPECS[version]]), folder / "model.pth")
            files[version] = rwkv_lite.convert(src, folder / "model.safetensors", "int8")
        return files[version]
    return get


@pytest.mark.parametrize("version", KNOWN_VERSIONS)
def test_tensor_and_state_shapes_describe_the_converted_file(version, converted):
    model = rwkv_lite.load(converted(version))
    arch, cfg = model.arch, model.arch_config
    assert isinstance(cfg, arch.Config) and cfg.version == version
    assert arch.Config.from_dict(model.config) == cfg
    expected = arch.tensor_shapes(cfg)
    stored = {name: tuple(info["shape"]) for name, info in model.metadata["tensors"].items()}
    optional = {name for name in expected if name.endswith("att.time_state")}      # state-tuned files only
    assert set(stored) - set(expected) == set(), "tensors the contract does not describe"
    assert set(expected) - set(stored) - optional == set(), "tensors the contract requires but the file lacks"
    assert {name: expected[name] for name in stored} == stored
    state = model.new_state()
    assert {name: a.shape for name, a in state.arrays.items()} == arch.state_shapes(cfg)
    assert {name: a.shape for name, a in arch.init_state(cfg).items()} == arch.state_shapes(cfg)


def _with_config(path, out, **changes):
    """A copy of model file `path` whose config has `changes` (None: the key removed)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    cfg = json.loads(header["__metadata__"]["config"])
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    header["__metadata__"]["config"] = json.dumps(cfg)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)                   # keep the data section 8-byte aligned
    out.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    return out


@pytest.mark.parametrize("version,changes,named", [
    ("5.2", {"ffn_size": 96}, "'blocks.0.ffn.key.weight' has shape"),
    ("6", {"d_decay": 3}, "'blocks.0.att.time_decay_w1' has shape"),
    ("7", {"d_a": 5}, "'blocks.0.att.a1' has shape"),
    ("5.0", {"n_head": 2, "head_size": 32}, "has shape [4, 16]"),         # att.decay or att.bonus
    ("4", {"ffn_size": 7}, "'blocks.0.ffn.key.weight' has shape"),
])
def test_a_config_that_disagrees_with_a_tensor_is_refused_naming_it(version, changes, named, converted, tmp_path):
    source = converted(version)
    bad = _with_config(source, tmp_path / "bad.safetensors", **changes)
    with pytest.raises(FormatError) as err:
        rwkv_lite.load(bad)
    message = str(err.value)
    assert named in message and "but the config implies" in message and str(bad) in message
    assert "\n" not in message


@pytest.mark.parametrize("changes,message", [
    ({"n_head": 0}, "config n_head=0 is not a positive integer"),
    ({"head_size": None}, "config head_size=None is not a positive integer"),
    ({"n_embd": True}, "config n_embd=True is not a positive integer"),
    ({"ln_x_eps": 2.0}, "config ln_x_eps=2.0 is not a small positive number"),
    ({"n_head": 3, "head_size": 5}, "config n_head=3 x head_size=5 does not make n_embd="),
])
def test_config_numbers_are_validated_by_the_version_config(changes, message, converted, tmp_path):
    bad = _with_config(converted("7"), tmp_path / "bad.safetensors", **changes)
    with pytest.raises(FormatError, match=message):
        rwkv_lite.load(bad)


def test_config_from_dict_is_typed_and_ignores_file_only_keys():
    arch = module_for("7")
    cfg = arch.Config.from_dict({"arch": "rwkv7", "version": "7", "n_layer": 2, "n_embd": 64, "vocab_size": 100,
                                 "n_head": 2, "head_size": 32, "ffn_size": 256, "ln_x_eps": 64e-5,
                                 "d_w": 8, "d_a": 8, "d_v": 8, "d_g": 16})
    assert (cfg.n_layer, cfg.n_head, cfg.d_de) == (2, 2, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n_layer = 3                                   # type: ignore[misc]

