// Mask-weighted LayerNorm / RMSNorm CUDA kernels (paper eq. 16-19), forward and backward.
//
// Pure CUDA (no torch headers), so CI compiles this file with nvcc on machines without a GPU;
// csrc/masked_norm_cuda_bind.cpp registers the launchers as the CUDA implementation of the
// msg_ops operators when torch is built with CUDA.
//
// Layout: one block per row (grid-stride over rows), statistics accumulated in fp32, inputs and
// outputs in fp32/fp16/bf16, mask/weight/bias in fp32. Loads are vectorised (VEC elements per
// access) when the row length and pointers allow it, otherwise scalar (odd hidden sizes).
// Backward writes dx per row and accumulates dw/db per block into fp32 partial rows
// [blocks, d], reduced over blocks by a second kernel (no atomics: deterministic).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace msg {

template <typename T>
__device__ __forceinline__ float to_f(T v) { return static_cast<float>(v); }
template <>
__device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v) { return static_cast<T>(v); }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Block-wide sum of two values; `shared` holds 2 * 32 floats. Every thread gets the result.
__device__ __forceinline__ void block_sum2(float& a, float& b, float* shared) {
  for (int off = 16; off > 0; off >>= 1) {
    a += __shfl_xor_sync(0xffffffff, a, off);
    b += __shfl_xor_sync(0xffffffff, b, off);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  __syncthreads();
  if (lane == 0) {
    shared[warp] = a;
    shared[32 + warp] = b;
  }
  __syncthreads();
  a = lane < warps ? shared[lane] : 0.f;
  b = lane < warps ? shared[32 + lane] : 0.f;
  for (int off = 16; off > 0; off >>= 1) {
    a += __shfl_xor_sync(0xffffffff, a, off);
    b += __shfl_xor_sync(0xffffffff, b, off);
  }
}

// Visit the elements of one row: f(j, x_j) with VEC-wide loads when possible.
template <typename T, int VEC, typename F>
__device__ __forceinline__ void for_row(const T* __restrict__ row, int64_t d, F f) {
  if (VEC > 1) {
    const int64_t nvec = d / VEC;
    const Pack<T, VEC>* p = reinterpret_cast<const Pack<T, VEC>*>(row);
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
      Pack<T, VEC> pk = p[i];
#pragma unroll
      for (int k = 0; k < VEC; ++k) f(i * VEC + k, to_f(pk.v[k]));
    }
  } else {
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) f(j, to_f(row[j]));
  }
}

template <typename T, int VEC, bool RMS>
__global__ void masked_norm_fwd_kernel(const T* __restrict__ x, const float* __restrict__ m,
                                       const float* __restrict__ w, const float* __restrict__ b,
                                       T* __restrict__ y, float* __restrict__ mean, float* __restrict__ rstd,
                                       int64_t rows, int64_t d, float eps) {
  __shared__ float shared[64];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * d;
    float s1 = 0.f, msum = 0.f;
    for_row<T, VEC>(xr, d, [&](int64_t j, float v) {
      s1 += RMS ? m[j] * v * v : m[j] * v;
      msum += m[j];
    });
    block_sum2(s1, msum, shared);
    const float inv_m = 1.f / msum;
    float mu = RMS ? 0.f : s1 * inv_m;
    float var = 0.f, unused = 0.f;
    if (RMS) {
      var = s1 * inv_m;
    } else {
      // second pass over the (cached) row: exact two-pass variance, as the CPU kernel
      for_row<T, VEC>(xr, d, [&](int64_t j, float v) { var += m[j] * (v - mu) * (v - mu); });
      block_sum2(var, unused, shared);
      var *= inv_m;
    }
    const float rs = rsqrtf(var + eps);
    T* yr = y + r * d;
    for_row<T, VEC>(xr, d, [&](int64_t j, float v) {
      const float o = (v - mu) * rs * w[j] + (b != nullptr ? b[j] : 0.f);
      yr[j] = from_f<T>(m[j] * o);
    });
    if (threadIdx.x == 0) {
      mean[r] = mu;
      rstd[r] = rs;
    }
  }
}

template <typename T, int VEC, bool RMS>
__global__ void masked_norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                       const float* __restrict__ m, const float* __restrict__ w,
                                       const float* __restrict__ mean, const float* __restrict__ rstd,
                                       T* __restrict__ dx, float* __restrict__ dw_part, float* __restrict__ db_part,
                                       int64_t rows, int64_t d) {
  __shared__ float shared[64];
  float msum = 0.f, unused = 0.f;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) msum += m[j];
  block_sum2(msum, unused, shared);
  const float inv_m = 1.f / msum;
  float* dwp = dw_part + static_cast<int64_t>(blockIdx.x) * d;
  float* dbp = db_part + static_cast<int64_t>(blockIdx.x) * d;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * d;
    const T* dyr = dy + r * d;
    const float mu = mean[r], rs = rstd[r];
    float s_dxhat = 0.f, s_dxhat_xhat = 0.f;
    for_row<T, VEC>(xr, d, [&](int64_t j, float v) {
      const float xh = (v - mu) * rs;
      const float g = to_f(dyr[j]) * m[j];
      const float dxh = g * w[j];
      s_dxhat += dxh;
      s_dxhat_xhat += dxh * xh;
      dwp[j] += g * xh;  // this block owns partial row blockIdx.x: no race
      dbp[j] += g;
    });
    block_sum2(s_dxhat, s_dxhat_xhat, shared);
    if (RMS) s_dxhat = 0.f;
    T* dxr = dx + r * d;
    for_row<T, VEC>(xr, d, [&](int64_t j, float v) {
      const float xh = (v - mu) * rs;
      const float dxh = to_f(dyr[j]) * m[j] * w[j];
      dxr[j] = from_f<T>(rs * (dxh - m[j] * inv_m * (s_dxhat + xh * s_dxhat_xhat)));
    });
  }
}

