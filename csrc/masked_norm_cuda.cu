// Mask-weighted LayerNorm / RMSNorm CUDA kernels (paper eq. 16-19), forward and backward.
//
// Pure CUDA (no torch headers), so CI compiles this file with nvcc on machines without a GPU;
// csrc/masked_norm_cuda_bind.cpp registers the launchers as the CUDA implementation of the
// msg_ops operators when torch is built with CUDA.
//
// Two paths, both one block per row (grid-stride over rows), statistics in fp32, inputs and outputs
// in fp32/fp16/bf16, mask/weight/bias in fp32:
//  * fast path (row length a multiple of 16 bytes; up to 512 threads x 4 packs of 16 bytes for
//    bf16/fp16, x 8 for fp32: rows of up to 16384 values): the row is loaded once
//    into registers with 16-byte accesses and every pass (mean, variance, output; or the two
//    gradient sums and dx) runs on registers, so x is read once and y written once (forward), and
//    x, dy read once and dx written once (backward): the memory traffic of a plain fused norm.
//    dw/db accumulate in the block's shared memory across its rows (each thread owns its
//    columns: no atomics) and are written once per block as fp32 partial rows [blocks, d].
//  * generic path (odd sizes, misaligned pointers, very wide rows): scalar loops that re-read the
//    row from L1/L2 for each pass and accumulate dw/db partial rows in global memory.
// The partial rows are summed over blocks by a second kernel in a fixed order (deterministic).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <type_traits>

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


// ---------------------------------------------------------------------------------------------
// Fast path: whole row in registers, kept as raw 16-byte packs (bf16: 4 registers per 8 values)
// and widened to fp32 on use. Thread t owns packs t, t + blockDim, ... (ITEMS of them). While a row
// is reduced and written, the block's next row is already being loaded (PF: prefetch), so each
// block keeps memory busy through its reductions.

// Chan et al.'s pairwise combination of (weight, mean, M2): the mask-weighted mean and variance
// (eq. 16-17) in one block reduction instead of two, without the cancellation of E[x^2] - E[x]^2.
__device__ __forceinline__ void chan_combine(float& w, float& mu, float& m2, float w_b, float mu_b, float m2_b) {
  const float wt = w + w_b;
  if (wt <= 0.f) return;
  const float delta = mu_b - mu, f = __fdividef(w_b, wt);
  mu += delta * f;
  m2 += m2_b + delta * delta * w * f;
  w = wt;
}

// Block-wide (weight, mean, M2); `shared` holds 3 * 32 floats. Every thread gets the result.
__device__ __forceinline__ void block_chan(float& w, float& mu, float& m2, float* shared) {
  for (int off = 16; off > 0; off >>= 1)
    chan_combine(w, mu, m2, __shfl_xor_sync(0xffffffff, w, off), __shfl_xor_sync(0xffffffff, mu, off),
                 __shfl_xor_sync(0xffffffff, m2, off));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  __syncthreads();
  if (lane == 0) {
    shared[warp] = w;
    shared[32 + warp] = mu;
    shared[64 + warp] = m2;
  }
  __syncthreads();
  w = lane < warps ? shared[lane] : 0.f;
  mu = lane < warps ? shared[32 + lane] : 0.f;
  m2 = lane < warps ? shared[64 + lane] : 0.f;
  for (int off = 16; off > 0; off >>= 1)
    chan_combine(w, mu, m2, __shfl_xor_sync(0xffffffff, w, off), __shfl_xor_sync(0xffffffff, mu, off),
                 __shfl_xor_sync(0xffffffff, m2, off));
}

