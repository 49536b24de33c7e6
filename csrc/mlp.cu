// pydlx: fully fused MLP forward in CUDA C++ with tensor-core MMA (WMMA 16x16x16), for the `cuda` backend.
//
// y = act_L(... act_1(x @ W0^T + b0) ...), every layer at most 128 wide, fp16 or bf16, fp32 accumulation. The
// hidden and last activations are each a name and a parameter (alpha: leaky_relu's slope, elu's alpha, else 0).
// One block of 8 warps takes 128 rows; each warp owns 16 of them through every layer. Per layer the block stages
// the layer's weights in shared memory (zero-padded to W x W, W = the padded width) and each warp multiplies its
// 16 activation rows (shared memory, input dtype) by them into W/16 fp32 accumulator fragments, then applies bias
// and activation on the way back into its own activation rows. Only y is written: activations never leave the chip.
// The first layer streams x and W0 through the same buffers in W-wide chunks, so the input width is free.
// Inference only for now: training (saving the activations, backward) runs the Triton kernels.
//
// Weight pointers and sizes travel in a by-value kernel parameter (no device allocation: CUDA-graph safe).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include "torch_stable.h"

#include <vector>

#include "activations.cuh"
#include "dispatch.h"

namespace pydlx {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kMaxLayers = 16;
constexpr int kMaxWidth = 128;
constexpr int kRows = 128;  // rows per block
constexpr int kWarps = 8;   // 16 rows per warp
constexpr int kThreads = kWarps * 32;

template <typename T>
struct MlpLayers {
  const T* w[kMaxLayers];
  const T* b[kMaxLayers];  // nullptr: no bias
  int n_in[kMaxLayers];
  int n_out[kMaxLayers];
  int count;
};

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Shared-memory layout for padded width W: rows padded by 8 elements (16 bytes) against bank conflicts; every
// fragment pointer stays 32-byte aligned and every leading dimension a multiple of 8 (16-bit) or 4 (fp32).
template <int W>
struct Smem {
  static constexpr int lda = W + 8;  // activations [kRows][lda]
  static constexpr int ldw = W + 8;  // weights [W][ldw], row n holds W[n][:]
  static constexpr int ldc = W + 4;  // per-warp fp32 staging [16][ldc]
  template <typename T>
  static constexpr size_t bytes() {
    return sizeof(T) * (kRows * lda + W * ldw) + sizeof(float) * kWarps * 16 * ldc;
  }
};

// sw[n][k] = w[n][k0 + k] for n < n_out and k0 + k < n_in, else 0.
template <typename T, int W>
__device__ void stage_weights(T* sw, const T* __restrict__ w, int n_out, int n_in, int k0) {
  for (int i = threadIdx.x; i < W * W; i += kThreads) {
    const int n = i / W, k = i % W;
    sw[n * Smem<W>::ldw + k] = (n < n_out && k0 + k < n_in) ? w[static_cast<int64_t>(n) * n_in + k0 + k]
                                                             : from_float<T>(0.f);
  }
}

// acc[j] += A(this warp's 16 rows of sa) @ B(j-th 16 columns of sw^T), over the W-wide K dimension.
template <typename T, int W>
__device__ void warp_mma(const T* sa, const T* sw, wmma::fragment<wmma::accumulator, 16, 16, 16, float> (&acc)[W / 16]) {
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int kk = 0; kk < W / 16; ++kk) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
    wmma::load_matrix_sync(a, sa + warp * 16 * Smem<W>::lda + kk * 16, Smem<W>::lda);
#pragma unroll
    for (int j = 0; j < W / 16; ++j) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;  // B[k][n] = W[n][k]
      wmma::load_matrix_sync(b, sw + j * 16 * Smem<W>::ldw + kk * 16, Smem<W>::ldw);
      wmma::mma_sync(acc[j], a, b, acc[j]);
    }
  }
}

