"""trpo_ext's KL / surrogate ops against torch.distributions and autograd of the textbook formulas:
values, gradients, Hessian-vector products, opcheck, edge cases and bad input."""
import decimal
import math

import pytest
import torch
from torch.distributions import Categorical, Independent, Normal, kl_divergence

import trpo_ext
from trpo_ext._reference import (
    mean_kl_categorical_reference,
    mean_kl_diag_gaussian_reference,
    surrogate_kl_categorical_reference,
    surrogate_kl_diag_gaussian_reference,
)

from conftest import CUDA

DTYPES = [torch.float32, torch.float64]
F64 = torch.float64
# log_std shapes: (old is [A], new is [A]) ... (old is [B, A], new is [B, A])
LOG_STD_KINDS = [(False, False), (True, False), (False, True), (True, True)]


def gaussian_inputs(B, A, dtype=F64, device="cpu", per_state=(False, False), seed=0,
                    spread=0.3, log_std_shift=0.0):
    g = torch.Generator().manual_seed(seed)
    mean_old = torch.randn(B, A, generator=g, dtype=F64)
    mean_new = mean_old + spread * torch.randn(B, A, generator=g, dtype=F64)
    ls_shape = lambda per: (B, A) if per else (A,)  # noqa: E731
    log_std_old = 0.5 * torch.randn(ls_shape(per_state[0]), generator=g, dtype=F64) + log_std_shift
    if per_state[1]:
        base = log_std_old.expand(B, A)
    else:
        base = log_std_old.mean(0) if per_state[0] else log_std_old
    log_std_new = (base + spread * torch.randn(ls_shape(per_state[1]), generator=g,
                                               dtype=F64)).contiguous()
    actions = mean_old + torch.randn(B, A, generator=g, dtype=F64) * log_std_old.exp()
    logp_old = Independent(Normal(mean_old, log_std_old.exp().expand(B, A)), 1).log_prob(actions)
    advantages = torch.randn(B, generator=g, dtype=F64)
    cast = lambda t: t.to(dtype=dtype, device=device)  # noqa: E731
    return [cast(t) for t in (mean_old, log_std_old, mean_new, log_std_new, actions, logp_old,
                              advantages)]


def categorical_inputs(B, K, dtype=F64, device="cpu", seed=0, scale=2.0, spread=0.5,
                       index_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    logits_old = scale * torch.randn(B, K, generator=g, dtype=F64)
    logits_new = logits_old + spread * scale * torch.randn(B, K, generator=g, dtype=F64)
    actions = torch.multinomial(torch.softmax(logits_old, -1), 1, generator=g).squeeze(-1)
    logp_old = Categorical(logits=logits_old).log_prob(actions)
    advantages = torch.randn(B, generator=g, dtype=F64)
    cast = lambda t: t.to(dtype=dtype, device=device)  # noqa: E731
    return [cast(logits_old), cast(logits_new), actions.to(device=device, dtype=index_dtype),
            cast(logp_old), cast(advantages)]


def gaussian_dists(mean_old, log_std_old, mean_new, log_std_new):
    to64 = lambda t: t.detach().cpu().double()  # noqa: E731
    old = Independent(Normal(to64(mean_old), to64(log_std_old).exp().expand(mean_old.shape)), 1)
    new = Independent(Normal(to64(mean_new), to64(log_std_new).exp().expand(mean_new.shape)), 1)
    return old, new


def tol(dtype):
    return dict(rtol=1e-10, atol=1e-12) if dtype == F64 else dict(rtol=2e-5, atol=2e-6)


# --- values against torch.distributions ----------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
# (the CPU tiles hold min(256, 4096 // A) rows: batches on both sides of a tile's edge)
@pytest.mark.parametrize("B,A", [(1, 1), (1, 6), (123, 7), (2048, 17), (5000, 1), (1000, 8),
                                 (333, 9), (200, 32), (70, 33), (8195, 3)])
@pytest.mark.parametrize("per_state", LOG_STD_KINDS)
def test_gaussian_matches_distributions(B, A, per_state, dtype, device):
    mo, lo, mn, ln, act, lp, adv = gaussian_inputs(B, A, dtype, device, per_state)
    old, new = gaussian_dists(mo, lo, mn, ln)
    kl_rows = kl_divergence(old, new)
    ratio = torch.exp(new.log_prob(act.cpu().double()) - lp.cpu().double())
    expected = ((ratio * adv.cpu().double()).mean(), kl_rows.mean(), kl_rows.max())

    kl = trpo_ext.mean_kl_diag_gaussian(mo, lo, mn, ln)
    assert kl.shape == () and kl.dtype == dtype and kl.device.type == device
    torch.testing.assert_close(kl.cpu().double(), expected[1], **tol(dtype))
    got = trpo_ext.surrogate_kl_diag_gaussian(mo, lo, mn, ln, act, lp, adv)
    for g, e in zip(got, expected):
        assert g.shape == () and g.dtype == dtype and g.device.type == device
        torch.testing.assert_close(g.cpu().double(), e, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,K", [(1, 1), (1, 2), (123, 18), (2048, 2), (7, 1000)])
def test_categorical_matches_distributions(B, K, dtype, device):
    lo, ln, act, lp, adv = categorical_inputs(B, K, dtype, device)
    old = Categorical(logits=lo.cpu().double())
    new = Categorical(logits=ln.cpu().double())
    kl_rows = kl_divergence(old, new)
    ratio = torch.exp(new.log_prob(act.cpu()) - lp.cpu().double())
    expected = ((ratio * adv.cpu().double()).mean(), kl_rows.mean(), kl_rows.max())

    kl = trpo_ext.mean_kl_categorical(lo, ln)
    assert kl.shape == () and kl.dtype == dtype and kl.device.type == device
    torch.testing.assert_close(kl.cpu().double(), expected[1], **tol(dtype))
    got = trpo_ext.surrogate_kl_categorical(lo, ln, act, lp, adv)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.cpu().double(), e, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [2, 5, 18])
def test_int32_actions_match_int64(K, dtype, device):
    args = categorical_inputs(300, K, dtype, device)
    ref = trpo_ext.surrogate_kl_categorical(*args)
    args[2] = args[2].to(torch.int32)
    got = trpo_ext.surrogate_kl_categorical(*args)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=0, atol=0)