// Per-pack arithmetic shared by the register and warp paths (VEC values of one row).
// Forward output, re-masked (eq. 19): m * ((x - mu) * rstd * w + b).
template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> norm_out_pack(const Pack<T, VEC>& xp, const Pack<float, VEC>& mp,
                                                      const Pack<float, VEC>& wp, const Pack<float, VEC>& bp,
                                                      float mu, float rs) {
  Pack<T, VEC> out;
#pragma unroll
  for (int k = 0; k < VEC; ++k) out.v[k] = from_f<T>(mp.v[k] * ((to_f(xp.v[k]) - mu) * rs * wp.v[k] + bp.v[k]));
  return out;
}

// Backward, first pass over a pack: the row sums s_a = sum dxhat, s_b = sum dxhat * xhat (dxhat =
// dy m w, the gradient through the output mask), and the pack's dw/db terms added to `acc`, laid out
// [k][packs] for dw then [VEC + k][packs] for db (consecutive packs on consecutive words).
template <typename T, int VEC>
__device__ __forceinline__ void grad_sums_pack(const Pack<T, VEC>& xp, const Pack<T, VEC>& gp,
                                               const Pack<float, VEC>& mp, const Pack<float, VEC>& wp, float mu,
                                               float rs, float& s_a, float& s_b, float* acc, int packs, int p) {
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const float xh = (to_f(xp.v[k]) - mu) * rs;
    const float g = to_f(gp.v[k]) * mp.v[k];
    const float dxh = g * wp.v[k];
    s_a += dxh;
    s_b += dxh * xh;
    acc[k * packs + p] += g * xh;
    acc[(VEC + k) * packs + p] += g;
  }
}

// Backward, second pass: dx = rstd (dxhat - m / sum(m) (s_a + xhat s_b)) (s_a = 0 for RMSNorm).
template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> dx_pack(const Pack<T, VEC>& xp, const Pack<T, VEC>& gp,
                                                const Pack<float, VEC>& mp, const Pack<float, VEC>& wp, float mu,
                                                float rs, float inv_m, float s_a, float s_b) {
  Pack<T, VEC> out;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const float xh = (to_f(xp.v[k]) - mu) * rs;
    const float dxh = to_f(gp.v[k]) * mp.v[k] * wp.v[k];
    out.v[k] = from_f<T>(rs * (dxh - mp.v[k] * inv_m * (s_a + xh * s_b)));
  }
  return out;
}

template <typename T, int VEC, int ITEMS>
__device__ __forceinline__ void load_row(Pack<T, VEC> (&dst)[ITEMS], const T* row, int packs) {
  const Pack<T, VEC>* src = reinterpret_cast<const Pack<T, VEC>*>(row);
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int p = threadIdx.x + i * blockDim.x;  // < 4096: 32-bit indices
    if (p < packs) dst[i] = src[p];
  }
}

