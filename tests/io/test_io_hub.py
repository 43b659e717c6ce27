"""Hub sources (hf://ORG/NAME[@REV][/PATH]) resolved by huggingface_hub from a real cache layout, offline."""

import hashlib
import os
import sys

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import weightsmith as ws
from weightsmith.cli import cli
from weightsmith.io.hub import HubRef, parse, pick

hub_constants = pytest.importorskip("huggingface_hub.constants")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache in tmp_path, offline; ``cache.add(repo, files, ...)`` fills it."""
    root = tmp_path / "hf-cache"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(root))  # read once, when the package is imported
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)

    class Cache:
        path = root

        def add(self, repo, files, *, commit=COMMIT, refs=("main",)):
            """Lay out ``files`` (repo path -> bytes or a local file) as the cache does: blobs + links."""
            folder = root / ("models--" + repo.replace("/", "--"))
            (folder / "blobs").mkdir(parents=True, exist_ok=True)
            for name, data in files.items():
                data = data if isinstance(data, bytes) else data.read_bytes()
                blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
                blob.write_bytes(data)
                link = folder / "snapshots" / commit / name
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(os.path.relpath(blob, link.parent))
            (folder / "refs").mkdir(exist_ok=True)
            for ref in refs:
                (folder / "refs" / ref).write_text(commit)
            return folder / "snapshots" / commit

    return Cache()


def _state(seed):
    g = torch.Generator().manual_seed(seed)
    return {"0.weight": torch.randn(4, 3, generator=g), "0.bias": torch.randn(4, generator=g),
            "2.weight": torch.randn(2, 4, generator=g), "2.bias": torch.randn(2, generator=g)}


def _files(tmp_path, state, name, **save):
    """The files ws.save writes for ``state`` (a file, or a sharded folder's files), by repo name."""
    out = tmp_path / name
    ws.save(state, out, **save)
    return {p.name: p for p in out.iterdir()} if out.is_dir() else {out.name: out}


def test_open_reads_the_cached_safetensors_and_leaves_a_torch_copy(cache, tmp_path):
    state = _state(0)
    other = {k: v + 1 for k, v in state.items()}
    torch.save(other, tmp_path / "pytorch_model.bin")
    cache.add("org/model", {**_files(tmp_path, state, "model.safetensors"),
                            "pytorch_model.bin": tmp_path / "pytorch_model.bin", "config.json": b"{}"})
    ckpt = ws.open("hf://org/model")
    assert ckpt.format == "safetensors" and ckpt.path.name == "model.safetensors"
    for k, v in state.items():
        assert torch.equal(ckpt.tensor(k), v)


def test_open_a_sharded_subfolder_at_a_revision(cache, tmp_path):
    """Shards are links into the cache's blobs: the index's shards are followed there."""
    state = _state(1)
    files = _files(tmp_path, state, "shards", max_shard_size=64)
    assert len(files) > 2
    cache.add("org/pipe", {f"text_encoder/{n}": p for n, p in files.items()} | {"model_index.json": b"{}"},
              refs=("v1",))
    ckpt = ws.open("hf://org/pipe@v1/text_encoder")
    assert ckpt.format == "sharded" and set(ckpt) == set(state)
    assert all(torch.equal(ckpt.tensor(k), v) for k, v in state.items())
    assert ws.open(f"hf://org/pipe@{COMMIT}/text_encoder").format == "sharded"  # a commit, without refs


def test_merge_plan_load_and_cli_take_hub_sources(cache, tmp_path):
    a, b = _state(2), _state(3)
    cache.add("org/a", _files(tmp_path, a, "model.safetensors"))
    (tmp_path / "b").mkdir()
    cache.add("org/b", _files(tmp_path / "b", b, "model.safetensors"))
    out = tmp_path / "soup.safetensors"
    report = ws.merge(["hf://org/a", "hf://org/b"], out)
    assert report.tensors == 4
    got = ws.open(out).load()
    for k in a:
        torch.testing.assert_close(got[k], (a[k] + b[k]) / 2)
    plan = ws.merge_plan(["hf://org/a", "hf://org/b"], method="linear")
    assert plan.sources[:2] == ["hf://org/a", "hf://org/b"] and not plan.problems
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    assert ws.plan(model, "hf://org/a").coverage == 1.0
    ws.load_(model, "hf://org/a")
    assert torch.equal(model[0].weight, a["0.weight"])
    r = CliRunner().invoke(cli, ["merge", "hf://org/a", "hf://org/b", "-o", str(tmp_path / "cli.safetensors")])
    assert r.exit_code == 0, r.output
    assert torch.equal(ws.open(tmp_path / "cli.safetensors").tensor("2.bias"), got["2.bias"])
    r = CliRunner().invoke(cli, ["inspect", "hf://org/b"])
    assert r.exit_code == 0 and "0.weight" in r.output, r.output


def test_a_missing_repository_names_it_and_the_fix(cache):
    with pytest.raises(ws.CheckpointNotFoundError, match=r"hf://org/nothing-here: the repository org/nothing-here "
                                                          r"is not in the local Hugging Face cache .*HF_HUB_OFFLINE"):
        ws.open("hf://org/nothing-here")
    r = CliRunner().invoke(cli, ["merge", "hf://org/nothing-here", "hf://org/nothing-here", "-o", "x.safetensors"])
    assert r.exit_code != 0 and "org/nothing-here" in r.output


def test_a_missing_subfolder_lists_what_the_repository_holds(cache, tmp_path):
    cache.add("org/pipe", {f"unet/{n}": p for n, p in _files(tmp_path, _state(4), "model.safetensors").items()})
    with pytest.raises(ws.CheckpointNotFoundError, match="no such file or folder in the repository; its folders: unet"):
        ws.open("hf://org/pipe/vae")
    with pytest.raises(ws.CheckpointNotFoundError, match=r"no weight files .*its subfolders: unet"):
        ws.open("hf://org/pipe")


def test_without_huggingface_hub_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ws.UsageError, match="needs the huggingface_hub package: pip install huggingface_hub"):
        ws.open("hf://org/model")


