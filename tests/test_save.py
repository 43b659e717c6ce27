"""`weightsmith.save`: formats, ties, checksums, metadata, reports, and refusals."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from torch import nn

import weightsmith as ws
from weightsmith.errors import SaveError
from weightsmith.io.safetensors import CHECKSUMS_KEY, TIES_KEY
from weightsmith.saving import SaveReport, parse_size


def test_module_to_safetensors(tmp_path: Path, mlp: nn.Module) -> None:
    path = tmp_path / "mlp.safetensors"
    report = ws.save(mlp, path)
    assert isinstance(report, SaveReport)
    assert (report.format, report.tensors, report.nbytes, report.ties) == ("safetensors", 4, 196, {})
    assert report.files == [str(path)]
    reference = safetensors.torch.load_file(path)
    for key, t in mlp.state_dict().items():
        assert torch.equal(reference[key], t), key


def test_format_follows_the_suffix(tmp_path: Path, mlp: nn.Module) -> None:
    for suffix in (".pt", ".pth", ".bin", ".ckpt"):
        path = tmp_path / f"m{suffix}"
        assert ws.save(mlp, path).format == "torch"
        loaded = torch.load(path, weights_only=True)
        assert torch.equal(loaded["2.weight"], mlp[2].weight), suffix
    assert ws.save(mlp, tmp_path / "m.weights").format == "safetensors"
    assert ws.open(tmp_path / "m.weights").format == "safetensors"
    assert ws.save(mlp, tmp_path / "forced.pt", format="safetensors").format == "safetensors"
    assert ws.open(tmp_path / "forced.pt").format == "safetensors"


def test_torch_format_keeps_ties(tmp_path: Path, tied_mlp: nn.Module) -> None:
    path = tmp_path / "tied.pt"
    report = ws.save(tied_mlp, path)
    assert report.ties == {"3.weight": "1.weight", "3.bias": "1.bias"}
    assert report.tensors == 8
    loaded = torch.load(path, weights_only=True)
    assert loaded["1.weight"].data_ptr() == loaded["3.weight"].data_ptr()
    assert sorted(ws.open(path).ties) == [("1.bias", "3.bias"), ("1.weight", "3.weight")]


def test_safetensors_ties_metadata(tmp_path: Path, tied_mlp: nn.Module) -> None:
    path = tmp_path / "tied.safetensors"
    report = ws.save(tied_mlp, path)
    assert report.tensors == 8 and report.nbytes == (32 + 8 + 64 + 8 + 8 + 1) * 4
    with safetensors.safe_open(path, "pt") as f:
        assert json.loads(f.metadata()[TIES_KEY]) == {"3.weight": "1.weight", "3.bias": "1.bias"}


def test_views_of_one_tensor_are_not_ties(tmp_path: Path) -> None:
    base = torch.arange(10.0)
    sd = {"a": base[:5], "b": base[5:], "c": base[:5].clone()}
    path = tmp_path / "views.safetensors"
    assert ws.save(sd, path).ties == {}
    loaded = ws.open(path).load()
    for key, t in sd.items():
        assert torch.equal(loaded[key], t), key


def test_checksums_are_crc32_of_each_tensor(tmp_path: Path, mlp: nn.Module) -> None:
    path = tmp_path / "m.safetensors"
    ws.save(mlp, path)
    with safetensors.safe_open(path, "pt") as f:
        crcs = json.loads(f.metadata()[CHECKSUMS_KEY])
    for key, t in mlp.state_dict().items():
        expected = zlib.crc32(t.detach().contiguous().view(torch.uint8).numpy().tobytes()) & 0xFFFFFFFF
        assert crcs[key] == f"{expected:08x}", key

    plain = tmp_path / "plain.safetensors"
    ws.save(mlp, plain, checksums=False)
    with safetensors.safe_open(plain, "pt") as f:
        assert CHECKSUMS_KEY not in (f.metadata() or {})


def test_metadata(tmp_path: Path, mlp: nn.Module) -> None:
    path = tmp_path / "m.safetensors"
    ws.save(mlp, path, metadata={"format": "pt", "epoch": 3})  # type: ignore[dict-item]
    assert ws.open(path).metadata["epoch"] == "3"
    assert ws.open(path).metadata["format"] == "pt"
    with pytest.raises(SaveError, match="torch files carry no string metadata"):
        ws.save(mlp, tmp_path / "m.pt", metadata={"a": "b"})
    assert not (tmp_path / "m.pt").exists()


def test_saving_an_open_checkpoint(tmp_path: Path, tied_mlp: nn.Module) -> None:
    src = tmp_path / "src.pt"
    torch.save(tied_mlp.state_dict(), src)
    dst = tmp_path / "dst.safetensors"
    report = ws.save(ws.open(src), dst)
    assert report.ties == {"3.weight": "1.weight", "3.bias": "1.bias"}
    loaded = ws.open(dst).load()
    assert loaded["1.weight"] is loaded["3.weight"]
    for key, t in tied_mlp.state_dict().items():
        assert torch.equal(loaded[key], t), key


def test_progress(tmp_path: Path, mlp: nn.Module) -> None:
    calls: list[tuple[int, int, str]] = []
    ws.save(mlp, tmp_path / "m.safetensors", progress=lambda d, t, k: calls.append((d, t, k)))
    assert [c[2] for c in calls] == list(mlp.state_dict())
    assert [c[0] for c in calls] == [128, 160, 192, 196]
    assert {c[1] for c in calls} == {196}

    sharded: list[tuple[int, int, str]] = []
    ws.save(mlp, tmp_path / "sh", max_shard_size=40, progress=lambda d, t, k: sharded.append((d, t, k)))
    assert [c[0] for c in sharded] == [128, 160, 192, 196]
    assert {c[1] for c in sharded} == {196}


def test_report_renders_and_serializes(tmp_path: Path, tied_mlp: nn.Module) -> None:
    report = ws.save(tied_mlp, tmp_path / "m.safetensors")
    data = json.loads(report.to_json())
    assert data["schema"] == "weightsmith.save/1"
    assert data["tensors"] == 8 and data["ties"] == {"3.weight": "1.weight", "3.bias": "1.bias"}
    assert "saved 8 tensors" in str(report) and "2 tied key(s)" in str(report)


@pytest.mark.parametrize(("text", "expected"), [
    (1000, 1000), ("1000", 1000), ("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("50KB", 50_000),
    ("2GiB", 2 * 2**30), ("1.5 MiB", 3 * 2**19), ("10 kb", 10_000),
])
def test_parse_size(text: int | str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", [0, -5, "five", "5XB", "", "GB"])
def test_parse_size_refuses(text: int | str) -> None:
    with pytest.raises(SaveError):
        parse_size(text)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_refusals(tmp_path: Path, mlp: nn.Module) -> None:
    with pytest.raises(SaveError, match="offending keys: b"):
        ws.save({"a": torch.ones(1), "b": [1, 2]}, tmp_path / "x.safetensors")
    with pytest.raises(SaveError, match="only string keys"):
        ws.save({1: torch.ones(1)}, tmp_path / "x.safetensors")
    with pytest.raises(SaveError, match="cannot save a list"):
        ws.save([torch.ones(1)], tmp_path / "x.safetensors")
    with pytest.raises(SaveError, match="unknown format 'onnx'"):
        ws.save(mlp, tmp_path / "x.onnx", format="onnx")
    with pytest.raises(SaveError, match="max_shard_size"):
        ws.save(mlp, tmp_path / "folder", format="sharded")
    with pytest.raises(SaveError, match="cannot store"):
        ws.save({"q": torch.ones(2, dtype=torch.complex32)}, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []  # nothing half-written anywhere


# -- a save into a model folder keeps what it did not write ------------------------------------------
def _hf_folder(folder: Path, *, max_shard_size: str | None = "20KB") -> None:
    """A real transformers ``save_pretrained`` folder with the files a model folder keeps beside it."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                        vocab_size=99, max_position_embeddings=16)
    options = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    BertModel(config).save_pretrained(folder, **options)
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "WordPiece"}}')
    (folder / "tokenizer_config.json").write_text('{"do_lower_case": true}')
    (folder / "README.md").write_text("# my model\n")
    (folder / "generation_config.json").write_text('{"max_length": 20}')
    (folder / "onnx").mkdir()
    (folder / "onnx" / "model.onnx").write_bytes(b"\x08\x07")
    (folder / "vocab.link").symlink_to("tokenizer.json")


