"""build: construct on meta, put the checkpoint's tensors in place (mapped from the file), initialize the rest."""

import pytest
import torch
from torch import nn

import weightsmith as ws
from weightsmith import ModelError, PlanError, empty_init
from weightsmith.examples import model_a, model_b, tied_mlp

X = torch.randn(5, 4, generator=torch.Generator().manual_seed(7))


@pytest.fixture
def src_a() -> nn.Module:
    torch.manual_seed(0)
    return model_a().eval()


def no_meta(model: nn.Module) -> None:
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        assert not t.is_meta, name
        assert t.device.type == "cpu", name


class WithBuffers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.norm = nn.BatchNorm1d(4)
        self.register_buffer("position_ids", torch.arange(6), persistent=False)


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_build_gives_real_tensors_equal_to_the_source(tmp_path, src_a, fmt):
    path = tmp_path / f"a.{fmt}"
    if fmt == "pt":
        torch.save(src_a.state_dict(), path)
    else:
        ws.save(src_a, path)

    model, report = ws.build(model_a, path)

    no_meta(model)
    for k, v in src_a.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert torch.equal(model.eval()(X), src_a(X))
    assert report.loaded == 8 and report.coverage == 1.0


def test_buffers_are_loaded_and_non_persistent_buffers_stay_real(tmp_path):
    torch.manual_seed(0)
    src = WithBuffers()
    src.norm.running_mean.fill_(0.25)
    src.norm.num_batches_tracked.fill_(4)
    path = tmp_path / "b.safetensors"
    ws.save(src, path)

    model, _ = ws.build(WithBuffers, path)

    no_meta(model)
    assert torch.equal(model.position_ids, torch.arange(6))  # in no checkpoint: the constructor's value
    assert torch.equal(model.norm.running_mean, torch.full((4,), 0.25))
    assert model.norm.num_batches_tracked.item() == 4
    assert torch.equal(model.lin.weight, src.lin.weight)


def test_a_missing_head_is_initialized_by_its_reset_parameters(tmp_path, src_a):
    path = tmp_path / "a.safetensors"
    ws.save(src_a, path)

    model, report = ws.build(model_b, path, strict=False, match="auto")

    no_meta(model)
    w = model.classifier.weight
    assert torch.isfinite(w).all() and w.abs().sum() > 0
    bound = 1 / 8 ** 0.5  # nn.Linear's default init for 8 inputs
    assert w.abs().max() <= bound + 1e-6 and w.std() > bound / 10
    assert torch.isfinite(model.classifier.bias).all() and model.classifier.bias.abs().sum() > 0
    assert report.provenance["classifier.weight"] == "reset_parameters"
    assert torch.equal(model.backbone_conv.weight, src_a.conv1.weight)  # paired structurally
    assert torch.equal(model.fc.weight, src_a.fc.weight)


def test_init_rules_fill_what_is_missing(tmp_path, src_a):
    path = tmp_path / "a.safetensors"
    ws.save(src_a, path)

    model, report = ws.build(model_b, path, strict=False,
                             init=[("classifier.weight", "zeros"), ("classifier.bias", "ones")])

    assert torch.equal(model.classifier.weight, torch.zeros(5, 8))
    assert torch.equal(model.classifier.bias, torch.ones(5))
    assert report.provenance["classifier.weight"] == "init: zeros"


def test_an_adapted_head_keeps_the_old_rows_and_initializes_the_new(tmp_path, src_a):
    path = tmp_path / "a.safetensors"
    ws.save(src_a, path)

    model, _ = ws.build(model_b, path, rename=[("head", "classifier")], on_mismatch="adapt", match="auto")

    no_meta(model)
    assert torch.equal(model.classifier.weight[:3], src_a.head.weight)
    new = model.classifier.weight[3:]
    assert torch.isfinite(new).all() and new.abs().sum() > 0


