// CUDA implementations of the msg_ops masked-norm operators (schemas in masked_norm_cpu.cpp).
// Built only when torch has CUDA (setup.py); the kernels live in masked_norm_cuda.cu.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <tuple>

namespace msg {
template <typename T>
void launch_masked_norm_fwd(const T*, const float*, const float*, const float*, T*, float*, float*, int64_t,
                            int64_t, float, bool, int, cudaStream_t);
template <typename T>
void launch_masked_norm_bwd(const T*, const T*, const float*, const float*, const float*, const float*, T*,
                            float*, float*, float*, float*, int64_t, int64_t, bool, int, cudaStream_t);
}  // namespace msg

namespace {

template <typename F>
void dispatch(at::ScalarType t, F f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, "masked norm (cuda): dtype ", t, " not supported; use float32, float16 or bfloat16");
  }
}

int max_blocks(const at::Tensor& x) {
  return at::cuda::getDeviceProperties(x.get_device())->multiProcessorCount * 8;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd(const at::Tensor& x_in, const at::Tensor& mask,
                                                   const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                                   double eps, bool rms) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t d = x_in.size(-1);
  TORCH_CHECK(mask.numel() == d && weight.numel() == d, "masked norm: mask and weight must have ", d, " entries");
  const at::Tensor x = x_in.contiguous();
  const int64_t rows = d ? x.numel() / d : 0;
  const at::Tensor m = mask.to(at::kFloat).contiguous(), w = weight.to(at::kFloat).contiguous();
  at::Tensor b;
  if (bias.has_value() && bias->defined()) b = bias->to(at::kFloat).contiguous();
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({rows}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    msg::launch_masked_norm_fwd<T>(reinterpret_cast<const T*>(x.data_ptr()), m.data_ptr<float>(),
                                   w.data_ptr<float>(), b.defined() ? b.data_ptr<float>() : nullptr,
                                   reinterpret_cast<T*>(y.data_ptr()), mean.data_ptr<float>(), rstd.data_ptr<float>(),
                                   rows, d, static_cast<float>(eps), rms, max_blocks(x), stream);
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                   const at::Tensor& mask, const at::Tensor& weight,
                                                   const at::Tensor& mean, const at::Tensor& rstd, bool rms) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t d = x_in.size(-1);
  const at::Tensor x = x_in.contiguous(), dy = dy_in.to(x_in.scalar_type()).contiguous();
  const int64_t rows = d ? x.numel() / d : 0;
  const at::Tensor m = mask.to(at::kFloat).contiguous(), w = weight.to(at::kFloat).contiguous();
  const int parts = max_blocks(x);
  at::Tensor dx = at::empty_like(x);
  auto f32 = x.options().dtype(at::kFloat);
  at::Tensor dw_part = at::empty({parts, d}, f32), db_part = at::empty({parts, d}, f32);
  at::Tensor dw = at::empty({d}, f32), db = at::empty({d}, f32);
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    msg::launch_masked_norm_bwd<T>(reinterpret_cast<const T*>(dy.data_ptr()), reinterpret_cast<const T*>(x.data_ptr()),
                                   m.data_ptr<float>(), w.data_ptr<float>(), mean.data_ptr<float>(),
                                   rstd.data_ptr<float>(), reinterpret_cast<T*>(dx.data_ptr()), dw_part.data_ptr<float>(),
                                   db_part.data_ptr<float>(), dw.data_ptr<float>(), db.data_ptr<float>(), rows, d, rms,
                                   parts, stream);
  });
  return {dx, dw, db};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ln_fwd(const at::Tensor& x, const at::Tensor& m, const at::Tensor& w,
                                                      const c10::optional<at::Tensor>& b, double eps) {
  return fwd(x, m, w, b, eps, false);
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_fwd(const at::Tensor& x, const at::Tensor& m, const at::Tensor& w,
                                                       double eps) {
  return fwd(x, m, w, c10::nullopt, eps, true);
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> ln_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& m,
                                                      const at::Tensor& w, const at::Tensor& mean, const at::Tensor& rs) {
  return bwd(dy, x, m, w, mean, rs, false);
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& m,
                                                       const at::Tensor& w, const at::Tensor& mean, const at::Tensor& rs) {
  return bwd(dy, x, m, w, mean, rs, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(msg_ops, CUDA, m) {
  m.impl("masked_layer_norm_fwd", &ln_fwd);
  m.impl("masked_layer_norm_bwd", &ln_bwd);
  m.impl("masked_rms_norm_fwd", &rms_fwd);
  m.impl("masked_rms_norm_bwd", &rms_bwd);
}