@pytest.mark.parametrize("log_std", [-12.0, -30.0])
def test_tiny_standard_deviations(log_std, device):
    # σ = e^-12 ≈ 6e-6 and e^-30 ≈ 9e-14: mean differences of a few σ must give O(1) KL terms,
    # not overflow or lose everything to 1/σ².
    mo, lo, mn, ln, act, lp, adv = gaussian_inputs(64, 4, F64, device, spread=0.0)
    lo = torch.full_like(lo, log_std)
    ln = lo + 0.1
    mn = mo + 2.0 * math.exp(log_std) * torch.randn_like(mo)
    act = mo + math.exp(log_std) * torch.randn_like(mo)
    lp = Independent(Normal(mo.cpu(), lo.cpu().exp().expand(mo.shape)), 1).log_prob(act.cpu())
    lp = lp.to(device)
    old, new = gaussian_dists(mo, lo, mn, ln)
    kl_rows = kl_divergence(old, new)
    got = trpo_ext.surrogate_kl_diag_gaussian(mo, lo, mn, ln, act, lp, adv)
    ratio = torch.exp(new.log_prob(act.cpu()) - lp.cpu())
    expected = ((ratio * adv.cpu()).mean(), kl_rows.mean(), kl_rows.max())
    for g, e in zip(got, expected):
        assert torch.isfinite(g)
        torch.testing.assert_close(g.cpu(), e, rtol=1e-9, atol=0)
    # float32 too (σ = e^-30 would make 1/σ² overflow float32 if it were formed), against the
    # float64 value of the float32-rounded inputs (rounding μ to float32 moves it by a visible
    # fraction of σ, which no kernel can undo)
    args32 = [t.float() for t in (mo, lo, mn, ln, act, lp, adv)]
    got32 = trpo_ext.surrogate_kl_diag_gaussian(*args32)
    expected = trpo_ext.surrogate_kl_diag_gaussian(*(t.double() for t in args32))
    for g, e in zip(got32, expected):
        assert torch.isfinite(g)
        torch.testing.assert_close(g.cpu().double(), e.cpu(), rtol=1e-4, atol=1e-6)


def _exact_half_expm1_minus_x(x: float) -> float:
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        d = decimal.Decimal(x)
        return float((d.exp() - 1 - d) / 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("delta", [1e-7, 1e-4, 3e-3, 0.2])
def test_nearby_gaussians_no_cancellation(delta, dtype, device):
    # Line-search KLs are ~1e-3 and smaller; the textbook "r − 1 − log r" loses all digits there in
    # float32.  Exact value per dimension: ½(e^{2δ} − 1 − 2δ) for log_std_new = log_std_old − δ.
    A = 3
    mo = torch.zeros(2, A, dtype=dtype, device=device)
    lo = torch.zeros(A, dtype=dtype, device=device)
    ln = torch.full((A,), -delta, dtype=torch.float64).to(dtype=dtype, device=device)
    x = 2 * (0.0 - float(ln[0]))  # the δ the op actually sees after rounding to dtype
    expected = A * _exact_half_expm1_minus_x(x)
    got = float(trpo_ext.mean_kl_diag_gaussian(mo, lo, mo, ln))
    assert got == pytest.approx(expected, rel=1e-12 if dtype == F64 else 2e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1e2, 1e4, 1e6])
def test_large_logits_stay_finite(scale, dtype, device):
    # (torch.distributions returns inf here once a new probability underflows to 0; the float64
    # log-softmax formula is the reference)
    lo, ln, act, lp, adv = categorical_inputs(50, 18, F64, device, scale=scale, spread=0.01)
    lp = torch.log_softmax(ln, -1).gather(-1, act[:, None]).squeeze(-1) + 0.1
    adv = adv + 1.0  # a surrogate well away from 0
    lo, ln, lp, adv = (t.to(dtype) for t in (lo, ln, lp, adv))
    # The reference sees the same dtype-rounded logits (rounding a logit of size s moves it by
    # eps·s, which no kernel can undo); what remains is the op's own arithmetic.
    ref = surrogate_kl_categorical_reference(lo.cpu().double(), ln.cpu().double(), act.cpu(),
                                             lp.cpu().double(), adv.cpu().double())
    assert all(torch.isfinite(r) for r in ref)
    assert abs(float(ref[0])) > 0.5  # a surrogate of 0 must not pass
    got = trpo_ext.surrogate_kl_categorical(lo, ln, act, lp, adv)
    assert all(torch.isfinite(g) for g in got)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.cpu().double(), r, **tol(dtype))
    kl = trpo_ext.mean_kl_categorical(lo, ln)
    torch.testing.assert_close(kl.cpu().double(), ref[1], **tol(dtype))
    # identical rows give exactly zero however large the logits
    assert float(trpo_ext.mean_kl_categorical(lo, lo)) == 0.0


def test_float32_accuracy_at_a_million_rows():
    # Batch sums accumulate in float64: the float32 result matches a float64 reference to float32
    # rounding, where a float32 running sum over 1e6 rows would drift by ~1e-4 relative.
    mo, lo, mn, ln, act, lp, adv = gaussian_inputs(1_000_000, 1, F64, "cpu", spread=0.1)
    args32 = [t.float() for t in (mo, lo, mn, ln, act, lp, adv)]
    ref = surrogate_kl_diag_gaussian_reference(*(t.double() for t in args32))
    got = trpo_ext.surrogate_kl_diag_gaussian(*args32)
    torch.testing.assert_close(got[0].double(), ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1].double(), ref[1], rtol=2e-6, atol=0)
    torch.testing.assert_close(got[2].double(), ref[2], rtol=2e-6, atol=0)


