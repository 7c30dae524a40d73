"""trpo_ext.conjugate_gradient against scipy's CG and numpy's solve, breakdowns, xᵀAx, opcheck, bad input."""
import numpy as np
import pytest
import scipy.sparse.linalg
import torch

import trpo_ext
from trpo_ext._reference import conjugate_gradient_reference

from conftest import CUDA, DEVICES

DTYPES = [torch.float32, torch.float64]


# --- test matrices (float64 numpy), each with the damping the solver is given ----------------------

def spd_with_condition(n, cond, seed):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eig = np.logspace(0, np.log10(cond), n)
    return (q * eig) @ q.T


def poisson_2d(m):
    """The 5-point Laplacian on an m×m grid with Dirichlet boundaries (n = m²)."""
    t = 2 * np.eye(m) - np.eye(m, k=1) - np.eye(m, k=-1)
    return np.kron(t, np.eye(m)) + np.kron(np.eye(m), t)


def low_rank(n, rank, seed):
    u = np.random.default_rng(seed).standard_normal((n, rank))
    return u @ u.T


# (name, A, damping): the system solved is (A + damping·I) x = b.
PROBLEMS = [
    ("cond10", spd_with_condition(40, 1e1, 0), 0.0),
    ("cond1e2", spd_with_condition(60, 1e2, 1), 0.0),
    ("cond1e3", spd_with_condition(60, 1e3, 2), 0.0),
    ("cond1e4", spd_with_condition(80, 1e4, 3), 0.0),
    ("poisson", poisson_2d(9), 0.0),
    ("lowrank_damped", low_rank(50, 5, 4), 0.1),
]
PROBLEM_IDS = [p[0] for p in PROBLEMS]


def rhs(n, seed=10):
    return np.random.default_rng(seed).standard_normal(n)


def as_t(a, dtype, device):
    return torch.as_tensor(a, dtype=dtype, device=device)


def scipy_cg(A, b, x0, maxiter, rtol):
    """scipy's CG on the damped matrix, and the number of iterations it ran (via its callback)."""
    count = [0]

    def cb(_):
        count[0] += 1

    x, _ = scipy.sparse.linalg.cg(A, b, x0=x0, rtol=rtol, atol=0.0, maxiter=maxiter, callback=cb)
    return x, count[0]


# --- against scipy: the same iterations give the same iterate --------------------------------------

@pytest.mark.parametrize("with_x0", [False, True])
@pytest.mark.parametrize("name,A,damping", PROBLEMS, ids=PROBLEM_IDS)
def test_fixed_iterations_match_scipy(name, A, damping, with_x0, device):
    n = A.shape[0]
    Ad = A + damping * np.eye(n)
    b = rhs(n)
    x0 = rhs(n, seed=11) if with_x0 else None
    At = as_t(A, torch.float64, device)
    for k in (1, 4, 15):
        ours = trpo_ext.conjugate_gradient(
            lambda v: At @ v, as_t(b, torch.float64, device),
            None if x0 is None else as_t(x0, torch.float64, device),
            maxiter=k, rtol=0.0, damping=damping)
        ref, ref_iters = scipy_cg(Ad, b, x0, k, rtol=0.0)
        assert ours.status == "maxiter" and ours.iterations == k == ref_iters
        scale = np.linalg.norm(ref)
        np.testing.assert_allclose(ours.x.cpu().numpy(), ref, rtol=0, atol=1e-9 * scale)


@pytest.mark.parametrize("name,A,damping", PROBLEMS, ids=PROBLEM_IDS)
def test_iteration_count_matches_scipy(name, A, damping, device):
    n = A.shape[0]
    Ad = A + damping * np.eye(n)
    b = rhs(n)
    At = as_t(A, torch.float64, device)
    ours = trpo_ext.conjugate_gradient(At, as_t(b, torch.float64, device), maxiter=10 * n,
                                       rtol=1e-8, damping=damping)
    ref, ref_iters = scipy_cg(Ad, b, None, 10 * n, rtol=1e-8)
    assert ours.status == "converged"
    if ref_iters <= n:
        assert ours.iterations == ref_iters
    else:
        # Past n iterations (cond ≥ 1e3 here) finite-precision CG has lost the orthogonality of its
        # residuals, and rounding alone moves the count: perturbing cond1e4's matrix by 1e-15 of
        # its largest entry gave 274–289 iterations for ours and 276–295 for scipy's (8 draws),
        # and the matrix itself comes from LAPACK, whose last bits differ between CPUs.  So the
        # counts agree only to within that spread.
        assert abs(ours.iterations - ref_iters) <= 0.08 * ref_iters
    np.testing.assert_allclose(ours.x.cpu().numpy(), ref, rtol=0,
                               atol=1e-8 * np.linalg.cond(Ad) * np.linalg.norm(ref))


