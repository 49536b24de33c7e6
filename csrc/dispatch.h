// pydlx: the one shared compile-time switch header for the C++/CUDA kernels.
//  * PYDLX_DISPATCH_FLOAT(dtype, NAME, ...): runs the body with scalar_t = float, pydlx::Half or pydlx::BFloat16.
//  * PYDLX_DISPATCH_ACT(act, ...): runs the body with `constexpr int ACT` for an activation code (act_code of its name;
//    the parameter of leaky_relu / elu travels as a run-time float next to it).
// Activation codes match ACT_CODES in pydlx/triton/common.py.
#pragma once

#include <string>

#include "torch_stable.h"

namespace pydlx {

enum Act : int {
  kNone = 0, kRelu = 1, kGelu = 2, kGeluTanh = 3, kSilu = 4, kTanh = 5, kSigmoid = 6,
  kLeakyRelu = 7, kElu = 8, kHardswish = 9, kHardsigmoid = 10, kMish = 11, kRelu6 = 12, kSelu = 13
};

inline int act_code(const std::string& name) {
  if (name == "none") return kNone;
  if (name == "relu") return kRelu;
  if (name == "gelu") return kGelu;
  if (name == "gelu_tanh") return kGeluTanh;
  if (name == "silu") return kSilu;
  if (name == "tanh") return kTanh;
  if (name == "sigmoid") return kSigmoid;
  if (name == "leaky_relu") return kLeakyRelu;
  if (name == "elu") return kElu;
  if (name == "hardswish") return kHardswish;
  if (name == "hardsigmoid") return kHardsigmoid;
  if (name == "mish") return kMish;
  if (name == "relu6") return kRelu6;
  if (name == "selu") return kSelu;
  PYDLX_CHECK(false, "pydlx: activation must be one of none, relu, gelu, gelu_tanh, silu, tanh, sigmoid, leaky_relu, "
              "elu, hardswish, hardsigmoid, mish, relu6, selu; got '", name, "'");
}

}  // namespace pydlx

#define PYDLX_DISPATCH_FLOAT(DTYPE, NAME, ...)                                                       \
  [&] {                                                                                              \
    switch (DTYPE) {                                                                                 \
      case pydlx::ScalarType::Float: { using scalar_t = float; return __VA_ARGS__(); }               \
      case pydlx::ScalarType::Half: { using scalar_t = pydlx::Half; return __VA_ARGS__(); }          \
      case pydlx::ScalarType::BFloat16: { using scalar_t = pydlx::BFloat16; return __VA_ARGS__(); }  \
      default: PYDLX_CHECK(false, NAME, ": dtype must be float32, float16 or bfloat16, got ",        \
                           pydlx::dtype_name(DTYPE));                                                \
    }                                                                                                \
  }()

#define PYDLX_ACT_CASE(CODE, ...) case CODE: { constexpr int ACT = CODE; return __VA_ARGS__(); }

#define PYDLX_DISPATCH_ACT(CODE, ...)                                                               \
  [&] {                                                                                              \
    switch (CODE) {                                                                                  \
      PYDLX_ACT_CASE(pydlx::kNone, __VA_ARGS__) PYDLX_ACT_CASE(pydlx::kRelu, __VA_ARGS__)           \
      PYDLX_ACT_CASE(pydlx::kGelu, __VA_ARGS__) PYDLX_ACT_CASE(pydlx::kGeluTanh, __VA_ARGS__)       \
      PYDLX_ACT_CASE(pydlx::kSilu, __VA_ARGS__) PYDLX_ACT_CASE(pydlx::kTanh, __VA_ARGS__)           \
      PYDLX_ACT_CASE(pydlx::kSigmoid, __VA_ARGS__) PYDLX_ACT_CASE(pydlx::kLeakyRelu, __VA_ARGS__)    \
      PYDLX_ACT_CASE(pydlx::kElu, __VA_ARGS__) PYDLX_ACT_CASE(pydlx::kHardswish, __VA_ARGS__)        \
      PYDLX_ACT_CASE(pydlx::kHardsigmoid, __VA_ARGS__) PYDLX_ACT_CASE(pydlx::kMish, __VA_ARGS__)     \
      PYDLX_ACT_CASE(pydlx::kRelu6, __VA_ARGS__) PYDLX_ACT_CASE(pydlx::kSelu, __VA_ARGS__)          \
      default: PYDLX_CHECK(false, "pydlx: unknown activation code ", CODE);                         \
    }                                                                                                \
  }()