@pytest.mark.parametrize("A", [1, 3, 6, 17, 40])
def test_reproducible_across_thread_counts(A):
    args = gaussian_inputs(600_000 // A, A, torch.float32, "cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = trpo_ext.surrogate_kl_diag_gaussian(*args)
        kl_one = trpo_ext.mean_kl_diag_gaussian(*args[:4])
        torch.set_num_threads(max(2, threads))
        many = trpo_ext.surrogate_kl_diag_gaussian(*args)
        kl_many = trpo_ext.mean_kl_diag_gaussian(*args[:4])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one + (kl_one,), many + (kl_many,)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_identical_policies(dtype, device):
    # At θ = θ_old the KL, its maximum and its gradient are exactly zero, and the surrogate is the
    # mean advantage when logp_old is the new policy's own log-probability.
    mo, lo, _, _, act, _, adv = gaussian_inputs(300, 4, dtype, device)
    mn, ln = mo.clone().requires_grad_(), lo.clone().requires_grad_()
    logp = Independent(Normal(mo.double(), lo.double().exp().expand(mo.shape)), 1).log_prob(
        act.double()).to(dtype)
    s, k, m = trpo_ext.surrogate_kl_diag_gaussian(mo, lo, mn, ln, act, logp, adv)
    assert float(k.detach()) == 0.0 and float(m) == 0.0
    torch.testing.assert_close(s.double(), adv.double().mean(), **tol(dtype))
    g = torch.autograd.grad(trpo_ext.mean_kl_diag_gaussian(mo, lo, mn, ln), (mn, ln))
    assert all(bool((x == 0).all()) for x in g)
    lo_c, _, act_c, _, adv_c = categorical_inputs(300, 6, dtype, device)
    x = lo_c.clone().requires_grad_()
    logp = torch.log_softmax(lo_c, -1).gather(-1, act_c[:, None]).squeeze(-1)
    s, k, m = trpo_ext.surrogate_kl_categorical(lo_c, x, act_c, logp, adv_c)
    assert float(k.detach()) == 0.0 and float(m) == 0.0
    torch.testing.assert_close(s.double(), adv_c.double().mean(), **tol(dtype))
    (g,) = torch.autograd.grad(trpo_ext.mean_kl_categorical(lo_c, x), (x,))
    assert float(g.abs().max()) <= 4 * torch.finfo(dtype).eps / 300


# --- gradients ------------------------------------------------------------------------------------

def _gauss_fns(mo, lo, act, lp, adv):
    kl = lambda mn, ln: trpo_ext.mean_kl_diag_gaussian(mo, lo, mn, ln)  # noqa: E731
    surr = lambda mn, ln: trpo_ext.surrogate_kl_diag_gaussian(mo, lo, mn, ln, act, lp, adv)[:2]  # noqa: E731
    return kl, surr


@pytest.mark.parametrize("per_state", LOG_STD_KINDS)
@pytest.mark.parametrize("B,A", [(1, 1), (9, 3)])
def test_gaussian_gradcheck(B, A, per_state, device):
    mo, lo, mn, ln, act, lp, adv = gaussian_inputs(B, A, F64, device, per_state)
    mn.requires_grad_()
    ln.requires_grad_()
    kl, surr = _gauss_fns(mo, lo, act, lp, adv)
    assert torch.autograd.gradcheck(kl, (mn, ln))
    assert torch.autograd.gradgradcheck(kl, (mn, ln))
    assert torch.autograd.gradcheck(surr, (mn, ln))


@pytest.mark.parametrize("B,K", [(1, 1), (1, 3), (9, 5)])
def test_categorical_gradcheck(B, K, device):
    lo, ln, act, lp, adv = categorical_inputs(B, K, F64, device)
    ln.requires_grad_()
    kl = lambda x: trpo_ext.mean_kl_categorical(lo, x)  # noqa: E731
    assert torch.autograd.gradcheck(kl, (ln,))
    assert torch.autograd.gradgradcheck(kl, (ln,))
    assert torch.autograd.gradcheck(lambda x: trpo_ext.surrogate_kl_categorical(lo, x, act, lp, adv)[:2],
                                    (ln,))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_state", LOG_STD_KINDS)
@pytest.mark.parametrize("B,A", [(257, 6), (1000, 1), (700, 17)])  # several CPU tiles each
def test_gaussian_gradients_match_reference(B, A, per_state, dtype, device):
    mo, lo, mn, ln, act, lp, adv = gaussian_inputs(B, A, dtype, device, per_state)
    w_kl, w_s = 0.7, -1.3  # arbitrary upstream weights exercise both gradient paths at once

    def grads(fn):
        x, y = mn.detach().double().requires_grad_(), ln.detach().double().requires_grad_()
        if fn is None:
            x, y = mn.detach().clone().requires_grad_(), ln.detach().clone().requires_grad_()
            s, k, _ = trpo_ext.surrogate_kl_diag_gaussian(mo, lo, x, y, act, lp, adv)
        else:
            s, k, _ = fn(mo.double(), lo.double(), x, y, act.double(), lp.double(), adv.double())
        return torch.autograd.grad(w_kl * k + w_s * s, (x, y))

    got = grads(None)
    ref = grads(surrogate_kl_diag_gaussian_reference)
    for g, r, t in zip(got, ref, (mn, ln)):
        assert g.shape == t.shape and g.dtype == dtype
        torch.testing.assert_close(g.cpu().double(), r.cpu(), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,K", [(257, 18), (600, 2)])  # several CPU tiles each
def test_categorical_gradients_match_reference(B, K, dtype, device):
    lo, ln, act, lp, adv = categorical_inputs(B, K, dtype, device)
    x = ln.detach().clone().requires_grad_()
    s, k, _ = trpo_ext.surrogate_kl_categorical(lo, x, act, lp, adv)
    (got,) = torch.autograd.grad(0.7 * k - 1.3 * s, (x,))
    y = ln.detach().double().requires_grad_()
    s, k, _ = surrogate_kl_categorical_reference(lo.double(), y, act, lp.double(), adv.double())
    (ref,) = torch.autograd.grad(0.7 * k - 1.3 * s, (y,))
    torch.testing.assert_close(got.cpu().double(), ref.cpu(), **tol(dtype))


@pytest.mark.parametrize("at_old", [True, False])
@pytest.mark.parametrize("per_state", LOG_STD_KINDS)
def test_gaussian_hvp_matches_reference(per_state, at_old, device):
    mo, lo, mn, ln, *_ = gaussian_inputs(64, 5, F64, device, per_state)
    if at_old:  # the Fisher-vector product of TRPO: the Hessian at θ = θ_old
        mn = mo.clone()
        ln = lo.expand(ln.shape).clone() if ln.dim() == 2 else lo.clone()
        if ln.dim() == 1 and lo.dim() == 2:
            pytest.skip("a state-independent θ cannot equal a per-state θ_old")
    v = (torch.randn_like(mn), torch.randn_like(ln))
    _, hvp_op = torch.autograd.functional.hvp(
        lambda a, b: trpo_ext.mean_kl_diag_gaussian(mo, lo, a, b), (mn, ln), v)
    _, hvp_ref = torch.autograd.functional.hvp(
        lambda a, b: mean_kl_diag_gaussian_reference(mo, lo, a, b), (mn, ln), v)
    for g, r in zip(hvp_op, hvp_ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("at_old", [True, False])
def test_categorical_hvp_matches_reference(at_old, device):
    lo, ln, *_ = categorical_inputs(64, 7, F64, device)
    if at_old:
        ln = lo.clone()
    v = torch.randn_like(ln)
    _, hvp_op = torch.autograd.functional.hvp(lambda a: trpo_ext.mean_kl_categorical(lo, a), ln, v)
    _, hvp_ref = torch.autograd.functional.hvp(lambda a: mean_kl_categorical_reference(lo, a), ln, v)
    torch.testing.assert_close(hvp_op, hvp_ref, rtol=1e-10, atol=1e-12)


# --- the Fisher metric ops: Hessians of the textbook KL at new = old -------------------------------

def _hvp_at_old(kl_fn, params, v):
    _, h = torch.autograd.functional.hvp(kl_fn, params, v)
    return h


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_state", [False, True])
@pytest.mark.parametrize("B,A", [(1, 1), (64, 5), (300, 17)])
def test_gaussian_metric_is_the_kl_hessian(B, A, per_state, dtype, device):
    mo, lo, *_ = gaussian_inputs(B, A, F64, device, (per_state, per_state))
    u = (torch.randn_like(mo), torch.randn_like(lo))
    # Independent reference: torch.distributions' KL, its Hessian at new = old by autograd.
    ref = _hvp_at_old(
        lambda m, l: kl_divergence(Independent(Normal(mo, lo.exp().expand_as(mo)), 1),
                                   Independent(Normal(m, l.exp().expand_as(m)), 1)).mean(),
        (mo.clone(), lo.clone()), u)
    got = trpo_ext.fisher_metric_diag_gaussian(lo.to(dtype), u[0].to(dtype), u[1].to(dtype))
    assert got[0].shape == mo.shape and got[1].shape == lo.shape and got[0].dtype == dtype
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.double(), r, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,K", [(1, 1), (1, 2), (64, 7), (33, 1000)])
def test_categorical_metric_is_the_kl_hessian(B, K, dtype, device):
    lo, *_ = categorical_inputs(B, K, F64, device)
    lo = lo * 3.0
    u = torch.randn_like(lo)
    ref = _hvp_at_old(lambda a: kl_divergence(Categorical(logits=lo), Categorical(logits=a)).mean(),
                      lo.clone(), u)
    got = trpo_ext.fisher_metric_categorical(lo.to(dtype), u.to(dtype))
    assert got.shape == lo.shape and got.dtype == dtype
    torch.testing.assert_close(got.double(), ref, **tol(dtype))


def test_categorical_metric_large_and_masked_logits(device):
    lo = torch.tensor([[1e4, 1e4 - 1.0, float("-inf")], [-1e4, -1e4, -1e4]], dtype=F64,
                      device=device)
    u = torch.tensor([[0.3, -1.0, 2.0], [1.0, 2.0, 3.0]], dtype=F64, device=device)
    got = trpo_ext.fisher_metric_categorical(lo, u)
    p = torch.softmax(lo, -1)
    expected = p * (u - (p * u).sum(-1, keepdim=True)) / 2
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)


def test_metric_ops_opcheck(device):
    for dtype in DTYPES:
        mo, lo, *_ = gaussian_inputs(9, 3, dtype, device)
        torch.library.opcheck(torch.ops.trpo_ext.kl_metric_diag_gaussian.default,
                              (lo, torch.randn_like(mo), torch.randn_like(lo)))
        mo, lo, *_ = gaussian_inputs(9, 3, dtype, device, (True, True))
        torch.library.opcheck(torch.ops.trpo_ext.kl_metric_diag_gaussian.default,
                              (lo, torch.randn_like(mo), torch.randn_like(lo)))
        lg, *_ = categorical_inputs(9, 5, dtype, device)
        torch.library.opcheck(torch.ops.trpo_ext.kl_metric_categorical.default,
                              (lg, torch.randn_like(lg)))


def test_metric_ops_bad_input(device):
    mo, lo, *_ = gaussian_inputs(9, 3, F64, device)
    with pytest.raises(ValueError, match="log_std must be"):
        trpo_ext.fisher_metric_diag_gaussian(lo[:2], torch.randn_like(mo), torch.randn_like(lo[:2]))
    with pytest.raises(ValueError, match="u_log_std"):
        trpo_ext.fisher_metric_diag_gaussian(lo, torch.randn_like(mo), torch.randn(4, dtype=F64,
                                                                                  device=device))
    with pytest.raises(ValueError, match="u_mean must be"):
        trpo_ext.fisher_metric_diag_gaussian(lo, torch.randn(3, dtype=F64, device=device), lo)
    with pytest.raises(TypeError, match="dtype"):
        trpo_ext.fisher_metric_diag_gaussian(lo, torch.randn_like(mo).float(), torch.randn_like(lo))
    lg, *_ = categorical_inputs(9, 5, F64, device)
    with pytest.raises(ValueError, match="u must have"):
        trpo_ext.fisher_metric_categorical(lg, torch.randn(9, 4, dtype=F64, device=device))
    with pytest.raises(ValueError, match="empty batch"):
        trpo_ext.fisher_metric_categorical(lg[:0], lg[:0])
    with pytest.raises(TypeError, match="u must be a torch.Tensor"):
        trpo_ext.fisher_metric_categorical(lg, 1.0)


def test_metric_ops_refuse_inputs_that_require_grad(device):
    mo, lo, *_ = gaussian_inputs(9, 3, F64, device)
    u = torch.randn_like(mo).requires_grad_()
    with pytest.raises(ValueError, match="kl_metric_diag_gaussian is not differentiable, but "
                                         "u_mean requires grad"):
        trpo_ext.fisher_metric_diag_gaussian(lo, u, torch.randn_like(lo))
    lg, *_ = categorical_inputs(9, 5, F64, device)
    with pytest.raises(ValueError, match="kl_metric_categorical is not differentiable, but "
                                         "logits requires grad"):
        trpo_ext.fisher_metric_categorical(lg.clone().requires_grad_(), torch.randn_like(lg))
    with torch.no_grad():
        got = trpo_ext.fisher_metric_categorical(lg, u.new_ones(9, 5).requires_grad_())
    assert torch.equal(got, trpo_ext.fisher_metric_categorical(lg, torch.ones_like(lg)))


def test_meta_mixed_with_real_tensors_is_refused():
    # Such calls reach the fake kernels, which would hand back uninitialised real tensors.
    mo, lo, mn, ln, a, lp, adv = gaussian_inputs(6, 3, F64, "cpu")
    with pytest.raises(RuntimeError, match="mean_new is on meta but mean_old is on cpu"):
        trpo_ext.mean_kl_diag_gaussian(mo, lo, mn.to("meta"), ln)
    with pytest.raises(RuntimeError, match="advantages is on meta"):
        trpo_ext.surrogate_kl_diag_gaussian(mo, lo, mn, ln, a, lp, adv.to("meta"))
    lg, *_ = categorical_inputs(6, 4, F64, "cpu")
    with pytest.raises(RuntimeError, match="logits_new is on meta but logits_old is on cpu"):
        trpo_ext.mean_kl_categorical(lg, lg.to("meta"))
    with pytest.raises(RuntimeError, match="u is on meta but logits is on cpu"):
        trpo_ext.fisher_metric_categorical(lg, lg.to("meta"))
    # All on meta: the shape-only result, as before.
    out = trpo_ext.mean_kl_diag_gaussian(mo.to("meta"), lo.to("meta"), mn.to("meta"), ln.to("meta"))
    assert out.device.type == "meta" and out.shape == ()


@pytest.mark.parametrize("discrete", [False, True])
def test_fisher_vector_product_through_a_network(discrete, device):
    # The driver's FVP: double backward of the mean KL at θ_old through a policy network,
    # against torch.autograd.functional.hvp of the reference formula.
    torch.manual_seed(0)
    obs = torch.randn(100, 4, dtype=F64, device=device)
    out = 3 if discrete else 2
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, out))
    net = net.to(dtype=F64, device=device)
    log_std = torch.full((out,), -0.5, dtype=F64, device=device)
    flat = torch.cat([p.detach().flatten() for p in net.parameters()] + [log_std])
    shapes = [p.shape for p in net.parameters()]

    def dist_params(theta):
        i, params = 0, []
        for s in shapes:
            n = math.prod(s)
            params.append(theta[i:i + n].view(s))
            i += n
        h = torch.tanh(obs @ params[0].T + params[1])
        return h @ params[2].T + params[3], theta[i:]

    head_old, ls_old = (t.detach() for t in dist_params(flat))

    def kl_op(theta):
        head, ls = dist_params(theta)
        if discrete:
            return trpo_ext.mean_kl_categorical(head_old, head)
        return trpo_ext.mean_kl_diag_gaussian(head_old, ls_old, head, ls)

    def kl_ref(theta):
        head, ls = dist_params(theta)
        if discrete:
            return mean_kl_categorical_reference(head_old, head)
        return mean_kl_diag_gaussian_reference(head_old, ls_old, head, ls)

    v = torch.randn_like(flat)
    theta = flat.clone().requires_grad_()
    (g,) = torch.autograd.grad(kl_op(theta), theta, create_graph=True)
    (fvp,) = torch.autograd.grad(g @ v, theta)
    _, expected = torch.autograd.functional.hvp(kl_ref, flat, v)
    torch.testing.assert_close(fvp, expected, rtol=1e-10, atol=1e-12)
    assert float(fvp @ v) > 0  # the Fisher matrix is positive semi-definite


