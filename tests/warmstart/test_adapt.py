"""Shape adapters, unit by unit and through `load_(..., on_mismatch="adapt")` with real models and files."""

import pytest
import torch
from torch import nn

import weightsmith as ws
from weightsmith import PlanError
from weightsmith.warmstart.adapt import find_adapter


class Net(nn.Module):
    """A tiny backbone + head whose head width is a parameter."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.head = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).relu())


def saved(tmp_path, model: nn.Module, name: str = "src.safetensors"):
    path = tmp_path / name
    ws.save(model, path)
    return path


# -- classifier heads ---------------------------------------------------------------------------
def test_a_head_with_more_classes_keeps_the_old_rows_and_its_own_init_for_the_new(tmp_path):
    torch.manual_seed(0)
    src = Net(3)
    dst = Net(5)
    new_rows = dst.head.weight[3:].detach().clone()
    new_bias = dst.head.bias[3:].detach().clone()

    report = ws.load_(dst, saved(tmp_path, src), on_mismatch="adapt")

    assert torch.equal(dst.head.weight[:3], src.head.weight)
    assert torch.equal(dst.head.bias[:3], src.head.bias)
    assert torch.equal(dst.head.weight[3:], new_rows)
    assert torch.equal(dst.head.bias[3:], new_bias)
    assert torch.equal(dst.body.weight, src.body.weight)
    assert "adapt:rows" in report.provenance["head.weight"]
    x = torch.randn(6, 4)
    assert torch.allclose(dst(x)[:, :3], src(x), atol=1e-6)  # the old classes predict as before


def test_a_head_with_fewer_classes_keeps_the_first_rows(tmp_path):
    torch.manual_seed(0)
    src, dst = Net(5), Net(2)
    ws.load_(dst, saved(tmp_path, src), on_mismatch="adapt")
    assert torch.equal(dst.head.weight, src.head.weight[:2])
    assert torch.equal(dst.head.bias, src.head.bias[:2])


def test_the_default_policy_refuses_and_names_the_key_and_both_shapes(tmp_path):
    torch.manual_seed(0)
    dst = Net(5)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(PlanError) as info:
        ws.load_(dst, saved(tmp_path, Net(3)))
    text = str(info.value)
    assert "head.weight" in text and "[3, 8]" in text and "[5, 8]" in text
    assert "head.bias" in text and "[3]" in text and "[5]" in text
    assert any("head.weight" in p for p in info.value.problems)
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())


def test_a_per_key_policy_adapts_only_what_it_selects(tmp_path):
    torch.manual_seed(0)
    src = Net(3)
    path = saved(tmp_path, src)
    dst = Net(5)
    ws.load_(dst, path, on_mismatch=[("head.weight", "adapt"), ("head.bias", "skip")], strict=False)
    assert torch.equal(dst.head.weight[:3], src.head.weight)
    p = ws.plan(Net(5), path, on_mismatch=[("head.weight", "adapt")])  # head.bias falls back to "error"
    assert len(p.problems) == 1 and "head.bias" in p.problems[0]


def test_a_mismatch_no_adapter_fits_is_a_problem(tmp_path):
    src = nn.Sequential(nn.Linear(8, 8))
    dst = nn.Sequential(nn.Linear(9, 8))  # input width differs: no adapter for a Linear's columns
    p = ws.plan(dst, saved(tmp_path, src), on_mismatch="adapt")
    assert len(p.problems) == 1
    assert "0.weight" in p.problems[0] and "no shape adapter" in p.problems[0]


# -- first convolution ----------------------------------------------------------------------------
@pytest.mark.parametrize("channels, how", [(1, "sum"), (6, "repeat")])
def test_a_first_conv_with_other_input_channels_sees_a_grey_image_as_before(tmp_path, channels, how):
    torch.manual_seed(0)
    src = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    dst = nn.Sequential(nn.Conv2d(channels, 8, 3), nn.ReLU())

    report = ws.load_(dst, saved(tmp_path, src), on_mismatch="adapt")

    assert f"input channels 3->{channels} ({how})" in report.provenance["0.weight"]
    assert torch.equal(dst[0].bias, src[0].bias)
    grey = torch.randn(2, 1, 6, 6)
    # the same picture in every channel gives the same response
    assert torch.allclose(dst(grey.expand(-1, channels, -1, -1)), src(grey.expand(-1, 3, -1, -1)), atol=1e-5)


def test_a_first_conv_with_four_channels_repeats_cyclically_and_rescales(tmp_path):
    torch.manual_seed(0)
    src = nn.Sequential(nn.Conv2d(3, 8, 3))
    dst = nn.Sequential(nn.Conv2d(4, 8, 3))
    ws.load_(dst, saved(tmp_path, src), on_mismatch="adapt")
    w = src[0].weight
    assert torch.allclose(dst[0].weight[:, :3], w * 0.75)
    assert torch.allclose(dst[0].weight[:, 3], w[:, 0] * 0.75)


# -- position embeddings ----------------------------------------------------------------------------
class Positions(nn.Module):
    def __init__(self, length: int) -> None:
        super().__init__()
        self.position_embeddings = nn.Embedding(length, 4)


def test_1d_position_embeddings_are_interpolated_linearly(tmp_path):
    src = Positions(16)
    with torch.no_grad():  # rows that are linear in the position stay linear
        src.position_embeddings.weight.copy_(torch.linspace(0, 15, 16)[:, None] * torch.tensor([1.0, -2.0, 0.5, 3.0]))
    dst = Positions(31)
    report = ws.load_(dst, saved(tmp_path, src), on_mismatch="adapt")
    assert "adapt:pos_1d" in report.provenance["position_embeddings.weight"]
    expect = torch.linspace(0, 15, 31)[:, None] * torch.tensor([1.0, -2.0, 0.5, 3.0])
    assert torch.allclose(dst.position_embeddings.weight, expect, atol=1e-5)


class ViTPositions(nn.Module):
    def __init__(self, grid: int) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, 4))


def test_a_2d_position_grid_with_a_class_token_is_resized(tmp_path):
    src = ViTPositions(14)
    g = torch.linspace(0, 1, 14)
    yy, xx = torch.meshgrid(g, g, indexing="ij")
    grid = torch.stack([torch.sin(2 * xx + yy), torch.cos(xx - 2 * yy), xx * yy, xx + yy], -1)
    with torch.no_grad():
        src.pos_embed[0, 0] = 7.0
        src.pos_embed[0, 1:] = grid.reshape(196, 4)
    dst = ViTPositions(16)

    report = ws.load_(dst, saved(tmp_path, src), on_mismatch="adapt")

    assert "14x14->16x16 (+1 class token)" in report.provenance["pos_embed"]
    assert torch.equal(dst.pos_embed[0, 0], torch.full((4,), 7.0))  # the class token is kept as is
    out = dst.pos_embed[0, 1:].reshape(16, 16, 4)
    for (i, j) in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:  # corners land on corners (not transposed)
        assert torch.allclose(out[i, j], grid[i, j], atol=0.03), (i, j)
    assert (out[0, -1] - out[-1, 0]).abs().max() > 0.1


# -- vocabulary embeddings ------------------------------------------------------------------------
class Vocab(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(n, 8)


def test_a_grown_vocabulary_keeps_old_rows_and_new_rows_are_their_mean(tmp_path):
    torch.manual_seed(0)
    src, dst = Vocab(100), Vocab(104)
    report = ws.load_(dst, saved(tmp_path, src), on_mismatch="adapt")
    w = dst.word_embeddings.weight
    assert torch.equal(w[:100], src.word_embeddings.weight)
    mean = src.word_embeddings.weight.mean(0)
    for row in w[100:]:
        assert torch.allclose(row, mean, atol=1e-6)
    assert "new rows = mean" in report.provenance["word_embeddings.weight"]


def test_a_shrunk_vocabulary_keeps_the_first_rows(tmp_path):
    torch.manual_seed(0)
    src, dst = Vocab(100), Vocab(90)
    ws.load_(dst, saved(tmp_path, src), on_mismatch="adapt")
    assert torch.equal(dst.word_embeddings.weight, src.word_embeddings.weight[:90])


# -- find_adapter alone -----------------------------------------------------------------------------
def test_find_adapter_names_what_it_would_do():
    assert find_adapter("head.weight", (3, 8), (3, 8)) is None
    assert find_adapter("head.weight", (3, 8), (3, 8, 1)) is None
    assert find_adapter("head.weight", (3, 8), (5, 8)).name == "rows"
    assert find_adapter("embed_tokens.weight", (10, 8), (12, 8)).name == "vocab"
    assert find_adapter("stem.conv.weight", (8, 3, 3, 3), (8, 1, 3, 3)).name == "in_channels"
    assert find_adapter("pos_embed", (1, 197, 4), (1, 257, 4)).name == "pos_grid"
    assert find_adapter("pos_embed", (1, 197, 4), (1, 197, 8)) is None  # width changes are not adaptable
    assert find_adapter("pos_embed", (50, 4), (70, 4)).name == "pos_1d"
    assert find_adapter("embeddings.position_embeddings.weight", (65, 4), (257, 4)).name == "pos_1d"  # a table
    assert find_adapter("patch_embed.proj.weight", (8, 3, 16, 16), (8, 3, 14, 14)).name == "patch_embed"


# -- timm parity: the published formulas, written here with torch ------------------------------------
def timm_resample_abs_pos_embed(posemb, new_size, num_prefix_tokens=1):
    """timm.layers.resample_abs_pos_embed with its defaults (bicubic, antialias=True)."""
    import math
    import torch.nn.functional as F

    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    old = int(math.sqrt(grid.shape[1]))
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new_size, mode="bicubic", antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, posemb.shape[-1])
    return torch.cat([prefix, grid], dim=1)


def timm_resample_patch_embed(patch_embed, new_size):
    """timm.layers.resample_patch_embed (FlexiViT): pinv of the resize matrix, basis vector by basis vector."""
    import torch.nn.functional as F

    old_size = patch_embed.shape[-2:]
    mat = []
    for i in range(old_size[0] * old_size[1]):
        basis = torch.zeros(old_size[0] * old_size[1])
        basis[i] = 1.0
        up = F.interpolate(basis.reshape(1, 1, *old_size), size=new_size, mode="bicubic", antialias=True)
        mat.append(up.reshape(-1))
    resize_mat = torch.stack(mat).T.double()
    pinv = torch.linalg.pinv(resize_mat.T)
    out = torch.empty(*patch_embed.shape[:2], *new_size, dtype=torch.float64)
    for o in range(patch_embed.shape[0]):
        for c in range(patch_embed.shape[1]):
            out[o, c] = (pinv @ patch_embed[o, c].reshape(-1).double()).reshape(new_size)
    return out.float()


@pytest.mark.parametrize("old,new,prefix", [(16, 12, 1), (14, 16, 1), (14, 12, 5), (8, 6, 0)])
def test_the_position_grid_matches_timms_resampling_prefix_tokens_kept(tmp_path, old, new, prefix):
    torch.manual_seed(0)
    src = nn.Module()
    src.pos_embed = nn.Parameter(torch.randn(1, prefix + old * old, 6))
    dst = nn.Module()
    dst.pos_embed = nn.Parameter(torch.zeros(1, prefix + new * new, 6))

    report = ws.load_(dst, saved(tmp_path, src), on_mismatch="adapt")

    expect = timm_resample_abs_pos_embed(src.pos_embed.detach(), (new, new), num_prefix_tokens=prefix)
    assert torch.allclose(dst.pos_embed, expect, atol=1e-6)
    assert torch.equal(dst.pos_embed[0, :prefix], src.pos_embed[0, :prefix])
    assert "antialias" in report.provenance["pos_embed"]


def test_downsampling_the_grid_is_antialiased_as_in_timm():
    import torch.nn.functional as F

    from weightsmith.warmstart.adapt import resample_abs_pos_embed

    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 256, 4)
    ours = resample_abs_pos_embed(pos, (8, 8))
    plain = F.interpolate(pos[:, 1:].reshape(1, 16, 16, 4).permute(0, 3, 1, 2), size=(8, 8), mode="bicubic",
                          align_corners=False).permute(0, 2, 3, 1).reshape(1, 64, 4)
    assert (ours[:, 1:] - plain).abs().max() > 0.05  # without antialias the answer differs


class Patches(nn.Module):
    def __init__(self, patch: int) -> None:
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, 8, patch, stride=patch)


@pytest.mark.parametrize("old,new", [(16, 8), (8, 12), (4, 6)])
def test_a_patch_embedding_is_resized_by_timms_pseudo_inverse(tmp_path, old, new):
    torch.manual_seed(0)
    src = Patches(old)
    dst = Patches(new)

    report = ws.load_(dst, saved(tmp_path, src), on_mismatch="adapt")

    expect = timm_resample_patch_embed(src.patch_embed.proj.weight.detach(), (new, new))
    assert torch.allclose(dst.patch_embed.proj.weight, expect, atol=1e-5)
    assert torch.equal(dst.patch_embed.proj.bias, src.patch_embed.proj.bias)
    assert "adapt:patch_embed" in report.provenance["patch_embed.proj.weight"]


def test_an_upsampled_patch_sees_a_resized_image_as_the_old_kernel_saw_the_original():
    import torch.nn.functional as F

    from weightsmith.warmstart.adapt import resample_patch_embed

    torch.manual_seed(0)
    kernel = torch.randn(2, 3, 4, 4)
    new = resample_patch_embed(kernel, (7, 7))
    x = torch.randn(5, 3, 4, 4)
    x_big = F.interpolate(x, size=(7, 7), mode="bicubic", antialias=True, align_corners=False)
    assert torch.allclose(F.conv2d(x, kernel), F.conv2d(x_big, new), atol=1e-4)
