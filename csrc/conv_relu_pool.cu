// pydlx: Conv2d -> activation [-> MaxPool2d] as one direct-convolution CUDA kernel, for first layers (few input
// channels).
//
// Why a direct convolution: a first layer has C = 1..4 input channels, so an implicit GEMM's reduction over C*k*k
// pads 27 (3x3x3) up to 32 or more and its tensor-core K steps gather a handful of useful values each. Here a
// block stages a zero-padded input tile of all C channels and the weights of 16 output channels in shared memory
// as fp32, computes the conv outputs under its tile of pooled pixels with FMAs (each conv output exactly once, also
// for overlapping 3/2 pools), keeps them in shared memory, and pools them: only the pooled map and an int8 argmax
// per pooled element (its position in the pool window, for backward) are written. Bias and activation come after
// the max (a per-channel bias and a non-decreasing activation -- the only ones fused with a pool -- commute with
// it: exact). Pool padding and ceil mode: window positions outside the conv output take no part (max_pool2d's
// -inf padding); the first position inside starts the max. Without a pool (P = Q = 1) the activated conv output is
// written, and with save_z its pre-activation too. NaN propagates as in max_pool2d.
//
// Shapes: x [N, C, H, W] with any strides (NCHW or channels_last), w [K, C, R, R], b [K] or none; outputs y and
// idx (z) contiguous [N, K, HP, WP]. fp32, fp16, bf16 in and out, fp32 arithmetic. C <= kMaxChannels.
#include "torch_stable.h"

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <tuple>

#include "activations.cuh"
#include "dispatch.h"

