"""`weightsmith convert SRC DST`: writes, refuses to overwrite without --force, verifies; exit 2 on error."""

import importlib
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import weightsmith
from weightsmith.cli import cli

st_module = importlib.import_module("weightsmith.io.safetensors")


def run(*args):
    return CliRunner().invoke(cli, ["convert", *map(str, args)])


@pytest.fixture
def src(tmp_path, mlp):
    path = tmp_path / "model.pt"
    torch.save(mlp.state_dict(), path)
    return path


def test_converts_to_safetensors(src, tmp_path, mlp):
    result = run(src, tmp_path / "model.safetensors")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("converted 4 tensors")
    out = load_file(str(tmp_path / "model.safetensors"))
    for key, value in mlp.state_dict().items():
        assert torch.equal(out[key], value)


def test_refuses_to_overwrite_without_force(src, tmp_path):
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"keep me")
    refused = run(src, dst)
    assert refused.exit_code == 2 and "--force" in refused.output
    assert dst.read_bytes() == b"keep me"
    assert run(src, dst, "--force").exit_code == 0
    assert set(weightsmith.open(dst)) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_json_dtype_filter_and_shards(src, tmp_path):
    result = run(src, tmp_path / "sharded", "--dtype", "bfloat16", "--filter", "*.weight",
                 "--max-shard-size", "100B", "--json", "--verify")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["schema"] == "weightsmith.convert/1"
    assert (data["format"], data["tensors"], data["dtype"], data["verified"]) == ("sharded", 2, "bfloat16", True)
    opened = weightsmith.open(tmp_path / "sharded")
    assert sorted(opened) == ["0.weight", "2.weight"]
    assert {opened[k].dtype for k in opened} == {"bfloat16"}


def test_verify_failure_exits_2(src, tmp_path, monkeypatch):
    original = st_module.tensor_bytes

    def flipped(name, tensor):
        data = np.array(original(name, tensor), copy=True)
        data[-1] ^= 0x80
        return data

    monkeypatch.setattr(st_module, "tensor_bytes", flipped)
    result = run(src, tmp_path / "out.safetensors", "--verify")
    assert result.exit_code == 2 and "verification failed" in result.output
    assert not (tmp_path / "out.safetensors").exists()


def test_errors_exit_2(tmp_path, src):
    assert run(tmp_path / "nope.pt", tmp_path / "x.safetensors").exit_code == 2
    bad = run(src, tmp_path / "x.safetensors", "--filter", "decoder.*")
    assert bad.exit_code == 2 and "matched nothing" in bad.output
    assert run(src, tmp_path / "x.safetensors", "--dtype", "int8").exit_code == 2  # not a choice


@pytest.fixture
def wrapped(tmp_path, mlp):
    path = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in mlp.state_dict().items()}, path)
    return path


def test_strip_prefix_and_rename(wrapped, tmp_path, mlp):
    out = tmp_path / "clean.safetensors"
    result = run(wrapped, out, "--strip-prefix", "module.", "--rename", "2=head")
    assert result.exit_code == 0, result.output
    got = load_file(str(out))
    assert sorted(got) == ["0.bias", "0.weight", "head.bias", "head.weight"]
    assert torch.equal(got["head.weight"], mlp.state_dict()["2.weight"])


def test_rules_file_and_filter_on_new_names(wrapped, tmp_path):
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([{"source": "module.0", "target": "embed"}]))
    out = tmp_path / "picked.safetensors"
    result = run(wrapped, out, "--rules", rules, "--filter", "embed")
    assert result.exit_code == 0, result.output
    assert sorted(load_file(str(out))) == ["embed.bias", "embed.weight"]


def test_a_rename_that_matches_nothing_is_an_error(wrapped, tmp_path):
    out = tmp_path / "x.safetensors"
    result = run(wrapped, out, "--strip-prefix", "model.", "--rename", "9=head")
    assert result.exit_code == 2 and not out.exists()
    assert result.output == ("error: cannot rename: --strip-prefix 'model.' matched no key; "
                             "rule 9 -> head matched no key\n")
    clash = run(wrapped, out, "--rename", "module.0.weight=w", "--rename", "module.2.weight=w")
    assert clash.exit_code == 2 and "'module.0.weight', 'module.2.weight' all become 'w'" in clash.output


def test_root_on_a_safetensors_file_says_it_is_ignored(tmp_path, mlp):
    path = tmp_path / "flat.safetensors"
    weightsmith.save(mlp, path)
    result = CliRunner().invoke(cli, ["convert", str(path), str(tmp_path / "o.pt"), "--root", "ema"])
    assert result.exit_code == 0, result.output
    assert "note: --root 'ema' is ignored: a safetensors file holds one flat set of tensors" in result.stderr
    inspected = CliRunner().invoke(cli, ["inspect", str(path), "--root", "ema"])
    assert "note: --root 'ema' is ignored" in inspected.stderr