template <typename T, int VEC, int ITEMS, bool RMS>
__global__ void __launch_bounds__(512) reg_fwd_kernel(const T* __restrict__ x, const float* __restrict__ m,
                                                      const float* __restrict__ w, const float* __restrict__ b,
                                                      T* __restrict__ y, float* __restrict__ mean,
                                                      float* __restrict__ rstd, int64_t rows, int64_t d, float eps) {
  __shared__ float shared[96];
  using P = Pack<T, VEC>;
  using FP = Pack<float, VEC>;
  constexpr bool PF = ITEMS <= 4;  // prefetch while registers allow (<= 64 bytes per thread per row)
  const int packs = static_cast<int>(d / VEC);
  // The mask is read in all three passes of every row: keep it in registers (loaded once per
  // block) so those reads don't compete with x and y for L1 bandwidth.
  FP mk[ITEMS];
  // this thread's mask weight, and the whole row's (constant across rows)
  float wt = 0.f, unused = 0.f;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int p = threadIdx.x + i * blockDim.x;  // < 4096: 32-bit indices
    mk[i] = FP{};
    if (p < packs) {
      mk[i] = reinterpret_cast<const FP*>(m)[p];
#pragma unroll
      for (int k = 0; k < VEC; ++k) wt += mk[i].v[k];
    }
  }
  float msum = wt;
  block_sum2(msum, unused, shared);
  const float inv_m = 1.f / msum;
  P cur[ITEMS], nxt[ITEMS];
  int64_t r = blockIdx.x;
  if (PF && r < rows) load_row<T, VEC, ITEMS>(cur, x + r * d, packs);
  for (; r < rows; r += gridDim.x) {
    if (PF) {
      if (r + gridDim.x < rows) load_row<T, VEC, ITEMS>(nxt, x + (r + gridDim.x) * d, packs);
    } else {
      load_row<T, VEC, ITEMS>(cur, x + r * d, packs);
    }
    float mu = 0.f, var;
    if (RMS) {
      float s2 = 0.f;
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const int p = threadIdx.x + i * blockDim.x;  // < 4096: 32-bit indices
        if (p < packs) {
          const FP& mp = mk[i];
#pragma unroll
          for (int k = 0; k < VEC; ++k) s2 += mp.v[k] * to_f(cur[i].v[k]) * to_f(cur[i].v[k]);
        }
      }
      block_sum2(s2, unused, shared);
      var = s2 * inv_m;
    } else {  // thread-local two-pass mean and M2 on registers, then one block-wide Chan reduction
      float s1 = 0.f;
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const int p = threadIdx.x + i * blockDim.x;  // < 4096: 32-bit indices
        if (p < packs) {
          const FP& mp = mk[i];
#pragma unroll
          for (int k = 0; k < VEC; ++k) s1 += mp.v[k] * to_f(cur[i].v[k]);
        }
      }
      float tw = wt, tmu = wt > 0.f ? s1 / wt : 0.f, tm2 = 0.f;
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const int p = threadIdx.x + i * blockDim.x;  // < 4096: 32-bit indices
        if (p < packs) {
          const FP& mp = mk[i];
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const float c = to_f(cur[i].v[k]) - tmu;
            tm2 += mp.v[k] * c * c;
          }
        }
      }
      block_chan(tw, tmu, tm2, shared);
      mu = tmu;
      var = tm2 * inv_m;
    }
    const float rs = rsqrtf(var + eps);
    P* yr = reinterpret_cast<P*>(y + r * d);
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int p = threadIdx.x + i * blockDim.x;  // < 4096: 32-bit indices
      if (p < packs) {
        FP bp{};
        if (b != nullptr) bp = reinterpret_cast<const FP*>(b)[p];
        yr[p] = norm_out_pack<T, VEC>(cur[i], mk[i], reinterpret_cast<const FP*>(w)[p], bp, mu, rs);
      }
    }
    if (threadIdx.x == 0) {
      mean[r] = mu;
      rstd[r] = rs;
    }
    if (PF) {
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) cur[i] = nxt[i];
    }
  }
}

