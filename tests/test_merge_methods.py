"""Every merge method against a straightforward implementation of its published formula."""

import math

import pytest
import torch

import weightsmith as ws
from weightsmith.merging.methods import Params, combine, dare_seed


def _models(n, shape=(6, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + torch.randn(shape, generator=g) for _ in range(n)]


def _merge(sources, method, **kw):
    """ws.merge of state dicts holding one tensor ``w``, read back."""
    out = {}
    state = [{"w": s} for s in sources]
    base = kw.pop("base", None)
    model = torch.nn.Module()
    model.register_buffer("w", torch.zeros(sources[0].shape))
    ws.merge(state, model, method=method, base={"w": base} if base is not None else None, **kw)
    out = model.w.clone()
    return out


# -- straightforward implementations -------------------------------------------------------------
def ref_trim(tau, density):
    flat = tau.flatten()
    k = max(1, int(density * flat.numel())) if density > 0 else 0
    order = torch.argsort(flat.abs(), descending=True, stable=True)  # equal magnitudes: index order
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[order[:k]] = True
    return (flat * keep).view_as(tau)


def ref_elect(base, taus, w, lam=1.0, normalize=True, consensus="sum"):
    weighted = torch.stack([t * wi for t, wi in zip(taus, w)])
    votes = weighted.sign().sum(0) if consensus == "count" else weighted.sum(0)
    elected = torch.where(votes >= 0, 1.0, -1.0)
    agree = weighted.sign() == elected
    merged = (weighted * agree).sum(0)
    if normalize:
        div = (torch.tensor(w).view(-1, *[1] * base.dim()) * agree).sum(0)
        div[div == 0] = 1
        merged = merged / div
    return base + lam * merged


def ref_dare_mask(key, i, seed, density, numel):
    g = torch.Generator().manual_seed(dare_seed(seed, key, i))
    return torch.rand(numel, generator=g) < density


def ref_slerp(a, b, t):
    fa, fb = a.flatten().double(), b.flatten().double()
    cos = float(fa @ fb / (fa.norm() * fb.norm()))
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    om = math.acos(cos)
    return (math.sin((1 - t) * om) / math.sin(om)) * a + (math.sin(t * om) / math.sin(om)) * b


# -- the methods --------------------------------------------------------------------------------
def test_linear_is_the_weighted_mean():
    _, xs = _models(3)
    got = _merge(xs, "linear", weights=[1.0, 2.0, 0.5])
    want = (xs[0] + 2 * xs[1] + 0.5 * xs[2]) / 3.5
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_linear_without_normalize_is_the_weighted_sum():
    _, xs = _models(2)
    got = _merge(xs, "linear", weights=[0.3, 0.3], normalize=False)
    torch.testing.assert_close(got, 0.3 * xs[0] + 0.3 * xs[1], rtol=0, atol=1e-6)


def test_task_arithmetic_adds_weighted_task_vectors_to_the_base():
    base, xs = _models(2)
    got = _merge(xs, "task_arithmetic", base=base, weights=[0.7, -0.2], lambda_=1.5)
    want = base + 1.5 * (0.7 * (xs[0] - base) - 0.2 * (xs[1] - base))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_task_arithmetic_normalized_divides_by_the_weights():
    base, xs = _models(2)
    got = _merge(xs, "task_arithmetic", base=base, weights=[0.5, 1.5], normalize=True)
    torch.testing.assert_close(got, base + (0.5 * (xs[0] - base) + 1.5 * (xs[1] - base)) / 2.0, rtol=0, atol=1e-5)


def test_ties_sign_election_by_hand():
    base = torch.zeros(3)
    xs = [torch.tensor([3.0, -1.0, 2.0]), torch.tensor([-1.0, -1.0, 0.5]), torch.tensor([-1.0, 2.0, -4.0])]
    # sums: 1 (+: only 3 agrees), 0 (+ by convention: only 2), -1.5 (-: only -4)
    got = _merge(xs, "ties", base=base, density=1.0)
    torch.testing.assert_close(got, torch.tensor([3.0, 2.0, -4.0]))
    # by count: element 0 has one + and two -: the mean of the two -1s
    got = _merge(xs, "ties", base=base, density=1.0, consensus="count")
    torch.testing.assert_close(got[0], torch.tensor(-1.0))


@pytest.mark.parametrize("density", [0.2, 0.5, 0.9])
@pytest.mark.parametrize("consensus", ["sum", "count"])
def test_ties_matches_trim_elect_disjoint_mean(density, consensus):
    base, xs = _models(3, shape=(16, 9))
    w = [1.0, 0.5, 2.0]
    got = _merge(xs, "ties", base=base, weights=w, density=density, consensus=consensus, lambda_=0.8)
    want = ref_elect(base, [ref_trim(x - base, density) for x in xs], w, lam=0.8, consensus=consensus)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_ties_trim_keeps_exactly_k_when_magnitudes_tie_across_chunks():
    base = torch.zeros(40)
    x = torch.tensor([1.0, -1.0, 2.0, 1.0] * 10)  # many equal magnitudes, spread over chunks of 7
    p = Params(weights=[1.0], density=[0.5], normalize=True)
    out = torch.empty(40)
    combine("ties", [x], base, p, out, chunk=7)
    want = ref_elect(base, [ref_trim(x, 0.5)], [1.0])
    torch.testing.assert_close(out, want)
    assert int((out != 0).sum()) == 20


def test_ties_keeps_at_least_one_element_at_a_positive_density():
    base, (x,) = _models(1, shape=(3,))
    got = _merge([x], "ties", base=base, density=0.1)  # int(0.3) = 0, but one is kept
    assert int((got != base).sum()) == 1


def test_ties_chunked_equals_whole():
    base, xs = _models(2, shape=(1000,))
    p = Params(weights=[1.0, 1.0], density=[0.3, 0.6])
    whole, chunked = torch.empty(1000), torch.empty(1000)
    combine("ties", xs, base, p, whole)
    combine("ties", xs, base, p, chunked, chunk=300)
    assert torch.equal(whole, chunked)


def test_dare_linear_drops_and_rescales():
    base, (x,) = _models(1, shape=(100, 100))
    got = _merge([x], "dare_linear", base=base, density=0.3, seed=7)
    tau, delta = x - base, got - base
    kept = delta != 0
    assert abs(float(kept.float().mean()) - 0.3) < 0.03
    torch.testing.assert_close(delta[kept], tau[kept] / 0.3, rtol=1e-5, atol=1e-5)  # rescaled by 1/density
    mask = ref_dare_mask("w", 0, 7, 0.3, tau.numel()).view_as(tau)
    torch.testing.assert_close(got, base + tau * mask / 0.3, rtol=0, atol=1e-5)


def test_dare_is_reproducible_for_a_seed_and_differs_across_seeds():
    base, xs = _models(2, shape=(50, 50))
    a = _merge(xs, "dare_ties", base=base, density=0.5, seed=1)
    b = _merge(xs, "dare_ties", base=base, density=0.5, seed=1)
    c = _merge(xs, "dare_ties", base=base, density=0.5, seed=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_dare_ties_matches_drop_then_elect():
    base, xs = _models(3, shape=(20, 20))
    w = [1.0, 0.5, 1.5]
    got = _merge(xs, "dare_ties", base=base, weights=w, density=0.4, seed=3)
    taus = [(x - base) * ref_dare_mask("w", i, 3, 0.4, 400).view(20, 20) / 0.4 for i, x in enumerate(xs)]
    torch.testing.assert_close(got, ref_elect(base, taus, w, normalize=False), rtol=0, atol=1e-5)
    normalized = _merge(xs, "dare_ties", base=base, weights=w, density=0.4, seed=3, normalize=True)
    torch.testing.assert_close(normalized, ref_elect(base, taus, w), rtol=0, atol=1e-5)


def test_dare_without_rescale_keeps_values():
    base, (x,) = _models(1, shape=(30, 30))
    got = _merge([x], "dare_linear", base=base, density=0.5, rescale=False)
    kept = got != base
    torch.testing.assert_close(got[kept], x[kept])


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 1.0])
def test_slerp_matches_the_formula(t):
    _, (a, b) = _models(2)
    got = _merge([a, b], "slerp", t=t)
    torch.testing.assert_close(got, ref_slerp(a, b, t).float(), rtol=0, atol=1e-5)