def test_surrogate_second_order_raises():
    mo, lo, mn, ln, act, lp, adv = gaussian_inputs(5, 2)
    mn.requires_grad_()
    s, _, _ = trpo_ext.surrogate_kl_diag_gaussian(mo, lo, mn, ln, act, lp, adv)
    (g,) = torch.autograd.grad(s, mn, create_graph=True)
    with pytest.raises(NotImplementedError, match="first order only"):
        torch.autograd.grad(g.sum(), mn)
    lo_c, ln_c, act_c, lp_c, adv_c = categorical_inputs(5, 3)
    ln_c.requires_grad_()
    s, _, _ = trpo_ext.surrogate_kl_categorical(lo_c, ln_c, act_c, lp_c, adv_c)
    (g,) = torch.autograd.grad(s, ln_c, create_graph=True)
    with pytest.raises(NotImplementedError, match="first order only"):
        torch.autograd.grad(g.sum(), ln_c)


def test_max_kl_carries_no_gradient():
    mo, lo, mn, ln, act, lp, adv = gaussian_inputs(5, 2)
    mn.requires_grad_()
    s, k, m = trpo_ext.surrogate_kl_diag_gaussian(mo, lo, mn, ln, act, lp, adv)
    assert s.requires_grad and k.requires_grad and not m.requires_grad