namespace pydlx {
namespace {

constexpr int kGroup = 16;      // output channels a block computes
constexpr int kThreads = 256;
constexpr int kMaxChannels = 8;  // input channels: the kernel is for first layers
constexpr int kMaxSmem = 96 * 1024;

struct Geometry {
  int C, H, W, K, HO, WO, HP, WP, R, S, pad, P, Q, PP;
  int act;      // activation code (dispatch.h), applied after the max
  float alpha;  // its parameter (leaky_relu's slope, elu's alpha)
  int64_t sn, sc, sh, sw;  // x strides
  int tile;                // pooled pixels per tile side
  int toh, tih;            // conv rows and input rows under a tile (square tiles)
};

// the input tile's floats, rounded up to a multiple of 4 so that the weights after it are float4-aligned
__host__ __device__ inline int in_floats(const Geometry& g) { return (g.C * g.tih * g.tih + 3) / 4 * 4; }

inline int smem_floats(const Geometry& g) {
  return in_floats(g) + g.C * g.R * g.R * kGroup + kGroup * g.toh * g.toh;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) conv_relu_pool_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                                                  const T* __restrict__ b, T* __restrict__ y,
                                                                  int8_t* __restrict__ idx, T* __restrict__ z,
                                                                  Geometry g) {
  extern __shared__ __align__(16) float smem[];
  float* s_in = smem;                                 // [C][tih][tih]
  float* s_w = s_in + in_floats(g);                    // [C][R][R][kGroup]: a tap's 16 channels are contiguous
  float* s_conv = s_w + g.C * g.R * g.R * kGroup;      // [kGroup][toh][toh]
  const int tiles_w = (g.WP + g.tile - 1) / g.tile;
  const int ph0 = (blockIdx.x / tiles_w) * g.tile, pw0 = (blockIdx.x % tiles_w) * g.tile;
  const int k0 = blockIdx.y * kGroup;
  const int64_t n = blockIdx.z;
  const int oh0 = ph0 * g.Q - g.PP, ow0 = pw0 * g.Q - g.PP;  // the tile's first conv output row / column
  const int ih0 = oh0 * g.S - g.pad, iw0 = ow0 * g.S - g.pad;  // its first input row / column (may be padding)
  const int RR = g.R * g.R;

  const T* xn = x + n * g.sn;
  for (int i = threadIdx.x; i < g.C * g.tih * g.tih; i += kThreads) {
    const int c = i / (g.tih * g.tih), r = (i / g.tih) % g.tih, q = i % g.tih;
    const int ih = ih0 + r, iw = iw0 + q;
    s_in[i] = (ih >= 0 && ih < g.H && iw >= 0 && iw < g.W)
                  ? static_cast<float>(xn[c * g.sc + ih * g.sh + iw * g.sw]) : 0.0f;
  }
  for (int i = threadIdx.x; i < g.C * RR * kGroup; i += kThreads) {
    const int k = i % kGroup, tap = i / kGroup;  // tap = (c, kh, kw), matching w's [C][R][R] order
    s_w[i] = (k0 + k < g.K) ? static_cast<float>(w[static_cast<int64_t>(k0 + k) * g.C * RR + tap]) : 0.0f;
  }
  __syncthreads();

  // conv outputs under the tile: one pixel x 16 channels a thread at a time; weights are broadcast reads
  for (int pix = threadIdx.x; pix < g.toh * g.toh; pix += kThreads) {
    const int r = pix / g.toh, q = pix % g.toh;
    const int oh = oh0 + r, ow = ow0 + q;
    if (oh < 0 || oh >= g.HO || ow < 0 || ow >= g.WO) continue;  // outside the conv output: no window reads it
    float acc[kGroup];
#pragma unroll
    for (int k = 0; k < kGroup; ++k) acc[k] = 0.0f;
    for (int c = 0; c < g.C; ++c) {
      for (int kh = 0; kh < g.R; ++kh) {
        const float* in_row = s_in + (c * g.tih + r * g.S + kh) * g.tih + q * g.S;
        const float4* w_tap = reinterpret_cast<const float4*>(s_w + ((c * g.R + kh) * g.R) * kGroup);
        for (int kw = 0; kw < g.R; ++kw) {
          const float v = in_row[kw];
#pragma unroll
          for (int k4 = 0; k4 < kGroup / 4; ++k4) {
            const float4 wv = w_tap[kw * (kGroup / 4) + k4];
            acc[4 * k4 + 0] = fmaf(v, wv.x, acc[4 * k4 + 0]);
            acc[4 * k4 + 1] = fmaf(v, wv.y, acc[4 * k4 + 1]);
            acc[4 * k4 + 2] = fmaf(v, wv.z, acc[4 * k4 + 2]);
            acc[4 * k4 + 3] = fmaf(v, wv.w, acc[4 * k4 + 3]);
          }
        }
      }
    }
#pragma unroll
    for (int k = 0; k < kGroup; ++k) s_conv[(k * g.toh + r) * g.toh + q] = acc[k];
  }
  __syncthreads();

  // pool: the first position inside the conv output starts the max, then the first larger value or a NaN wins
  // (the last NaN, as in max_pool2d); then bias and activation (NaN kept)
  for (int i = threadIdx.x; i < kGroup * g.tile * g.tile; i += kThreads) {
    const int k = i / (g.tile * g.tile), a = (i / g.tile) % g.tile, c = i % g.tile;
    const int ph = ph0 + a, pw = pw0 + c;
    if (k0 + k >= g.K || ph >= g.HP || pw >= g.WP) continue;
    float best = -INFINITY;
    int arg = -1;
    for (int u = 0; u < g.P; ++u) {
      const int oh = oh0 + a * g.Q + u;
      if (oh < 0 || oh >= g.HO) continue;
      for (int v = 0; v < g.P; ++v) {
        const int ow = ow0 + c * g.Q + v;
        if (ow < 0 || ow >= g.WO) continue;
        const float zv = s_conv[(k * g.toh + a * g.Q + u) * g.toh + c * g.Q + v];
        if (arg < 0 || zv > best || zv != zv) {  // max_pool2d's rule: the last NaN wins
          best = zv;
          arg = u * g.P + v;
        }
      }
    }
    if (b != nullptr) best += static_cast<float>(b[k0 + k]);
    const int64_t out = ((n * g.K + k0 + k) * g.HP + ph) * g.WP + pw;
    if (z != nullptr) z[out] = static_cast<T>(best);
    y[out] = static_cast<T>(act_fwd_rt(g.act, best, g.alpha));
    if (g.P > 1) idx[out] = static_cast<int8_t>(arg);
  }
}

// max_pool2d's output size along one dimension (dilation 1), floor or ceil mode (torch's rule)
int pooled_size(int size, int P, int Q, int pad, bool ceil_mode) {
  int out = (size + 2 * pad - P + (ceil_mode ? Q - 1 : 0)) / Q + 1;
  if (ceil_mode && (out - 1) * Q >= size + pad) --out;
  return out;
}

std::tuple<Tensor, Tensor, Tensor> conv_relu_pool2d_fwd_cuda(
    Tensor input, Tensor weight, std::optional<Tensor> bias, int64_t stride, int64_t padding, int64_t pool_size,
    int64_t pool_stride, int64_t pool_padding, bool ceil_mode, std::string activation, double alpha, bool save_z) {
  const char* name = "pydlx::conv_relu_pool2d_fwd_cuda";
  PYDLX_CHECK(input.dim() == 4, name, ": input must be (N, C, H, W), got ", shape(input));
  PYDLX_CHECK(weight.dim() == 4 && weight.size(1) == input.size(1) && weight.size(2) == weight.size(3), name,
              ": weight must be (K, C, k, k) with C = input's channels, got ", shape(weight));
  PYDLX_CHECK(input.size(1) <= kMaxChannels, name, ": the direct-convolution kernel is for first layers, at most ",
              kMaxChannels, " input channels; got ", input.size(1));
  PYDLX_CHECK(weight.scalar_type() == input.scalar_type() && same_device(weight, input), name,
              ": weight must match input's dtype and device");
  PYDLX_CHECK(stride >= 1 && padding >= 0 && pool_size >= 1 && pool_stride >= 1 && pool_size <= 3 &&
                  pool_padding >= 0 && 2 * pool_padding <= pool_size, name, ": bad stride/padding/pool arguments");
  PYDLX_CHECK(!save_z || pool_size == 1, name, ": the pre-activation is saved only without a pool");
  Tensor b;
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    b = contig(*bias);
    PYDLX_CHECK(b.dim() == 1 && b.size(0) == weight.size(0) && b.scalar_type() == input.scalar_type() &&
                    same_device(b, input), name, ": bias must be (K,) of input's dtype and device");
  }
  Geometry g{};
  g.C = static_cast<int>(input.size(1));
  g.H = static_cast<int>(input.size(2));
  g.W = static_cast<int>(input.size(3));
  g.K = static_cast<int>(weight.size(0));
  g.R = static_cast<int>(weight.size(2));
  g.S = static_cast<int>(stride);
  g.pad = static_cast<int>(padding);
  g.P = static_cast<int>(pool_size);
  g.Q = static_cast<int>(pool_stride);
  g.PP = static_cast<int>(pool_padding);
  g.act = act_code(activation);
  g.alpha = static_cast<float>(alpha);
  PYDLX_CHECK(g.H + 2 * g.pad >= g.R && g.W + 2 * g.pad >= g.R, name, ": the kernel (", g.R,
              ") is larger than the padded input (", g.H + 2 * g.pad, "x", g.W + 2 * g.pad, ")");
  g.HO = (g.H + 2 * g.pad - g.R) / g.S + 1;
  g.WO = (g.W + 2 * g.pad - g.R) / g.S + 1;
  g.HP = pooled_size(g.HO, g.P, g.Q, g.PP, ceil_mode);
  g.WP = pooled_size(g.WO, g.P, g.Q, g.PP, ceil_mode);
  PYDLX_CHECK(g.HP >= 1 && g.WP >= 1, name, ": the conv output (", g.HO, "x", g.WO,
              ") is too small for the pool window");
  g.sn = input.stride(0);
  g.sc = input.stride(1);
  g.sh = input.stride(2);
  g.sw = input.stride(3);
  // the largest square tile (8, 4, 2 or 1 pooled pixels a side) whose shared memory fits
  const DeviceGuard guard(input.get_device_index());
  int dev = 0, optin = 0;
  PYDLX_CUDA_CHECK(cudaGetDevice(&dev));
  PYDLX_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  const size_t limit = std::min<size_t>(kMaxSmem, static_cast<size_t>(optin));
  for (g.tile = 8;; g.tile /= 2) {
    g.toh = (g.tile - 1) * g.Q + g.P;
    g.tih = (g.toh - 1) * g.S + g.R;
    if (g.tile == 1 || static_cast<size_t>(smem_floats(g)) * 4 <= limit) break;
  }
  const size_t smem = static_cast<size_t>(smem_floats(g)) * sizeof(float);
  PYDLX_CHECK(smem <= limit, name, ": needs ", smem, " bytes of shared memory; this GPU allows ", limit);

