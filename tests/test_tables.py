"""`summary`: the parameter table of a model, state dict or checkpoint (S1-S4)."""

import json

import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import weightsmith
from weightsmith.tables import Summary, summary
from _one_rank import one_rank_mesh


class FakeInfo:
    def __init__(self, shape, dtype, storage=None):
        self.shape, self.dtype, self.storage = tuple(shape), dtype, storage
        self.numel = 1
        for d in shape:
            self.numel *= d
        self.nbytes = self.numel * {"float32": 4, "bfloat16": 2}[dtype]


class FakeCheckpoint(dict):
    """The checkpoint interface: a mapping key -> info, plus ``.tensor(key)`` and ``.path``."""

    path = "fake.safetensors"

    def __init__(self, infos):
        super().__init__(infos)
        self.loaded = []

    def tensor(self, key):
        self.loaded.append(key)
        info = self[key]
        return torch.ones(info.shape, dtype=getattr(torch, info.dtype))


def test_running_example_rows_and_totals(mlp):
    s = summary(mlp)
    assert [r.name for r in s] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert [r.shape for r in s] == [(8, 4), (8,), (1, 8), (1,)]
    assert s["0.weight"].count == 32 and s["0.weight"].dtype == "float32"
    assert s["0.weight"].device == "cpu" and s["0.weight"].kind == "parameter"
    assert (s.totals.all, s.totals.trainable, s.totals.frozen, s.totals.buffers) == (49, 49, 0, 0)
    assert s.totals.nbytes == 49 * 4
    assert s.referenced == s.totals


def test_each_layer_says_what_it_holds_and_relu_holds_nothing(mlp):
    s = summary(mlp)
    assert [(m.name, m.type) for m in s.modules] == [
        ("", "Sequential"), ("0", "Linear"), ("1", "ReLU"), ("2", "Linear")]
    assert s.module("0").parameters == ("0.weight", "0.bias")
    assert s.module("1").parameters == ()
    assert s.module("1").describe() == "1 (ReLU): no parameters"
    assert s.module("").describe() == "(root) (Sequential): no parameters"


def test_frozen_layer_counts_as_frozen(mlp):
    mlp[0].requires_grad_(False)
    s = summary(mlp)
    assert (s.totals.trainable, s.totals.frozen) == (9, 40)
    assert s["0.weight"].trainable is False and s["2.bias"].trainable is True


def test_tied_layer_is_counted_once_and_marked(tied_mlp):
    s = summary(tied_mlp)
    unique = sum(p.numel() for p in tied_mlp.parameters())  # parameters() de-duplicates
    assert unique == 121
    assert s.totals.all == 121 and s.totals.trainable == 121
    assert s.referenced.all == 121 + 72
    assert s["1.weight"].tied_with == ("3.weight",)
    assert s["3.bias"].tied_with == ("1.bias",)
    assert s["0.weight"].tied_with == ()
    assert s.tied_groups == [("1.weight", "3.weight"), ("1.bias", "3.bias")]
    assert s.names(duplicates=False) == ["0.weight", "0.bias", "1.weight", "1.bias", "4.weight",
                                         "4.bias"]
    assert s.module("3").same_as == ("1",)
    assert "2 tied groups counted once" in s.totals_line()


def test_same_storage_under_two_parameters_is_tied():
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.weight = nn.Parameter(a.weight.data)  # a distinct Parameter over the same memory
    s = summary(nn.ModuleDict({"a": a, "b": b}))
    assert s["b.weight"].tied_with == ("a.weight",)
    assert s.totals.all == 9 + 3 + 3


def test_parameter_on_the_root_module_is_listed():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))
            self.body = nn.Linear(3, 2)

    s = summary(Scaled(), depth=1)
    assert s["scale"].count == 3
    assert s.module("").parameters == ("scale",)
    assert [(r.name, r.count, r.own) for r in s.rollup] == [("", 11, 3), ("body", 8, 8)]
    assert "(root)" in str(s)


