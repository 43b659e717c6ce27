"""merge_lora against peft's merge_and_unload(); extract_lora adapters that peft loads."""

import copy
import json

import pytest
import torch
from torch import nn

import weightsmith as ws

peft = pytest.importorskip("peft")
Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D


class Net(nn.Module):
    """An embedding, a Linear, a transformers Conv1D (stored in × out) and a head."""

    def __init__(self, square=False):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.q = nn.Linear(8, 8 if square else 6)
        self.c_attn = Conv1D(12, 8 if square else 6)
        self.out = nn.Linear(12, 3)

    def forward(self, ids):
        return self.out(self.c_attn(self.q(self.embed(ids))))


def _adapter(tmp_path, base, name, **config):
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **config))
    model.save_pretrained(tmp_path / name)
    return model.merge_and_unload().state_dict()


@pytest.mark.parametrize("rslora", [False, True])
def test_merge_lora_equals_peft_merge_and_unload(tmp_path, rslora):
    torch.manual_seed(0)
    base = Net()
    ws.save(base.state_dict(), tmp_path / "base.safetensors")
    want = _adapter(tmp_path, base, "ad", r=4, lora_alpha=8, use_rslora=rslora,
                    target_modules=["q", "c_attn", "embed"])
    report = ws.merge_lora(tmp_path / "base.safetensors", tmp_path / "ad", tmp_path / "m.safetensors")
    got = ws.open(tmp_path / "m.safetensors").load()
    assert set(report.modules) == {"q.weight", "c_attn.weight", "embed.weight"}
    assert set(got) == set(want)
    for k in want:
        assert float((got[k] - want[k]).abs().max()) <= 1e-6, k
    assert not torch.equal(got["q.weight"], base.q.weight)


def test_merge_lora_with_rank_and_alpha_patterns(tmp_path):
    torch.manual_seed(6)
    base = Net()
    ws.save(base.state_dict(), tmp_path / "base.safetensors")
    want = _adapter(tmp_path, base, "ad", r=4, lora_alpha=8, target_modules=["q", "out"],
                    rank_pattern={"q": 2}, alpha_pattern={"out": 3})
    report = ws.merge_lora(tmp_path / "base.safetensors", tmp_path / "ad", tmp_path / "m.safetensors")
    assert report.modules["q.weight"] == {"rank": 2, "scale": 4.0}
    assert report.modules["out.weight"] == {"rank": 4, "scale": 0.75}
    got = ws.open(tmp_path / "m.safetensors").load()
    for k in want:
        assert float((got[k] - want[k]).abs().max()) <= 1e-6, k


def test_merge_lora_with_prefixed_base_keys_and_a_scale(tmp_path):
    torch.manual_seed(1)
    base = Net()
    want = _adapter(tmp_path, base, "ad", r=2, lora_alpha=4, target_modules=["q"])
    ws.save({f"model.{k}": v for k, v in base.state_dict().items()}, tmp_path / "base.safetensors")
    ws.merge_lora(tmp_path / "base.safetensors", tmp_path / "ad", tmp_path / "m.safetensors", scale=0.5)
    got = ws.open(tmp_path / "m.safetensors").load()
    half = base.q.weight + 0.5 * (want["q.weight"] - base.q.weight)
    torch.testing.assert_close(got["model.q.weight"], half, rtol=0, atol=1e-6)


def test_square_conv1d_layout_from_a_live_model(tmp_path):
    torch.manual_seed(2)
    base = Net(square=True)
    want = _adapter(tmp_path, base, "ad", r=3, lora_alpha=6, target_modules=["q", "c_attn"])
    target = Net(square=True)
    target.load_state_dict(base.state_dict())
    ws.merge_lora(base, tmp_path / "ad", target)  # the base as a model: layer types say the layout
    for k, v in target.state_dict().items():
        assert float((v - want[k]).abs().max()) <= 1e-6, k


def test_adapter_that_does_not_fit_is_refused_before_writing(tmp_path):
    torch.manual_seed(3)
    _adapter(tmp_path, Net(), "ad", r=2, lora_alpha=2, target_modules=["q"])
    other = {"q.weight": torch.zeros(5, 8), "q.bias": torch.zeros(5)}
    out = tmp_path / "m.safetensors"
    with pytest.raises(ws.PlanError, match="q: B @ A is"):
        ws.merge_lora(other, tmp_path / "ad", out)
    assert not out.exists()


