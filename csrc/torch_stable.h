// pydlx: where the C++/CUDA kernels meet torch: PyTorch's stable C ABI only (torch/csrc/stable, torch/headeronly),
// never ATen's C++ classes, so that one build of pydlx._C loads under every torch from the one its build targets
// (TORCH_TARGET_VERSION, set by pydlx/_ext.py: 2.11) on. Everything the kernels need from torch is here.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/Half.h>

namespace pydlx {

using Tensor = torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;
using Half = torch::headeronly::Half;
using BFloat16 = torch::headeronly::BFloat16;

// "[2, 3]": a tensor's shape in messages
inline std::string shape(const Tensor& t) {
  std::ostringstream out;
  out << "[";
  for (int64_t i = 0; i < t.dim(); ++i) out << (i ? ", " : "") << t.size(i);
  out << "]";
  return out.str();
}

inline const char* dtype_name(ScalarType s) {
  switch (s) {
    case ScalarType::Float: return "float32";
    case ScalarType::Half: return "float16";
    case ScalarType::BFloat16: return "bfloat16";
    case ScalarType::Double: return "float64";
    default: return "a dtype other than float32, float16, bfloat16 and float64";
  }
}

// "cuda:0" / "cpu": a tensor's device in messages
inline std::string device_name(const Tensor& t) {
  return t.is_cuda() ? "cuda:" + std::to_string(t.get_device_index()) : (t.is_cpu() ? "cpu" : "a non-CUDA device");
}

inline bool same_device(const Tensor& a, const Tensor& b) {
  return a.is_cuda() == b.is_cuda() && a.get_device_index() == b.get_device_index();
}

// the current CUDA stream of a tensor's device (the one torch launches on)
inline cudaStream_t stream_of(const Tensor& t) {
  void* stream = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(t.get_device_index(), &stream));
  return static_cast<cudaStream_t>(stream);
}

// makes a tensor's device the current one for the scope
using DeviceGuard = torch::stable::accelerator::DeviceGuard;

// a new uninitialized tensor on `like`'s device, of its dtype or `dtype`
inline Tensor empty_like_sized(const Tensor& like, const std::vector<int64_t>& sizes,
                               std::optional<ScalarType> dtype = std::nullopt) {
  return torch::stable::new_empty(like, sizes, dtype);
}

inline Tensor contig(const Tensor& t) { return t.is_contiguous() ? t : torch::stable::contiguous(t); }

}  // namespace pydlx

// TORCH_CHECK for the stable ABI: raises RuntimeError in Python with the message
#define PYDLX_CHECK(cond, ...) STD_TORCH_CHECK(cond, __VA_ARGS__)
#define PYDLX_CUDA_CHECK(expr)                                                                         \
  do {                                                                                                 \
    const cudaError_t pydlx_err_ = (expr);                                                             \
    STD_TORCH_CHECK(pydlx_err_ == cudaSuccess, "CUDA error: ", cudaGetErrorString(pydlx_err_));       \
  } while (0)
#define PYDLX_LAUNCH_CHECK() PYDLX_CUDA_CHECK(cudaGetLastError())