def _others(folder: Path) -> dict[str, tuple[bytes, int, int]]:
    """Everything but the checkpoint's own files: bytes, mtime, inode (a symlink: its target)."""
    import re

    ours = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?").fullmatch
    out: dict[str, tuple[bytes, int, int]] = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if ours(rel) or p.is_dir():
            continue
        if p.is_symlink():
            out[rel] = (str(p.readlink()).encode(), 0, 0)
        else:
            out[rel] = (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_ino)
    return out


@pytest.mark.parametrize("shards_before", ["20KB", None])
def test_sharded_save_into_a_model_folder_keeps_its_other_files(tmp_path: Path, shards_before: str | None) -> None:
    from transformers import BertModel

    folder = tmp_path / "bert"
    _hf_folder(folder, max_shard_size=shards_before)
    kept = _others(folder)
    assert {"config.json", "tokenizer.json", "README.md", "generation_config.json", "onnx/model.onnx"} <= set(kept)
    state = {k: v * 2 for k, v in BertModel.from_pretrained(folder).state_dict().items()}

    report = ws.save(state, folder, max_shard_size="30KB")

    assert _others(folder) == kept  # bytes, times and inodes, symlink and subfolder included
    assert not (folder / "model.safetensors").exists()  # the old single file would shadow the index
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert sorted(p.name for p in folder.glob("model*.safetensors")) == shards
    assert len(report.files) == len(shards) + 1
    reloaded = BertModel.from_pretrained(folder).state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in state.items())


