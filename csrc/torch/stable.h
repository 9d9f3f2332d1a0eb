// stable.h -- the vocabulary of the torch bindings, on libtorch's stable ABI only.
//
// NOTE: [stable ABI] The bindings (csrc/torch/*) include nothing from ATen or c10 (only
// torch/csrc/stable/ and torch/headeronly/), so the compiled module calls libtorch through its
// C shim alone (the aoti_torch_* and torch_* functions) and loads into any torch from the one
// TORCH_TARGET_VERSION names (setup.py sets it: NOTE: [target torch version] there) to the
// newest. scripts/abi_check.sh builds the wheel against one torch, runs the tests under another,
// and fails on any other undefined torch or CPython symbol. What the stable API gives is used
// as it is; where our code needs more (error messages that print dtypes, shapes and devices as
// ATen printed them; a CPU scalar's value as float) it is written here on top of that API.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <cstdint>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace sign_kernels {
namespace binding {

using Tensor = torch::stable::Tensor;
using Tensors = std::vector<Tensor>;  // a schema's Tensor[] (a std::vector from torch 2.10)
using OptTensor = std::optional<Tensor>;
using OptTensors = std::optional<Tensors>;
using Ints = std::vector<int64_t>;  // int[]
using OptInts = std::optional<Ints>;
using ScalarType = torch::headeronly::ScalarType;
using Device = torch::stable::Device;
using DeviceType = torch::headeronly::DeviceType;
using Shape = torch::headeronly::IntHeaderOnlyArrayRef;

// NOTE: [argument errors] SK_CHECK(cond, parts...) throws std::runtime_error (torch turns it
// into Python's RuntimeError, as it did TORCH_CHECK's c10::Error) whose message is the parts
// streamed one after the other: exactly the text TORCH_CHECK made of them. Not
// STD_TORCH_CHECK: that one puts the function, file and line in front of the message, and the
// messages are part of the interface (tests match them). The parts are built only on failure.
template <class... Parts>
[[noreturn]] inline void fail(const Parts&... parts) {
  std::ostringstream message;
  (message << ... << parts);
  throw std::runtime_error(message.str());
}

#define SK_CHECK(cond, ...)                                  \
  do {                                                       \
    if (!(cond)) ::sign_kernels::binding::fail(__VA_ARGS__); \
  } while (0)

// A dtype's name as ATen prints it ("Float", "BFloat16", ...).
inline const char* dtype_name(ScalarType t) { return torch::headeronly::toString(t); }

// A shape as ATen prints it: "[2, 3]", "[]" for a 0-dim tensor.
inline std::string shape_str(Shape sizes) {
  std::ostringstream s;
  s << '[';
  for (size_t i = 0; i < sizes.size(); ++i) s << (i ? ", " : "") << sizes[i];
  s << ']';
  return s.str();
}

inline std::string shape_str(const Ints& sizes) { return shape_str(Shape(sizes)); }

// A device type's name as ATen writes it, in lower case ("cpu", "cuda") for a device or in
// upper case ("CPU", "CUDA": c10::DeviceTypeName) for a kernel's device type.
inline std::string device_type_name(DeviceType t, bool lower_case) {
  const char* name = nullptr;
  switch (t) {
    case DeviceType::CPU: name = "CPU"; break;
    case DeviceType::CUDA: name = "CUDA"; break;
    case DeviceType::HIP: name = "HIP"; break;
    case DeviceType::XPU: name = "XPU"; break;
    case DeviceType::MPS: name = "MPS"; break;
    case DeviceType::Meta: name = "META"; break;
    case DeviceType::XLA: name = "XLA"; break;
    case DeviceType::Lazy: name = "LAZY"; break;
    case DeviceType::MTIA: name = "MTIA"; break;
    case DeviceType::HPU: name = "HPU"; break;
    case DeviceType::PrivateUse1: name = "PRIVATEUSE1"; break;
    default: return "device type " + std::to_string(static_cast<int>(t));
  }
  std::string s(name);
  if (lower_case)
    for (char& c : s) c = static_cast<char>(c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c);
  return s;
}

// A device as ATen prints it: "cpu", "cuda:0".
inline std::string device_str(const Device& d) {
  std::string s = device_type_name(d.type(), true);
  if (d.index() >= 0) s += ":" + std::to_string(d.index());
  return s;
}

// at::isFloatingType.
inline bool is_floating(ScalarType t) {
  switch (t) {
    case ScalarType::Double:
    case ScalarType::Float:
    case ScalarType::Half:
    case ScalarType::BFloat16:
    case ScalarType::Float8_e5m2:
    case ScalarType::Float8_e4m3fn:
    case ScalarType::Float8_e5m2fnuz:
    case ScalarType::Float8_e4m3fnuz:
    case ScalarType::Float8_e8m0fnu:
      return true;
    default:
      return false;
  }
}

// The value of a 1-element CPU tensor of a floating dtype as float (at::Tensor::item<float>):
// read in place when it is fp32, else converted by torch (aten::to) first.
inline float host_float(const Tensor& t) {
  if (t.scalar_type() == ScalarType::Float) return *static_cast<const float*>(t.const_data_ptr());
  const Tensor f = torch::stable::to(t, ScalarType::Float);
  return *static_cast<const float*>(f.const_data_ptr());
}

inline bool is_sparse(const Tensor& t) { return t.layout() == torch::headeronly::Layout::Sparse; }

}  // namespace binding
}  // namespace sign_kernels
