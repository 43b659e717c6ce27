"""`convert`: round trips between torch zip and safetensors, sharding, casting, verification."""

import importlib
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import weightsmith
from weightsmith.errors import SaveError, UsageError

convert_module = importlib.import_module("weightsmith.conversion")
st_module = importlib.import_module("weightsmith.io.safetensors")


@pytest.fixture
def bn_model():
    """Conv + BatchNorm (an int64 buffer) + a tied pair, seeded."""
    torch.manual_seed(0)
    shared = nn.Linear(8, 8)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), shared, nn.ReLU(), shared)
    model[1].running_mean.normal_()
    model[1].num_batches_tracked.fill_(7)
    return model


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_torch_zip_to_safetensors_to_torch_zip_keeps_values_and_ties(tmp_path, bn_model):
    state = bn_model.state_dict()
    torch.save(state, tmp_path / "model.pt")
    r1 = weightsmith.convert(tmp_path / "model.pt", tmp_path / "model.safetensors")
    assert (r1.format, r1.source_format, r1.tensors) == ("safetensors", "torch", len(state))
    assert r1.ties == {"5.weight": "3.weight", "5.bias": "3.bias"}
    mid = weightsmith.open(tmp_path / "model.safetensors")
    assert sorted(mid.ties) == [("3.bias", "5.bias"), ("3.weight", "5.weight")]
    r2 = weightsmith.convert(tmp_path / "model.safetensors", tmp_path / "back.pt")
    assert r2.format == "torch"
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert list(back) == list(state)
    for key in state:
        assert_same(back[key], state[key])
    assert back["5.weight"].data_ptr() == back["3.weight"].data_ptr()  # still one storage
    assert weightsmith.open(tmp_path / "back.pt")["5.weight"].storage is not None


def test_dtype_casts_floating_tensors_only(tmp_path, bn_model):
    state = bn_model.state_dict()
    torch.save(state, tmp_path / "model.pt")
    report = weightsmith.convert(tmp_path / "model.pt", tmp_path / "half.safetensors", dtype="float16", verify=True)
    out = load_file(str(tmp_path / "half.safetensors"))
    assert out["1.num_batches_tracked"].dtype == torch.int64 and int(out["1.num_batches_tracked"]) == 7
    for key, value in state.items():
        if value.is_floating_point() and key in out:
            assert_same(out[key], value.half())
    assert report.dtype == "float16" and report.cast == len(out) - 1  # every stored floating tensor
    back = weightsmith.convert(tmp_path / "half.safetensors", tmp_path / "bf16.pt", dtype=torch.bfloat16)
    assert torch.load(tmp_path / "bf16.pt", weights_only=True)["0.weight"].dtype == torch.bfloat16
    assert back.notes == []  # the source metadata held only weightsmith's own entries
    with pytest.raises(UsageError, match="floating-point dtype"):
        weightsmith.convert(tmp_path / "model.pt", tmp_path / "x.safetensors", dtype="int8")


def test_sharded_output_is_readable_by_safetensors_and_weightsmith(tmp_path, bn_model):
    state = bn_model.state_dict()
    torch.save(state, tmp_path / "model.pt")
    report = weightsmith.convert(tmp_path / "model.pt", tmp_path / "sharded", max_shard_size=300, verify=True)
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert report.format == "sharded" and len(shards) > 2 and report.verified
    seen = {}
    for shard in shards:
        part = load_file(str(shard))
        assert sum(t.numel() * t.element_size() for t in part.values()) <= 300 or len(part) == 1
        seen.update(part)
    assert set(seen) == set(state) - {"5.weight", "5.bias"}  # tied keys are stored once
    for key, value in seen.items():
        assert_same(value, state[key])
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == report.nbytes
    opened = weightsmith.open(tmp_path / "sharded")
    assert set(opened) == set(state)
    assert_same(opened.tensor("5.weight"), state["3.weight"])
    assert weightsmith.diff(tmp_path / "model.pt", tmp_path / "sharded").equal