@pytest.mark.parametrize("index,name", [(0, "mean_old"), (1, "log_std_old"), (4, "actions"),
                                        (5, "logp_old"), (6, "advantages")])
def test_constant_inputs_must_not_require_grad(index, name):
    args = gaussian_inputs(5, 2)
    args[index].requires_grad_()
    with pytest.raises(ValueError, match=f"{name} requires grad.*detach"):
        trpo_ext.surrogate_kl_diag_gaussian(*args)
    if index < 2:
        with pytest.raises(ValueError, match=f"{name} requires grad"):
            trpo_ext.mean_kl_diag_gaussian(*args[:4])
    cat = categorical_inputs(5, 3)
    cat[0].requires_grad_()
    with pytest.raises(ValueError, match="logits_old requires grad"):
        trpo_ext.mean_kl_categorical(cat[0], cat[1])
    with torch.no_grad():  # outside grad mode nothing is differentiated, nothing to refuse
        trpo_ext.surrogate_kl_diag_gaussian(*args)


# --- categorical rows of every width ----------------------------------------------------------------
# The CPU tiles hold min(256, 4096 // K) rows, one row per SIMD lane; batch sizes straddle the tiles
# and the vector widths.

CAT_PATH_K = [1, 2, 3, 7, 8, 9, 17, 18, 32, 33, 48, 1000]


def _cat_expected(lo, ln, act, lp, adv):
    # float64 log-softmax formulas (trpo_ext._reference), independent of the kernels
    return surrogate_kl_categorical_reference(*(t.cpu().double() if t.is_floating_point() else t.cpu()
                                                for t in (lo, ln, act, lp, adv)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", CAT_PATH_K)
@pytest.mark.parametrize("B", [1, 7, 64, 65, 300])
def test_categorical_paths_match_reference(B, K, dtype, device):
    lo, ln, act, lp, adv = categorical_inputs(B, K, dtype, device, seed=K + B)
    expected = _cat_expected(lo, ln, act, lp, adv)
    got = trpo_ext.surrogate_kl_categorical(lo, ln, act, lp, adv)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.cpu().double(), e, **tol(dtype))
    torch.testing.assert_close(trpo_ext.mean_kl_categorical(lo, ln).cpu().double(), expected[1],
                               **tol(dtype))
    # gradients of surrogate + KL against autograd through the float64 reference
    x = ln.clone().requires_grad_()
    s, k, _ = trpo_ext.surrogate_kl_categorical(lo, x, act, lp, adv)
    (got_g,) = torch.autograd.grad(s + 0.7 * k, (x,))
    y = ln.cpu().double().requires_grad_()
    s, k, _ = surrogate_kl_categorical_reference(lo.cpu().double(), y, act.cpu(),
                                                 lp.cpu().double(), adv.cpu().double())
    (ref_g,) = torch.autograd.grad(s + 0.7 * k, (y,))
    torch.testing.assert_close(got_g.cpu().double(), ref_g, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [2, 3, 18, 1000])
@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_categorical_paths_large_logits(K, scale, dtype, device):
    # Logits around ±1e4 (one shared offset plus O(1) spread): the maxima must cancel exactly.
    lo, ln, act, lp, adv = categorical_inputs(130, K, F64, device, seed=3)
    lo, ln = lo + scale, ln + scale
    lo, ln, lp, adv = (t.to(dtype) for t in (lo, ln, lp, adv))
    # (the reference sees the same dtype-rounded logits, so only the op's own arithmetic differs)
    expected = _cat_expected(lo, ln, act, lp, adv)
    assert abs(float(expected[0])) > 0.01 and float(expected[1]) > 0.01  # zeros must not pass
    got = trpo_ext.surrogate_kl_categorical(lo, ln, act, lp, adv)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.cpu().double(), e, **tol(dtype))
    assert float(trpo_ext.mean_kl_categorical(lo, lo)) == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [2, 3, 18, 1000])