def test_convert_and_the_cli_force_into_a_model_folder_keep_its_other_files(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from weightsmith.cli import cli

    folder = tmp_path / "bert"
    _hf_folder(folder)
    kept = _others(folder)
    ws.convert(folder, folder, max_shard_size="50KB")  # reshard in place
    assert _others(folder) == kept
    ws.save(ws.open(folder).load(), tmp_path / "other.safetensors")
    result = CliRunner().invoke(cli, ["convert", str(tmp_path / "other.safetensors"), str(folder),
                                       "--max-shard-size", "40KB", "--force", "-q"])
    assert result.exit_code == 0, result.output
    assert _others(folder) == kept
    assert ws.diff(folder, tmp_path / "other.safetensors").equal


def test_a_failed_sharded_save_leaves_the_model_folder_as_it_was(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    import weightsmith.io.atomic as atomic

    folder = tmp_path / "bert"
    _hf_folder(folder)
    before = {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"", p.lstat().st_mtime_ns)
              for p in folder.rglob("*")}
    state = ws.open(folder).load()

    def eio(*_args: object) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(atomic, "_exchange", eio)  # the swap itself fails, after the staged folder is complete
    monkeypatch.setattr(atomic.os, "rename", eio)
    with pytest.raises(SaveError, match="intact"):
        ws.save({k: v + 1 for k, v in state.items()}, folder, max_shard_size="30KB")
    monkeypatch.undo()
    after = {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"", p.lstat().st_mtime_ns)
             for p in folder.rglob("*")}
    assert after == before
    assert [p.name for p in tmp_path.iterdir()] == ["bert"]  # no staging folder left


def test_an_old_index_naming_foreign_files_does_not_get_them_deleted(tmp_path: Path, mlp: nn.Module) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    (folder / "config.json").write_text("{}")
    (folder / "notes.safetensors.txt").write_text("keep")
    index = {"weight_map": {"a": "../outside.safetensors", "b": "config.json", "c": "/etc/hostname"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    ws.save(mlp, folder, max_shard_size="1KB")
    assert (tmp_path / "outside.safetensors").read_bytes() == b"x"
    assert (folder / "config.json").read_text() == "{}" and (folder / "notes.safetensors.txt").exists()


def test_dcp_save_keeps_the_folders_other_files(tmp_path: Path, mlp: nn.Module) -> None:
    folder = tmp_path / "step-1"
    ws.save(mlp, folder, format="dcp")
    (folder / "train_state.json").write_text('{"step": 1}')
    stamp = (folder / "train_state.json").stat().st_mtime_ns
    ws.save({k: v + 1 for k, v in mlp.state_dict().items()}, folder, format="dcp")
    assert (folder / "train_state.json").read_text() == '{"step": 1}'
    assert (folder / "train_state.json").stat().st_mtime_ns == stamp
    assert torch.equal(ws.open(folder).load()["0.weight"], mlp[0].weight + 1)


def test_a_single_file_save_leaves_its_neighbours_untouched(tmp_path: Path, mlp: nn.Module) -> None:
    for name, data in [("config.json", b"{}"), ("model.safetensors.tmp", b"mine"), (".model.safetensors.x", b"y")]:
        (tmp_path / name).write_bytes(data)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
    ws.save(mlp, tmp_path / "model.safetensors")
    ws.save(mlp, tmp_path / "model.safetensors")
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns)
             for p in tmp_path.iterdir() if p.name != "model.safetensors"}
    assert after == before


