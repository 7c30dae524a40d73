// The loop of tanh_and_derivative (act_cpu.cpp), included once per instruction set inside a
// namespace, after vmath.h; no include guard, includes nothing itself.
template <typename scalar_t>
void tanh_deriv_range(const scalar_t* __restrict x, scalar_t* __restrict y, scalar_t* __restrict d,
                      int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t t = vtanh(x[i]);
    y[i] = t;
    d[i] = scalar_t(1) - t * t;
  }
}