@pytest.mark.parametrize("text, ref", [
    ("hf://org/name", HubRef("org/name")),
    ("hf://org/name@v1.0", HubRef("org/name", "v1.0")),
    ("hf://org/name@refs/pr/3/unet", HubRef("org/name", "refs/pr/3", "unet")),
    ("hf://org/name/text_encoder/model.safetensors", HubRef("org/name", None, "text_encoder/model.safetensors")),
])
def test_parse(text, ref):
    assert parse(text) == ref and str(ref) == text


@pytest.mark.parametrize("text", ["hf://name", "hf://org/", "hf://org/name@", "hf://org/name//x"])
def test_parse_refuses_malformed_sources(text):
    with pytest.raises(ws.UsageError, match="write hf://ORG/NAME"):
        parse(text)


def test_pick_prefers_safetensors_and_never_fetches_torch_files_beside_them():
    both = ["config.json", "pytorch_model.bin", "pytorch_model.bin.index.json", "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors", "model.safetensors.index.json", "sub/model.safetensors"]
    assert pick(both, HubRef("o/n")) == "model.safetensors.index.json"
    assert pick(["pytorch_model.bin", "config.json"], HubRef("o/n")) == "pytorch_model.bin"
    assert pick(both, HubRef("o/n", path="sub")) == "sub/model.safetensors"
    assert pick(["weights/a.safetensors"], HubRef("o/n", path="weights")) == "weights/a.safetensors"
    with pytest.raises(ws.UnknownFormatError, match="several safetensors checkpoints"):
        pick(["a.safetensors", "b.safetensors"], HubRef("o/n"))
    assert pick(["a.safetensors", "b.safetensors"], HubRef("o/n", path="b.safetensors")) == "b.safetensors"


def test_a_snapshot_folder_given_as_a_local_path_opens_but_links_elsewhere_are_refused(cache, tmp_path):
    state = _state(5)
    snapshot = cache.add("org/sharded", _files(tmp_path, state, "shards", max_shard_size=64))
    assert set(ws.open(snapshot)) == set(state)  # links into the repository's blobs are the cache's layout
    shard = sorted(snapshot.glob("model-*.safetensors"))[0]
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(shard.read_bytes())
    shard.unlink()
    shard.symlink_to(outside)
    with pytest.raises(ws.CorruptCheckpointError, match="outside"):
        ws.open(snapshot)


def test_online_only_the_chosen_weight_files_are_requested(monkeypatch, tmp_path):
    """With the Hub reachable: the listing decides, and only the index and its shards are fetched."""
    import json

    import huggingface_hub

    state = _state(6)
    files = _files(tmp_path, state, "shards", max_shard_size=64)
    listing = ["README.md", "config.json", "pytorch_model.bin", *files]
    asked = []

    def snapshot_download(repo_id, *, revision=None, allow_patterns=None, **_):
        asked.append((repo_id, revision, sorted(allow_patterns)))
        folder = tmp_path / "snap"
        folder.mkdir(exist_ok=True)
        for name in allow_patterns:
            if not (folder / name).exists():
                (folder / name).write_bytes(files[name].read_bytes())
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, revision=None: listing)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    ckpt = ws.open("hf://org/online@v2")
    shards = sorted(set(json.loads(files["model.safetensors.index.json"].read_text())["weight_map"].values()))
    assert asked == [("org/online", "v2", ["model.safetensors.index.json"]),
                     ("org/online", "v2", sorted(["model.safetensors.index.json", *shards]))]
    assert ckpt.format == "sharded" and set(ckpt) == set(state)


def test_merge_lora_takes_a_base_and_an_adapter_from_the_hub(cache, tmp_path):
    peft = pytest.importorskip("peft")
    import copy

    torch.manual_seed(7)
    base = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                                                      target_modules=["0", "2"]))
    model.save_pretrained(tmp_path / "ad")
    want = model.merge_and_unload().state_dict()
    cache.add("org/base", _files(tmp_path, base.state_dict(), "model.safetensors"))
    cache.add("org/lora", {f"run1/{p.name}": p for p in (tmp_path / "ad").iterdir()} | {"README.md": b"#"})
    ws.merge_lora("hf://org/base", "hf://org/lora/run1", tmp_path / "m.safetensors")
    got = ws.open(tmp_path / "m.safetensors").load()
    for k in want:
        assert float((got[k] - want[k]).abs().max()) <= 1e-6, k
    with pytest.raises(ws.CheckpointNotFoundError, match="no adapter_config.json there"):
        ws.merge_lora("hf://org/base", "hf://org/lora", tmp_path / "n.safetensors")
