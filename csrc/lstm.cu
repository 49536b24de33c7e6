// pydlx: persistent whole-sequence LSTM recurrence in CUDA (one layer, one direction), forward and backward.
//
// The recurrent weights W_hh [4H, H] are split across the SMs and stay in shared memory for the whole sequence;
// one cooperative launch walks every step with exactly one grid-wide synchronization per step (cooperative
// groups' grid.sync(), whose co-residency the cooperative launch guarantees or refuses with an error).
//
// Forward: block p owns hidden units J_p = [p*HB, p*HB + HB) and the 4 gate rows of W_hh for each of them
// (4*HB rows x H, in the input dtype). Per step it stages h_{t-1} (all H units, BC batch rows at a time, fp32) in
// shared memory, computes its units' four gate pre-activations for every batch row (one warp per unit, lanes
// split H in 4-wide vectors, fp32 FMAs), adds G[t] = x_t W_ih^T + b (one GEMM outside, for all steps), applies
// sigmoid/tanh and the cell update, and writes h_t and c_t for its units; then grid.sync() publishes h_t.
// Backward (reverse time): block p owns the same units and keeps the columns J_p of W_hh (4H x HB, transposed)
// on chip. Per step: phase 1 forms dz (the gate pre-activation gradients) for its units from its own dh, dc and the
// saved activations, and writes them; grid.sync(); phase 2 computes dh_{t-1}[:, J_p] = dz_t[:, all 4H] W_hh[:, J_p]
// for its own units (which phase 1 of the next step reads: no second sync). The weight gradients are GEMMs over
// all steps at once, outside (pydlx/ops/lstm.py), as for the Triton path.
// Buffers and masks (per-sequence lengths: rows past their end keep h and c and output 0; a reverse direction
// walks T-1..0) are those of pydlx/triton/lstm.py, so both backends share the Python side.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include "torch_stable.h"

#include <algorithm>
#include <optional>
#include <tuple>

#include "activations.cuh"  // sigmoid_ (and dispatch.h)

