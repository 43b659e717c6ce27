"""`verify`: a changed byte is found by its checksum, even where the format itself still reads."""

from __future__ import annotations

import json
import struct
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from torch import nn

import weightsmith
from weightsmith.trust import VerifyReport, verify


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _data_offset(path: Path, key: str, within: int = 0) -> int:
    """File offset of byte ``within`` of tensor ``key`` in a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    return 8 + n + header[key]["data_offsets"][0] + within


def test_a_flipped_data_byte_is_reported_by_key_while_the_file_still_opens(tmp_path: Path,
                                                                          mlp: nn.Sequential) -> None:
    path = tmp_path / "mlp.safetensors"
    weightsmith.save(mlp, path)
    clean = verify(path)
    assert clean.ok and clean.method == "weightsmith.crc32" and clean.checked == 4

    _flip(path, _data_offset(path, "2.weight", within=5))

    with weightsmith.open(path) as ckpt:  # the format has no checksum of its own: this still reads
        changed = ckpt.load()["2.weight"]
        assert not torch.equal(changed, mlp[2].weight.detach())
    report = verify(path)
    assert not report.ok
    assert list(report.mismatched) == ["2.weight"]
    assert report.checked == 4
    assert f"{zlib.crc32(changed.numpy().tobytes()) & 0xFFFFFFFF:08x}" in report.mismatched["2.weight"]
    assert report.to_dict()["ok"] is False and report.to_dict()["schema"] == "weightsmith.verify/1"
    assert "1 of 4 checksums differ" in str(report)


def test_tied_keys_are_checked_once_and_not_listed_as_unchecked(tmp_path: Path, tied_mlp: nn.Sequential) -> None:
    path = tmp_path / "tied.safetensors"
    weightsmith.save(tied_mlp, path)
    report = verify(path)
    assert report.ok and report.unchecked == []
    assert report.checked == 6  # 0.*, 1.* (= 3.*), 4.*


def test_a_file_saved_without_checksums_says_so(tmp_path: Path, mlp: nn.Sequential) -> None:
    path = tmp_path / "plain.safetensors"
    weightsmith.save(mlp, path, checksums=False)
    _flip(path, _data_offset(path, "0.bias"))
    report = verify(path)
    assert report.ok and not report.has_checksums and report.method == "none"
    assert sorted(report.unchecked) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert "no checksums recorded" in str(report)


def test_a_flipped_byte_in_a_shard_is_reported_by_key(tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = {f"block{i}.weight": torch.randn(64, 64) for i in range(4)}
    folder = tmp_path / "sharded"
    weightsmith.save(state, folder, max_shard_size="20KB")
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) >= 2
    assert verify(folder).ok and verify(folder).checked == 4

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    victim = index["weight_map"]["block2.weight"]
    _flip(folder / victim, _data_offset(folder / victim, "block2.weight", within=100))

    report = verify(folder)
    assert list(report.mismatched) == ["block2.weight"]


def test_a_flipped_byte_in_a_torch_zip_member_is_a_crc_mismatch(tmp_path: Path, mlp: nn.Sequential) -> None:
    path = tmp_path / "mlp.pt"
    torch.save(mlp.state_dict(), path)
    assert verify(path).ok and verify(path).method == "zip crc32"

    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith("/data/0"))
        names = [i.filename for i in zf.infolist()]
    with open(path, "rb") as f:  # the member's data starts after its local header
        f.seek(info.header_offset)
        head = f.read(30)
    start = info.header_offset + 30 + struct.unpack("<H", head[26:28])[0] + struct.unpack("<H", head[28:30])[0]
    _flip(path, start + 3)

    assert torch.load(path, weights_only=True)["0.weight"].shape == (8, 4)  # torch does not notice
    report = verify(path)
    assert list(report.mismatched) == [info.filename]
    assert "zip directory says" in report.mismatched[info.filename]
    assert "(tensors: 0.weight)" in report.mismatched[info.filename]
    assert report.checked == len(names)


def test_a_legacy_torch_file_records_no_checksums(tmp_path: Path, mlp: nn.Sequential) -> None:
    path = tmp_path / "legacy.pt"
    torch.save(mlp.state_dict(), path, _use_new_zipfile_serialization=False)
    report = verify(path)
    assert report.ok and not report.has_checksums and report.format == "torch-legacy"


def test_progress_counts_every_byte(tmp_path: Path, mlp: nn.Sequential) -> None:
    path = tmp_path / "mlp.safetensors"
    weightsmith.save(mlp, path)
    calls: list[tuple[int, int, str]] = []
    report = verify(path, progress=lambda done, total, key: calls.append((done, total, key)))
    nbytes = sum(p.numel() * 4 for p in mlp.parameters())
    assert isinstance(report, VerifyReport) and report.nbytes == nbytes
    assert calls[-1][:2] == (nbytes, nbytes)
    assert [d for d, _, _ in calls] == sorted(d for d, _, _ in calls)


@pytest.mark.parametrize("metadata", ["{not json", '{"0.weight": 7}'])
def test_damaged_checksum_metadata_is_a_finding_not_a_crash(tmp_path: Path, mlp: nn.Sequential,
                                                            metadata: str) -> None:
    path = tmp_path / "m.safetensors"
    weightsmith.save(mlp, path, checksums=False, metadata={"weightsmith.crc32": metadata})
    report = verify(path)
    assert not report.ok
    assert "damaged" in next(iter(report.mismatched.values()))


def test_checksum_metadata_nested_past_the_parser_depth_is_reported_damaged_not_a_crash():
    found = Path(__file__).parents[2] / "fuzz" / "found" / "deep-crc32-metadata.safetensors"
    report = weightsmith.verify(found)
    assert not report.ok
    assert "the checksum metadata itself is damaged" in report.to_json()