def test_buffers_are_marked_and_counted_apart():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model[1].register_buffer("mask", torch.ones(2), persistent=False)
    s = summary(model)
    assert s["1.running_mean"].kind == "buffer" and s["1.running_mean"].trainable is None
    assert s["1.num_batches_tracked"].dtype == "int64"
    assert s["1.mask"].persistent is False and s["1.running_var"].persistent is True
    assert s["1.weight"].kind == "parameter"
    assert s.totals.all == 108 + 4 + 4 + 4
    assert s.totals.buffers == 4 + 4 + 1 + 2
    assert s.module("1").buffers == ("1.running_mean", "1.running_var", "1.num_batches_tracked",
                                     "1.mask")
    assert "buffer*" in str(s) and "buffer*: non-persistent (not in state_dict())" in str(s)


def test_meta_model_is_counted_from_shapes():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(20_000, 20_000), nn.Linear(20_000, 10))
    s = summary(model)  # any data access on meta tensors would raise
    assert s.totals.all == 20_000 * 20_000 + 20_000 + 20_000 * 10 + 10
    assert s["0.weight"].device == "meta"
    assert s["0.weight"].tied_with == ()


def test_rollup_by_depth_shows_layers_without_parameters():
    model = nn.Sequential()
    model.add_module("enc", nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 3)))
    model.add_module("act", nn.ReLU())
    model.add_module("head", nn.Linear(3, 1))
    one = summary(model, depth=1)
    assert [(r.name, r.type, r.count) for r in one.rollup] == [
        ("enc", "Sequential", 9 + 12), ("act", "ReLU", 0), ("head", "Linear", 4)]
    two = summary(model, depth=2)
    assert [(r.name, r.count, r.own) for r in two.rollup] == [  # parents count their children
        ("enc", 21, 0), ("enc.0", 9, 9), ("enc.1", 0, 0), ("enc.2", 12, 12), ("act", 0, 0), ("head", 4, 4)]
    text = str(two)
    assert "│ enc     │ Sequential │            21 │   0 │" in text
    assert "│   enc.0 │ Linear     │             9 │   9 │" in text
    assert "│   enc.1 │ ReLU       │ no parameters │   0 │" in text
    assert "tied with" not in text  # no ties: no empty column
    assert "no parameters" in str(one)
    assert summary(model).rollup is None


def test_state_dict_keeps_ties_and_cannot_tell_buffers(tied_mlp):
    s = summary(tied_mlp.state_dict())
    assert s.source == "state dict"
    assert {r.kind for r in s} == {"tensor"}
    assert s["1.weight"].tied_with == ("3.weight",)
    assert s.totals.all == 121 and s.referenced.all == 193
    assert s.totals_line().startswith("elements: 121 in 6 tensors")


def test_mapping_with_non_tensors_names_every_offender():
    with pytest.raises(TypeError, match=r"'epoch' is int; 'note' is str.*state_dict"):
        summary({"w": torch.ones(2), "epoch": 3, "note": "x"})


def test_bad_target_and_depth_are_rejected(mlp):
    with pytest.raises(TypeError, match="list"):
        summary([torch.ones(2)])
    with pytest.raises(ValueError, match="depth"):
        summary(mlp, depth=-1)


def test_checkpoint_is_read_from_infos_without_loading_tensors():
    ckpt = FakeCheckpoint({
        "emb.weight": FakeInfo((10, 4), "bfloat16", storage="0"),
        "head.weight": FakeInfo((10, 4), "bfloat16", storage="0"),
        "head.bias": FakeInfo((10,), "float32", storage="1"),
    })
    s = summary(ckpt, depth=1)
    assert ckpt.loaded == []
    assert s.source == "fake.safetensors"
    assert s["emb.weight"].dtype == "bfloat16" and s["emb.weight"].device is None
    assert s["head.weight"].tied_with == ("emb.weight",)
    assert s.totals.all == 50 and s.referenced.all == 90
    assert s.totals.nbytes == 80 + 40
    assert [(r.name, r.count) for r in s.rollup] == [("emb", 40), ("head", 50)]