def test_extract_lora_loads_in_peft_and_reproduces_the_fine_tune(tmp_path):
    torch.manual_seed(4)
    base = Net()
    tuned = copy.deepcopy(base)
    with torch.no_grad():  # a rank-2 update of each Linear / Conv1D weight
        for mod in (tuned.q, tuned.c_attn, tuned.out):
            w = mod.weight
            w += torch.randn(w.shape[0], 2) @ torch.randn(2, w.shape[1]) * 0.1
    # the base as a model: its layer types say c_attn (a Conv1D) is stored in × out
    report = ws.extract_lora(base, tuned.state_dict(), tmp_path / "ad", rank=4)
    assert report.error < 1e-5
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and sorted(config["target_modules"]) == ["c_attn", "out", "q"]
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ad")
    ids = torch.arange(20).view(4, 5)
    torch.testing.assert_close(loaded(ids), tuned(ids), rtol=1e-4, atol=1e-5)


def test_extract_lora_error_is_what_the_rank_leaves_out(tmp_path):
    torch.manual_seed(5)
    base = {"lin.weight": torch.randn(16, 10)}
    delta = torch.randn(16, 10)
    tuned = {"lin.weight": base["lin.weight"] + delta}
    report = ws.extract_lora(base, tuned, tmp_path / "ad", rank=3)
    s = torch.linalg.svdvals(delta)
    assert report.error == pytest.approx(float(s[3:].norm() / s.norm()), rel=1e-4)
    merged = tmp_path / "m.safetensors"
    ws.merge_lora(base, tmp_path / "ad", merged)  # round trip: the best rank-3 approximation
    err = (ws.open(merged).tensor("lin.weight") - tuned["lin.weight"]).norm()
    assert float(err) == pytest.approx(float(s[3:].norm()), rel=1e-3)


# -- DoRA and conv layers ------------------------------------------------------------------------
class ConvNet(nn.Module):
    """A Conv2d, a Conv1d and a Linear head: LoRA on conv layers (peft's lora.Conv2d / Conv1d)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.seq = nn.Conv1d(6, 4, 3)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        y = self.seq(self.conv(x).flatten(2))          # (B, 4, L)
        return self.head(self.norm(y.mean(-1)))


def _dora_adapter(tmp_path, base, name, **config):
    """A DoRA adapter with random A, B and magnitudes (at init the magnitude is ‖W + sBA‖, a no-op)."""
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, use_dora=True,
                                                                        **config))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_magnitude_vector" in pname:
                p.mul_(torch.rand_like(p) + 0.5)
    model.save_pretrained(tmp_path / name)
    return model.merge_and_unload().state_dict()


def _close(got, want):
    for k in want:
        assert float((got[k] - want[k]).abs().max()) <= 1e-6, k


@pytest.mark.parametrize("rslora", [False, True])
def test_dora_merge_equals_peft_merge_and_unload(tmp_path, rslora):
    torch.manual_seed(10)
    base = Net()
    ws.save(base.state_dict(), tmp_path / "base.safetensors")
    want = _dora_adapter(tmp_path, base, "ad", r=3, lora_alpha=6, use_rslora=rslora,
                         target_modules=["q", "c_attn", "embed", "out"])
    report = ws.merge_lora(tmp_path / "base.safetensors", tmp_path / "ad", tmp_path / "m.safetensors")
    assert all(m.get("dora") for m in report.modules.values()) and len(report.modules) == 4
    got = ws.open(tmp_path / "m.safetensors").load()
    assert set(got) == set(want)
    _close(got, want)


def test_dora_merge_of_conv_layers_equals_peft(tmp_path):
    torch.manual_seed(11)
    base = ConvNet()
    ws.save(base.state_dict(), tmp_path / "base.safetensors")
    want = _dora_adapter(tmp_path, base, "ad", r=2, lora_alpha=5, target_modules=["conv", "seq", "head"])
    report = ws.merge_lora(tmp_path / "base.safetensors", tmp_path / "ad", tmp_path / "m.safetensors")
    assert set(report.modules) == {"conv.weight", "seq.weight", "head.weight"}
    _close(ws.open(tmp_path / "m.safetensors").load(), want)


def test_plain_lora_merge_of_conv_layers_equals_peft(tmp_path):
    torch.manual_seed(12)
    base = ConvNet()
    want = _adapter(tmp_path, base, "ad", r=2, lora_alpha=3, target_modules=["conv", "seq"])
    target = ConvNet()
    target.load_state_dict(base.state_dict())
    ws.merge_lora(base.state_dict(), tmp_path / "ad", target)
    _close(target.state_dict(), want)
    assert not torch.equal(target.conv.weight, base.conv.weight)


def _as_plain_lora(src, dst):
    """The same adapter with its DoRA magnitudes dropped and use_dora off."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    config = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}))
    tensors = load_file(src / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if "magnitude" not in k}, dst / "adapter_model.safetensors")