// Backward on registers; dw/db partial sums in dynamic shared memory, laid out [VEC][packs] per
// gradient so that consecutive threads touch consecutive words (no bank conflicts).
template <typename T, int VEC, int ITEMS, bool RMS>
__global__ void __launch_bounds__(512) reg_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                                      const float* __restrict__ m, const float* __restrict__ w,
                                                      const float* __restrict__ mean, const float* __restrict__ rstd,
                                                      T* __restrict__ dx, float* __restrict__ dw_part,
                                                      float* __restrict__ db_part, int64_t rows, int64_t d) {
  __shared__ float shared[64];
  extern __shared__ float acc[];  // dw: acc[k * packs + p], db: acc[(VEC + k) * packs + p]
  using P = Pack<T, VEC>;
  using FP = Pack<float, VEC>;
  constexpr bool PF = ITEMS <= 2;  // two tensors per row: prefetch while <= 64 bytes per thread
  const int packs = static_cast<int>(d / VEC);
  const FP* mv = reinterpret_cast<const FP*>(m);
  const FP* wv = reinterpret_cast<const FP*>(w);
  float msum = 0.f, unused = 0.f;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int p = threadIdx.x + i * blockDim.x;  // < 4096: 32-bit indices
    if (p < packs) {
      const FP mp = mv[p];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        msum += mp.v[k];
        acc[k * packs + p] = 0.f;
        acc[(VEC + k) * packs + p] = 0.f;
      }
    }
  }
  block_sum2(msum, unused, shared);
  const float inv_m = 1.f / msum;
  P xs[ITEMS], gs[ITEMS], xn[ITEMS], gn[ITEMS];
  int64_t r = blockIdx.x;
  if (PF && r < rows) {
    load_row<T, VEC, ITEMS>(xs, x + r * d, packs);
    load_row<T, VEC, ITEMS>(gs, dy + r * d, packs);
  }
  for (; r < rows; r += gridDim.x) {
    if (PF) {
      if (r + gridDim.x < rows) {
        load_row<T, VEC, ITEMS>(xn, x + (r + gridDim.x) * d, packs);
        load_row<T, VEC, ITEMS>(gn, dy + (r + gridDim.x) * d, packs);
      }
    } else {
      load_row<T, VEC, ITEMS>(xs, x + r * d, packs);
      load_row<T, VEC, ITEMS>(gs, dy + r * d, packs);
    }
    const float mu = mean[r], rs = rstd[r];
    float s_a = 0.f, s_b = 0.f;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int p = threadIdx.x + i * blockDim.x;  // < 4096: 32-bit indices
      if (p < packs) {
        // this thread owns these columns of acc: no race
        grad_sums_pack<T, VEC>(xs[i], gs[i], mv[p], wv[p], mu, rs, s_a, s_b, acc, packs, p);
      }
    }
    block_sum2(s_a, s_b, shared);
    if (RMS) s_a = 0.f;
    P* dxr = reinterpret_cast<P*>(dx + r * d);
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int p = threadIdx.x + i * blockDim.x;  // < 4096: 32-bit indices
      if (p < packs) {
        dxr[p] = dx_pack<T, VEC>(xs[i], gs[i], mv[p], wv[p], mu, rs, inv_m, s_a, s_b);
      }
    }
    if (PF) {
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        xs[i] = xn[i];
        gs[i] = gn[i];
      }
    }
  }
  // Each thread flushes the columns it owns (the only ones it wrote): no synchronisation needed.
  FP* dwp = reinterpret_cast<FP*>(dw_part + static_cast<int64_t>(blockIdx.x) * d);
  FP* dbp = reinterpret_cast<FP*>(db_part + static_cast<int64_t>(blockIdx.x) * d);
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int p = threadIdx.x + i * blockDim.x;  // < 4096: 32-bit indices
    if (p < packs) {
      FP a, c;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        a.v[k] = acc[k * packs + p];
        c.v[k] = acc[(VEC + k) * packs + p];
      }
      dwp[p] = a;
      dbp[p] = c;
    }
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
inline bool aligned(const void* p, int bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// Fast-path geometry: ITEMS packs per thread, at most 512 threads (so __launch_bounds__(512) leaves
// 128 registers per thread); ITEMS grows first so each thread has several 16-byte loads in flight.
struct RegGeometry {
  int items = 0, threads = 0;  // items == 0: use the generic path
};

template <typename T>
RegGeometry reg_geometry(const void* x, const void* y, const float* m, const float* w, const float* b, int64_t d) {
  constexpr int VEC = 16 / sizeof(T);
  RegGeometry g;
  if (d % VEC != 0 || !aligned<T>(x, 16) || !aligned<T>(y, 16) || !aligned<T>(m, 4 * VEC) ||
      !aligned<T>(w, 4 * VEC) || !aligned<T>(b, 4 * VEC))
    return g;
  const int64_t packs = d / VEC;
  const int max_items = sizeof(T) == 4 ? 8 : 4;  // 8 packs of 2-byte types spill registers
  for (int items = 1; items <= max_items; items *= 2) {
    if ((packs + items - 1) / items <= 512) {
      g.items = items;
      g.threads = static_cast<int>(((packs + items - 1) / items + 31) / 32 * 32);
      return g;
    }
  }
  return g;
}

// ---------------------------------------------------------------------------------------------
// Warp-per-row path for narrow rows (at most 32 lanes x 8 packs of 16 bytes: hidden <= 2048 in
// bf16/fp16, <= 1024 in fp32). A block-per-row kernel spends most of a narrow row's time in its
// two __syncthreads block reductions; here each warp owns whole rows, reduces with shuffles only,
// and the block's 4 warps stream independent rows. Mask, weight and bias sit in shared memory
// (read by every row); the backward keeps each warp's dw/db partial sums in shared memory
// ([k][packs] per gradient: consecutive lanes touch consecutive words) and the block adds its
// warps' rows in a fixed order before writing one partial row: deterministic, as the block path.
// Selected when MSG_NORM_WARP_ROWS=1 (read per call) until its bandwidth is measured on a GPU.
constexpr int kWarpRowsWarps = 4;

__device__ __forceinline__ float warp_sum(float v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffff, v, off);
  return v;
}