def test_float32_fixed_iterations_match_scipy(device):
    # scipy runs in float32 for float32 arrays: both are float32 CG, they agree to float32 rounding.
    A = spd_with_condition(50, 1e2, 5).astype(np.float32)
    b = rhs(50).astype(np.float32)
    ours = trpo_ext.conjugate_gradient(as_t(A, torch.float32, device),
                                       as_t(b, torch.float32, device), maxiter=8, rtol=0.0)
    ref, _ = scipy_cg(A, b, None, 8, rtol=0.0)
    np.testing.assert_allclose(ours.x.cpu().numpy(), ref, rtol=0, atol=2e-5 * np.linalg.norm(ref))


# --- converged solves against numpy.linalg.solve ---------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_x0", [False, True])
@pytest.mark.parametrize("name,A,damping", PROBLEMS, ids=PROBLEM_IDS)
def test_converged_matches_solve(name, A, damping, with_x0, dtype, device):
    n = A.shape[0]
    Ad = A + damping * np.eye(n)
    b = rhs(n)
    exact = np.linalg.solve(Ad, b)
    cond = np.linalg.cond(Ad)
    rtol = 1e-10 if dtype == torch.float64 else 1e-4
    At = as_t(A, dtype, device)
    x0 = as_t(rhs(n, seed=12), dtype, device) if with_x0 else None
    res = trpo_ext.conjugate_gradient(lambda v: At @ v, as_t(b, dtype, device), x0,
                                      maxiter=20 * n, rtol=rtol, damping=damping)
    assert res.status == "converged", res
    assert 0 < res.iterations <= 20 * n
    assert res.x.dtype == dtype and res.x.device.type == device and res.x.shape == (n,)
    x = res.x.cpu().double().numpy()
    # The stopping rule itself, on the residual the recurrence tracked …
    assert res.residual_norm <= rtol * np.linalg.norm(b)
    # … which stays within rounding (eps · cond) of the true residual, and the error is bounded by
    # cond · residual.  Both bounds stay below 1 (x = 0 has true residual ‖b‖ and error 1) for
    # every problem: float32 at cond 1e4 measures a true residual of 5e-4·‖b‖ and an error of 3e-4.
    true_res = np.linalg.norm(b - Ad @ x)
    eps = np.finfo(np.float64 if dtype == torch.float64 else np.float32).eps
    assert true_res <= (2 * rtol + 10 * eps * cond) * np.linalg.norm(b)
    err = np.linalg.norm(x - exact) / np.linalg.norm(exact)
    assert err <= min(cond * (2 * rtol + 10 * eps), 1e-2)


# --- xᵀ(A + damping·I)x ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_x0", [False, True])
@pytest.mark.parametrize("maxiter", [1, 5, 200])
def test_xAx_equals_explicit_product(maxiter, with_x0, dtype, device):
    A, damping = low_rank(50, 8, 6) + np.eye(50), 0.3
    b = rhs(50)
    At = as_t(A, dtype, device)
    x0 = as_t(rhs(50, 13), dtype, device) if with_x0 else None
    res = trpo_ext.conjugate_gradient(At, as_t(b, dtype, device), x0, maxiter=maxiter,
                                      rtol=1e-12, damping=damping)
    assert res.xAx.shape == () and res.xAx.dtype == dtype and res.xAx.device.type == device
    x = res.x.cpu().double().numpy()
    explicit = x @ (A + damping * np.eye(50)) @ x
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    assert abs(res.xAx.item() - explicit) <= tol * abs(explicit)