def test_dora_adapter_merged_as_plain_lora_differs(tmp_path):
    """The control: without the magnitudes the result is not peft's, so the DoRA test can fail."""
    torch.manual_seed(13)
    base = Net()
    want = _dora_adapter(tmp_path, base, "ad", r=3, lora_alpha=6, target_modules=["q", "out"])
    _as_plain_lora(tmp_path / "ad", tmp_path / "plain")
    ws.merge_lora(base.state_dict(), tmp_path / "plain", tmp_path / "p.safetensors")
    got = ws.open(tmp_path / "p.safetensors").load()
    assert float((got["q.weight"] - want["q.weight"]).abs().max()) > 1e-2
    assert float((got["out.weight"] - want["out.weight"]).abs().max()) > 1e-2


def test_dora_scale_is_a_fraction_of_the_whole_change(tmp_path):
    torch.manual_seed(14)
    base = Net()
    want = _dora_adapter(tmp_path, base, "ad", r=2, lora_alpha=2, target_modules=["q"])
    ws.merge_lora(base.state_dict(), tmp_path / "ad", tmp_path / "m.safetensors", scale=0.25)
    got = ws.open(tmp_path / "m.safetensors").tensor("q.weight")
    torch.testing.assert_close(got, base.q.weight + 0.25 * (want["q.weight"] - base.q.weight), rtol=0, atol=1e-6)


def test_magnitudes_without_use_dora_are_refused(tmp_path):
    torch.manual_seed(15)
    base = Net()
    _dora_adapter(tmp_path, base, "ad", r=2, lora_alpha=2, target_modules=["q"])
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}))
    out = tmp_path / "m.safetensors"
    with pytest.raises(ws.PlanError, match="q: the adapter holds a DoRA magnitude vector"):
        ws.merge_lora(base.state_dict(), tmp_path / "ad", out)
    assert not out.exists()


def _low_rank_(weight, rank, scale=0.1):
    """Add a rank-``rank`` update to a (conv) weight, seen as out × (in · kernel)."""
    flat = torch.randn(weight.shape[0], rank) @ torch.randn(rank, weight[0].numel())
    weight += scale * flat.reshape(weight.shape)


def test_extract_lora_of_conv_layers_loads_in_peft(tmp_path):
    torch.manual_seed(20)
    base = ConvNet()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for mod in (tuned.conv, tuned.seq, tuned.head):
            _low_rank_(mod.weight, 2)
    report = ws.extract_lora(base, tuned.state_dict(), tmp_path / "ad", rank=2)
    assert report.error < 1e-5 and report.skipped == {}
    assert set(report.modules) == {"conv", "seq", "head"}
    got = ws.open(tmp_path / "ad" / "adapter_model.safetensors")
    assert got["base_model.model.conv.lora_A.weight"].shape == (2, 3, 3, 3)   # the layer's kernel
    assert got["base_model.model.conv.lora_B.weight"].shape == (6, 2, 1, 1)   # a 1×1 conv
    assert got["base_model.model.seq.lora_A.weight"].shape == (2, 6, 3)
    assert got["base_model.model.seq.lora_B.weight"].shape == (4, 2, 1)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ad")
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(loaded(x), tuned(x), rtol=1e-4, atol=1e-5)


