"""trpo_ext.gae against the float64 reference, an analytic case, opcheck and bad input."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import trpo_ext
from trpo_ext._reference import gae_reference

from conftest import DEVICES, CUDA

DTYPES = [torch.float32, torch.float64]
SHAPES = [(1,), (1, 1), (7,), (123, 7), (2048, 16), (5, 300), (3000, 1), (40_000, 3), (1, 64)]


def make_rollout(shape, dtype, device, p_term=0.05, p_trunc=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(shape, generator=g, dtype=torch.float64)
    v = torch.randn(shape, generator=g, dtype=torch.float64)
    nv = torch.randn(shape, generator=g, dtype=torch.float64)
    term = torch.rand(shape, generator=g) < p_term
    trunc = torch.rand(shape, generator=g) < p_trunc
    done = term | trunc
    cast = lambda t: t.to(dtype=dtype, device=device)  # noqa: E731
    return cast(r), cast(v), cast(nv), term.to(device), done.to(device)


def tolerances(dtype, T):
    # float32 accumulates rounding along the recursion; its length is bounded by 1 / (1 - γλ).
    return (dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64
            else dict(rtol=2e-5, atol=5e-5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, dtype, device):
    r, v, nv, term, done = make_rollout(shape, dtype, device)
    adv, ret = trpo_ext.gae(r, v, nv, term, done, 0.99, 0.95)
    ref_adv, ref_ret = gae_reference(r.cpu(), v.cpu(), nv.cpu(), term.cpu(), done.cpu(), 0.99, 0.95)
    assert adv.dtype == dtype and adv.device.type == device and adv.shape == r.shape
    assert ret.dtype == dtype and ret.shape == r.shape
    tol = tolerances(dtype, shape[0])
    torch.testing.assert_close(adv.cpu().double(), ref_adv, **tol)
    torch.testing.assert_close(ret.cpu().double(), ref_ret, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_long_horizon_no_episode_ends(dtype, device):
    # T = 200k, N = 1 takes the time-chunked path on every backend; with no episode end at all the
    # carry has to cross every chunk boundary.
    shape = (200_000, 1)
    r, v, nv, term, done = make_rollout(shape, dtype, device, p_term=0.0, p_trunc=0.0)
    adv, ret = trpo_ext.gae(r, v, nv, term, done, 0.99, 0.95)
    ref_adv, ref_ret = gae_reference(r.cpu(), v.cpu(), nv.cpu(), term.cpu(), done.cpu(), 0.99, 0.95)
    tol = tolerances(dtype, shape[0])
    torch.testing.assert_close(adv.cpu().double(), ref_adv, **tol)
    torch.testing.assert_close(ret.cpu().double(), ref_ret, **tol)


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.0, 0.5), (0.9, 0.0), (1.0, 0.0), (0.5, 1.0)])
def test_edge_discounts(gamma, lam, device):
    r, v, nv, term, done = make_rollout((300, 5), torch.float64, device)
    adv, ret = trpo_ext.gae(r, v, nv, term, done, gamma, lam)
    ref_adv, ref_ret = gae_reference(r.cpu(), v.cpu(), nv.cpu(), term.cpu(), done.cpu(), gamma, lam)
    torch.testing.assert_close(adv.cpu(), ref_adv, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ret.cpu(), ref_ret, rtol=1e-9, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(
    T=st.integers(1, 700),
    N=st.integers(1, 40),
    p_term=st.floats(0.0, 0.5),
    p_trunc=st.floats(0.0, 0.5),
    gamma=st.floats(0.0, 1.0),
    lam=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
    one_d=st.booleans(),
)
def test_property_against_reference(T, N, p_term, p_trunc, gamma, lam, seed, one_d):
    shape = (T,) if one_d else (T, N)
    for dtype in DTYPES:
        r, v, nv, term, done = make_rollout(shape, dtype, "cpu", p_term, p_trunc, seed)
        adv, ret = trpo_ext.gae(r, v, nv, term, done, gamma, lam)
        ref_adv, ref_ret = gae_reference(r, v, nv, term, done, gamma, lam)
        tol = tolerances(dtype, T)
        torch.testing.assert_close(adv.double(), ref_adv, **tol)
        torch.testing.assert_close(ret.double(), ref_ret, **tol)


# One environment: on the CPU the time axis is cut into chunks of at least 256 steps; these lengths
# fall on both sides of the chunk edges.
@pytest.mark.parametrize("T", [1, 15, 16, 17, 33, 16383, 16384, 16385, 3 * 16384 + 7, 100_003])
@pytest.mark.parametrize("one_d", [False, True])
def test_one_env_lengths(T, one_d, device):
    shape = (T,) if one_d else (T, 1)
    r, v, nv, term, done = make_rollout(shape, torch.float32, device, p_term=0.01, p_trunc=0.01,
                                        seed=T)
    adv, ret = trpo_ext.gae(r, v, nv, term, done, 0.99, 0.95)
    ref_adv, ref_ret = gae_reference(r.cpu(), v.cpu(), nv.cpu(), term.cpu(), done.cpu(), 0.99, 0.95)
    torch.testing.assert_close(adv.cpu().double(), ref_adv, **tolerances(torch.float32, T))
    torch.testing.assert_close(ret.cpu().double(), ref_ret, **tolerances(torch.float32, T))


@pytest.mark.parametrize("shape", [(100_003, 1), (100_003, 3), (70_001, 8)])
def test_cpu_result_independent_of_thread_count(shape):
    # The few-environment CPU path cuts the time axis into as many chunks as the threads can use:
    # the result on any thread count equals the one-thread result up to rounding.
    r, v, nv, term, done = make_rollout(shape, torch.float32, "cpu", p_term=0.002, p_trunc=0.002)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a1, r1 = trpo_ext.gae(r, v, nv, term, done, 0.99, 0.95)
        for threads in (2, 3, 5):
            torch.set_num_threads(threads)
            a, rt = trpo_ext.gae(r, v, nv, term, done, 0.99, 0.95)
            torch.testing.assert_close(a, a1, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(rt, r1, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(before)
    ref_adv, _ = gae_reference(r, v, nv, term, done, 0.99, 0.95)
    torch.testing.assert_close(a1.double(), ref_adv, **tolerances(torch.float32, shape[0]))


def test_one_env_terminal_next_value_is_ignored(device):
    # The TD residual selects instead of multiplying, so a NaN next value of a terminal step stays
    # out.
    r, v, nv, term, done = make_rollout((1000, 1), torch.float32, device, p_term=0.3)
    poisoned = torch.where(term, torch.full_like(nv, float("nan")), nv)
    a1, r1 = trpo_ext.gae(r, v, nv, term, done, 0.99, 0.95)
    a2, r2 = trpo_ext.gae(r, v, poisoned, term, done, 0.99, 0.95)
    assert torch.isfinite(a2).all() and torch.isfinite(r2).all()
    torch.testing.assert_close(a1, a2, rtol=0, atol=0)


def test_analytic_constant_critic(device):
    # A critic that always predicts V = c, rewards of 1, γ = 0.9, λ = 0.5, one environment:
    #   t:            0      1      2 (truncated)   3      4 (terminated)
    #   δ_t = 1 + γ·V(s') − c  unless terminated, where δ = 1 − c.
    # With c = 2, γc = 1.8: δ = (0.8, 0.8, 0.8, 0.8, −1.0).  The truncated step bootstraps from its
    # final observation (next value 2) but the recursion stops there:
    #   A_4 = −1.0;  A_3 = 0.8 + 0.45·(−1.0) = 0.35;  A_2 = 0.8 (done);
    #   A_1 = 0.8 + 0.45·0.8 = 1.16;  A_0 = 0.8 + 0.45·1.16 = 1.322.
    c = 2.0
    r = torch.ones(5, dtype=torch.float64, device=device)
    v = torch.full_like(r, c)
    nv = torch.full_like(r, c)
    terminated = torch.tensor([0, 0, 0, 0, 1], dtype=torch.bool, device=device)
    truncated = torch.tensor([0, 0, 1, 0, 0], dtype=torch.bool, device=device)
    adv, ret = trpo_ext.gae(r, v, nv, terminated, terminated | truncated, 0.9, 0.5)
    expected = torch.tensor([1.322, 1.16, 0.8, 0.35, -1.0], dtype=torch.float64)
    torch.testing.assert_close(adv.cpu(), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(ret.cpu(), expected + c, rtol=0, atol=1e-12)


def test_terminal_next_value_is_ignored(device):
    r, v, nv, term, done = make_rollout((50, 4), torch.float64, device, p_term=0.3)
    poisoned = torch.where(term, torch.full_like(nv, float("nan")), nv)
    a1, _ = trpo_ext.gae(r, v, nv, term, done, 0.99, 0.95)
    a2, _ = trpo_ext.gae(r, v, poisoned, term, done, 0.99, 0.95)
    assert torch.isfinite(a2).all()
    torch.testing.assert_close(a1, a2, rtol=0, atol=0)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.int32, torch.int64,
                                        torch.float32, torch.float64])
def test_mask_dtypes(mask_dtype, device):
    r, v, nv, term, done = make_rollout((64, 3), torch.float32, device)
    a_ref, r_ref = trpo_ext.gae(r, v, nv, term, done, 0.99, 0.95)
    a, rt = trpo_ext.gae(r, v, nv, term.to(mask_dtype), done.to(mask_dtype), 0.99, 0.95)
    torch.testing.assert_close(a, a_ref, rtol=0, atol=0)
    torch.testing.assert_close(rt, r_ref, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(dtype, device):
    # Transposed views of [N, T] storage: time-major [T, N] but not contiguous.
    r, v, nv, term, done = (t.t() for t in make_rollout((123, 33), dtype, device))
    assert not r.is_contiguous()
    adv, ret = trpo_ext.gae(r, v, nv, term, done, 0.97, 0.9)
    adv_c, ret_c = trpo_ext.gae(*(t.contiguous() for t in (r, v, nv, term, done)), 0.97, 0.9)
    torch.testing.assert_close(adv, adv_c, rtol=0, atol=0)
    torch.testing.assert_close(ret, ret_c, rtol=0, atol=0)
    # a strided slice too
    sl = [t[::2, 1::3] for t in make_rollout((66, 30), dtype, device)]
    a1, r1 = trpo_ext.gae(*sl, 0.97, 0.9)
    a2, r2 = trpo_ext.gae(*(t.contiguous() for t in sl), 0.97, 0.9)
    torch.testing.assert_close(a1, a2, rtol=0, atol=0)
    torch.testing.assert_close(r1, r2, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(0,), (0, 5), (5, 0), (0, 0)])
def test_zero_size(shape, device):
    r, v, nv, term, done = make_rollout(shape, torch.float32, device)
    adv, ret = trpo_ext.gae(r, v, nv, term, done, 0.99, 0.95)
    assert adv.shape == shape and ret.shape == shape and adv.dtype == torch.float32


@pytest.mark.parametrize("shape", [(1,), (123, 7), (3000, 2)])
def test_opcheck(shape, device):
    for dtype in DTYPES:
        r, v, nv, term, done = make_rollout(shape, dtype, device)
        torch.library.opcheck(torch.ops.trpo_ext.gae.default, (r, v, nv, term, done, 0.99, 0.95))


def test_torch_compile_fullgraph():
    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(r, v, nv, term, done):
        adv, ret = trpo_ext.gae(r, v, nv, term, done, 0.99, 0.95)
        return (adv - adv.mean()) / (adv.std() + 1e-8), ret

    args = make_rollout((64, 4), torch.float32, "cpu")
    got_adv, got_ret = f(*args)
    adv, ret = trpo_ext.gae(*args, 0.99, 0.95)
    torch.testing.assert_close(got_adv, (adv - adv.mean()) / (adv.std() + 1e-8))
    torch.testing.assert_close(got_ret, ret)


# --- bad input --------------------------------------------------------------------------------

def _good(shape=(10, 3), dtype=torch.float32):
    return list(make_rollout(shape, dtype, "cpu"))


@pytest.mark.parametrize("index,name", [(1, "values"), (2, "next_values"), (3, "terminated"),
                                        (4, "done")])
def test_rejects_shape_mismatch(index, name):
    args = _good()
    args[index] = args[index][:-1]
    with pytest.raises(ValueError, match=rf"{name} must have the shape of rewards \[10, 3\], got \[9, 3\]"):
        trpo_ext.gae(*args, 0.99, 0.95)


@pytest.mark.parametrize("shape", [(), (2, 3, 4)])
def test_rejects_bad_dims(shape):
    args = [torch.zeros(shape), torch.zeros(shape), torch.zeros(shape),
            torch.zeros(shape, dtype=torch.bool), torch.zeros(shape, dtype=torch.bool)]
    with pytest.raises(ValueError, match=r"rewards must be \[T\] or \[T, N\]"):
        trpo_ext.gae(*args, 0.99, 0.95)


@pytest.mark.parametrize("index,name", [(0, "rewards"), (1, "values"), (2, "next_values")])
def test_refuses_inputs_that_require_grad(index, name):
    # gae has no backward: a gradient would silently never reach such an input.
    args = _good()
    args[index] = args[index].clone().requires_grad_()
    with pytest.raises(ValueError, match=rf"gae is not differentiable, but {name} requires grad"):
        trpo_ext.gae(*args, 0.99, 0.95)
    with torch.no_grad():  # no graph is built: allowed, and the same values
        adv, ret = trpo_ext.gae(*args, 0.99, 0.95)
    ref_adv, ref_ret = trpo_ext.gae(*[a.detach() for a in args], 0.99, 0.95)
    assert torch.equal(adv, ref_adv) and torch.equal(ret, ref_ret)


@pytest.mark.parametrize("index,name", [(1, "values"), (4, "done")])
def test_refuses_meta_mixed_with_real_tensors(index, name):
    # Such a call reaches the fake kernel, which would return uninitialised CPU tensors.
    args = _good()
    args[index] = args[index].to("meta")
    with pytest.raises(RuntimeError, match=rf"{name} is on meta but rewards is on cpu"):
        trpo_ext.gae(*args, 0.99, 0.95)


def test_rejects_mixed_dtypes():
    args = _good()
    args[1] = args[1].double()
    with pytest.raises(TypeError, match="values must have the dtype of rewards"):
        trpo_ext.gae(*args, 0.99, 0.95)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int64])
def test_rejects_unsupported_value_dtype(dtype):
    args = _good()
    args[0], args[1], args[2] = (t.to(dtype) for t in args[:3])
    with pytest.raises(TypeError, match="rewards must be float32 or float64"):
        trpo_ext.gae(*args, 0.99, 0.95)


@pytest.mark.parametrize("name,gamma,lam", [("gamma", 1.5, 0.9), ("gamma", -0.1, 0.9),
                                            ("lam", 0.9, 1.01), ("lam", 0.9, float("nan"))])
def test_rejects_out_of_range_scalars(name, gamma, lam):
    with pytest.raises(ValueError, match=f"{name} must be in \\[0, 1\\]"):
        trpo_ext.gae(*_good(), gamma, lam)


def test_rejects_non_tensor_arguments():
    args = _good()
    args[0] = args[0].tolist()
    with pytest.raises(TypeError, match="rewards must be a torch.Tensor, got list"):
        trpo_ext.gae(*args, 0.99, 0.95)
    with pytest.raises(TypeError, match="gamma must be a real number"):
        trpo_ext.gae(*_good(), "0.99", 0.95)


def test_op_level_checks_without_wrapper():
    # The registered op checks too (C++), for callers of torch.ops.trpo_ext.gae directly.
    args = _good()
    with pytest.raises(ValueError, match="gamma must be in"):
        torch.ops.trpo_ext.gae(*args, 2.0, 0.95)
    args[3] = torch.zeros(10, 3, dtype=torch.complex64)
    with pytest.raises(TypeError, match="terminated must be bool"):
        torch.ops.trpo_ext.gae(*args, 0.9, 0.95)


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_rejects_mixed_devices():
    args = _good()
    args[2] = args[2].cuda()
    with pytest.raises(ValueError, match="next_values must be on the device of rewards"):
        trpo_ext.gae(*args, 0.99, 0.95)