# --- breakdowns ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_indefinite_stops_with_last_good_x(dtype, device):
    eig = np.array([3.0, 1.0, -2.0, 0.5, 2.0, -0.25, 4.0, 1.5])
    q, _ = np.linalg.qr(np.random.default_rng(7).standard_normal((8, 8)))
    A = (q * eig) @ q.T
    b = rhs(8)
    At = as_t(A, dtype, device)
    res = trpo_ext.conjugate_gradient(At, as_t(b, dtype, device), maxiter=50, rtol=1e-12)
    ref = conjugate_gradient_reference(lambda v: At.cpu().double() @ v, torch.tensor(b),
                                       maxiter=50, rtol=1e-12)
    assert res.status == ref[3] == "nonpositive_curvature"
    assert res.iterations == ref[1]
    assert torch.isfinite(res.x).all()
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(res.x.cpu().double(), ref[0], rtol=tol, atol=tol)
    # The last good x is the iterate after res.iterations iterations.
    again = trpo_ext.conjugate_gradient(At, as_t(b, dtype, device), maxiter=res.iterations,
                                        rtol=0.0)
    assert again.status == "maxiter"
    torch.testing.assert_close(res.x, again.x, rtol=0, atol=0)


@pytest.mark.parametrize("with_x0", [False, True])
def test_negative_definite_keeps_start(with_x0, device):
    b = torch.ones(5, dtype=torch.float64, device=device)
    x0 = torch.full_like(b, 2.0) if with_x0 else None
    res = trpo_ext.conjugate_gradient(lambda v: -v, b, x0, maxiter=10)
    assert res.status == "nonpositive_curvature" and res.iterations == 0
    torch.testing.assert_close(res.x, x0 if with_x0 else torch.zeros_like(b))


def test_nonfinite_matvec_keeps_last_good_x(device):
    A = as_t(spd_with_condition(30, 50, 8), torch.float64, device)
    b = as_t(rhs(30), torch.float64, device)
    calls = [0]

    def matvec(v):
        calls[0] += 1
        out = A @ v
        if calls[0] == 4:
            out[3] = float("nan")
        return out

    res = trpo_ext.conjugate_gradient(matvec, b, maxiter=20, rtol=0.0)
    assert res.status == "nonfinite" and res.iterations == 3
    good = trpo_ext.conjugate_gradient(A, b, maxiter=3, rtol=0.0)
    torch.testing.assert_close(res.x, good.x, rtol=0, atol=0)
    torch.testing.assert_close(res.xAx, good.xAx, rtol=0, atol=0)


def test_nonfinite_b(device):
    b = torch.tensor([1.0, float("inf"), 2.0], dtype=torch.float64, device=device)
    res = trpo_ext.conjugate_gradient(lambda v: v, b, maxiter=5)
    assert res.status == "nonfinite" and res.iterations == 0
    assert torch.equal(res.x, torch.zeros_like(b))


def test_steps_after_stop_change_nothing(device):
    # What lets CUDA poll for convergence only every few iterations: once the state says stop, a
    # step (even with a garbage matvec result) leaves x, r, p and the state as they were.
    A = as_t(spd_with_condition(20, 10, 9), torch.float64, device)
    b = as_t(rhs(20), torch.float64, device)
    ops = torch.ops.trpo_ext
    x = torch.zeros_like(b)
    r, p, state = ops.cg_init(b, None, None, 0.0, 1e-6, 0.0)
    for _ in range(100):
        ops.cg_step(x, r, p, A @ p, state, 0.0)
    assert state[5].item() == 1  # converged
    before = [t.clone() for t in (x, r, p, state)]
    for _ in range(3):
        ops.cg_step(x, r, p, torch.full_like(p, float("nan")), state, 0.0)
    for t, t0 in zip((x, r, p, state), before):
        assert torch.equal(t, t0)


# --- small, empty, trivial ------------------------------------------------------------------------

def test_zero_rhs_converges_at_zero(device):
    b = torch.zeros(7, device=device)
    res = trpo_ext.conjugate_gradient(lambda v: 2 * v, b, maxiter=5, rtol=0.0)
    assert res.status == "converged" and res.iterations == 0 and torch.equal(res.x, b)
    assert res.xAx.item() == 0.0


def test_empty(device):
    b = torch.zeros(0, dtype=torch.float64, device=device)
    res = trpo_ext.conjugate_gradient(lambda v: v, b, maxiter=5)
    assert res.x.shape == (0,) and res.status == "converged" and res.iterations == 0


def test_one_dimensional_exact_in_one_iteration(device):
    b = torch.tensor([3.0], dtype=torch.float64, device=device)
    # rtol at rounding level, not 0: the CUDA kernels fuse r − α·(Ap + damping·p) into FMAs, which
    # leave a residual of an ulp (1.7e-16 here, seen on an H200) where the CPU's rounding gives 0.
    res = trpo_ext.conjugate_gradient(lambda v: 4 * v, b, maxiter=10, rtol=1e-12, damping=2.0)
    assert res.iterations == 1 and res.status == "converged"
    assert res.x.item() == pytest.approx(0.5)


