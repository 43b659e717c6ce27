"""Sources that share memory with the model they are written into: every read sees the old values.

``{"a": m.b, "b": m.a}`` is a swap; copying as we go would write ``a`` first and then read the new
``a`` back into ``b``. Views, slices and a second storage object over the same bytes count too.
"""

import numpy as np
import pytest
import torch
from torch import nn

import weightsmith as ws


class Two(nn.Module):
    """``a`` = 1s, ``b`` = 2s, and a 2-D ``w`` for views."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.full((3,), 1.0))
        self.b = nn.Parameter(torch.full((3,), 2.0))
        self.w = nn.Parameter(torch.arange(6.0).reshape(2, 3))


def _ids(model: nn.Module) -> dict[str, int]:
    return {k: id(p) for k, p in model.named_parameters(remove_duplicate=False)}


WRITERS = {
    "load_": lambda m, src: ws.load_(m, src, strict=False),
    "assign_": lambda m, src: ws.assign_(m, src),
    "restore_": lambda m, src: ws.restore_(m, src, strict=False),
}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_swapping_two_parameters_from_the_model_itself(writer):
    m = Two()
    ids = _ids(m)
    WRITERS[writer](m, {"a": m.b, "b": m.a})
    assert torch.equal(m.a.detach(), torch.full((3,), 2.0))
    assert torch.equal(m.b.detach(), torch.full((3,), 1.0))
    assert _ids(m) == ids  # the same Parameter objects


@pytest.mark.parametrize("writer", list(WRITERS))
def test_views_of_the_model_swap_and_rotate(writer):
    m = Two()
    old_w = m.w.detach().clone()
    # rows of w swapped through views, and a and b fed from slices of each other's memory
    WRITERS[writer](m, {"w": m.w.flip(0), "a": m.b[:], "b": m.a.view(3)})
    assert torch.equal(m.w.detach(), old_w.flip(0))
    assert torch.equal(m.a.detach(), torch.full((3,), 2.0))
    assert torch.equal(m.b.detach(), torch.full((3,), 1.0))


@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_source_over_the_same_bytes_through_another_storage_object(writer):
    # a and b live in one numpy buffer; the value for b is a third tensor over bytes of both
    buf = np.array([1, 1, 1, 2, 2, 2], dtype=np.float32)
    m = nn.Module()
    m.a = nn.Parameter(torch.from_numpy(buf[:3]))
    m.b = nn.Parameter(torch.from_numpy(buf[3:]))
    straddling = torch.from_numpy(buf[1:4])  # its own storage object: old a, a, b
    WRITERS[writer](m, {"a": torch.full((3,), 9.0), "b": straddling})
    assert m.a.tolist() == [9.0, 9.0, 9.0]
    assert m.b.tolist() == [1.0, 1.0, 2.0]  # what the straddling tensor held before any write


@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_source_that_is_its_own_target_stays_and_feeds_another(writer):
    m = Two()
    WRITERS[writer](m, {"a": m.a, "b": m.a})
    assert torch.equal(m.a.detach(), torch.full((3,), 1.0))
    assert torch.equal(m.b.detach(), torch.full((3,), 1.0))


@pytest.mark.parametrize("writer", list(WRITERS))
def test_tied_targets_fed_from_the_model_itself(writer):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    m.tail = m[0]  # 0.* and tail.* are one tensor each
    old0, old1 = m[0].weight.detach().clone(), m[1].weight.detach().clone()
    ids = _ids(m)
    WRITERS[writer](m, {"0.weight": m[1].weight, "tail.weight": m[1].weight, "1.weight": m[0].weight})
    assert torch.equal(m[0].weight.detach(), old1) and m.tail.weight is m[0].weight
    assert torch.equal(m[1].weight.detach(), old0)
    assert _ids(m) == ids


def test_a_rename_that_swaps_two_layers_of_the_model_into_itself():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    old = {k: v.detach().clone() for k, v in m.state_dict().items()}
    ws.load_(m, m, rename=[("0.weight", "1.weight"), ("1.weight", "0.weight"),
                           ("0.bias", "1.bias"), ("1.bias", "0.bias")])
    assert torch.equal(m[0].weight.detach(), old["1.weight"])
    assert torch.equal(m[1].weight.detach(), old["0.weight"])
    assert torch.equal(m[0].bias.detach(), old["1.bias"])


def test_transfer_swapping_a_state_dict_into_itself_reads_the_old_values():
    # transfer builds a new dict and writes nothing in place: guarded here all the same
    sd = {"a": torch.full((3,), 1.0), "b": torch.full((3,), 2.0)}
    out, _ = ws.transfer(sd, sd, rename=[("a", "b"), ("b", "a")])
    assert out["a"].tolist() == [2.0] * 3 and out["b"].tolist() == [1.0] * 3
    assert sd["a"].tolist() == [1.0] * 3 and sd["b"].tolist() == [2.0] * 3  # the inputs untouched


def test_build_from_a_live_model_shares_no_memory_with_it():
    torch.manual_seed(0)
    donor = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    built, _ = ws.build(lambda: nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), donor)
    with torch.no_grad():
        donor[0].weight.add_(1.0)  # training the donor afterwards ...
    assert not torch.equal(built[0].weight, donor[0].weight)  # ... leaves the built model alone
    donor_bytes = {p.untyped_storage().data_ptr() for p in donor.parameters()}
    assert not donor_bytes & {p.untyped_storage().data_ptr() for p in built.parameters()}


def test_build_gives_two_untied_targets_memory_of_their_own_when_the_source_ties_them(tmp_path):
    torch.manual_seed(0)
    shared = torch.randn(3, 3)
    source = {"0.weight": shared, "0.bias": torch.zeros(3), "1.weight": shared, "1.bias": torch.zeros(3)}
    expected = shared.clone()
    built, _ = ws.build(lambda: nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)), source)
    assert torch.equal(built[0].weight, expected) and torch.equal(built[1].weight, expected)
    with torch.no_grad():
        built[0].weight.zero_()  # one untied parameter changed: the other, and the source, keep theirs
    assert torch.equal(built[1].weight, expected) and torch.equal(shared, expected)



# -- two different targets over one memory (not a tie) ------------------------------------------------
def _one_memory_twice() -> nn.Module:
    m = nn.Module()
    m.a = nn.Parameter(torch.zeros(2, 3))
    m.b = nn.Parameter(m.a.data)  # another Parameter object over the same floats
    return m


@pytest.mark.parametrize("writer", list(WRITERS))
def test_two_targets_over_one_memory_given_different_values_are_refused(writer):
    m = _one_memory_twice()
    with pytest.raises(ws.WeightsmithError, match="'a' shares memory with 'b'.*not a tie"):
        WRITERS[writer](m, {"a": torch.ones(2, 3), "b": torch.full((2, 3), 2.0)})
    assert torch.equal(m.a.detach(), torch.zeros(2, 3))  # nothing written


@pytest.mark.parametrize("writer", list(WRITERS))
def test_targets_over_one_memory_that_agree_or_do_not_overlap_load(writer):
    m = _one_memory_twice()
    WRITERS[writer](m, {"a": torch.ones(2, 3), "b": torch.ones(2, 3)})
    assert torch.equal(m.b.detach(), torch.ones(2, 3))
    fused = torch.zeros(4, 6)  # q and k: column halves of one weight, apart element by element
    qk = nn.Module()
    qk.q, qk.k = nn.Parameter(fused[:, :3]), nn.Parameter(fused[:, 3:])
    WRITERS[writer](qk, {"q": torch.ones(4, 3), "k": torch.full((4, 3), 2.0)})
    assert torch.equal(fused, torch.cat([torch.ones(4, 3), torch.full((4, 3), 2.0)], 1))


def test_a_buffer_that_views_a_weight_transposed_loads_when_the_values_agree():
    m = nn.Module()
    m.w = nn.Parameter(torch.zeros(2, 3))
    m.register_buffer("wt", m.w.data.T)
    x = torch.arange(6.0).reshape(2, 3)
    ws.load_(m, {"w": x, "wt": x.T})
    assert torch.equal(m.w.detach(), x)
    with pytest.raises(ws.WeightsmithError, match="'w' shares memory with 'wt'"):
        ws.load_(m, {"w": x, "wt": x.T + 1})
    assert torch.equal(m.w.detach(), x)


def test_only_values_that_would_be_read_after_a_write_are_copied():
    from weightsmith.warmstart.execute import unaliased as _unaliased

    m = Two()
    state = m.state_dict(keep_vars=True)
    fresh = torch.zeros(2, 3)
    staged = {"a": m.a, "b": m.a, "w": fresh}
    _unaliased(staged, state, list(state))
    assert staged["a"] is m.a  # its own target exactly: writing it changes nothing, no copy
    assert staged["b"] is not m.a and torch.equal(staged["b"], m.a.detach())  # read after a is written
    assert staged["w"] is fresh  # memory of its own: no copy