template <typename T, int VEC, int ITEMS, bool RMS>
__global__ void __launch_bounds__(32 * kWarpRowsWarps)
    warp_fwd_kernel(const T* __restrict__ x, const float* __restrict__ m, const float* __restrict__ w,
                    const float* __restrict__ b, T* __restrict__ y, float* __restrict__ mean,
                    float* __restrict__ rstd, int64_t rows, int64_t d, float eps) {
  extern __shared__ float4 smem4[];  // float4: 16-byte aligned for the packed reads below
  float* ms = reinterpret_cast<float*>(smem4);
  float* ws = ms + d;
  float* bs = ws + d;
  using P = Pack<T, VEC>;
  using FP = Pack<float, VEC>;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    ms[j] = m[j];
    ws[j] = w[j];
    bs[j] = b != nullptr ? b[j] : 0.f;
  }
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int packs = static_cast<int>(d / VEC);
  float msum = 0.f;
  for (int64_t j = lane; j < d; j += 32) msum += ms[j];
  const float inv_m = 1.f / warp_sum(msum);
  const FP* mv = reinterpret_cast<const FP*>(ms);
  const FP* wv = reinterpret_cast<const FP*>(ws);
  const FP* bv = reinterpret_cast<const FP*>(bs);
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpRowsWarps + warp; r < rows;
       r += static_cast<int64_t>(gridDim.x) * kWarpRowsWarps) {
    P xs[ITEMS];
    const P* xr = reinterpret_cast<const P*>(x + r * d);
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int p = lane + 32 * i;
      if (p < packs) xs[i] = xr[p];
    }
    // warp-wide sum over the row of m_j * g(x_j), every lane gets it
    auto row_sum = [&](auto g) {
      float acc = 0.f;
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const int p = lane + 32 * i;
        if (p < packs) {
          const FP mp = mv[p];
#pragma unroll
          for (int k = 0; k < VEC; ++k) acc += mp.v[k] * g(to_f(xs[i].v[k]));
        }
      }
      return warp_sum(acc);
    };
    float mu = 0.f, var;
    if (RMS) {
      var = row_sum([](float v) { return v * v; }) * inv_m;
    } else {  // exact two-pass mean and variance on the registers (eq. 17)
      mu = row_sum([](float v) { return v; }) * inv_m;
      var = row_sum([mu](float v) { return (v - mu) * (v - mu); }) * inv_m;
    }
    const float rs = rsqrtf(var + eps);
    P* yr = reinterpret_cast<P*>(y + r * d);
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int p = lane + 32 * i;
      if (p < packs) {
        yr[p] = norm_out_pack<T, VEC>(xs[i], mv[p], wv[p], bv[p], mu, rs);
      }
    }
    if (lane == 0) {
      mean[r] = mu;
      rstd[r] = rs;
    }
  }
}

