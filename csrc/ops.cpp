// The one place where every trpo_ext op schema is declared.  Backend files (csrc/cpu/*_cpu.cpp,
// csrc/cuda/*_cuda.cu) register implementations with TORCH_LIBRARY_IMPL; the dispatcher picks the
// backend from the tensors.  Importing the compiled module `trpo_ext._C` runs these registrations.
#include <Python.h>
#include <torch/library.h>
#include <torch/version.h>

#ifndef TRPO_EXT_CUDA_ARCHS
#define TRPO_EXT_CUDA_ARCHS ""
#endif
#ifndef TRPO_EXT_CUDA_VERSION
#define TRPO_EXT_CUDA_VERSION ""
#endif

TORCH_LIBRARY(trpo_ext, m) {
  // --- GAE (gae_*) -------------------------------------------------------------------------------
  // advantages, returns for time-major [T] or [T, N] rollouts.  Masks are bool, or 0/1 values of any
  // integer or floating dtype (converted to bool by the shared checks in gae.h).
  m.def(
      "gae(Tensor rewards, Tensor values, Tensor next_values, Tensor terminated, Tensor done, "
      "float gamma, float lam) -> (Tensor, Tensor)");

  // --- conjugate gradient (cg_*) -----------------------------------------------------------------
  // Solves (A + damping·I) x = b with the operator applied by the caller between steps (see cg.h).
  // cg_init: (r, p, state) for the start x0 (zero when absent; then Ax0 = matvec(x0) is required).
  m.def(
      "cg_init(Tensor b, Tensor? x0, Tensor? Ax0, float damping, float rtol, float atol) "
      "-> (Tensor, Tensor, Tensor)");
  // cg_step: one iteration given Ap = matvec(p); x, r, p and state are updated in place, and the step
  // does nothing once state says the solve has stopped.
  m.def(
      "cg_step(Tensor(a!) x, Tensor(b!) r, Tensor(c!) p, Tensor Ap, Tensor(d!) state, "
      "float damping) -> ()");
  // cg_finish: xᵀ(b − r) = xᵀ(A + damping·I)x as a 0-d tensor of b's dtype (also kept in state).
  m.def("cg_finish(Tensor b, Tensor x, Tensor r, Tensor(a!) state) -> Tensor");

  // --- KL divergence and surrogate (kl_*) --------------------------------------------------------
  // Batch means of KL(π_old ‖ π_new) summed over action dimensions (Gaussian: means [B, A],
  // log_stds [A] or [B, A]; categorical: logits [B, K]).  Returns a 0-d tensor.
  m.def(
      "kl_diag_gaussian(Tensor mean_old, Tensor log_std_old, Tensor mean_new, Tensor log_std_new) "
      "-> Tensor");
  m.def("kl_categorical(Tensor logits_old, Tensor logits_new) -> Tensor");
  // The line search's fused pass: (surrogate, mean_kl, max_kl), surrogate = mean over the batch of
  // exp(log π_new(a) − logp_old) · advantages.
  m.def(
      "kl_surrogate_diag_gaussian(Tensor mean_old, Tensor log_std_old, Tensor mean_new, "
      "Tensor log_std_new, Tensor actions, Tensor logp_old, Tensor advantages) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "kl_surrogate_categorical(Tensor logits_old, Tensor logits_new, Tensor actions, "
      "Tensor logp_old, Tensor advantages) -> (Tensor, Tensor, Tensor)");
  // Gradients with respect to the new distribution's parameters of
  // grad_mean_kl · mean_kl + grad_surrogate · surrogate (the surrogate term only when
  // grad_surrogate is given, which then needs actions, logp_old and advantages).  The upstream
  // gradients are 0-d tensors read on the device.  Gaussian: (grad_mean_new, grad_log_std_new), the
  // latter shaped like log_std_new.
  m.def(
      "kl_diag_gaussian_backward(Tensor grad_mean_kl, Tensor? grad_surrogate, Tensor mean_old, "
      "Tensor log_std_old, Tensor mean_new, Tensor log_std_new, Tensor? actions, "
      "Tensor? logp_old, Tensor? advantages) -> (Tensor, Tensor)");
  // The Fisher metric products (kl.h): the Hessian of the batch-mean KL at new = old applied to
  // directions in the distribution's parameters.  Gaussian: (M u_mean [B, A], M u_log_std shaped
  // like log_std); categorical: M u [B, K].
  m.def(
      "kl_metric_diag_gaussian(Tensor log_std, Tensor u_mean, Tensor u_log_std) -> (Tensor, Tensor)");
  m.def("kl_metric_categorical(Tensor logits, Tensor u) -> Tensor");
  m.def(
      "kl_categorical_backward(Tensor grad_mean_kl, Tensor? grad_surrogate, Tensor logits_old, "
      "Tensor logits_new, Tensor? actions, Tensor? logp_old, Tensor? advantages) -> Tensor");

  // --- networks (act_*) --------------------------------------------------------------------------
  // (tanh(x), 1 − tanh(x)²) in one pass, for the linearised networks of policies.py; not
  // differentiable.
  m.def("tanh_and_derivative(Tensor x) -> (Tensor, Tensor)");
}

namespace {

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                          "trpo_ext compiled ops (registered under torch.ops.trpo_ext)", -1,
                          nullptr};

}  // namespace

// The extension is imported only for its registrations and build facts; ops are reached through
// torch.ops.trpo_ext, never through pybind functions (those would bypass fake tensors and compile).
PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&module_def);
  if (mod == nullptr) return nullptr;
#ifdef TRPO_EXT_WITH_CUDA
  PyModule_AddIntConstant(mod, "with_cuda", 1);
  PyModule_AddStringConstant(mod, "cuda_version", TRPO_EXT_CUDA_VERSION);
#else
  PyModule_AddIntConstant(mod, "with_cuda", 0);
#endif
  PyModule_AddStringConstant(mod, "cuda_archs", TRPO_EXT_CUDA_ARCHS);
  PyModule_AddIntConstant(mod, "torch_version_major", TORCH_VERSION_MAJOR);
  PyModule_AddIntConstant(mod, "torch_version_minor", TORCH_VERSION_MINOR);
  // Deprecated, kept for one release: the CPU kernels are compiled once and vectorised by the
  // compiler, with no run-time choice of instruction set.
  PyModule_AddStringConstant(mod, "cpu_isa", "compiler");
  PyModule_AddStringConstant(mod, "cpu_isa_supported", "compiler");
  return mod;
}