def test_real_safetensors_checkpoint(tmp_path, mlp):
    path = tmp_path / "mlp.safetensors"
    save_file(mlp.state_dict(), str(path))
    s = summary(weightsmith.open(path))
    assert [r.name for r in s] == sorted(mlp.state_dict())  # safetensors sorts its keys
    assert s.totals.all == 49
    assert s["0.weight"].shape == (8, 4)


def test_dtensor_shows_global_and_local_shape():
    with one_rank_mesh() as mesh:
        from torch.distributed.tensor import DTensor, Shard

        lin = nn.Linear(4, 6)
        # this rank holds rows 0-2 of a (6, 4) weight, as one of two ranks would
        local = lin.weight.detach()[:3].clone()
        lin.weight = nn.Parameter(DTensor.from_local(local, mesh, [Shard(0)], run_check=False,
                                                     shape=torch.Size([6, 4]), stride=(4, 1)))
        s = summary(lin)
    assert s["weight"].shape == (6, 4) and s["weight"].local_shape == (3, 4)
    assert s["weight"].count == 24 and s["bias"].local_shape is None
    assert "(6, 4) local (3, 4)" in str(s)


def test_renderings_agree(tied_mlp):
    s = summary(tied_mlp, depth=1)
    text = str(s)
    assert "1.weight" in text and "3.weight" in text and "121" in text
    md = s.to_markdown()
    assert md.splitlines()[0].startswith("| name | shape | dtype |")
    assert "| 1.weight | (8, 8) | float32 | cpu | 64 | yes | parameter | 3.weight |" in md
    data = json.loads(s.to_json())
    assert data["schema"] == Summary.SCHEMA == "weightsmith.summary/1"
    assert data["totals"]["all"] == 121 and data["referenced"]["all"] == 193
    assert data["rows"][2]["tied_with"] == ["3.weight"]
    assert data["modules"][3]["type"] == "ReLU" and data["modules"][3]["parameters"] == []


def test_public_names_resolve():
    # the module weightsmith.tables was imported above; the package names its function
    assert weightsmith.summary is summary and weightsmith.Summary is Summary


def test_results_show_as_tables_in_a_repl(mlp):
    s = summary(mlp, depth=1)
    assert repr(s) == str(s) and "parameters of Sequential" in repr(s)
    assert s._repr_html_().startswith("<pre") and "0.weight" in s._repr_html_()
    table = s.modules_table()
    assert "1 (ReLU): no parameters" not in repr(table) and "no parameters" in repr(table)
    assert not repr(table).startswith("<rich")
    assert "197 B" not in str(s) and "196 B" in str(s)  # binary units: bytes, then KiB


def test_sizes_use_binary_units():
    with torch.device("meta"):
        s = summary(nn.Linear(1024, 1024))
    assert s.totals_line().endswith("; 4.0 MiB")


def test_table_fits_80_columns_and_piped_rows_keep_names_whole():
    from rich.console import Console

    with torch.device("meta"):
        model = nn.Sequential()
        model.add_module("encoder_with_a_rather_long_name", nn.ModuleList(
            nn.Sequential(nn.Linear(30522, 384), nn.LayerNorm(384)) for _ in range(3)))
    model.register_buffer("position_ids_of_the_embeddings", torch.arange(512)[None], persistent=False)
    s = summary(model)
    console = Console(width=80, record=True, color_system=None, file=open(os.devnull, "w"))
    console.print(s)
    text = console.export_text()
    assert all(len(line) <= 80 for line in text.splitlines()), text
    row = next(line for line in text.splitlines() if "(384, 30522)" in line)
    assert "11,720,448" in row and "float32" in row and "param" in row
    assert "device" in text.splitlines()[2]  # meta and cpu differ: the column stays
    plain = s.plain().splitlines()
    assert plain[1].split() == ["name", "shape", "dtype", "device", "count", "kind"]
    assert any(line.startswith("encoder_with_a_rather_long_name.2.0.weight ") for line in plain)
    assert "buffer*: non-persistent (not in state_dict())" in plain
    assert "device: meta" in summary(model.encoder_with_a_rather_long_name).plain()  # one device: a note