template <typename T, int VEC, int ITEMS, bool RMS>
__global__ void __launch_bounds__(32 * kWarpRowsWarps)
    warp_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ m,
                    const float* __restrict__ w, const float* __restrict__ mean, const float* __restrict__ rstd,
                    T* __restrict__ dx, float* __restrict__ dw_part, float* __restrict__ db_part, int64_t rows,
                    int64_t d) {
  extern __shared__ float4 smem4[];
  float* ms = reinterpret_cast<float*>(smem4);
  float* ws = ms + d;
  float* acc_all = ws + d;  // per warp: dw acc[k * packs + p], then db acc[(VEC + k) * packs + p]
  using P = Pack<T, VEC>;
  using FP = Pack<float, VEC>;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    ms[j] = m[j];
    ws[j] = w[j];
  }
  for (int64_t j = threadIdx.x; j < 2 * kWarpRowsWarps * d; j += blockDim.x) acc_all[j] = 0.f;
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int packs = static_cast<int>(d / VEC);
  float* acc = acc_all + static_cast<int64_t>(warp) * 2 * d;
  float msum = 0.f;
  for (int64_t j = lane; j < d; j += 32) msum += ms[j];
  const float inv_m = 1.f / warp_sum(msum);
  const FP* mv = reinterpret_cast<const FP*>(ms);
  const FP* wv = reinterpret_cast<const FP*>(ws);
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpRowsWarps + warp; r < rows;
       r += static_cast<int64_t>(gridDim.x) * kWarpRowsWarps) {
    P xs[ITEMS], gs[ITEMS];
    const P* xr = reinterpret_cast<const P*>(x + r * d);
    const P* gr = reinterpret_cast<const P*>(dy + r * d);
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int p = lane + 32 * i;
      if (p < packs) {
        xs[i] = xr[p];
        gs[i] = gr[p];
      }
    }
    const float mu = mean[r], rs = rstd[r];
    float s_a = 0.f, s_b = 0.f;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int p = lane + 32 * i;
      if (p < packs) {
        // this lane owns these columns of its warp's rows
        grad_sums_pack<T, VEC>(xs[i], gs[i], mv[p], wv[p], mu, rs, s_a, s_b, acc, packs, p);
      }
    }
    s_a = RMS ? 0.f : warp_sum(s_a);
    s_b = warp_sum(s_b);
    P* dxr = reinterpret_cast<P*>(dx + r * d);
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int p = lane + 32 * i;
      if (p < packs) {
        dxr[p] = dx_pack<T, VEC>(xs[i], gs[i], mv[p], wv[p], mu, rs, inv_m, s_a, s_b);
      }
    }
  }
  __syncthreads();
  // the block's partial row: its warps' sums added in warp order (deterministic)
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    const int64_t p = j / VEC, k = j % VEC;
    float a = 0.f, c = 0.f;
#pragma unroll
    for (int v = 0; v < kWarpRowsWarps; ++v) {
      a += acc_all[v * 2 * d + k * packs + p];
      c += acc_all[v * 2 * d + (VEC + k) * packs + p];
    }
    dw_part[static_cast<int64_t>(blockIdx.x) * d + j] = a;
    db_part[static_cast<int64_t>(blockIdx.x) * d + j] = c;
  }
}

// Packs per lane for the warp path (0: not selected): opted in, aligned, and narrow enough.
template <typename T>
int warp_items(const void* x, const void* y, const float* m, const float* w, const float* b, int64_t d) {
  constexpr int VEC = 16 / sizeof(T);
  const char* env = std::getenv("MSG_NORM_WARP_ROWS");
  if (env == nullptr || env[0] != '1' || d == 0 || d % VEC != 0 || !aligned<T>(x, 16) || !aligned<T>(y, 16) ||
      !aligned<T>(m, 4 * VEC) || !aligned<T>(w, 4 * VEC) || !aligned<T>(b, 4 * VEC))
    return 0;
  const int64_t per_lane = (d / VEC + 31) / 32;
  for (int items = 1; items <= 8; items *= 2)
    if (per_lane <= items) return items;
  return 0;
}