template <typename T, int W>
__global__ void __launch_bounds__(kThreads) mlp_fwd_kernel(const T* __restrict__ x, int64_t M, int K0,
                                                           MlpLayers<T> p, T* __restrict__ y, int act,
                                                           float alpha, int last_act, float last_alpha) {
  extern __shared__ __align__(128) unsigned char smem[];
  T* sa = reinterpret_cast<T*>(smem);
  T* sw = sa + kRows * Smem<W>::lda;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* sc = reinterpret_cast<float*>(sw + W * Smem<W>::ldw) + warp * 16 * Smem<W>::ldc;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kRows;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[W / 16];
  for (int l = 0; l < p.count; ++l) {
#pragma unroll
    for (int j = 0; j < W / 16; ++j) wmma::fill_fragment(acc[j], 0.f);
    if (l == 0) {  // stream x and W0 through the buffers, W columns at a time
      for (int k0 = 0; k0 < K0; k0 += W) {
        __syncthreads();  // the previous chunk's readers are done
        for (int i = threadIdx.x; i < kRows * W; i += kThreads) {
          const int r = i / W, c = i % W;
          const bool in = m0 + r < M && k0 + c < K0;
          sa[r * Smem<W>::lda + c] = in ? x[(m0 + r) * K0 + k0 + c] : from_float<T>(0.f);
        }
        stage_weights<T, W>(sw, p.w[0], p.n_out[0], p.n_in[0], k0);
        __syncthreads();
        warp_mma<T, W>(sa, sw, acc);
      }
    } else {
      __syncthreads();  // every warp is done reading the previous layer's weights
      stage_weights<T, W>(sw, p.w[l], p.n_out[l], p.n_in[l], 0);
      __syncthreads();
      warp_mma<T, W>(sa, sw, acc);
    }
    // epilogue: fp32 staging, + bias, activation; back into this warp's own activation rows, or out to y
#pragma unroll
    for (int j = 0; j < W / 16; ++j) wmma::store_matrix_sync(sc + j * 16, acc[j], Smem<W>::ldc, wmma::mem_row_major);
    __syncwarp();
    const bool last = l + 1 == p.count;
    const int n_out = p.n_out[l], a = last ? last_act : act;
    const float al = last ? last_alpha : alpha;
    const T* bias = p.b[l];
    for (int i = lane; i < 16 * W; i += 32) {
      const int r = i / W, c = i % W;
      float v = 0.f;
      if (c < n_out) {
        v = sc[r * Smem<W>::ldc + c] + (bias != nullptr ? to_float(bias[c]) : 0.f);
        v = act_fwd_rt(a, v, al);
      }
      if (!last) {
        sa[(warp * 16 + r) * Smem<W>::lda + c] = from_float<T>(v);  // padded columns stay 0
      } else if (c < n_out && m0 + warp * 16 + r < M) {
        y[(m0 + warp * 16 + r) * n_out + c] = from_float<T>(v);
      }
    }
    __syncwarp();
  }
}

template <typename T, int W>
void launch_width(const Tensor& x, const MlpLayers<T>& p, Tensor& y, int act, float alpha, int last_act,
                  float last_alpha) {
  const int64_t M = x.size(0);
  const size_t smem = Smem<W>::template bytes<T>();
  auto kernel = mlp_fwd_kernel<T, W>;
  PYDLX_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const dim3 grid(static_cast<unsigned>((M + kRows - 1) / kRows));
  kernel<<<grid, kThreads, smem, stream_of(x)>>>(
      reinterpret_cast<const T*>(x.data_ptr()), M, static_cast<int>(x.size(1)), p,
      reinterpret_cast<T*>(y.data_ptr()), act, alpha, last_act, last_alpha);
  PYDLX_LAUNCH_CHECK();
}

template <typename T>
void launch(const Tensor& x, const std::vector<Tensor>& ws, const std::vector<Tensor>& bs,
            Tensor& y, int act, float alpha, int last_act, float last_alpha, int width) {
  MlpLayers<T> p{};
  p.count = static_cast<int>(ws.size());
  for (int l = 0; l < p.count; ++l) {
    p.w[l] = reinterpret_cast<const T*>(ws[l].data_ptr());
    p.b[l] = bs[l].defined() ? reinterpret_cast<const T*>(bs[l].data_ptr()) : nullptr;
    p.n_out[l] = static_cast<int>(ws[l].size(0));
    p.n_in[l] = static_cast<int>(ws[l].size(1));
  }
  switch (width) {
    case 16: return launch_width<T, 16>(x, p, y, act, alpha, last_act, last_alpha);
    case 32: return launch_width<T, 32>(x, p, y, act, alpha, last_act, last_alpha);
    case 64: return launch_width<T, 64>(x, p, y, act, alpha, last_act, last_alpha);
    default: return launch_width<T, 128>(x, p, y, act, alpha, last_act, last_alpha);
  }
}

