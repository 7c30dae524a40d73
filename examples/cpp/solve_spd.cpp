// Solves a symmetric positive definite system with trpo_ext's conjugate gradient from C++, and checks
// the answer: the 2-D Poisson matrix (5-point Laplacian on a 24×24 grid, n = 576) applied
// matrix-free, in float64 and float32, plus a damped solve, a breakdown and the error paths.
// Exits non-zero on any failed check (ctest runs it).
#include <trpo_ext/cg.h>

#include <cmath>
#include <cstdio>
#include <stdexcept>
#include <string>

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

// y = L v for the 5-point Laplacian on an m×m grid (Dirichlet boundary), v flattened row-major.
at::Tensor poisson(const at::Tensor& v, int64_t m) {
  const at::Tensor g = v.view({m, m});
  at::Tensor y = 4 * g;
  y.slice(0, 1).sub_(g.slice(0, 0, m - 1));
  y.slice(0, 0, m - 1).sub_(g.slice(0, 1));
  y.slice(1, 1).sub_(g.slice(1, 0, m - 1));
  y.slice(1, 0, m - 1).sub_(g.slice(1, 1));
  return y.reshape({m * m});
}

void solve_poisson(at::ScalarType dtype, double rtol) {
  const int64_t m = 24;
  const int64_t n = m * m;
  const auto opts = at::TensorOptions().dtype(dtype);
  const at::Tensor b = at::sin(at::arange(n, opts.dtype(at::kDouble)) * 0.37).to(dtype);
  int64_t calls = 0;
  trpo_ext::CGOptions options;
  options.maxiter = 1000;
  options.rtol = rtol;
  const trpo_ext::CGResult res = trpo_ext::conjugate_gradient(
      [&](const at::Tensor& v) {
        ++calls;
        return poisson(v, m);
      },
      b, options);
  const std::string tag = std::string(dtype == at::kDouble ? "float64" : "float32") + ": ";
  std::printf("%sstatus=%s iterations=%lld residual=%.3e\n", tag.c_str(),
              trpo_ext::to_string(res.status), static_cast<long long>(res.iterations),
              res.residual_norm);
  expect(res.status == trpo_ext::CGStatus::kConverged, tag + "converged");
  expect(calls == res.iterations, tag + "one matvec call per iteration");
  const double bnorm = b.to(at::kDouble).norm().item<double>();
  const at::Tensor x = res.x.to(at::kDouble);
  const double true_residual = (b.to(at::kDouble) - poisson(x, m)).norm().item<double>();
  // The recurrence's residual meets the rule; the true one stays within rounding of it.
  expect(res.residual_norm <= rtol * bnorm, tag + "residual below rtol·‖b‖");
  expect(true_residual <= 10 * rtol * bnorm, tag + "true residual ‖b − Ax‖ small");
  const double xAx = x.dot(poisson(x, m)).item<double>();
  expect(std::abs(res.xAx.item<double>() - xAx) <= 1e-4 * xAx, tag + "xAx equals xᵀAx");
}

}  // namespace

int main() {
  solve_poisson(at::kDouble, 1e-10);
  solve_poisson(at::kFloat, 1e-5);

  // Damping: (diag(d) + 0.5 I) x = b has the exact solution b / (d + 0.5).
  {
    const at::Tensor d = at::linspace(1.0, 10.0, 50, at::kDouble);
    const at::Tensor b = at::ones({50}, at::kDouble);
    trpo_ext::CGOptions options;
    options.maxiter = 100;
    options.damping = 0.5;
    const auto res = trpo_ext::conjugate_gradient([&](const at::Tensor& v) { return d * v; }, b,
                                                  options, at::zeros({50}, at::kDouble));
    const double err = (res.x - b / (d + 0.5)).abs().max().item<double>();
    expect(res.status == trpo_ext::CGStatus::kConverged && err < 1e-9, "damped diagonal solve");
  }

  // A negative definite operator stops at once with the start unchanged.
  {
    const at::Tensor b = at::ones({8}, at::kDouble);
    const auto res = trpo_ext::conjugate_gradient([](const at::Tensor& v) { return -v; }, b);
    expect(res.status == trpo_ext::CGStatus::kNonpositiveCurvature && res.iterations == 0 &&
               res.x.abs().max().item<double>() == 0.0,
           "non-positive curvature keeps the last good x");
  }

  // Exceptions from matvec propagate unchanged; bad input throws a ValueError naming the argument.
  {
    bool caught = false;
    try {
      trpo_ext::conjugate_gradient(
          [](const at::Tensor&) -> at::Tensor { throw std::runtime_error("from matvec"); },
          at::ones({4}, at::kDouble));
    } catch (const std::runtime_error& e) {
      caught = std::string(e.what()) == "from matvec";
    }
    expect(caught, "matvec exception propagates");
    std::string msg;
    try {
      trpo_ext::conjugate_gradient([](const at::Tensor& v) { return v.narrow(0, 0, 2); },
                                   at::ones({4}, at::kDouble));
    } catch (const c10::ValueError& e) {
      msg = e.what_without_backtrace();
    }
    expect(msg.find("matvec(p) must have the shape of b [4], got [2]") != std::string::npos,
           "wrong matvec shape is refused: " + msg);
  }

  std::printf("%s\n", failures ? "FAILED" : "all checks passed");
  return failures ? 1 : 0;
}