// Blocks for the fast paths: as many as fit on the device at once (each then streams its rows; a
// backward block's dw/db rows are written to the partial buffer once, so fewer blocks = less
// partial traffic).
template <typename K>
int resident_blocks(K kernel, int threads, size_t smem) {
  int device = 0, sms = 0, per_sm = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (smem > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem);
  return sms * (per_sm > 0 ? per_sm : 0);
}

// A fast-path kernel's compile-time variant: packs per thread (or lane) and RMS vs LayerNorm.
template <int IT, bool R>
struct Variant {
  static constexpr int items = IT;
  static constexpr bool rms = R;
};

// Launch `pick(Variant<items, rms>{})` (a kernel) on the resident number of blocks, clamped to
// [least, most]; returns the blocks launched (0: none, the caller takes another path).
template <typename Pick, typename... Args>
int launch_resident(Pick pick, int items, bool rms, int threads, size_t smem, int64_t most, int64_t least,
                    cudaStream_t stream, Args... args) {
  int blocks = 0;
  auto go = [&](auto variant) {
    auto kernel = pick(variant);
    int64_t n = resident_blocks(kernel, threads, smem);
    if (n > most) n = most;
    if (n < least) n = least;
    blocks = static_cast<int>(n);
    if (blocks > 0) kernel<<<blocks, threads, smem, stream>>>(args...);
  };
  switch (items) {
    case 1: if (rms) go(Variant<1, true>{}); else go(Variant<1, false>{}); break;
    case 2: if (rms) go(Variant<2, true>{}); else go(Variant<2, false>{}); break;
    case 4: if (rms) go(Variant<4, true>{}); else go(Variant<4, false>{}); break;
    default: if (rms) go(Variant<8, true>{}); else go(Variant<8, false>{}); break;
  }
  return blocks;
}

template <typename T>
void launch_masked_norm_fwd(const T* x, const float* m, const float* w, const float* b, T* y, float* mean,
                            float* rstd, int64_t rows, int64_t d, float eps, bool rms, int max_blocks,
                            cudaStream_t stream) {
  const int blocks = static_cast<int>(rows < max_blocks ? rows : max_blocks);
  if (blocks == 0) return;
  constexpr int VEC = 16 / sizeof(T);  // 16-byte accesses
  const int wi = warp_items<T>(x, y, m, w, b, d);
  if (wi > 0) {
    const int64_t groups = (rows + kWarpRowsWarps - 1) / kWarpRowsWarps;
    launch_resident([](auto v) { return warp_fwd_kernel<T, VEC, decltype(v)::items, decltype(v)::rms>; }, wi, rms,
                    32 * kWarpRowsWarps, 3 * sizeof(float) * static_cast<size_t>(d), groups, 1, stream,
                    x, m, w, b, y, mean, rstd, rows, d, eps);
    return;
  }
  const RegGeometry g = reg_geometry<T>(x, y, m, w, b, d);
  if (g.items > 0) {
    launch_resident([](auto v) { return reg_fwd_kernel<T, VEC, decltype(v)::items, decltype(v)::rms>; }, g.items,
                    rms, g.threads, 0, rows, 1, stream, x, m, w, b, y, mean, rstd, rows, d, eps);
    return;
  }
  const int threads = threads_for(d);
  const bool vec = can_vectorise<T>(x, d, VEC) && can_vectorise<T>(y, d, VEC);
#define MSG_FWD(V, R) \
  masked_norm_fwd_kernel<T, V, R><<<blocks, threads, 0, stream>>>(x, m, w, b, y, mean, rstd, rows, d, eps)
  if (vec && rms) MSG_FWD(VEC, true);
  else if (vec) MSG_FWD(VEC, false);
  else if (rms) MSG_FWD(1, true);
  else MSG_FWD(1, false);
#undef MSG_FWD
}