// dw[j] = sum_b dw_part[b, j] (and db): one thread per column, fixed order (deterministic).
__global__ void reduce_partials_kernel(const float* __restrict__ dw_part, const float* __restrict__ db_part,
                                       float* __restrict__ dw, float* __restrict__ db, int blocks, int64_t d) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= d) return;
  float a = 0.f, c = 0.f;
  for (int k = 0; k < blocks; ++k) {
    a += dw_part[static_cast<int64_t>(k) * d + j];
    c += db_part[static_cast<int64_t>(k) * d + j];
  }
  dw[j] = a;
  db[j] = c;
}

inline int threads_for(int64_t d) {
  if (d >= 4096) return 512;
  if (d >= 1024) return 256;
  if (d >= 256) return 128;
  return 64;
}

template <typename T>
inline bool can_vectorise(const void* p, int64_t d, int vec) {
  return d % vec == 0 && reinterpret_cast<uintptr_t>(p) % (sizeof(T) * vec) == 0;
}

template <typename T>
void launch_masked_norm_fwd(const T* x, const float* m, const float* w, const float* b, T* y, float* mean,
                            float* rstd, int64_t rows, int64_t d, float eps, bool rms, int max_blocks,
                            cudaStream_t stream) {
  const int threads = threads_for(d);
  const int blocks = static_cast<int>(rows < max_blocks ? rows : max_blocks);
  if (blocks == 0) return;
  constexpr int VEC = 16 / sizeof(T);  // 16-byte accesses
  const bool vec = can_vectorise<T>(x, d, VEC);
#define MSG_FWD(V, R) \
  masked_norm_fwd_kernel<T, V, R><<<blocks, threads, 0, stream>>>(x, m, w, b, y, mean, rstd, rows, d, eps)
  if (vec && rms) MSG_FWD(VEC, true);
  else if (vec) MSG_FWD(VEC, false);
  else if (rms) MSG_FWD(1, true);
  else MSG_FWD(1, false);
#undef MSG_FWD
}

template <typename T>
void launch_masked_norm_bwd(const T* dy, const T* x, const float* m, const float* w, const float* mean,
                            const float* rstd, T* dx, float* dw_part, float* db_part, float* dw, float* db,
                            int64_t rows, int64_t d, bool rms, int partial_blocks, cudaStream_t stream) {
  const int threads = threads_for(d);
  const int blocks = static_cast<int>(rows < partial_blocks ? rows : partial_blocks);
  cudaMemsetAsync(dw_part, 0, sizeof(float) * partial_blocks * d, stream);
  cudaMemsetAsync(db_part, 0, sizeof(float) * partial_blocks * d, stream);
  if (blocks > 0) {
    constexpr int VEC = 16 / sizeof(T);
    const bool vec = can_vectorise<T>(x, d, VEC) && can_vectorise<T>(dy, d, VEC);
#define MSG_BWD(V, R)                                                                                       \
  masked_norm_bwd_kernel<T, V, R><<<blocks, threads, 0, stream>>>(dy, x, m, w, mean, rstd, dx, dw_part, \
                                                                  db_part, rows, d)
    if (vec && rms) MSG_BWD(VEC, true);
    else if (vec) MSG_BWD(VEC, false);
    else if (rms) MSG_BWD(1, true);
    else MSG_BWD(1, false);
#undef MSG_BWD
  }
  const int rt = 256;
  reduce_partials_kernel<<<static_cast<int>((d + rt - 1) / rt), rt, 0, stream>>>(dw_part, db_part, dw, db,
                                                                                partial_blocks, d);
}

#define MSG_INSTANTIATE(T)                                                                                     \
  template void launch_masked_norm_fwd<T>(const T*, const float*, const float*, const float*, T*, float*, \
                                          float*, int64_t, int64_t, float, bool, int, cudaStream_t);      \
  template void launch_masked_norm_bwd<T>(const T*, const T*, const float*, const float*, const float*,   \
                                          const float*, T*, float*, float*, float*, float*, int64_t,       \
                                          int64_t, bool, int, cudaStream_t);
MSG_INSTANTIATE(float)
MSG_INSTANTIATE(__half)
MSG_INSTANTIATE(__nv_bfloat16)
#undef MSG_INSTANTIATE

}  // namespace msg