@pytest.mark.parametrize("masked", [-1e30, float("-inf")])
def test_categorical_paths_masked_classes(K, masked, dtype, device):
    # Huge negative (or −inf) logits at the same classes of old and new, as for invalid actions:
    # those classes have probability 0 and add nothing, as in torch.distributions.
    lo, ln, act, lp, adv = categorical_inputs(97, K, F64, device, seed=5)
    mask = torch.zeros(97, K, dtype=torch.bool, device=device)
    mask[:, 0] = True
    mask[::3, K - 1] = K > 2
    act = torch.where(act == 0, torch.ones_like(act), act) if K > 1 else act
    act = torch.where(mask.gather(1, act[:, None]).squeeze(1), torch.full_like(act, 1), act)
    lo = lo.masked_fill(mask, masked)
    ln = ln.masked_fill(mask, masked)
    lp = torch.log_softmax(lo, -1).gather(-1, act[:, None]).squeeze(-1)
    kl_rows = kl_divergence(Categorical(logits=lo.cpu()), Categorical(logits=ln.cpu()))
    lo, ln, lp, adv = (t.to(dtype) for t in (lo, ln, lp, adv))
    kl = trpo_ext.mean_kl_categorical(lo, ln)
    torch.testing.assert_close(kl.cpu().double(), kl_rows.mean(), **tol(dtype))
    s, k, m = trpo_ext.surrogate_kl_categorical(lo, ln, act, lp, adv)
    torch.testing.assert_close(k.cpu().double(), kl_rows.mean(), **tol(dtype))
    torch.testing.assert_close(m.cpu().double(), kl_rows.max(), **tol(dtype))
    ratio = torch.exp(Categorical(logits=ln.cpu().double()).log_prob(act.cpu()) - lp.cpu().double())
    torch.testing.assert_close(s.cpu().double(), (ratio * adv.cpu().double()).mean(), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [2, 3, 9, 18, 1000])