Tensor mlp_fwd_cuda(Tensor input, std::vector<Tensor> weights, std::vector<Tensor> biases,
                    std::vector<bool> has_bias, std::string activation, double alpha, std::string last_activation,
                    double last_alpha) {
  const char* name = "pydlx::mlp_fwd_cuda";
  PYDLX_CHECK(input.is_cuda(), name, ": input must be a CUDA tensor, got one on ", device_name(input));
  PYDLX_CHECK(input.dim() == 2, name, ": input must be 2-D (rows, in_features), got ", input.dim(), "-D");
  const auto dtype = input.scalar_type();
  PYDLX_CHECK(dtype == ScalarType::Half || dtype == ScalarType::BFloat16, name,
              ": dtype must be float16 or bfloat16, got ", dtype_name(dtype));
  const int L = static_cast<int>(weights.size());
  PYDLX_CHECK(L >= 1 && L <= kMaxLayers, name, ": 1 to ", kMaxLayers, " layers, got ", L);
  PYDLX_CHECK(static_cast<int>(has_bias.size()) == L, name, ": has_bias must have one entry per layer");
  const int act = act_code(activation), last_act = act_code(last_activation);
  std::vector<Tensor> ws, bs;
  int fan_in = static_cast<int>(input.size(1)), width = 16, bi = 0;
  for (int l = 0; l < L; ++l) {
    const Tensor& w = weights[l];
    PYDLX_CHECK(w.dim() == 2 && w.size(1) == fan_in, name, ": weights[", l, "] must be (out, ", fan_in, "), got ",
                shape(w));
    PYDLX_CHECK(w.size(0) <= kMaxWidth, name, ": weights[", l, "] has ", w.size(0), " outputs; at most ",
                kMaxWidth);
    PYDLX_CHECK(w.scalar_type() == dtype && same_device(w, input), name, ": weights[", l,
                "] must match input's dtype and device");
    ws.push_back(contig(w));
    if (has_bias[l]) {
      PYDLX_CHECK(bi < static_cast<int>(biases.size()), name, ": fewer biases than has_bias says");
      const Tensor& b = biases[bi++];
      PYDLX_CHECK(b.dim() == 1 && b.size(0) == w.size(0) && b.scalar_type() == dtype && same_device(b, input),
                  name, ": biases for layer ", l, " must be (", w.size(0), ",) of input's dtype and device");
      bs.push_back(contig(b));
    } else {
      bs.emplace_back();
    }
    while (width < w.size(0)) width *= 2;
    fan_in = static_cast<int>(w.size(0));
  }
  PYDLX_CHECK(bi == static_cast<int>(biases.size()), name, ": more biases than has_bias says");
  const Tensor x = contig(input);
  Tensor y = empty_like_sized(x, {x.size(0), fan_in});
  if (x.size(0) == 0) return y;
  const DeviceGuard guard(x.get_device_index());
  if (dtype == ScalarType::Half) {
    launch<__half>(x, ws, bs, y, act, static_cast<float>(alpha), last_act, static_cast<float>(last_alpha), width);
  } else {
    launch<__nv_bfloat16>(x, ws, bs, y, act, static_cast<float>(alpha), last_act, static_cast<float>(last_alpha),
                          width);
  }
  return y;
}

}  // namespace
}  // namespace pydlx

STABLE_TORCH_LIBRARY_FRAGMENT(pydlx, m) {
  m.def("mlp_fwd_cuda(Tensor input, Tensor[] weights, Tensor[] biases, bool[] has_bias, str activation, "
        "float alpha, str last_activation, float last_alpha) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(pydlx, CUDA, m) { m.impl("mlp_fwd_cuda", TORCH_BOX(&pydlx::mlp_fwd_cuda)); }