inline size_t max_dynamic_smem() {
  int device = 0, optin = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  return static_cast<size_t>(optin) - 64 * sizeof(float);  // the static reduction buffer
}

template <typename T>
void launch_masked_norm_bwd(const T* dy, const T* x, const float* m, const float* w, const float* mean,
                            const float* rstd, T* dx, float* dw_part, float* db_part, float* dw, float* db,
                            int64_t rows, int64_t d, bool rms, int partial_blocks, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  const int rt = 256;
  const int reduce_grid = static_cast<int>((d + rt - 1) / rt);
  const int64_t most = rows < partial_blocks ? rows : partial_blocks;
  const int wi = aligned<T>(dy, 16) ? warp_items<T>(x, dx, m, w, nullptr, d) : 0;
  const size_t warp_smem = (2 + 2 * kWarpRowsWarps) * sizeof(float) * static_cast<size_t>(d);
  RegGeometry g = reg_geometry<T>(x, dx, m, w, nullptr, d);
  if (!aligned<T>(dy, 16)) g.items = 0;
  const size_t reg_smem = 2 * sizeof(float) * static_cast<size_t>(d);
  int blocks = 0;
  if (wi > 0 && rows > 0 && warp_smem <= max_dynamic_smem()) {
    const int64_t groups = (rows + kWarpRowsWarps - 1) / kWarpRowsWarps;
    blocks = launch_resident([](auto v) { return warp_bwd_kernel<T, VEC, decltype(v)::items, decltype(v)::rms>; },
                             wi, rms, 32 * kWarpRowsWarps, warp_smem, groups < most ? groups : most, 0, stream,
                             dy, x, m, w, mean, rstd, dx, dw_part, db_part, rows, d);
  }
  if (blocks == 0 && g.items > 0 && rows > 0 && reg_smem <= max_dynamic_smem()) {
    blocks = launch_resident([](auto v) { return reg_bwd_kernel<T, VEC, decltype(v)::items, decltype(v)::rms>; },
                             g.items, rms, g.threads, reg_smem, most, 0, stream,
                             dy, x, m, w, mean, rstd, dx, dw_part, db_part, rows, d);
  }
  if (blocks > 0) {
    reduce_partials_kernel<<<reduce_grid, rt, 0, stream>>>(dw_part, db_part, dw, db, blocks, d);
    return;
  }
  // generic path: partial rows accumulated in global memory, so they start at zero
  const int threads = threads_for(d);
  blocks = static_cast<int>(most);
  cudaMemsetAsync(dw_part, 0, sizeof(float) * partial_blocks * d, stream);
  cudaMemsetAsync(db_part, 0, sizeof(float) * partial_blocks * d, stream);
  if (blocks > 0) {
    const bool vec = can_vectorise<T>(x, d, VEC) && can_vectorise<T>(dy, d, VEC) && can_vectorise<T>(dx, d, VEC);
#define MSG_BWD(V, R)                                                                                       \
  masked_norm_bwd_kernel<T, V, R><<<blocks, threads, 0, stream>>>(dy, x, m, w, mean, rstd, dx, dw_part, \
                                                                  db_part, rows, d)
    if (vec && rms) MSG_BWD(VEC, true);
    else if (vec) MSG_BWD(VEC, false);
    else if (rms) MSG_BWD(1, true);
    else MSG_BWD(1, false);
#undef MSG_BWD
  }
  reduce_partials_kernel<<<reduce_grid, rt, 0, stream>>>(dw_part, db_part, dw, db, partial_blocks, d);
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