  const std::vector<int64_t> out_shape{input.size(0), g.K, g.HP, g.WP};
  Tensor y = empty_like_sized(input, out_shape);
  Tensor idx = empty_like_sized(input, g.P > 1 ? out_shape : std::vector<int64_t>{0}, ScalarType::Char);
  Tensor z = empty_like_sized(input, save_z ? out_shape : std::vector<int64_t>{0});
  if (y.numel() == 0) return {y, idx, z};
  PYDLX_CHECK(input.size(0) <= 65535, name, ": batch must be at most 65535, got ", input.size(0));
  const Tensor wc = contig(weight);
  const int tiles = ((g.HP + g.tile - 1) / g.tile) * ((g.WP + g.tile - 1) / g.tile);
  const dim3 grid(tiles, (g.K + kGroup - 1) / kGroup, static_cast<unsigned>(input.size(0)));
  auto stream = stream_of(input);
  PYDLX_DISPATCH_FLOAT(input.scalar_type(), name, [&] {
    auto kernel = conv_relu_pool_kernel<scalar_t>;
    if (smem > 48 * 1024) {
      PYDLX_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(smem)));
    }
    kernel<<<grid, kThreads, smem, stream>>>(static_cast<const scalar_t*>(input.const_data_ptr()),
                                             static_cast<const scalar_t*>(wc.const_data_ptr()),
                                             has_bias ? static_cast<const scalar_t*>(b.const_data_ptr()) : nullptr,
                                             static_cast<scalar_t*>(y.mutable_data_ptr()),
                                             g.P > 1 ? static_cast<int8_t*>(idx.mutable_data_ptr()) : nullptr,
                                             save_z ? static_cast<scalar_t*>(z.mutable_data_ptr()) : nullptr, g);
    PYDLX_LAUNCH_CHECK();
  });
  return {y, idx, z};
}

}  // namespace
}  // namespace pydlx

STABLE_TORCH_LIBRARY_FRAGMENT(pydlx, m) {
  m.def("conv_relu_pool2d_fwd_cuda(Tensor input, Tensor weight, Tensor? bias, int stride, int padding, "
        "int pool_size, int pool_stride, int pool_padding, bool ceil_mode, str activation, float alpha, bool save_z) "
        "-> (Tensor, Tensor, Tensor)");
}

STABLE_TORCH_LIBRARY_IMPL(pydlx, CUDA, m) {
  m.impl("conv_relu_pool2d_fwd_cuda", TORCH_BOX(&pydlx::conv_relu_pool2d_fwd_cuda));
}