def test_extract_lora_of_conv_layers_keeps_the_best_rank_r_part(tmp_path):
    """Below the difference's rank, peft's merged weight is the truncated SVD: the error the rank leaves."""
    torch.manual_seed(21)
    base = ConvNet()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for mod in (tuned.conv, tuned.seq):
            _low_rank_(mod.weight, 3)
    report = ws.extract_lora(base.state_dict(), tuned.state_dict(), tmp_path / "ad", rank=1)
    merged = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ad").merge_and_unload()
    worst = 0.0
    for name in ("conv", "seq"):
        delta = (getattr(tuned, name).weight - getattr(base, name).weight).detach()
        u, s, vh = torch.linalg.svd(delta.reshape(delta.shape[0], -1))
        best = (s[0] * u[:, :1] @ vh[:1]).reshape(delta.shape)  # Eckart–Young, computed here
        got = getattr(merged, name).weight.detach() - getattr(base, name).weight.detach()
        torch.testing.assert_close(got, best, rtol=1e-4, atol=1e-6)
        worst = max(worst, float(s[1:].norm() / s.norm()))
    assert 0.1 < report.error == pytest.approx(worst, rel=1e-4)


def test_extract_lora_of_a_full_rank_conv_difference_is_near_exact(tmp_path):
    torch.manual_seed(22)
    base = ConvNet()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for mod in (tuned.conv, tuned.seq, tuned.head):
            mod.weight += 0.1 * torch.randn_like(mod.weight)
    ws.save(base.state_dict(), tmp_path / "base.safetensors")  # from files: the shapes say conv
    ws.save(tuned.state_dict(), tmp_path / "tuned.safetensors")
    report = ws.extract_lora(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "ad", rank=6)
    assert report.modules == {"conv": {"rank": 6, "scale": 1.0}, "seq": {"rank": 4, "scale": 1.0},
                              "head": {"rank": 2, "scale": 1.0}}
    assert report.error < 1e-5
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ad")
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(loaded(x), tuned(x), rtol=1e-4, atol=1e-5)
    ws.merge_lora(tmp_path / "base.safetensors", tmp_path / "ad", tmp_path / "m.safetensors")  # round trip
    for k, v in ws.open(tmp_path / "m.safetensors").load().items():
        torch.testing.assert_close(v, tuned.state_dict()[k], rtol=0, atol=1e-5)


class Mixed(nn.Module):
    """Layers whose differences LoRA cannot hold, beside one conv it can."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.conv = nn.Conv2d(6, 6, 3, padding=1)
        self.grouped = nn.Conv2d(6, 6, 3, padding=1, groups=2)
        self.dilated = nn.Conv2d(6, 6, 3, padding=2, dilation=2)
        self.bn = nn.BatchNorm2d(6)


def test_extract_lora_lists_what_it_cannot_express_with_the_reason(tmp_path):
    torch.manual_seed(23)
    base = Mixed()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for p in tuned.parameters():
            p += 0.1 * torch.randn_like(p)
    tuned.bn.running_mean += 1
    tuned.bn.num_batches_tracked += 3
    report = ws.extract_lora(base, tuned.state_dict(), tmp_path / "ad", rank=2)
    assert set(report.modules) == {"conv"}
    why = report.skipped
    assert set(why) == {"embed.weight", "grouped.weight", "grouped.bias", "dilated.weight", "dilated.bias",
                        "conv.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.num_batches_tracked"}
    assert "pass embeddings=" in why["embed.weight"]
    assert "grouped convolution (groups=2)" in why["grouped.weight"]
    assert "dilated convolution" in why["dilated.weight"]
    assert why["bn.weight"].startswith("a 1-D tensor") and why["conv.bias"].startswith("a 1-D tensor")
    assert "int64 tensor" in why["bn.num_batches_tracked"]
    assert "skipped embed.weight: an embedding" in str(report)
    assert report.to_dict()["skipped"] == why
    # from files the layer types are unknown: the shapes decide, and the same 1-D tensors are listed
    from_files = ws.extract_lora(base.state_dict(), tuned.state_dict(), tmp_path / "ad2", rank=2)
    assert "bn.weight" in from_files.skipped and "embed.weight" in from_files.skipped
    assert "grouped" in from_files.modules  # a file does not say a conv is grouped


def test_extract_lora_with_nothing_expressible_says_why(tmp_path):
    base = {"norm.weight": torch.ones(4)}
    with pytest.raises(ws.UsageError, match=r"nothing to extract\n  norm.weight: a 1-D tensor"):
        ws.extract_lora(base, {"norm.weight": torch.full((4,), 2.0)}, tmp_path / "ad", rank=2)
    assert not (tmp_path / "ad").exists()
