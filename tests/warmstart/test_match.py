"""match_modules alone: module pairs from signatures and order, and what it refuses to guess."""

import torch
from torch import nn

import weightsmith as ws
from weightsmith.warmstart.match import match_modules


def specs(model: nn.Module) -> dict[str, tuple[tuple[int, ...], str]]:
    return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}


def block(names: tuple[str, ...]) -> nn.Module:
    m = nn.Module()
    for n in names:
        m.add_module(n, nn.Linear(4, 4))
    return m


def test_weight_and_bias_of_one_module_move_together():
    src = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8))
    dst = nn.Module()
    dst.inp, dst.out = nn.Linear(4, 8), nn.Linear(8, 8)
    found = match_modules(specs(src), specs(dst))
    assert {(p.source, p.target) for p in found.pairs} == {
        ("0.weight", "inp.weight"), ("0.bias", "inp.bias"), ("1.weight", "out.weight"), ("1.bias", "out.bias")}
    assert found.ambiguous == []


def test_same_shaped_siblings_pair_by_name_when_names_speak():
    src, dst = block(("query", "key", "value")), block(("q", "k", "v"))
    found = match_modules(specs(src), specs(dst))
    assert {(p.source_module, p.target_module) for p in found.pairs} == {("query", "q"), ("key", "k"), ("value", "v")}


def test_names_that_contradict_the_order_are_not_guessed():
    src, dst = block(("query", "key")), block(("k", "q"))  # the target declares them the other way round
    found = match_modules(specs(src), specs(dst))
    assert found.pairs == []
    assert all("not guessed" in a.reason for a in found.ambiguous)


def test_a_sorted_source_pairs_only_what_needs_no_order():
    src, dst = block(("query", "key", "value")), block(("a", "b", "c"))
    found = match_modules(specs(src), specs(dst), source_ordered=False)
    assert found.pairs == []
    (amb,) = found.ambiguous
    assert "sorted by name" in amb.reason and "query" in amb.reason and "a" in amb.reason
    layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(12))
    blocks = nn.Module()
    blocks.blocks = nn.ModuleList(nn.ModuleDict({"fc": nn.Linear(4, 4)}) for _ in range(12))
    found = match_modules(specs(layers), specs(blocks), source_ordered=False)  # indices decide
    assert {(p.source_module, p.target_module) for p in found.pairs} == {(str(i), f"blocks.{i}.fc") for i in range(12)}


class Layer(nn.Module):
    def __init__(self, first: str, second: str) -> None:
        super().__init__()
        self.add_module(first, nn.LayerNorm(4))
        self.attn = nn.Linear(4, 12)
        self.mlp = nn.Linear(4, 16)
        self.add_module(second, nn.LayerNorm(4))


def test_a_module_never_goes_into_the_block_its_neighbour_went_to():
    # source: attn, mlp, then both norms; target: a norm first. Aligned blindly, layer 0's second
    # norm would meet block 1's first norm.
    src = nn.ModuleDict({"layers": nn.ModuleList(nn.ModuleDict({"attn": nn.Linear(4, 12), "mlp": nn.Linear(4, 16),
                                                                "ln_a": nn.LayerNorm(4), "ln_b": nn.LayerNorm(4)})
                                                 for _ in range(3))})
    dst = nn.ModuleDict({"blocks": nn.ModuleList(Layer("n1", "n2") for _ in range(3))})
    found = match_modules(specs(src), specs(dst))
    for p in found.pairs:
        assert p.source.split(".")[1] == p.target.split(".")[1], (p.source, p.target)  # same layer index
    assert {p.target_module for p in found.pairs} >= {f"blocks.{i}.{n}" for i in range(3) for n in ("attn", "mlp")}


def test_conv1d_weights_are_transposed_and_say_so():
    src = {"h.0.c_fc.weight": ((4, 16), "float32"), "h.0.c_fc.bias": ((16,), "float32"),
           "h.0.c_proj.weight": ((16, 4), "float32"), "h.0.c_proj.bias": ((4,), "float32")}
    dst = {"b.0.fc.weight": ((16, 4), "float32"), "b.0.fc.bias": ((16,), "float32"),
           "b.0.proj.weight": ((4, 16), "float32"), "b.0.proj.bias": ((4,), "float32")}
    found = match_modules(src, dst, linear={"b.0.fc", "b.0.proj"})
    assert found.layout == "conv1d"
    got = {p.target: (p.source, str(p.transform) if p.transform else None) for p in found.pairs}
    assert got == {"b.0.fc.weight": ("h.0.c_fc.weight", "transpose"), "b.0.fc.bias": ("h.0.c_fc.bias", None),
                   "b.0.proj.weight": ("h.0.c_proj.weight", "transpose"), "b.0.proj.bias": ("h.0.c_proj.bias", None)}
    assert all("Conv1D" in p.reason for p in found.pairs if p.transform)


def test_structural_pairs_load_the_right_values(tmp_path):
    torch.manual_seed(0)
    src = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    dst = nn.Module()
    dst.stem, dst.norm, dst.head = nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2)
    report = ws.load_(dst, src.state_dict(), match="auto")
    assert torch.equal(dst.stem.weight, src[0].weight) and torch.equal(dst.head.bias, src[2].bias)
    assert report.provenance["norm.weight"] == "1.weight"


def test_module_order_is_trusted_from_torch_files_and_weightsmith_files_not_sorted_ones(tmp_path):
    from safetensors.torch import save_file

    from weightsmith.warmstart.plan import as_source

    torch.manual_seed(0)
    model = block(("query", "key", "value"))
    ws.save(model, tmp_path / "ws.safetensors")
    torch.save(model.state_dict(), tmp_path / "m.pt")
    save_file(model.state_dict(), str(tmp_path / "hf.safetensors"))
    ws.save(ws.open(tmp_path / "hf.safetensors"), tmp_path / "resaved.safetensors")  # sorted, though ours
    assert as_source(tmp_path / "ws.safetensors").ordered and as_source(tmp_path / "m.pt").ordered
    assert not as_source(tmp_path / "hf.safetensors").ordered
    assert not as_source(tmp_path / "resaved.safetensors").ordered
    dst = block(("a", "b", "c"))
    ordered = ws.plan(dst, tmp_path / "ws.safetensors", match="auto")
    assert {s.target: s.sources for s in ordered.steps}["b.weight"] == ("key.weight",)
    unordered = ws.plan(dst, tmp_path / "hf.safetensors", match="auto")
    assert not unordered.loaded and "sorted by name" in unordered.ambiguous[0]