# -- what every safetensors file carries --------------------------------------------------------------
def test_every_safetensors_file_says_format_pt(tmp_path: Path, tied_mlp: nn.Module) -> None:
    ws.save(tied_mlp, tmp_path / "one.safetensors", metadata={"note": "x"})
    ws.save(tied_mlp, tmp_path / "sharded", max_shard_size="300B", checksums=False)
    ws.convert(tmp_path / "one.safetensors", tmp_path / "two.safetensors")
    ws.convert(tmp_path / "one.safetensors", tmp_path / "resharded", max_shard_size="500B")
    files = [tmp_path / "one.safetensors", tmp_path / "two.safetensors",
             *(tmp_path / "sharded").glob("*.safetensors"), *(tmp_path / "resharded").glob("*.safetensors")]
    assert len(files) > 4
    for f in files:
        with safetensors.safe_open(f, "pt") as opened:
            assert opened.metadata()["format"] == "pt", f


def test_metadata_format_other_than_pt_is_refused(tmp_path: Path, mlp: nn.Module) -> None:
    with pytest.raises(SaveError, match="'format' is 'tf'"):
        ws.save(mlp, tmp_path / "m.safetensors", metadata={"format": "tf"})
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu", "uint16", "uint32", "uint64"])
def test_modern_dtypes_save_to_safetensors(tmp_path: Path, dtype: str) -> None:
    t = torch.arange(24, dtype=torch.uint8).reshape(4, 6)
    itemsize = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    value = torch.arange(24 * itemsize, dtype=torch.uint8).view(getattr(torch, dtype)).reshape(4, 6) if itemsize > 1 \
        else t.view(getattr(torch, dtype))
    ws.save({"w": value}, tmp_path / "m.safetensors")
    loaded = safetensors.torch.load_file(tmp_path / "m.safetensors")["w"]
    assert loaded.dtype == value.dtype and torch.equal(loaded.view(torch.uint8), value.view(torch.uint8))


def test_float4_saves_as_f4_with_two_values_per_byte(tmp_path: Path) -> None:
    packed = torch.arange(12, dtype=torch.uint8).reshape(4, 3).view(torch.float4_e2m1fn_x2)
    ws.save({"w": packed}, tmp_path / "m.safetensors")
    raw = (tmp_path / "m.safetensors").read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert header["w"]["dtype"] == "F4" and header["w"]["shape"] == [4, 6]
    loaded = safetensors.torch.load_file(tmp_path / "m.safetensors")["w"]
    assert loaded.dtype == torch.float4_e2m1fn_x2 and tuple(loaded.shape) == (4, 3)
    assert torch.equal(loaded.view(torch.uint8), packed.view(torch.uint8))
    with pytest.raises(SaveError, match="0-d"):
        ws.save({"w": packed[0, 0]}, tmp_path / "scalar.safetensors")


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_unstorable_dtypes_are_refused_at_once_naming_file_keys_and_dtypes(tmp_path: Path) -> None:
    state = {"ok": torch.zeros(2), "a": torch.zeros(2, dtype=torch.complex32), "b": torch.zeros(2, dtype=torch.uint1),
             "c": torch.zeros(2, dtype=torch.complex32)}
    for path, options in [(tmp_path / "m.safetensors", {}), (tmp_path / "sharded", {"max_shard_size": "1KB"})]:
        with pytest.raises(SaveError) as err:
            ws.save(state, path, **options)
        text = str(err.value)
        assert str(path) in text and "3 tensor(s)" in text
        assert "'a' has dtype torch.complex32" in text and "'b' has dtype torch.uint1" in text and "'c'" in text
        assert not path.exists()


def test_checksums_are_zlib_crc32_with_or_without_isal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from weightsmith.io.writers import safetensors as writer

    data = torch.arange(1000, dtype=torch.float32)
    expected = f"{zlib.crc32(data.numpy().tobytes()) & 0xFFFFFFFF:08x}"
    monkeypatch.setitem(sys.modules, "isal.isal_zlib", None)  # as where isal is not installed
    fallback = writer._crc32_function()
    monkeypatch.undo()
    assert fallback is zlib.crc32
    for crc in (fallback, writer._crc32_function()):
        monkeypatch.setattr(writer, "crc32", crc)
        ws.save({"x": data}, tmp_path / "m.safetensors")
        with safetensors.safe_open(tmp_path / "m.safetensors", "pt") as f:
            assert json.loads(f.metadata()[CHECKSUMS_KEY]) == {"x": expected}


def test_progress_follows_a_torch_save_too(tmp_path: Path, mlp: nn.Module) -> None:
    seen: list[tuple[int, int]] = []
    report = ws.save(mlp, tmp_path / "m.pt", progress=lambda done, total, _key: seen.append((done, total)))
    assert seen and seen[-1] == (report.nbytes, report.nbytes)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
