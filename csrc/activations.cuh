// pydlx: the activations and their derivatives for the C++/CUDA kernels, in fp32 whatever the storage dtype.
// The same functions as pydlx/reference/linear.py (the oracle) and pydlx/triton/common.py; codes in dispatch.h.
// For relu/tanh/sigmoid the derivative takes the output y, for gelu/gelu_tanh/silu the pre-activation z.
#pragma once

#include "dispatch.h"

namespace pydlx {

// Forms that keep relative accuracy at every magnitude and do not overflow (tests/test_activations.py sweeps
// 1e-8 .. 1e2, both signs): expf/erff/erfcf/tanhf of the CUDA math library (not the fast-math intrinsics, whose
// error grows with |x|); 1 - sigmoid(v) as sigmoid(-v), 1 - y^2 as (1 - y)(1 + y), and for z < 0 the normal
// CDF as erfc (1 + erf(z) rounds to 0 below z = -3.9 in fp32).
__device__ __forceinline__ float sigmoid_(float z) { return 1.f / (1.f + expf(-z)); }

__device__ __forceinline__ float normal_cdf_(float z) {
  return z >= 0.f ? 0.5f * (1.f + erff(z * 0.70710678118654752f)) : 0.5f * erfcf(-z * 0.70710678118654752f);
}

template <int ACT>
__device__ __forceinline__ float act_fwd(float z) {
  if constexpr (ACT == kRelu) return z < 0.f ? 0.f : z;  // NaN stays NaN, like torch.relu
  else if constexpr (ACT == kGelu) return z * normal_cdf_(z);
  else if constexpr (ACT == kGeluTanh) return z * sigmoid_(1.59576912161f * (z + 0.044715f * z * z * z));
  else if constexpr (ACT == kSilu) return z * sigmoid_(z);
  else if constexpr (ACT == kTanh) return tanhf(z);
  else if constexpr (ACT == kSigmoid) return sigmoid_(z);
  else return z;
}

template <int ACT>
__device__ __forceinline__ float act_bwd(float g, float s) {
  if constexpr (ACT == kRelu) return s > 0.f ? g : 0.f;
  else if constexpr (ACT == kGelu) {
    const float pdf = expf(-0.5f * s * s) * 0.39894228040143268f;
    return g * (normal_cdf_(s) + s * pdf);
  } else if constexpr (ACT == kGeluTanh) {
    const float v = 1.59576912161f * (s + 0.044715f * s * s * s);  // 2u, u the tanh argument
    const float dv = 1.59576912161f * (1.f + 0.134145f * s * s);
    const float sg = sigmoid_(v);
    return g * (sg + s * dv * sg * sigmoid_(-v));
  } else if constexpr (ACT == kSilu) {
    return g * sigmoid_(s) * (1.f + s * sigmoid_(-s));
  } else if constexpr (ACT == kTanh) return g * ((1.f - s) * (1.f + s));
  else if constexpr (ACT == kSigmoid) return g * s * (1.f - s);
  else return g;
}

// The activation chosen at run time (a uniform branch), for kernels that would otherwise be instantiated for
// every pair of hidden and last activations.
__device__ __forceinline__ float act_fwd_rt(int act, float z) {
  switch (act) {
    case kRelu: return act_fwd<kRelu>(z);
    case kGelu: return act_fwd<kGelu>(z);
    case kGeluTanh: return act_fwd<kGeluTanh>(z);
    case kSilu: return act_fwd<kSilu>(z);
    case kTanh: return act_fwd<kTanh>(z);
    case kSigmoid: return act_fwd<kSigmoid>(z);
    default: return z;
  }
}

}  // namespace pydlx
