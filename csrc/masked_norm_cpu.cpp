// Mask-weighted LayerNorm / RMSNorm on CPU (paper eq. 16-19), forward and backward.
//
// One pass per row for the statistics (accumulated in float for float/half/bfloat16 inputs, in
// double for double), one for the output. Rows run in parallel with at::parallel_for (OpenMP);
// the inner loops over features are plain, vectorisable loops. The mask is a constant (a buffer
// of the model), so it gets no gradient.
//
//   LayerNorm: mu = sum(m x)/M, var = sum(m (x-mu)^2)/M, r = 1/sqrt(var+eps), xhat = (x-mu) r,
//              y = m (xhat w + b)
//   backward:  g = dy m, dxhat = g w,
//              dx = r (dxhat - m/M (sum dxhat + xhat sum(dxhat xhat))), dw = sum_rows g xhat, db = sum_rows g
//   RMSNorm:   ms = sum(m x^2)/M, r = 1/sqrt(ms+eps), y = m x r w;  dx = r (dxhat - m/M xhat sum(dxhat xhat))
//
// Bound with TORCH_LIBRARY (ATen only, no torch/extension.h: builds in seconds).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

namespace {

template <typename T>
using acc_t = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

void check_inputs(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& weight) {
  TORCH_CHECK(x.device().is_cpu(), "masked norm (cpu-ext): x must be a CPU tensor");
  TORCH_CHECK(x.dim() >= 1, "masked norm: x must have at least one dimension");
  const int64_t d = x.size(-1);
  TORCH_CHECK(mask.dim() == 1 && mask.size(0) == d, "masked norm: mask must have shape [", d, "], got ",
              mask.sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == d, "masked norm: weight must have shape [", d, "]");
}

template <typename T, bool RMS>
void forward_rows(const T* x, const acc_t<T>* m_in, const acc_t<T>* w_in, const acc_t<T>* b_in, T* y, acc_t<T>* mean_out,
                  acc_t<T>* rstd_out, int64_t rows, int64_t d, double eps) {
  using A = acc_t<T>;
  A msum = 0;
#pragma omp simd reduction(+ : msum)
  for (int64_t j = 0; j < d; ++j) msum += m_in[j];
  const A inv_m = A(1) / msum;
  at::parallel_for(0, rows, 16, [=](int64_t begin, int64_t end) {
    // local, restrict-qualified copies: the compiler may keep them in registers and vectorise
    const A* __restrict__ m = m_in;
    const A* __restrict__ w = w_in;
    const A* __restrict__ b = b_in;
    std::vector<A> xf_buf(d);
    A* __restrict__ xf = xf_buf.data();
    for (int64_t r = begin; r < end; ++r) {
      const T* __restrict__ xr = x + r * d;
      T* __restrict__ yr = y + r * d;
      A mu = 0;
      // `omp simd reduction`: without it the compiler may not reorder (vectorise) a float sum
#pragma omp simd reduction(+ : mu)
      for (int64_t j = 0; j < d; ++j) {
        xf[j] = static_cast<A>(xr[j]);
        mu += RMS ? A(0) : m[j] * xf[j];
      }
      mu *= inv_m;
      A var = 0;
#pragma omp simd reduction(+ : var)
      for (int64_t j = 0; j < d; ++j) {
        const A c = xf[j] - mu;
        var += m[j] * c * c;
      }
      const A rstd = A(1) / std::sqrt(var * inv_m + static_cast<A>(eps));
      if (b != nullptr) {
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) yr[j] = static_cast<T>(m[j] * ((xf[j] - mu) * rstd * w[j] + b[j]));
      } else {
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) yr[j] = static_cast<T>(m[j] * (xf[j] - mu) * rstd * w[j]);
      }
      mean_out[r] = mu;
      rstd_out[r] = rstd;
    }
  });
}

template <typename T, bool RMS>
void backward_rows(const T* dy, const T* x, const acc_t<T>* m_in, const acc_t<T>* w_in, const acc_t<T>* mean,
                   const acc_t<T>* rstd, T* dx, acc_t<T>* dw_part, acc_t<T>* db_part, int64_t rows, int64_t d) {
  using A = acc_t<T>;
  A msum = 0;
#pragma omp simd reduction(+ : msum)
  for (int64_t j = 0; j < d; ++j) msum += m_in[j];
  const A inv_m = A(1) / msum;
  // dw/db: per-thread partial sums (rows are split between threads), reduced by the caller
  at::parallel_for(0, rows, 16, [=](int64_t begin, int64_t end) {
    const int tid = at::get_thread_num();
    A* __restrict__ dwp = dw_part + static_cast<int64_t>(tid) * d;
    A* __restrict__ dbp = db_part + static_cast<int64_t>(tid) * d;
    const A* __restrict__ m = m_in;
    const A* __restrict__ w = w_in;
    std::vector<A> xhat_buf(d), dxhat_buf(d);
    A* __restrict__ xhat = xhat_buf.data();
    A* __restrict__ dxhat = dxhat_buf.data();
    for (int64_t r = begin; r < end; ++r) {
      const T* __restrict__ xr = x + r * d;
      const T* __restrict__ dyr = dy + r * d;
      T* __restrict__ dxr = dx + r * d;
      const A mu = mean[r], rs = rstd[r];
      A sum_dxhat = 0, sum_dxhat_xhat = 0;
#pragma omp simd reduction(+ : sum_dxhat, sum_dxhat_xhat)
      for (int64_t j = 0; j < d; ++j) {
        const A xh = (static_cast<A>(xr[j]) - mu) * rs;
        const A g = static_cast<A>(dyr[j]) * m[j];
        const A dxh = g * w[j];
        xhat[j] = xh;
        dxhat[j] = dxh;
        sum_dxhat += dxh;
        sum_dxhat_xhat += dxh * xh;
        dwp[j] += g * xh;
        dbp[j] += g;
      }
      if (RMS) sum_dxhat = 0;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) {
        dxr[j] = static_cast<T>(rs * (dxhat[j] - m[j] * inv_m * (sum_dxhat + xhat[j] * sum_dxhat_xhat)));
      }
    }
  });
}

