"""Checkpoint io: sharded safetensors, strict key tables, strict loading, refusing pickles, the native format."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from multimodal.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    KeyTable,
    LazyCheckpoint,
    Rule,
    SplitRule,
    build_on_meta,
    convert,
    load_into,
    read_native_config,
    read_state_dict,
    save_native,
)


class TwoLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(6, 6) for _ in range(2))
        self.head = torch.nn.Linear(6, 3, bias=False)


def random_state(generator):
    model = TwoLayer()
    return {k: torch.randn(v.shape, generator=generator) for k, v in model.state_dict().items()}


def test_sharded_safetensors_read_lazily(tmp_path, generator):
    state = random_state(generator)
    keys = sorted(state)
    shards = {"a.safetensors": keys[:2], "b.safetensors": keys[2:]}
    weight_map = {}
    for name, shard_keys in shards.items():
        save_file({k: state[k] for k in shard_keys}, str(tmp_path / name))
        weight_map.update({k: name for k in shard_keys})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    lazy = read_state_dict(tmp_path)
    assert isinstance(lazy, LazyCheckpoint)
    assert sorted(lazy) == keys
    for key in keys:
        assert torch.equal(lazy[key], state[key])
    row = lazy.get_slice("layers.0.weight")[1:3]
    assert torch.equal(row, state["layers.0.weight"][1:3])


def test_load_into_meta_model_assigns(generator):
    state = random_state(generator)
    model = build_on_meta(TwoLayer)
    assert model.head.weight.is_meta
    load_into(model, state)
    x = torch.randn(5, 6, generator=generator)
    expected = x
    for i in range(2):
        expected = expected @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    expected = expected @ state["head.weight"].T
    out = model.head(model.layers[1](model.layers[0](x)))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_load_errors_name_missing_unexpected_and_misshaped(generator):
    state = random_state(generator)
    del state["layers.1.bias"]
    state["extra.weight"] = torch.randn(2, generator=generator)
    state["head.weight"] = torch.randn(3, 5, generator=generator)
    with pytest.raises(CheckpointError) as info:
        load_into(build_on_meta(TwoLayer), state)
    message = str(info.value)
    assert "Missing keys: layers.1.bias." in message
    assert "Unexpected keys: extra.weight." in message
    assert "Mis-shaped keys: head.weight (3, 5) != (3, 6)." in message


def test_key_table_fuses_splits_renames_and_is_strict(generator):
    foreign = {
        "blk.0.q": torch.randn(4, 6, generator=generator),
        "blk.0.k": torch.randn(2, 6, generator=generator),
        "blk.1.q": torch.randn(4, 6, generator=generator),
        "blk.1.k": torch.randn(2, 6, generator=generator),
        "fused": torch.randn(7, 3, generator=generator),
        "rope.inv_freq": torch.randn(3, generator=generator),
    }
    table = KeyTable(
        "toy",
        rules=[
            Rule("layers.{n}.qk", ("blk.{n}.q", "blk.{n}.k")),
            SplitRule(("left", "right"), "fused", sizes=lambda ctx: (ctx["left"], 7 - ctx["left"])),
        ],
        ignore=(r"inv_freq$",),
        context={"left": 3},
    )
    ours = convert(foreign, table)
    assert sorted(ours) == ["layers.0.qk", "layers.1.qk", "left", "right"]
    assert torch.equal(ours["layers.1.qk"], torch.cat([foreign["blk.1.q"], foreign["blk.1.k"]]))
    assert torch.equal(torch.cat([ours["left"], ours["right"]]), foreign["fused"])

    broken = dict(foreign)
    del broken["blk.1.k"]
    broken["stray"] = torch.ones(1)
    with pytest.raises(CheckpointError, match=r"missing keys: blk\.1\.k\..*unexpected keys: blk\.1\.q, stray\."):
        convert(broken, table)


def test_pickle_files_are_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps({"w": Payload()}))
    with pytest.raises(CheckpointError, match="weights-only"):
        read_state_dict(path)
    other = tmp_path / "model.ckpt"
    other.write_bytes(b"anything")
    with pytest.raises(CheckpointError, match="unsupported format"):
        read_state_dict(other)


def test_weights_only_bin_is_accepted(tmp_path, generator):
    state = random_state(generator)
    torch.save(state, tmp_path / "pytorch_model.bin")
    loaded = read_state_dict(tmp_path)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_corrupt_safetensors_is_a_clear_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        read_state_dict(tmp_path)


def test_native_round_trip_and_version_check(tmp_path, generator):
    state = random_state(generator)
    save_native(state, {"width": 6}, tmp_path / "ckpt", kind="toy")
    config = read_native_config(tmp_path / "ckpt", kind="toy")
    assert config["format_version"] == FORMAT_VERSION and config["width"] == 6
    loaded = read_state_dict(tmp_path / "ckpt")
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    with pytest.raises(CheckpointError, match="not a 'other' one"):
        read_native_config(tmp_path / "ckpt", kind="other")
    config_path = tmp_path / "ckpt" / "config.json"
    config_path.write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format version 99"):
        read_native_config(tmp_path / "ckpt")