def test_slerp_falls_back_to_linear_when_colinear():
    a = torch.randn(8)
    got = _merge([a, 2 * a], "slerp", t=0.25)
    torch.testing.assert_close(got, 0.75 * a + 0.25 * 2 * a)


def test_slerp_with_a_base_runs_from_the_base():
    base, (x,) = _models(1)
    got = _merge([x], "slerp", base=base, t=0.3)
    torch.testing.assert_close(got, ref_slerp(base, x, 0.3).float(), rtol=0, atol=1e-5)


def test_model_stock_interpolates_by_the_angle():
    base, xs = _models(3)
    got = _merge(xs, "model_stock", base=base)
    taus = [(x - base).flatten().double() for x in xs]
    cos = [float(taus[i] @ taus[j] / (taus[i].norm() * taus[j].norm())) for i in range(3) for j in range(i + 1, 3)]
    c = sum(cos) / 3
    r = 3 * c / (1 + 2 * c)
    want = r * (sum(xs) / 3) + (1 - r) * base
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_bfloat16_inputs_accumulate_in_float32():
    _, xs = _models(3)
    xs = [x.bfloat16() for x in xs]
    got = _merge(xs, "linear", weights=[0.3, 0.3, 0.4], dtype="float32")  # float32 products and sums
    want = (0.3 * xs[0].float() + 0.3 * xs[1].float() + 0.4 * xs[2].float()) / 1.0
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