def test_maxiter_zero(device):
    b = torch.ones(4, device=device)
    x0 = torch.full_like(b, 0.5)
    res = trpo_ext.conjugate_gradient(lambda v: v, b, x0, maxiter=0)
    assert res.status == "maxiter" and res.iterations == 0
    assert torch.equal(res.x, x0) and res.x.data_ptr() != x0.data_ptr()
    assert res.residual_norm == pytest.approx(1.0)


def test_noncontiguous_rhs(device):
    A = as_t(spd_with_condition(30, 100, 14), torch.float64, device)
    wide = torch.randn(30, 2, dtype=torch.float64, device=device)
    b = wide[:, 1]
    assert not b.is_contiguous()
    res = trpo_ext.conjugate_gradient(A, b, maxiter=10, rtol=0.0)
    ref = trpo_ext.conjugate_gradient(A, b.contiguous(), maxiter=10, rtol=0.0)
    assert torch.equal(res.x, ref.x) and res.x.is_contiguous()


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_diagonal_matches_reference(dtype, device):
    # Long enough for the parallel chunked passes on the CPU and many blocks on CUDA.
    n = 300_000
    g = torch.Generator().manual_seed(0)
    diag = (torch.rand(n, generator=g, dtype=torch.float64) * 99 + 1).to(dtype=dtype, device=device)
    b = torch.randn(n, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    res = trpo_ext.conjugate_gradient(lambda v: diag * v, b, maxiter=12, rtol=0.0, damping=0.5)
    ref = conjugate_gradient_reference(lambda v: diag.cpu().double() * v, b.cpu().double(),
                                       maxiter=12, rtol=0.0, damping=0.5)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(res.x.cpu().double(), ref[0], rtol=tol, atol=tol * ref[0].abs().max().item())
    assert res.residual_norm == pytest.approx(ref[2], rel=100 * tol)
    assert res.xAx.item() == pytest.approx(ref[4].item(), rel=tol)


# Sizes around the CPU passes' fixed reduction chunks (2**14 elements): one short chunk, several
# chunks with a ragged end (swept on the calling thread), and enough chunks for the thread pool
# (above 2**18 elements).
CHUNKED_SIZES = [1000, 5 * 2**14 + 123, 2**18 + 3 * 2**14 + 7]


def _chunked_solve(n, dtype, with_x0):
    """A damped diagonal solve touching every CPU pass (init with or without x0, steps, finish)."""
    g = torch.Generator().manual_seed(n)
    diag = (torch.rand(n, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    b = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    x0 = torch.randn(n, generator=g, dtype=torch.float64).to(dtype) if with_x0 else None
    res = trpo_ext.conjugate_gradient(lambda v: diag * v, b, x0, maxiter=8, rtol=0.0, damping=0.3)
    return res.x, res.xAx, res.residual_norm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", CHUNKED_SIZES)
def test_result_independent_of_thread_count(n, dtype):
    old = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(_chunked_solve(n, dtype, with_x0=True))
    finally:
        torch.set_num_threads(old)
    for x, xAx, rnorm in results[1:]:
        assert torch.equal(x, results[0][0]) and torch.equal(xAx, results[0][1])
        assert rnorm == results[0][2]


# --- the operator ---------------------------------------------------------------------------------

def test_square_tensor_operator_dense_and_sparse(device):
    A = poisson_2d(6)
    b = rhs(36)
    dense = as_t(A, torch.float64, device)
    by_callable = trpo_ext.conjugate_gradient(lambda v: dense @ v, as_t(b, torch.float64, device),
                                              maxiter=7, rtol=0.0)
    by_tensor = trpo_ext.conjugate_gradient(dense, as_t(b, torch.float64, device), maxiter=7,
                                            rtol=0.0)
    by_sparse = trpo_ext.conjugate_gradient(dense.to_sparse_csr(), as_t(b, torch.float64, device),
                                            maxiter=7, rtol=0.0)
    torch.testing.assert_close(by_tensor.x, by_callable.x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(by_sparse.x, by_callable.x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("maxiter,rtol,with_x0,expected", [
    (6, 0.0, False, 6), (6, 0.0, True, 7), (500, 1e-8, False, None),
])
def test_one_matvec_per_iteration(maxiter, rtol, with_x0, expected):
    A = torch.as_tensor(spd_with_condition(40, 100, 15))
    b = torch.as_tensor(rhs(40))
    calls = []
    res = trpo_ext.conjugate_gradient(lambda v: calls.append(1) or A @ v, b,
                                      torch.zeros(40, dtype=torch.float64) if with_x0 else None,
                                      maxiter=maxiter, rtol=rtol)
    # The CPU stops exactly: one call per iteration, plus one for the start when x0 is given.
    assert len(calls) == res.iterations + int(with_x0)
    if expected is not None:
        assert len(calls) == expected


def test_matvec_exception_propagates_unchanged(device):
    err = KeyError("from matvec")
    calls = [0]

    def matvec(v):
        calls[0] += 1
        if calls[0] == 3:
            raise err
        return diag * v

    diag = torch.arange(1.0, 11.0, device=device)
    with pytest.raises(KeyError) as info:
        trpo_ext.conjugate_gradient(matvec, torch.randn(10, device=device), maxiter=5, rtol=0.0)
    assert info.value is err


def test_sync_false_then_synced(device):
    A = as_t(spd_with_condition(20, 10, 16), torch.float64, device)
    b = as_t(rhs(20), torch.float64, device)
    lazy = trpo_ext.conjugate_gradient(A, b, maxiter=4, rtol=0.0, sync=False)
    assert lazy.iterations is None and lazy.status is None and lazy.residual_norm is None
    full = lazy.synced()
    eager = trpo_ext.conjugate_gradient(A, b, maxiter=4, rtol=0.0)
    assert (full.iterations, full.status) == (eager.iterations, eager.status) == (4, "maxiter")
    assert full.residual_norm == eager.residual_norm
    assert torch.equal(lazy.x, eager.x) and torch.equal(lazy.xAx, eager.xAx)


# --- bad input ------------------------------------------------------------------------------------

def _ok():
    return torch.eye(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(b=torch.ones(2, 2, dtype=torch.float64)), ValueError, r"b must be a 1-D tensor, got shape \[2, 2\]"),
    (dict(b=torch.ones(4, dtype=torch.int64)), TypeError, r"b must be float32 or float64, got (Long|torch.int64)"),
    (dict(b=[1.0, 2.0]), TypeError, r"b must be a torch.Tensor, got list"),
    (dict(matvec=lambda v: v[:2]), ValueError, r"matvec\(p\) must have the shape of b \[4\], got \[2\]"),
    (dict(matvec=lambda v: v.float()), TypeError, r"matvec\(p\) must have the dtype of b \(Double\), got Float"),
    (dict(matvec=lambda v: torch.empty(4, dtype=torch.float64, device="meta")), ValueError,
     r"matvec\(p\) must be on the device of b \(cpu\), got meta"),
    (dict(matvec=lambda v: v.numpy()), TypeError, r"matvec must return a torch.Tensor, got ndarray"),
    (dict(matvec="A"), TypeError, r"matvec must be a callable or a square tensor, got str"),
    (dict(matvec=torch.eye(3, dtype=torch.float64)), ValueError, r"matvec is a 3x3 matrix but b has 4 entries"),
    (dict(matvec=torch.ones(4, 3, dtype=torch.float64)), ValueError, r"square matrix, got shape \[4, 3\]"),
    (dict(matvec=torch.eye(4)), TypeError, r"matvec \(a matrix\) must have the dtype of b"),
    (dict(maxiter=-1), ValueError, r"maxiter must be >= 0, got -1"),
    (dict(maxiter=2.5), TypeError, r"maxiter must be an int"),
    (dict(damping=-0.1), ValueError, r"damping must be a finite number >= 0, got -0.1"),
    (dict(rtol=-1e-3), ValueError, r"rtol must be a finite number >= 0"),
    (dict(atol=-1.0), ValueError, r"atol must be a finite number >= 0"),
    (dict(atol=float("nan")), ValueError, r"atol must be a finite number >= 0"),
    (dict(check_every=0), ValueError, r"check_every must be >= 1"),
    (dict(x0=torch.ones(3, dtype=torch.float64)), ValueError, r"x0 must have the shape of b \[4\], got \[3\]"),
    (dict(x0=torch.ones(4)), TypeError, r"x0 must have the dtype of b"),
    (dict(x0=[0.0] * 4), TypeError, r"x0 must be a torch.Tensor"),
    (dict(sync=None), TypeError, r"sync must be a bool, got NoneType"),
])
def test_bad_input(kwargs, exc, match):
    A, b = _ok()
    args = dict(matvec=A, b=b, x0=None, maxiter=3)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        trpo_ext.conjugate_gradient(**args)


def test_bad_x0_matvec_named():
    b = torch.ones(4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"matvec\(x0\) must have the shape of b"):
        trpo_ext.conjugate_gradient(lambda v: v[:3], b, torch.zeros_like(b))


# --- ops: opcheck ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 37, 20_000])
def test_opcheck(n, dtype, device):
    g = torch.Generator().manual_seed(n)
    b = torch.randn(n, generator=g, dtype=dtype).to(device)
    x0 = torch.randn(n, generator=g, dtype=dtype).to(device)
    d = torch.rand(n, generator=g, dtype=dtype).to(device) + 1
    ops = torch.ops.trpo_ext
    torch.library.opcheck(ops.cg_init, (b, None, None, 0.1, 1e-6, 0.0))
    torch.library.opcheck(ops.cg_init, (b, x0, d * x0, 0.1, 1e-6, 0.0))
    r, p, state = ops.cg_init(b, None, None, 0.1, 0.0, 0.0)
    x = torch.zeros_like(b)
    torch.library.opcheck(ops.cg_step, (x, r, p, d * p, state, 0.1))
    torch.library.opcheck(ops.cg_finish, (b, x, r, state))


# --- CUDA only ------------------------------------------------------------------------------------

cuda_only = pytest.mark.skipif(not CUDA, reason="needs a GPU and a CUDA build of trpo_ext")


@cuda_only
@pytest.mark.parametrize("check_every", [2, 3, 7])
def test_cuda_polling_equals_exact_stop(check_every):
    A = spd_with_condition(200, 1e3, 17)
    b = rhs(200)
    Ac = torch.as_tensor(A, device="cuda")
    bc = torch.as_tensor(b, device="cuda")
    calls = [0]

    def matvec(v):
        calls[0] += 1
        return Ac @ v

    # check_every=1 stops exactly; the reductions are deterministic, so polling less often must
    # give the very same bits.
    exact = trpo_ext.conjugate_gradient(Ac, bc, maxiter=1000, rtol=1e-8, check_every=1)
    gpu = trpo_ext.conjugate_gradient(matvec, bc, maxiter=1000, rtol=1e-8, check_every=check_every)
    assert gpu.status == exact.status == "converged"
    assert gpu.iterations == exact.iterations
    assert gpu.iterations <= calls[0] < gpu.iterations + check_every
    assert torch.equal(gpu.x, exact.x) and torch.equal(gpu.xAx, exact.xAx)
    # And the GPU agrees with the CPU up to rounding.
    cpu = trpo_ext.conjugate_gradient(torch.as_tensor(A), torch.as_tensor(b), maxiter=1000, rtol=1e-8)
    assert abs(cpu.iterations - gpu.iterations) <= 2
    torch.testing.assert_close(gpu.x.cpu(), cpu.x, rtol=1e-6, atol=1e-8)


@cuda_only
def test_cuda_no_sync_without_tolerance():
    A = torch.as_tensor(spd_with_condition(64, 100, 18), device="cuda")
    b = torch.as_tensor(rhs(64), device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        res = trpo_ext.conjugate_gradient(A, b, maxiter=10, rtol=0.0, sync=False)
        step = res.x * torch.sqrt(2 * 0.01 / res.xAx)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = trpo_ext.conjugate_gradient(A.cpu(), b.cpu(), maxiter=10, rtol=0.0)
    torch.testing.assert_close(step.cpu(), ref.x * (2 * 0.01 / ref.xAx) ** 0.5)


@cuda_only
@pytest.mark.parametrize("rtol", [0.0, 1e-6])
def test_cuda_graph_replay(rtol):
    A = torch.as_tensor(spd_with_condition(128, 1e2, 19), device="cuda", dtype=torch.float32)
    b1 = torch.randn(128, device="cuda")
    b2 = torch.randn(128, device="cuda")
    solver = trpo_ext.CGGraph(lambda v: A @ v, b1, maxiter=30, rtol=rtol, damping=0.1)
    for b in (b2, b1):
        got = solver.replay(b)
        want = trpo_ext.conjugate_gradient(A, b, maxiter=30, rtol=rtol, damping=0.1)
        assert (got.iterations, got.status) == (want.iterations, want.status)
        torch.testing.assert_close(got.x, want.x, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.xAx, want.xAx, rtol=1e-5, atol=1e-6)
