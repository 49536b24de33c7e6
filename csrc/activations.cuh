// pydlx: the activations and their derivatives for the C++/CUDA kernels, in fp32 whatever the storage dtype.
// The same functions as pydlx/reference/linear.py (the oracle) and pydlx/triton/common.py; codes in dispatch.h.
// For relu/tanh/sigmoid the derivative takes the output y, for gelu/gelu_tanh/silu the pre-activation z.
#pragma once

#include "dispatch.h"

namespace pydlx {

template <int ACT>
__device__ __forceinline__ float act_fwd(float z) {
  if constexpr (ACT == kRelu) return z < 0.f ? 0.f : z;  // NaN stays NaN, like torch.relu
  else if constexpr (ACT == kGelu) return 0.5f * z * (1.f + erff(z * 0.70710678118654752f));
  else if constexpr (ACT == kGeluTanh) return 0.5f * z * (1.f + tanhf(0.79788456080286536f * (z + 0.044715f * z * z * z)));
  else if constexpr (ACT == kSilu) return z / (1.f + __expf(-z));
  else if constexpr (ACT == kTanh) return tanhf(z);
  else if constexpr (ACT == kSigmoid) return 1.f / (1.f + __expf(-z));
  else return z;
}

template <int ACT>
__device__ __forceinline__ float act_bwd(float g, float s) {
  if constexpr (ACT == kRelu) return s > 0.f ? g : 0.f;
  else if constexpr (ACT == kGelu) {
    const float cdf = 0.5f * (1.f + erff(s * 0.70710678118654752f));
    const float pdf = __expf(-0.5f * s * s) * 0.39894228040143268f;
    return g * (cdf + s * pdf);
  } else if constexpr (ACT == kGeluTanh) {
    const float t = tanhf(0.79788456080286536f * (s + 0.044715f * s * s * s));
    const float dinner = 0.79788456080286536f * (1.f + 0.134145f * s * s);
    return g * (0.5f * (1.f + t) + 0.5f * s * (1.f - t * t) * dinner);
  } else if constexpr (ACT == kSilu) {
    const float sg = 1.f / (1.f + __expf(-s));
    return g * sg * (1.f + s * (1.f - sg));
  } else if constexpr (ACT == kTanh) return g * (1.f - s * s);
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