def test_metadata_is_carried_over(tmp_path, mlp):
    save_file({k: v.contiguous() for k, v in mlp.state_dict().items()}, str(tmp_path / "a.safetensors"),
              metadata={"format": "pt", "note": "from a run"})
    report = weightsmith.convert(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    with safe_open(str(tmp_path / "b.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and meta["note"] == "from a run"
    assert meta["weightsmith.converted_from"] == "a.safetensors"  # a file name: no machine path
    assert not any(str(tmp_path) in v for v in meta.values())
    assert "weightsmith.crc32" in meta and report.metadata["note"] == "from a run"
    torch_report = weightsmith.convert(tmp_path / "a.safetensors", tmp_path / "c.pt")
    assert torch_report.notes == ["torch files carry no string metadata; not kept: note"]


def test_select_keeps_a_subset(tmp_path, mlp):
    torch.save(mlp.state_dict(), tmp_path / "a.pt")
    report = weightsmith.convert(tmp_path / "a.pt", tmp_path / "w.safetensors", select="*.weight")
    assert sorted(load_file(str(tmp_path / "w.safetensors"))) == ["0.weight", "2.weight"]
    assert report.tensors == 2


def corrupt_writer(monkeypatch, key: str) -> None:
    """Make the safetensors writer flip one byte of ``key``'s data (the checksum follows the bad bytes)."""
    original = st_module.tensor_bytes

    def flipped(name, tensor):
        data = original(name, tensor)
        if name == key:
            data = np.array(data, copy=True)
            data[0] ^= 0x01
        return data

    monkeypatch.setattr(st_module, "tensor_bytes", flipped)


@pytest.mark.parametrize("out", ["b.safetensors", "sharded"])
def test_verify_catches_a_corrupted_output_and_keeps_the_old_one(tmp_path, mlp, monkeypatch, out):
    torch.save(mlp.state_dict(), tmp_path / "a.pt")
    dst = tmp_path / out
    shard = None if out.endswith(".safetensors") else "1KB"
    weightsmith.convert(tmp_path / "a.pt", dst, max_shard_size=shard)
    before = sorted(p.read_bytes() for p in ([dst] if dst.is_file() else dst.iterdir()))
    corrupt_writer(monkeypatch, "2.weight")
    weightsmith.convert(tmp_path / "a.pt", tmp_path / "unchecked.safetensors")  # without verify: unnoticed
    with pytest.raises(SaveError, match="verification failed.*'2.weight' holds different values"):
        weightsmith.convert(tmp_path / "a.pt", dst, max_shard_size=shard, verify=True)
    after = sorted(p.read_bytes() for p in ([dst] if dst.is_file() else dst.iterdir()))
    assert after == before  # the previous output is intact
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
    assert not weightsmith.diff(tmp_path / "a.pt", tmp_path / "unchecked.safetensors").equal


def test_streaming_releases_each_tensor_once_written(tmp_path, mlp, monkeypatch):
    torch.save(mlp.state_dict(), tmp_path / "a.pt")
    released = []
    checkpoint_cls = weightsmith.Checkpoint
    original = checkpoint_cls.release
    monkeypatch.setattr(checkpoint_cls, "release", lambda self, key: released.append(key) or original(self, key))
    weightsmith.convert(tmp_path / "a.pt", tmp_path / "b.safetensors")
    assert sorted(released) == sorted(mlp.state_dict())
    released.clear()
    mine = weightsmith.open(tmp_path / "a.pt")  # opened by the caller: its pages are left alone
    weightsmith.convert(mine, tmp_path / "c.safetensors")
    assert released == []


@pytest.mark.parametrize("make", ["safetensors", "torch", "sharded"])
def test_released_tensors_read_back_from_the_file(tmp_path, mlp, make):
    state = mlp.state_dict()
    if make == "torch":
        path = tmp_path / "m.pt"
        torch.save(state, path)
    else:
        path = tmp_path / ("m" if make == "sharded" else "m.safetensors")
        weightsmith.save(state, path, max_shard_size="1KB" if make == "sharded" else None)
    ckpt = weightsmith.open(path)
    first = {k: ckpt.tensor(k) for k in ckpt}
    for key in ckpt:
        ckpt.release(key)
    for key, value in state.items():
        assert_same(first[key], value)
        assert_same(ckpt.tensor(key), value)
    with pytest.raises(KeyError):
        ckpt.release("nope")


def test_bad_options_are_listed_together(tmp_path, mlp):
    torch.save(mlp.state_dict(), tmp_path / "a.pt")
    with pytest.raises(UsageError) as e:
        weightsmith.convert(tmp_path / "a.pt", tmp_path / "missing" / "b.pt", dtype="int8", max_shard_size="5GB",
                            format="torch")
    text = str(e.value)
    assert "dtype" in text and "sharded folder" in text and "does not exist" in text


def test_progress_reaches_the_total(tmp_path, mlp):
    torch.save(mlp.state_dict(), tmp_path / "a.pt")
    for dst in ("b.safetensors", "c.pt"):
        calls = []
        report = weightsmith.convert(tmp_path / "a.pt", tmp_path / dst, progress=lambda d, t, k: calls.append((d, t)))
        assert calls[-1] == (report.nbytes, report.nbytes)


def test_verify_reads_a_header_whose_length_starts_with_0x80(tmp_path, mlp):
    """A safetensors header length whose low byte is 0x80 looks like a pickle to content sniffing;
    the temporary output (no .safetensors suffix) must still be read back as safetensors."""
    state = {k: v.contiguous() for k, v in mlp.state_dict().items()}
    for pad in range(0, 256, 8):
        src = tmp_path / f"src{pad}.safetensors"
        save_file(state, str(src), metadata={"pad": "x" * pad})
        weightsmith.convert(src, tmp_path / "probe.safetensors")
        if (tmp_path / "probe.safetensors").read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no padding gave a header length ending in 0x80")
    report = weightsmith.convert(src, tmp_path / "checked.safetensors", verify=True)
    assert report.verified
    assert (tmp_path / "checked.safetensors").read_bytes()[0] == 0x80


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_convert_to_a_dcp_folder(tmp_path, tied_mlp):
    import torch.distributed.checkpoint as dcp

    weightsmith.save(tied_mlp, tmp_path / "a.safetensors", metadata={"note": "n"})
    report = weightsmith.convert(tmp_path / "a.safetensors", tmp_path / "ckpt", format="dcp", dtype="bfloat16")
    assert report.format == "dcp" and (tmp_path / "ckpt" / ".metadata").is_file()
    assert report.notes == ["DCP folders carry no string metadata; not kept: note"]
    target = {k: torch.empty_like(v, dtype=torch.bfloat16) for k, v in tied_mlp.state_dict().items()}
    dcp.load(target, checkpoint_id=tmp_path / "ckpt", no_dist=True)
    for k, v in tied_mlp.state_dict().items():
        assert torch.equal(target[k], v.to(torch.bfloat16)), k
    with pytest.raises(UsageError, match="verify is not available for DCP"):
        weightsmith.convert(tmp_path / "a.safetensors", tmp_path / "ckpt2", format="dcp", verify=True)


def test_convert_renames_keys_from_python_as_the_cli_does(tmp_path):
    ws = weightsmith
    src = tmp_path / "ddp.safetensors"
    ws.save({"module.encoder.layer.0.w": torch.ones(2), "module.encoder.layer.1.w": torch.zeros(2),
             "module.head.w": torch.full((1,), 3.0)}, src)
    out = tmp_path / "plain.safetensors"
    ws.convert(src, out, strip_prefix="module.", rename={"encoder.layer.{i}": "blocks.{i}"})
    got = ws.open(out).load()
    assert sorted(got) == ["blocks.0.w", "blocks.1.w", "head.w"]
    assert torch.equal(got["blocks.0.w"], torch.ones(2)) and torch.equal(got["head.w"], torch.full((1,), 3.0))
    with pytest.raises(ws.UsageError, match="'missing.' matched no key"):
        ws.convert(src, tmp_path / "x.safetensors", strip_prefix=["module.", "missing."])
    assert not (tmp_path / "x.safetensors").exists()