at::ScalarType acc_type_of(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_fwd(const at::Tensor& x_in, const at::Tensor& mask,
                                                        const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                                        double eps, bool rms) {
  check_inputs(x_in, mask, weight);
  const auto acc = acc_type_of(x_in);
  const at::Tensor x = x_in.contiguous();
  const int64_t d = x.size(-1), rows = d ? x.numel() / d : 0;
  const at::Tensor m = mask.to(acc).contiguous(), w = weight.to(acc).contiguous();
  at::Tensor b;
  if (bias.has_value() && bias->defined()) b = bias->to(acc).contiguous();
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({rows}, x.options().dtype(acc));
  at::Tensor rstd = at::empty({rows}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_norm_fwd", [&] {
    using A = acc_t<scalar_t>;
    const A* bp = b.defined() ? b.data_ptr<A>() : nullptr;
    if (rms) {
      forward_rows<scalar_t, true>(x.data_ptr<scalar_t>(), m.data_ptr<A>(), w.data_ptr<A>(), nullptr,
                                   y.data_ptr<scalar_t>(), mean.data_ptr<A>(), rstd.data_ptr<A>(), rows, d, eps);
    } else {
      forward_rows<scalar_t, false>(x.data_ptr<scalar_t>(), m.data_ptr<A>(), w.data_ptr<A>(), bp,
                                    y.data_ptr<scalar_t>(), mean.data_ptr<A>(), rstd.data_ptr<A>(), rows, d, eps);
    }
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_bwd(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                        const at::Tensor& mask, const at::Tensor& weight,
                                                        const at::Tensor& mean, const at::Tensor& rstd, bool rms) {
  check_inputs(x_in, mask, weight);
  const auto acc = acc_type_of(x_in);
  const at::Tensor x = x_in.contiguous(), dy = dy_in.to(x_in.scalar_type()).contiguous();
  const int64_t d = x.size(-1), rows = d ? x.numel() / d : 0;
  const at::Tensor m = mask.to(acc).contiguous(), w = weight.to(acc).contiguous();
  at::Tensor dx = at::empty_like(x);
  const int64_t threads = at::get_num_threads();
  at::Tensor dw_part = at::zeros({threads, d}, x.options().dtype(acc));
  at::Tensor db_part = at::zeros({threads, d}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_norm_bwd", [&] {
    using A = acc_t<scalar_t>;
    if (rms) {
      backward_rows<scalar_t, true>(dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), m.data_ptr<A>(),
                                    w.data_ptr<A>(), mean.data_ptr<A>(), rstd.data_ptr<A>(),
                                    dx.data_ptr<scalar_t>(), dw_part.data_ptr<A>(), db_part.data_ptr<A>(), rows, d);
    } else {
      backward_rows<scalar_t, false>(dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), m.data_ptr<A>(),
                                     w.data_ptr<A>(), mean.data_ptr<A>(), rstd.data_ptr<A>(),
                                     dx.data_ptr<scalar_t>(), dw_part.data_ptr<A>(), db_part.data_ptr<A>(), rows, d);
    }
  });
  return {dx, dw_part.sum(0), db_part.sum(0)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& x, const at::Tensor& mask,
                                                              const at::Tensor& weight,
                                                              const c10::optional<at::Tensor>& bias, double eps) {
  return norm_fwd(x, mask, weight, bias, eps, false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& mask,
                                                            const at::Tensor& weight, double eps) {
  return norm_fwd(x, mask, weight, c10::nullopt, eps, true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                              const at::Tensor& mask, const at::Tensor& weight,
                                                              const at::Tensor& mean, const at::Tensor& rstd) {
  return norm_bwd(dy, x, mask, weight, mean, rstd, false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                            const at::Tensor& mask, const at::Tensor& weight,
                                                            const at::Tensor& mean, const at::Tensor& rstd) {
  return norm_bwd(dy, x, mask, weight, mean, rstd, true);
}

}  // namespace

TORCH_LIBRARY(msg_ops, m) {
  m.def("masked_layer_norm_fwd(Tensor x, Tensor mask, Tensor weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("masked_layer_norm_bwd(Tensor dy, Tensor x, Tensor mask, Tensor weight, Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor)");
  m.def("masked_rms_norm_fwd(Tensor x, Tensor mask, Tensor weight, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("masked_rms_norm_bwd(Tensor dy, Tensor x, Tensor mask, Tensor weight, Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(msg_ops, CPU, m) {
  m.impl("masked_layer_norm_fwd", &layer_norm_fwd);
  m.impl("masked_layer_norm_bwd", &layer_norm_bwd);
  m.impl("masked_rms_norm_fwd", &rms_norm_fwd);
  m.impl("masked_rms_norm_bwd", &rms_norm_bwd);
}