class Scale(nn.Module):
    """A parameter whose module has no reset_parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.gain = nn.Parameter(torch.ones(4))


def test_a_parameter_without_reset_parameters_is_zeroed_and_the_report_says_so(tmp_path):
    torch.manual_seed(0)
    src = nn.ModuleDict({"lin": nn.Linear(4, 4)})
    path = tmp_path / "lin.safetensors"
    ws.save(src, path)

    model, report = ws.build(Scale, path)

    assert torch.equal(model.gain, torch.zeros(4))
    assert "zeros" in report.provenance["gain"] and "reset_parameters" in report.provenance["gain"]


def test_a_tied_model_stays_tied(tmp_path):
    torch.manual_seed(0)
    src = tied_mlp()
    for name, save in [("t.safetensors", ws.save), ("t.pt", lambda m, p: torch.save(m.state_dict(), p))]:
        save(src, tmp_path / name)
        model, report = ws.build(tied_mlp, tmp_path / name)
        assert model[2].weight is model[4].weight and model[2].bias is model[4].bias
        assert len(list(model.parameters())) == 6
        assert torch.equal(model[2].weight, src[2].weight)
        assert torch.equal(model(X), src(X))
        assert report.provenance["4.weight"].startswith("tied to 2.weight")


def test_a_parameter_shared_by_two_modules_is_built_shared(tied_lm, tied_lm_file):
    src, path = tied_lm_file

    model, report = ws.build(tied_lm, path)

    assert model.head.weight is model.embed.weight
    assert not model.embed.weight.is_meta
    assert torch.equal(model.embed.weight, src.embed.weight)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(model(ids), src(ids))
    assert report.provenance["head.weight"] == "tied to embed.weight"


def _mapped_range(ckpt):
    base = torch.frombuffer(ckpt.reader._map, dtype=torch.uint8)
    return base.data_ptr(), base.data_ptr() + base.numel()


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_loaded_tensors_are_the_file_mapping_not_a_copy(tmp_path, src_a, fmt):
    path = tmp_path / f"a.{fmt}"
    if fmt == "pt":
        torch.save(src_a.state_dict(), path)
    else:
        ws.save(src_a, path)
    ckpt = ws.open(path)

    model, _ = ws.build(model_a, ckpt)

    lo, hi = _mapped_range(ckpt)
    for name, p in model.named_parameters():
        assert lo <= p.untyped_storage().data_ptr() < hi, f"{name} was copied"


def test_a_mapped_model_trains_without_touching_the_file(tmp_path, src_a):
    path = tmp_path / "a.safetensors"
    ws.save(src_a, path)
    on_disk = path.read_bytes()
    model, _ = ws.build(model_a, path)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)

    model(X).pow(2).sum().backward()
    opt.step()

    assert not torch.equal(model.head.weight, src_a.head.weight)
    assert path.read_bytes() == on_disk  # copy-on-write mapping
    model2, _ = ws.build(model_a, path)
    assert torch.equal(model2.head.weight, src_a.head.weight)


def test_a_cast_checkpoint_gives_real_float32_parameters(tmp_path, src_a):
    path = tmp_path / "half.safetensors"
    ws.save({k: v.half() for k, v in src_a.state_dict().items()}, path)

    model, report = ws.build(model_a, path)

    assert model.conv1.weight.dtype == torch.float32
    assert torch.equal(model.conv1.weight, src_a.conv1.weight.half().float())
    assert report.provenance["conv1.weight"].endswith("cast float16->float32")


def test_a_refused_build_raises_the_plan_error(tmp_path, src_a):
    path = tmp_path / "a.safetensors"
    ws.save(src_a, path)
    with pytest.raises(PlanError, match="unexpected: source head.weight"):
        ws.build(model_b, path)  # strict: the old head is unexplained
    with pytest.raises(ModelError, match="not an nn.Module"):
        ws.build(lambda: {"not": "a model"}, path)


# -- empty_init -------------------------------------------------------------------------------------
INIT_NAMES = ("uniform_", "normal_", "kaiming_uniform_", "zeros_", "trunc_normal_", "xavier_uniform_")


def test_empty_init_puts_parameters_on_meta_and_skips_init():
    originals = {n: getattr(nn.init, n) for n in INIT_NAMES}
    register = nn.Module.register_parameter
    with empty_init():
        lin = nn.Linear(4, 4)
        bn = nn.BatchNorm1d(4)
        t = torch.ones(3)
        assert nn.init.normal_(t, 5.0) is t and torch.equal(t, torch.ones(3))  # a no-op inside
    assert lin.weight.is_meta and lin.bias.is_meta
    assert not bn.running_mean.is_meta  # buffers stay real
    assert all(getattr(nn.init, n) is f for n, f in originals.items())
    assert nn.Module.register_parameter is register
    assert not nn.Linear(2, 2).weight.is_meta


def test_empty_init_is_undone_when_the_factory_raises(tmp_path, src_a):
    path = tmp_path / "a.safetensors"
    ws.save(src_a, path)
    originals = {n: getattr(nn.init, n) for n in INIT_NAMES}
    register = nn.Module.register_parameter

    def factory():
        model_a()
        raise ValueError("bad config")

    with pytest.raises(ValueError, match="bad config"):
        ws.build(factory, path)

    assert all(getattr(nn.init, n) is f for n, f in originals.items())
    assert nn.Module.register_parameter is register
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    assert not lin.weight.is_meta and lin.weight.abs().sum() > 0
