// pydlx: CUDA activation kernels for the `cuda` backend of pydlx.ops.linear.
//
// The cuda backend computes z = x @ w^T + b with cuBLAS (torch.addmm, bias in cuBLAS's epilogue) and then
// one of these kernels: act_fwd_cuda writes y = act(z) in one pass; act_bwd_cuda writes dz = dy * act'(s)
// in one pass (s = z for gelu/gelu_tanh/silu/hardswish/mish, s = y for the others; see pydlx/reference/linear.py).
// `alpha` is the activation's parameter (leaky_relu's negative slope, elu's alpha; ignored by the others).
// Math in fp32 whatever the storage dtype; vectorised 16-byte loads where the tensors are aligned.
#include "torch_stable.h"
#include "activations.cuh"
#include "dispatch.h"

namespace pydlx {
namespace {

// VEC elements per thread per step: 16 bytes when every pointer is 16-byte aligned, else 1.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack { T v[VEC]; };

template <typename scalar_t, int ACT, int VEC, bool BWD>
__global__ void act_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ s,
                           scalar_t* __restrict__ out, int64_t n, float alpha) {
  using P = Pack<scalar_t, VEC>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i * VEC < n; i += stride) {
    const int64_t base = i * VEC;
    if (base + VEC <= n) {
      P pa = reinterpret_cast<const P*>(a)[i];
      P ps;
      if constexpr (BWD) ps = reinterpret_cast<const P*>(s)[i];
      P po;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float x = static_cast<float>(pa.v[j]);
        po.v[j] = static_cast<scalar_t>(BWD ? act_bwd<ACT>(x, static_cast<float>(ps.v[j]), alpha)
                                            : act_fwd<ACT>(x, alpha));
      }
      reinterpret_cast<P*>(out)[i] = po;
    } else {
      for (int64_t e = base; e < n; ++e) {
        const float x = static_cast<float>(a[e]);
        out[e] = static_cast<scalar_t>(BWD ? act_bwd<ACT>(x, static_cast<float>(s[e]), alpha) : act_fwd<ACT>(x, alpha));
      }
    }
  }
}

template <bool BWD>
Tensor launch(const Tensor& a, const Tensor& s, const std::string& activation, double alpha, const char* name) {
  PYDLX_CHECK(a.is_cuda(), name, ": input must be a CUDA tensor, got one on ", device_name(a));
  PYDLX_CHECK(a.is_contiguous(), name, ": input must be contiguous");
  if (BWD) {
    PYDLX_CHECK(same_device(s, a), name, ": saved is on ", device_name(s), " but grad is on ", device_name(a));
    PYDLX_CHECK(shape(s) == shape(a), name, ": saved has shape ", shape(s), " but grad has ", shape(a));
    PYDLX_CHECK(s.scalar_type() == a.scalar_type(), name, ": saved dtype ", dtype_name(s.scalar_type()),
                " != grad dtype ", dtype_name(a.scalar_type()));
  }
  const int code = act_code(activation);
  const Tensor sc = BWD ? contig(s) : a;
  std::vector<int64_t> sizes;
  for (int64_t i = 0; i < a.dim(); ++i) sizes.push_back(a.size(i));
  Tensor out = empty_like_sized(a, sizes);
  const int64_t n = a.numel();
  if (n == 0) return out;
  const DeviceGuard guard(a.get_device_index());
  cudaStream_t stream = stream_of(a);
  PYDLX_DISPATCH_FLOAT(a.scalar_type(), name, [&] {
    PYDLX_DISPATCH_ACT(code, [&] {
      constexpr int kVec = 16 / sizeof(scalar_t);
      const bool aligned = (reinterpret_cast<uintptr_t>(a.data_ptr()) % 16 == 0) &&
                           (reinterpret_cast<uintptr_t>(sc.data_ptr()) % 16 == 0) &&
                           (reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0);
      const int threads = 256;
      const int64_t work = aligned ? (n + kVec - 1) / kVec : n;
      const int blocks = static_cast<int>(std::min<int64_t>((work + threads - 1) / threads, 65535));
      const auto* ap = reinterpret_cast<const scalar_t*>(a.data_ptr());
      const auto* sp = reinterpret_cast<const scalar_t*>(sc.data_ptr());
      auto* op = reinterpret_cast<scalar_t*>(out.data_ptr());
      if (aligned) {
        act_kernel<scalar_t, ACT, kVec, BWD><<<blocks, threads, 0, stream>>>(ap, sp, op, n, static_cast<float>(alpha));
      } else {
        act_kernel<scalar_t, ACT, 1, BWD><<<blocks, threads, 0, stream>>>(ap, sp, op, n, static_cast<float>(alpha));
      }
      PYDLX_LAUNCH_CHECK();
    });
  });
  return out;
}

Tensor act_fwd_cuda(Tensor z, std::string activation, double alpha) {
  return launch<false>(z, z, activation, alpha, "pydlx::act_fwd_cuda");
}

Tensor act_bwd_cuda(Tensor grad, Tensor saved, std::string activation, double alpha) {
  return launch<true>(grad, saved, activation, alpha, "pydlx::act_bwd_cuda");
}

}  // namespace
}  // namespace pydlx

STABLE_TORCH_LIBRARY_FRAGMENT(pydlx, m) {
  m.def("act_fwd_cuda(Tensor z, str activation, float alpha) -> Tensor");
  m.def("act_bwd_cuda(Tensor grad, Tensor saved, str activation, float alpha) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(pydlx, CUDA, m) {
  m.impl("act_fwd_cuda", TORCH_BOX(&pydlx::act_fwd_cuda));
  m.impl("act_bwd_cuda", TORCH_BOX(&pydlx::act_bwd_cuda));
}