namespace pydlx {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBC = 8;   // batch rows of h staged per pass (forward)
constexpr int kBCB = 4;  // batch rows of dz staged per pass (backward: 4H wide)

struct Dims {
  int T, B, H, HB, Hp, H4p;  // Hp / H4p: H and 4H rounded up to a multiple of 4 (vector loads in shared memory)
  bool reverse, has_len, save;
};

__host__ __device__ __forceinline__ size_t align16(size_t bytes) { return (bytes + 15) / 16 * 16; }


template <typename T>
__device__ __forceinline__ float4 load4(const T* p) {  // 4 consecutive elements, 4-element aligned
  return make_float4(static_cast<float>(p[0]), static_cast<float>(p[1]), static_cast<float>(p[2]),
                     static_cast<float>(p[3]));
}
template <>
__device__ __forceinline__ float4 load4<float>(const float* p) { return *reinterpret_cast<const float4*>(p); }

__device__ __forceinline__ float dot4(float4 a, float4 b, float acc) {
  return fmaf(a.x, b.x, fmaf(a.y, b.y, fmaf(a.z, b.z, fmaf(a.w, b.w, acc))));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) lstm_fwd_persistent(const T* __restrict__ G, const T* __restrict__ W,
                                                                T* hs, float* cs, T* __restrict__ y,
                                                                float* __restrict__ acts,
                                                                const int* __restrict__ lengths, Dims d) {
  cg::grid_group grid = cg::this_grid();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* w_s = reinterpret_cast<T*>(smem_raw);                                        // [4 * HB][Hp]
  float* h_s = reinterpret_cast<float*>(smem_raw + align16(sizeof(T) * 4 * d.HB * d.Hp));  // [kBC][Hp]
  const int j0 = blockIdx.x * d.HB;
  const int nu = max(0, min(d.HB, d.H - j0));  // units this block owns (0 for a trailing block)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t BH = static_cast<int64_t>(d.B) * d.H;

  for (int i = threadIdx.x; i < 4 * d.HB * d.Hp; i += kThreads) {  // this block's rows of W_hh, once
    const int r = i / d.Hp, k = i % d.Hp, q = r / d.HB, u = r % d.HB;
    w_s[i] = (u < nu && k < d.H) ? W[static_cast<int64_t>(q * d.H + j0 + u) * d.H + k] : static_cast<T>(0.0f);
  }

  for (int s = 0; s < d.T; ++s) {
    const int t = d.reverse ? d.T - 1 - s : s;
    const int prev = d.reverse ? t + 1 : t, cur = d.reverse ? t : t + 1;
    for (int b0 = 0; b0 < d.B; b0 += kBC) {
      const int nb = min(kBC, d.B - b0);
      __syncthreads();  // h_s is free (and, the first time, w_s is written)
      for (int i = threadIdx.x; i < kBC * d.Hp; i += kThreads) {
        const int bb = i / d.Hp, k = i % d.Hp;
        h_s[i] = (bb < nb && k < d.H) ? static_cast<float>(hs[prev * BH + static_cast<int64_t>(b0 + bb) * d.H + k])
                                      : 0.0f;
      }
      __syncthreads();
      for (int u = warp; u < nu; u += kWarps) {
        float acc[4][kBC];
#pragma unroll
        for (int q = 0; q < 4; ++q)
#pragma unroll
          for (int bb = 0; bb < kBC; ++bb) acc[q][bb] = 0.0f;
        for (int k = 4 * lane; k < d.Hp; k += 128) {
          float4 wv[4];
#pragma unroll
          for (int q = 0; q < 4; ++q) wv[q] = load4(w_s + (q * d.HB + u) * d.Hp + k);
#pragma unroll
          for (int bb = 0; bb < kBC; ++bb) {
            const float4 hv = *reinterpret_cast<const float4*>(h_s + bb * d.Hp + k);
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[q][bb] = dot4(wv[q], hv, acc[q][bb]);
          }
        }
#pragma unroll
        for (int q = 0; q < 4; ++q)
#pragma unroll
          for (int bb = 0; bb < kBC; ++bb) acc[q][bb] = warp_sum(acc[q][bb]);
        // lane bb finishes batch row b0 + bb of unit j
#pragma unroll
        for (int bb = 0; bb < kBC; ++bb) {
          if (lane != bb || bb >= nb) continue;
          const int b = b0 + bb, j = j0 + u;
          const int64_t hc = static_cast<int64_t>(b) * d.H + j;
          const int64_t g = (static_cast<int64_t>(t) * d.B + b) * 4 * d.H + j;
          const float gi = sigmoid_(acc[0][bb] + static_cast<float>(G[g]));
          const float gf = sigmoid_(acc[1][bb] + static_cast<float>(G[g + d.H]));
          const float gg = tanhf(acc[2][bb] + static_cast<float>(G[g + 2 * d.H]));
          const float go = sigmoid_(acc[3][bb] + static_cast<float>(G[g + 3 * d.H]));
          const float c_prev = cs[prev * BH + hc];
          const bool on = !d.has_len || t < lengths[b];
          if (on) {
            const float c = gf * c_prev + gi * gg;
            const T h = static_cast<T>(go * tanhf(c));
            cs[cur * BH + hc] = c;
            hs[cur * BH + hc] = h;
            y[t * BH + hc] = h;
          } else {
            cs[cur * BH + hc] = c_prev;
            hs[cur * BH + hc] = hs[prev * BH + hc];
            y[t * BH + hc] = static_cast<T>(0.0f);
          }
          if (d.save) {
            acts[g] = gi;
            acts[g + d.H] = gf;
            acts[g + 2 * d.H] = gg;
            acts[g + 3 * d.H] = go;
          }
        }
      }
    }
    __threadfence();
    grid.sync();  // h_t of every unit is visible to every block
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) lstm_bwd_persistent(const T* __restrict__ dy,
                                                                const float* __restrict__ acts,
                                                                const float* __restrict__ cs,
                                                                const T* __restrict__ W, T* dz, float* dh,
                                                                float* dc, const int* __restrict__ lengths, Dims d) {
  cg::grid_group grid = cg::this_grid();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* w_s = reinterpret_cast<T*>(smem_raw);                                          // [HB][H4p]: W_hh[:, J_p]^T
  float* z_s = reinterpret_cast<float*>(smem_raw + align16(sizeof(T) * d.HB * d.H4p));  // [kBCB][H4p]
  const int j0 = blockIdx.x * d.HB;
  const int nu = max(0, min(d.HB, d.H - j0));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t BH = static_cast<int64_t>(d.B) * d.H;
  const int H4 = 4 * d.H;

  for (int i = threadIdx.x; i < d.HB * d.H4p; i += kThreads) {
    const int u = i / d.H4p, r = i % d.H4p;
    w_s[i] = (u < nu && r < H4) ? W[static_cast<int64_t>(r) * d.H + j0 + u] : static_cast<T>(0.0f);
  }

  for (int s = 0; s < d.T; ++s) {
    const int t = d.reverse ? s : d.T - 1 - s;  // backward walks the forward's steps in reverse
    const int prev = d.reverse ? t + 1 : t, cur = d.reverse ? t : t + 1;
    // phase 1: dz for this block's units, every batch row; dc carried in place
    for (int i = threadIdx.x; i < nu * d.B; i += kThreads) {
      const int u = i % nu, b = i / nu, j = j0 + u;
      const int64_t hc = static_cast<int64_t>(b) * d.H + j;
      const int64_t g = (static_cast<int64_t>(t) * d.B + b) * H4 + j;
      const bool on = !d.has_len || t < lengths[b];
      float zi = 0.0f, zf = 0.0f, zg = 0.0f, zo = 0.0f;
      if (on) {
        const float dht = dh[hc] + static_cast<float>(dy[t * BH + hc]);
        const float gi = acts[g], gf = acts[g + d.H], gg = acts[g + 2 * d.H], go = acts[g + 3 * d.H];
        const float tc = tanhf(cs[cur * BH + hc]);
        const float dct = dc[hc] + dht * go * (1.0f - tc * tc);
        zi = dct * gg * gi * (1.0f - gi);
        zf = dct * cs[prev * BH + hc] * gf * (1.0f - gf);
        zg = dct * gi * (1.0f - gg * gg);
        zo = dht * tc * go * (1.0f - go);
        dc[hc] = dct * gf;
      }
      dz[g] = static_cast<T>(zi);
      dz[g + d.H] = static_cast<T>(zf);
      dz[g + 2 * d.H] = static_cast<T>(zg);
      dz[g + 3 * d.H] = static_cast<T>(zo);
    }
    __threadfence();
    grid.sync();  // dz_t of every unit is visible to every block
    // phase 2: dh_{t-1}[:, J_p] = dz_t W_hh[:, J_p] for the rows still running
    for (int b0 = 0; b0 < d.B; b0 += kBCB) {
      const int nb = min(kBCB, d.B - b0);
      __syncthreads();
      for (int i = threadIdx.x; i < kBCB * d.H4p; i += kThreads) {
        const int bb = i / d.H4p, r = i % d.H4p;
        z_s[i] = (bb < nb && r < H4) ? static_cast<float>(dz[(static_cast<int64_t>(t) * d.B + b0 + bb) * H4 + r])
                                     : 0.0f;
      }
      __syncthreads();
      for (int u = warp; u < nu; u += kWarps) {
        float acc[kBCB];
#pragma unroll
        for (int bb = 0; bb < kBCB; ++bb) acc[bb] = 0.0f;
        for (int r = 4 * lane; r < d.H4p; r += 128) {
          const float4 wv = load4(w_s + u * d.H4p + r);
#pragma unroll
          for (int bb = 0; bb < kBCB; ++bb) acc[bb] = dot4(wv, *reinterpret_cast<const float4*>(z_s + bb * d.H4p + r),
                                                          acc[bb]);
        }
#pragma unroll
        for (int bb = 0; bb < kBCB; ++bb) acc[bb] = warp_sum(acc[bb]);
#pragma unroll
        for (int bb = 0; bb < kBCB; ++bb) {
          if (lane != bb || bb >= nb) continue;
          const int b = b0 + bb;
          if (!d.has_len || t < lengths[b]) dh[static_cast<int64_t>(b) * d.H + j0 + u] = acc[bb];
        }
      }
    }
    // no grid sync here: the next step's phase 1 reads only this block's own units of dh (written above by
    // other threads of this block, hence the block barrier)
    __syncthreads();
  }
}

int round4(int v) { return (v + 3) / 4 * 4; }

// The one home of the kernels' shared-memory size (pydlx/cuda/lstm.py asks it through the op lstm_smem_bytes):
// HB = ceil(H / SMs) hidden units a block, their W_hh rows (forward: 4 HB rows of H) or columns (backward: HB
// columns of 4H) in the weights' dtype (``elt`` bytes), plus the staged h (kBC rows) / dz (kBCB rows) in fp32.
size_t smem_bytes(int H, int elt, int sms, bool fwd) {
  const int HB = (H + sms - 1) / sms;
  return fwd ? align16(static_cast<size_t>(elt) * 4 * HB * round4(H)) + sizeof(float) * kBC * round4(H)
             : align16(static_cast<size_t>(elt) * HB * round4(4 * H)) + sizeof(float) * kBCB * round4(4 * H);
}

// Blocks and units per block: HB = ceil(H / SMs) units a block, one block per SM; refuses what does not fit.
template <typename T>
std::tuple<int, int, size_t> plan(const char* name, const void* kernel, int H, bool fwd) {
  int dev = 0, sms = 0, optin = 0;
  PYDLX_CUDA_CHECK(cudaGetDevice(&dev));
  // two attribute queries (cheap), not cudaGetDeviceProperties (which fills every field, milliseconds a call)
  PYDLX_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  PYDLX_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  const int HB = (H + sms - 1) / sms;
  const int blocks = (H + HB - 1) / HB;
  const size_t smem = smem_bytes(H, static_cast<int>(sizeof(T)), sms, fwd);
  PYDLX_CHECK(smem <= static_cast<size_t>(optin), name, ": hidden_size ", H,
              " does not fit the persistent kernel: ", HB, " units a block need ", smem, " bytes of shared memory, ",
              "the GPU has ", optin, " (use the triton backend for this layer)");
  PYDLX_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  int per_sm = 0;
  PYDLX_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
  PYDLX_CHECK(per_sm * sms >= blocks, name, ": ", blocks, " blocks cannot all be resident (", per_sm, " per SM)");
  return {HB, blocks, smem};
}

void check_common(const char* name, const Tensor& w_hh, const std::optional<Tensor>& lengths, int64_t B) {
  PYDLX_CHECK(w_hh.is_cuda() && w_hh.dim() == 2 && w_hh.size(0) == 4 * w_hh.size(1), name,
              ": w_hh must be a CUDA (4H, H) tensor, got ", shape(w_hh));
  if (lengths.has_value()) {
    PYDLX_CHECK(lengths->scalar_type() == ScalarType::Int && lengths->dim() == 1 && lengths->size(0) == B &&
                    lengths->is_contiguous() && same_device(*lengths, w_hh), name,
                ": lengths must be a contiguous int32 (B,) tensor on w_hh's device");
  }
}

std::vector<int64_t> dims(std::initializer_list<int64_t> d) { return std::vector<int64_t>(d); }

std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_seq_fwd_cuda(Tensor G, Tensor w_hh, Tensor h0, Tensor c0,
                                                             std::optional<Tensor> lengths, bool reverse, bool save) {
  const char* name = "pydlx::lstm_seq_fwd_cuda";
  PYDLX_CHECK(G.dim() == 3, name, ": G must be (T, B, 4H), got ", shape(G));
  const int64_t T = G.size(0), B = G.size(1), H = w_hh.size(1);
  check_common(name, w_hh, lengths, B);
  PYDLX_CHECK(G.size(2) == 4 * H && G.scalar_type() == w_hh.scalar_type() && same_device(G, w_hh), name,
              ": G must be (T, B, 4H) of w_hh's dtype and device");
  PYDLX_CHECK(shape(h0) == shape(c0) && h0.dim() == 2 && h0.size(0) == B && h0.size(1) == H, name,
              ": h0 and c0 must be (B, H)");
  Tensor hs = empty_like_sized(G, dims({T + 1, B, H}));
  Tensor cs = empty_like_sized(G, dims({T + 1, B, H}), ScalarType::Float);
  Tensor y = empty_like_sized(G, dims({T, B, H}));
  Tensor acts = empty_like_sized(G, save ? dims({T, B, 4 * H}) : dims({0}), ScalarType::Float);
  const int64_t first = reverse ? T : 0;
  Tensor h_first = torch::stable::select(hs, 0, first), c_first = torch::stable::select(cs, 0, first);
  torch::stable::copy_(h_first, h0);
  torch::stable::copy_(c_first, c0);
  if (T == 0 || B == 0 || H == 0) return {y, hs, cs, acts};
  const DeviceGuard guard(G.get_device_index());
  const Tensor Gc = contig(G), Wc = contig(w_hh);
  PYDLX_DISPATCH_FLOAT(G.scalar_type(), name, [&] {
    const void* kernel = reinterpret_cast<const void*>(&lstm_fwd_persistent<scalar_t>);
    auto [HB, blocks, smem] = plan<scalar_t>(name, kernel, static_cast<int>(H), true);
    Dims d{static_cast<int>(T), static_cast<int>(B), static_cast<int>(H), HB, round4(static_cast<int>(H)),
           round4(static_cast<int>(4 * H)), reverse, lengths.has_value(), save};
    const scalar_t* g_p = static_cast<const scalar_t*>(Gc.const_data_ptr());
    const scalar_t* w_p = static_cast<const scalar_t*>(Wc.const_data_ptr());
    scalar_t* hs_p = static_cast<scalar_t*>(hs.mutable_data_ptr());
    float* cs_p = static_cast<float*>(cs.mutable_data_ptr());
    scalar_t* y_p = static_cast<scalar_t*>(y.mutable_data_ptr());
    float* a_p = save ? static_cast<float*>(acts.mutable_data_ptr()) : nullptr;
    const int* len_p = lengths.has_value() ? static_cast<const int*>(lengths->const_data_ptr()) : nullptr;
    void* args[] = {&g_p, &w_p, &hs_p, &cs_p, &y_p, &a_p, &len_p, &d};
    PYDLX_CUDA_CHECK(cudaLaunchCooperativeKernel(kernel, dim3(blocks), dim3(kThreads), args, smem, stream_of(G)));
  });
  return {y, hs, cs, acts};
}

std::tuple<Tensor, Tensor, Tensor> lstm_seq_bwd_cuda(Tensor dy, Tensor dh_n, Tensor dc_n, Tensor acts, Tensor cs,
                                                     Tensor w_hh, std::optional<Tensor> lengths, bool reverse) {
  const char* name = "pydlx::lstm_seq_bwd_cuda";
  PYDLX_CHECK(acts.dim() == 3 && acts.scalar_type() == ScalarType::Float, name, ": acts must be fp32 (T, B, 4H)");
  const int64_t T = acts.size(0), B = acts.size(1), H = w_hh.size(1);
  check_common(name, w_hh, lengths, B);
  PYDLX_CHECK(acts.size(2) == 4 * H && cs.dim() == 3 && cs.size(0) == T + 1 && cs.scalar_type() == ScalarType::Float,
              name, ": cs must be fp32 (T + 1, B, H)");
  PYDLX_CHECK(dy.dim() == 3 && dy.size(0) == T && dy.size(1) == B && dy.size(2) == H &&
                  dy.scalar_type() == w_hh.scalar_type(), name, ": dy must be (T, B, H) of w_hh's dtype");
  PYDLX_CHECK(cs.size(1) == B && cs.size(2) == H, name, ": cs must be (T + 1, B, H)");
  for (const Tensor* t : {&dh_n, &dc_n}) {
    PYDLX_CHECK(t->dim() == 2 && t->size(0) == B && t->size(1) == H, name, ": dh_n and dc_n must be (B, H)");
  }
  for (const Tensor* t : {&dy, &acts, &cs, &dh_n, &dc_n}) {
    PYDLX_CHECK(same_device(*t, w_hh), name, ": every tensor must be on w_hh's device");
  }
  Tensor dz = empty_like_sized(w_hh, dims({T, B, 4 * H}));
  // fp32 copies of the incoming state gradients (the kernel updates them in place)
  Tensor dh = empty_like_sized(w_hh, dims({B, H}), ScalarType::Float);
  Tensor dc = empty_like_sized(w_hh, dims({B, H}), ScalarType::Float);
  torch::stable::copy_(dh, dh_n);
  torch::stable::copy_(dc, dc_n);
  if (T == 0 || B == 0 || H == 0) {
    torch::stable::zero_(dz);
    return {dz, dh, dc};
  }
  const DeviceGuard guard(w_hh.get_device_index());
  const Tensor dyc = contig(dy), Wc = contig(w_hh), ac = contig(acts), csc = contig(cs);
  PYDLX_DISPATCH_FLOAT(w_hh.scalar_type(), name, [&] {
    const void* kernel = reinterpret_cast<const void*>(&lstm_bwd_persistent<scalar_t>);
    auto [HB, blocks, smem] = plan<scalar_t>(name, kernel, static_cast<int>(H), false);
    Dims d{static_cast<int>(T), static_cast<int>(B), static_cast<int>(H), HB, round4(static_cast<int>(H)),
           round4(static_cast<int>(4 * H)), reverse, lengths.has_value(), false};
    const scalar_t* dy_p = static_cast<const scalar_t*>(dyc.const_data_ptr());
    const float* a_p = static_cast<const float*>(ac.const_data_ptr());
    const float* cs_p = static_cast<const float*>(csc.const_data_ptr());
    const scalar_t* w_p = static_cast<const scalar_t*>(Wc.const_data_ptr());
    scalar_t* dz_p = static_cast<scalar_t*>(dz.mutable_data_ptr());
    float* dh_p = static_cast<float*>(dh.mutable_data_ptr());
    float* dc_p = static_cast<float*>(dc.mutable_data_ptr());
    const int* len_p = lengths.has_value() ? static_cast<const int*>(lengths->const_data_ptr()) : nullptr;
    void* args[] = {&dy_p, &a_p, &cs_p, &w_p, &dz_p, &dh_p, &dc_p, &len_p, &d};
    PYDLX_CUDA_CHECK(cudaLaunchCooperativeKernel(kernel, dim3(blocks), dim3(kThreads), args, smem,
                                                 stream_of(w_hh)));
  });
  return {dz, dh, dc};
}

}  // namespace

// The larger of the forward's and the backward's shared memory a block (what must fit the GPU's opt-in limit).
int64_t lstm_smem_bytes(int64_t H, int64_t elt, int64_t sms) {
  PYDLX_CHECK(H >= 0 && elt > 0 && sms > 0, "pydlx::lstm_smem_bytes: H >= 0, elt > 0 and sms > 0, got ", H, ", ",
              elt, ", ", sms);
  return static_cast<int64_t>(std::max(smem_bytes(static_cast<int>(H), static_cast<int>(elt), static_cast<int>(sms),
                                                  true),
                                       smem_bytes(static_cast<int>(H), static_cast<int>(elt), static_cast<int>(sms),
                                                  false)));
}

}  // namespace pydlx

STABLE_TORCH_LIBRARY_FRAGMENT(pydlx, m) {
  m.def("lstm_smem_bytes(int H, int elt, int sms) -> int");
  m.def("lstm_seq_fwd_cuda(Tensor G, Tensor w_hh, Tensor h0, Tensor c0, Tensor? lengths, bool reverse, bool save) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("lstm_seq_bwd_cuda(Tensor dy, Tensor dh_n, Tensor dc_n, Tensor acts, Tensor cs, Tensor w_hh, "
        "Tensor? lengths, bool reverse) -> (Tensor, Tensor, Tensor)");
}

STABLE_TORCH_LIBRARY_IMPL(pydlx, CUDA, m) {
  m.impl("lstm_seq_fwd_cuda", TORCH_BOX(&pydlx::lstm_seq_fwd_cuda));
  m.impl("lstm_seq_bwd_cuda", TORCH_BOX(&pydlx::lstm_seq_bwd_cuda));
}

// a size computation (no tensor): the same answer on every device
STABLE_TORCH_LIBRARY_IMPL(pydlx, CompositeExplicitAutograd, m) {
  m.impl("lstm_smem_bytes", TORCH_BOX(&pydlx::lstm_smem_bytes));
}
