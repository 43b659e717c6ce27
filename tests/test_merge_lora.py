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


def _close(got, want, base_keys=None):
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