@pytest.mark.parametrize("side", ["old", "new"])
def test_categorical_paths_nan_logit_gives_nan(side, K, dtype, device):
    # A NaN logit in one row makes the mean KL and its maximum NaN (torch.distributions agrees),
    # on every path (the vectorised exps clamp their inputs, which must let NaN through).
    lo, ln, act, lp, adv = categorical_inputs(150, K, dtype, device, seed=3)
    (lo if side == "old" else ln)[77, K // 2] = float("nan")
    assert torch.isnan(kl_divergence(Categorical(logits=lo.cpu().double(), validate_args=False),
                                     Categorical(logits=ln.cpu().double(), validate_args=False)
                                     ).mean())
    assert torch.isnan(trpo_ext.mean_kl_categorical(lo, ln))
    _, k, m = trpo_ext.surrogate_kl_categorical(lo, ln, act, lp, adv)
    assert torch.isnan(k) and torch.isnan(m)


@pytest.mark.parametrize("K", [2, 3, 18, 1000])
def test_categorical_vanishing_old_class_that_the_new_policy_forbids(K):
    # An old class e^-86.8 to e^-87.8 below the row's largest (around float's smallest normal
    # number) whose new logit is −inf: the KL is +inf while that class's old probability is a
    # normal float, and finite once the CPU counts it as 0 (below e^-87) — never NaN, also with
    # denormals flushed to zero (an exp flushed to 0 must not be multiplied by the infinite
    # log-ratio).
    try:
        for flush in (False, True):
            torch.set_flush_denormal(flush)
            for gap in torch.linspace(86.8, 87.8, 41).tolist():
                lo = torch.zeros(40, K)
                lo[:, 1] = -gap
                ln = lo.clone()
                ln[:, 1] = float("-inf")
                kl = float(trpo_ext.mean_kl_categorical(lo, ln))
                assert not math.isnan(kl), (flush, gap)
                if gap < 86.95:
                    assert kl == math.inf, (flush, gap, kl)
    finally:
        torch.set_flush_denormal(False)


@pytest.mark.parametrize("K", [2, 18, 1000])
def test_categorical_paths_non_contiguous(K, device):
    lo, ln, act, lp, adv = categorical_inputs(50, K, torch.float32, device)
    t = lambda x: x.t().contiguous().t()  # noqa: E731  same values, column-major
    assert not t(lo).is_contiguous()
    for a, b in zip(trpo_ext.surrogate_kl_categorical(t(lo), t(ln), act, lp, adv),
                    trpo_ext.surrogate_kl_categorical(lo, ln, act, lp, adv)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("K", [2, 18, 1000])
def test_categorical_reproducible_across_thread_counts(K):
    args = categorical_inputs(400_000 // K, K, torch.float32, "cpu")
    x = args[1].clone().requires_grad_()
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            out = trpo_ext.surrogate_kl_categorical(args[0], x, *args[2:])
            (g,) = torch.autograd.grad(out[0] + out[1], (x,))
            results.append([o.detach() for o in out] + [g])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


# --- layouts, sizes ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(dtype, device):
    # Transposed [A, B] storage and strided slices must match their contiguous copies exactly.
    mo, lo, mn, ln, act, lp, adv = gaussian_inputs(40, 6, dtype, device, (True, True))
    t = lambda x: x.t().contiguous().t()  # noqa: E731  same values, column-major
    strided = [t(mo), lo[:, ::1].t().contiguous().t(), t(mn), t(ln), t(act), lp, adv]
    assert not strided[0].is_contiguous()
    for a, b in zip(trpo_ext.surrogate_kl_diag_gaussian(*strided),
                    trpo_ext.surrogate_kl_diag_gaussian(mo, lo, mn, ln, act, lp, adv)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    wide = gaussian_inputs(80, 12, dtype, device)
    sl = [wide[0][::2, ::2], wide[1][::2], wide[2][::2, ::2], wide[3][::2], wide[4][::2, ::2],
          wide[5][::2], wide[6][::2]]
    for a, b in zip(trpo_ext.surrogate_kl_diag_gaussian(*sl),
                    trpo_ext.surrogate_kl_diag_gaussian(*(x.contiguous() for x in sl))):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    lo_c, ln_c, act_c, lp_c, adv_c = categorical_inputs(80, 10, dtype, device)
    sl = [lo_c[::2, 1::2], ln_c[::2, 1::2], act_c[::2] % 5, lp_c[::2], adv_c[::2]]
    for a, b in zip(trpo_ext.surrogate_kl_categorical(*sl),
                    trpo_ext.surrogate_kl_categorical(*(x.contiguous() for x in sl))):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_empty_batch_is_an_error(device):
    mo, mn, act = (torch.zeros(0, 3, dtype=F64, device=device) for _ in range(3))
    lo, ln = (torch.zeros(3, dtype=F64, device=device) for _ in range(2))
    lp, adv = (torch.zeros(0, dtype=F64, device=device) for _ in range(2))
    with pytest.raises(ValueError, match=r"mean_old has an empty batch \(shape \[0, 3\]\)"):
        trpo_ext.mean_kl_diag_gaussian(mo, lo, mn, ln)
    with pytest.raises(ValueError, match="empty batch"):
        trpo_ext.surrogate_kl_diag_gaussian(mo, lo, mn, ln, act, lp, adv)
    z = torch.zeros(0, 4, dtype=F64, device=device)
    with pytest.raises(ValueError, match=r"logits_old has an empty batch"):
        trpo_ext.mean_kl_categorical(z, z)
    with pytest.raises(ValueError, match="no action dimensions"):
        trpo_ext.mean_kl_diag_gaussian(mo.new_zeros(3, 0), lo.new_zeros(0), mo.new_zeros(3, 0),
                                       lo.new_zeros(0))
    z = torch.zeros(3, 0, dtype=F64, device=device)
    with pytest.raises(ValueError, match="no classes"):
        trpo_ext.mean_kl_categorical(z, z)


# --- opcheck, compile -------------------------------------------------------------------------

# Old log_std [A] with new [B, A] (and the reverse) covers both layouts in one call each.
@pytest.mark.parametrize("dtype,per_state", [(torch.float32, (False, True)),
                                             (F64, (True, False))])
def test_opcheck_gaussian(dtype, per_state, device):
    mo, lo, mn, ln, act, lp, adv = gaussian_inputs(13, 3, dtype, device, per_state)
    mn.requires_grad_()
    ln.requires_grad_()
    ops = torch.ops.trpo_ext
    torch.library.opcheck(ops.kl_diag_gaussian.default, (mo, lo, mn, ln))
    torch.library.opcheck(ops.kl_surrogate_diag_gaussian.default, (mo, lo, mn, ln, act, lp, adv))
    g = torch.tensor(0.5, dtype=dtype, device=device)
    torch.library.opcheck(ops.kl_diag_gaussian_backward.default,
                          (g, None, mo, lo, mn, ln, None, None, None))
    torch.library.opcheck(ops.kl_diag_gaussian_backward.default,
                          (g, g * 3, mo, lo, mn.detach(), ln.detach(), act, lp, adv))


@pytest.mark.parametrize("dtype,index_dtype", [(torch.float32, torch.int64),
                                               (F64, torch.int32)])
def test_opcheck_categorical(dtype, index_dtype, device):
    lo, ln, act, lp, adv = categorical_inputs(13, 5, dtype, device, index_dtype=index_dtype)
    ln.requires_grad_()
    ops = torch.ops.trpo_ext
    torch.library.opcheck(ops.kl_categorical.default, (lo, ln))
    torch.library.opcheck(ops.kl_surrogate_categorical.default, (lo, ln, act, lp, adv))
    g = torch.tensor(0.5, dtype=dtype, device=device)
    torch.library.opcheck(ops.kl_categorical_backward.default,
                          (g, None, lo, ln, None, None, None))
    torch.library.opcheck(ops.kl_categorical_backward.default,
                          (g, g * 3, lo, ln.detach(), act, lp, adv))


def test_torch_compile_fullgraph():
    mo, lo, mn, ln, act, lp, adv = gaussian_inputs(64, 3, torch.float32)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(mn, ln):
        s, k, m = trpo_ext.surrogate_kl_diag_gaussian(mo, lo, mn, ln, act, lp, adv)
        return s - 10 * k, m

    got = f(mn, ln)
    s, k, m = trpo_ext.surrogate_kl_diag_gaussian(mo, lo, mn, ln, act, lp, adv)
    torch.testing.assert_close(got[0], s - 10 * k)
    torch.testing.assert_close(got[1], m)


# --- bad input ----------------------------------------------------------------------------------

def _g(B=10, A=3):
    return gaussian_inputs(B, A, torch.float32)


def _c(B=10, K=4):
    return categorical_inputs(B, K, torch.float32)


@pytest.mark.parametrize("index,name,bad,msg", [
    (2, "mean_new", lambda t: t[:-1], r"mean_new must have the shape of mean_old \[10, 3\], got \[9, 3\]"),
    (2, "mean_new", lambda t: t[:, :2], r"mean_new must have the shape of mean_old \[10, 3\], got \[10, 2\]"),
    (4, "actions", lambda t: t[:, :2], r"actions must have the shape of mean_old \[10, 3\], got \[10, 2\]"),
    (1, "log_std_old", lambda t: t[:2], r"log_std_old must be \[A\] = \[3\] or \[B, A\] = \[10, 3\] to match mean_old \[10, 3\], got \[2\]"),
    (3, "log_std_new", lambda t: t.expand(1, 3), r"log_std_new must be \[A\] = \[3\] or \[B, A\] = \[10, 3\].*got \[1, 3\]"),
    (3, "log_std_new", lambda t: t.expand(2, 10, 3), r"log_std_new must be \[A\].*got \[2, 10, 3\]"),
    (5, "logp_old", lambda t: t[:-1], r"logp_old must be \[B\] = \[10\].*got \[9\]"),
    (6, "advantages", lambda t: t[:, None], r"advantages must be \[B\] = \[10\].*got \[10, 1\]"),
    (0, "mean_old", lambda t: t[0], r"mean_old must be \[B, A\], got shape \[3\]"),
])
def test_gaussian_rejects_bad_shapes(index, name, bad, msg):
    args = _g()
    args[index] = bad(args[index])
    with pytest.raises(ValueError, match=msg):
        trpo_ext.surrogate_kl_diag_gaussian(*args)
    if index < 4:
        with pytest.raises(ValueError, match=msg):
            trpo_ext.mean_kl_diag_gaussian(*args[:4])


@pytest.mark.parametrize("index,name", [(1, "log_std_old"), (2, "mean_new"), (3, "log_std_new"),
                                        (4, "actions"), (5, "logp_old"), (6, "advantages")])
def test_gaussian_rejects_mixed_dtypes(index, name):
    args = _g()
    args[index] = args[index].double()
    with pytest.raises(TypeError, match=f"{name} must have the dtype of mean_old"):
        trpo_ext.surrogate_kl_diag_gaussian(*args)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int64])
def test_rejects_unsupported_dtypes(dtype):
    args = [t.to(dtype) for t in _g()]
    with pytest.raises(TypeError, match="mean_old must be float32 or float64"):
        trpo_ext.mean_kl_diag_gaussian(*args[:4])
    lo, ln, *_ = _c()
    with pytest.raises(TypeError, match="logits_old must be float32 or float64"):
        trpo_ext.mean_kl_categorical(lo.to(dtype), ln.to(dtype))


@pytest.mark.parametrize("index,msg", [
    (1, r"logits_new must have the shape of logits_old \[10, 4\], got \[10, 3\]"),
    (2, r"actions must be \[B\] = \[10\].*got \[9\]"),
    (3, r"logp_old must be \[B\] = \[10\].*got \[9\]"),
    (4, r"advantages must be \[B\] = \[10\].*got \[9\]"),
])
def test_categorical_rejects_bad_shapes(index, msg):
    args = _c()
    args[index] = args[index][..., :-1]
    with pytest.raises(ValueError, match=msg):
        trpo_ext.surrogate_kl_categorical(*args)


def test_categorical_rejects_bad_types():
    args = _c()
    args[1] = args[1].double()
    with pytest.raises(TypeError, match="logits_new must have the dtype of logits_old"):
        trpo_ext.mean_kl_categorical(*args[:2])
    args = _c()
    args[2] = args[2].float()
    with pytest.raises(TypeError, match="actions must be int64 or int32 class indices, got Float"):
        trpo_ext.surrogate_kl_categorical(*args)
    args = _c()
    args[4] = args[4].double()
    with pytest.raises(TypeError, match="advantages must have the dtype of logits_old"):
        trpo_ext.surrogate_kl_categorical(*args)
    with pytest.raises(TypeError, match="logits_new must be a torch.Tensor, got list"):
        trpo_ext.mean_kl_categorical(args[0], args[1].tolist())


@pytest.mark.parametrize("bad", [4, -1, 1000])
def test_categorical_out_of_range_action_cpu(bad):
    args = _c()
    args[2][7] = bad
    with pytest.raises(ValueError, match=rf"actions\[7\] = {bad} is out of range for K = 4 classes"):
        trpo_ext.surrogate_kl_categorical(*args)
    # the backward op checks too
    g = torch.tensor(1.0)
    with pytest.raises(ValueError, match=r"actions\[7\]"):
        torch.ops.trpo_ext.kl_categorical_backward(g, g, args[0], args[1], *args[2:])


@pytest.mark.parametrize("K", [2, 18])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("bad", ["K", -1, "min"])
def test_categorical_out_of_range_action_in_a_large_batch(bad, index_dtype, K):
    # The CPU scans each block's actions before its arithmetic, blocks in parallel; the message
    # names the first bad action, forward and backward.
    lo, ln, act, lp, adv = categorical_inputs(200_000, K, torch.float32, index_dtype=index_dtype)
    value = torch.iinfo(index_dtype).min if bad == "min" else K if bad == "K" else bad
    act[150_001] = value
    act[199_999] = value
    msg = rf"actions\[150001\] = {value} is out of range for K = {K}"
    with pytest.raises(ValueError, match=msg):
        trpo_ext.surrogate_kl_categorical(lo, ln, act, lp, adv)
    g = torch.tensor(1.0)
    with pytest.raises(ValueError, match=msg):
        torch.ops.trpo_ext.kl_categorical_backward(g, g, lo, ln, act, lp, adv)


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_categorical_out_of_range_action_cuda_gives_nan():
    args = categorical_inputs(10, 4, torch.float32, "cuda")
    args[2][7] = 4
    s, k, m = trpo_ext.surrogate_kl_categorical(*args)
    assert torch.isnan(s) and torch.isfinite(k) and torch.isfinite(m)
    ln = args[1].clone().requires_grad_()
    s, _, _ = trpo_ext.surrogate_kl_categorical(args[0], ln, *args[2:])
    (g,) = torch.autograd.grad(s, ln)
    assert torch.isnan(g[7]).all()


def test_backward_ops_check_their_inputs():
    mo, lo, mn, ln, act, lp, adv = _g()
    ops = torch.ops.trpo_ext
    with pytest.raises(ValueError, match="grad_mean_kl must hold one value"):
        ops.kl_diag_gaussian_backward(torch.ones(2), None, mo, lo, mn, ln, None, None, None)
    with pytest.raises(ValueError, match="grad_surrogate needs actions, logp_old and advantages"):
        ops.kl_diag_gaussian_backward(torch.ones(()), torch.ones(()), mo, lo, mn, ln, None, None,
                                      None)
    with pytest.raises(ValueError, match="given together"):
        ops.kl_diag_gaussian_backward(torch.ones(()), torch.ones(()), mo, lo, mn, ln, act, None,
                                      None)
    with pytest.raises(TypeError, match="grad_mean_kl must have the dtype of mean_old"):
        ops.kl_diag_gaussian_backward(torch.ones((), dtype=F64), None, mo, lo, mn, ln, None, None,
                                      None)


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_rejects_mixed_devices():
    args = _g()
    args[2] = args[2].cuda()
    with pytest.raises(ValueError, match="must be on the device of"):
        trpo_ext.surrogate_kl_diag_gaussian(*args)
    args = _c()
    args[3] = args[3].cuda()
    with pytest.raises(ValueError, match="logp_old must be on the device of logits_old"):
        trpo_ext.surrogate_kl_categorical(*args)
