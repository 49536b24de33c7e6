// pydlx: the activations and their derivatives for the C++/CUDA kernels, in fp32 whatever the storage dtype.
// The same functions as pydlx/reference/linear.py (the oracle) and pydlx/triton/common.py; codes in dispatch.h.
// For relu/tanh/sigmoid/leaky_relu/elu/hardsigmoid/relu6/selu the derivative takes the output y, for
// gelu/gelu_tanh/silu/hardswish/mish the pre-activation z. `alpha` is leaky_relu's negative slope (>= 0) and elu's
// alpha (> 0); the other activations ignore it.
#pragma once

#include "dispatch.h"

namespace pydlx {

// Forms that keep relative accuracy at every magnitude and do not overflow (tests/test_activations.py sweeps
// 1e-8 .. 1e2, both signs): expf/expm1f/erff/erfcf/tanhf of the CUDA math library (not the fast-math intrinsics,
// whose error grows with |x|); 1 - sigmoid(v) as sigmoid(-v), 1 - y^2 as (1 - y)(1 + y), for z < 0 the normal
// CDF as erfc (1 + erf(z) rounds to 0 below z = -3.9 in fp32), elu's e^z - 1 as expm1f, and mish from exact
// fractions of t = exp(-|z|). Clamps are written with comparisons, which keep NaN (fminf/fmaxf drop it).
// selu's constants (torch's; pydlx/activations.py SELU_SCALE and SELU_SCALE * SELU_ALPHA)
constexpr float kSeluScale = 1.0507009873554804934f;
constexpr float kSeluScaleAlpha = 1.7580993408473768599f;

__device__ __forceinline__ float sigmoid_(float z) { return 1.f / (1.f + expf(-z)); }

__device__ __forceinline__ float normal_cdf_(float z) {
  return z >= 0.f ? 0.5f * (1.f + erff(z * 0.70710678118654752f)) : 0.5f * erfcf(-z * 0.70710678118654752f);
}

__device__ __forceinline__ float clamp_(float x, float lo, float hi) {
  x = x < lo ? lo : x;
  return x > hi ? hi : x;
}

// n = tanh(softplus(z)), 1 - n and sigmoid(z) from t = exp(-|z|) <= 1 (pydlx/reference/linear.py's mish_parts):
// for z <= 0, n = t(t+2) / (t(t+2) + 2), 1 - n = 2 / (t(t+2) + 2), sigmoid = t / (1 + t); for z > 0,
// n = (1+2t) / (1+2t+2t^2), 1 - n = 2t^2 / (1+2t+2t^2), sigmoid = 1 / (1 + t).
struct MishParts { float n, one_minus_n, sigmoid; };

__device__ __forceinline__ MishParts mish_parts_(float z) {
  const float t = expf(-fabsf(z));
  const bool neg = z <= 0.f;
  const float num = neg ? t * (t + 2.f) : 1.f + 2.f * t;
  const float rest = neg ? 2.f : 2.f * t * t;
  const float den = num + rest;
  return {num / den, rest / den, (neg ? t : 1.f) / (1.f + t)};
}

template <int ACT>
__device__ __forceinline__ float act_fwd(float z, float alpha) {
  if constexpr (ACT == kRelu) return z < 0.f ? 0.f : z;  // NaN stays NaN, like torch.relu
  else if constexpr (ACT == kGelu) return z * normal_cdf_(z);
  else if constexpr (ACT == kGeluTanh) return z * sigmoid_(1.59576912161f * (z + 0.044715f * z * z * z));
  else if constexpr (ACT == kSilu) return z * sigmoid_(z);
  else if constexpr (ACT == kTanh) return tanhf(z);
  else if constexpr (ACT == kSigmoid) return sigmoid_(z);
  else if constexpr (ACT == kLeakyRelu) return z > 0.f ? z : z * alpha;
  else if constexpr (ACT == kElu) return z > 0.f ? z : alpha * expm1f(z);
  else if constexpr (ACT == kHardswish) return z * clamp_(z + 3.f, 0.f, 6.f) / 6.f;  // torch's order
  else if constexpr (ACT == kHardsigmoid) return clamp_(z + 3.f, 0.f, 6.f) / 6.f;
  else if constexpr (ACT == kMish) return z * mish_parts_(z).n;
  else if constexpr (ACT == kRelu6) return clamp_(z, 0.f, 6.f);
  else if constexpr (ACT == kSelu) return z > 0.f ? kSeluScale * z : kSeluScaleAlpha * expm1f(z);
  else return z;
}

// At the kinks and for NaN, torch's conventions (pydlx/reference/linear.py's activation_backward).
template <int ACT>
__device__ __forceinline__ float act_bwd(float g, float s, float alpha) {
  if constexpr (ACT == kRelu) return s <= 0.f ? 0.f : g;  // torch's threshold_backward: NaN passes g
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
  else if constexpr (ACT == kLeakyRelu) return s > 0.f ? g : g * alpha;
  else if constexpr (ACT == kElu) return s <= 0.f ? g * (s + alpha) : g;  // z <= 0: alpha e^z = y + alpha
  else if constexpr (ACT == kHardswish) return s <= -3.f ? 0.f : (s < 3.f ? g * (s / 3.f + 0.5f) : g);
  else if constexpr (ACT == kHardsigmoid) return (s > 0.f && s < 1.f) ? g / 6.f : 0.f;
  else if constexpr (ACT == kMish) {
    const MishParts p = mish_parts_(s);
    return g * (p.n + s * p.one_minus_n * (1.f + p.n) * p.sigmoid);
  } else if constexpr (ACT == kRelu6) return (s <= 0.f || s >= 6.f) ? 0.f : g;
  else if constexpr (ACT == kSelu) return s <= 0.f ? g * (s + kSeluScaleAlpha) : g * kSeluScale;  // from y, as elu
  else return g;
}

// The activation chosen at run time (a uniform branch), for kernels that would otherwise be instantiated for
// every pair of hidden and last activations.
__device__ __forceinline__ float act_fwd_rt(int act, float z, float alpha) {
  switch (act) {
    case kRelu: return act_fwd<kRelu>(z, alpha);
    case kGelu: return act_fwd<kGelu>(z, alpha);
    case kGeluTanh: return act_fwd<kGeluTanh>(z, alpha);
    case kSilu: return act_fwd<kSilu>(z, alpha);
    case kTanh: return act_fwd<kTanh>(z, alpha);
    case kSigmoid: return act_fwd<kSigmoid>(z, alpha);
    case kLeakyRelu: return act_fwd<kLeakyRelu>(z, alpha);
    case kElu: return act_fwd<kElu>(z, alpha);
    case kHardswish: return act_fwd<kHardswish>(z, alpha);
    case kHardsigmoid: return act_fwd<kHardsigmoid>(z, alpha);
    case kMish: return act_fwd<kMish>(z, alpha);
    case kRelu6: return act_fwd<kRelu6>(z, alpha);
    case kSelu: return act_fwd<kSelu>(z, alpha);
    default: return z;
  }
}

}  // namespace pydlx
