// dist_lion_checks.h -- argument checks of Distributed Lion's ops and their descriptors
// (csrc/core/descriptor.h), shared by the CPU and CUDA bindings (the Python side never sends what these refuse; NOTE: [wire fields] in
// csrc/core/dist_lion_math.h has the layout of the byte tensors).
#pragma once

#include "common.h"

namespace sign_kernels {
namespace binding {

struct DistPackInfo {
  at::ScalarType grad, state;
};

inline bool dist_float(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

inline DistPackInfo check_dist_pack(const char* op, at::TensorList grads, at::TensorList exp_avgs,
                                    at::TensorList packed, c10::DeviceType device_type) {
  const size_t n = grads.size();
  TORCH_CHECK(exp_avgs.size() == n && packed.size() == n, op,
              ": grads, exp_avgs and packed must have the same length, got ", n, ", ", exp_avgs.size(), ", ",
              packed.size());
  DistPackInfo info{at::kFloat, at::kFloat};
  if (n == 0) return info;
  info = {grads[0].scalar_type(), exp_avgs[0].scalar_type()};
  const c10::Device device = grads[0].device();
  TORCH_CHECK(device.type() == device_type, op, ": grads[0] is on ", device, ", this kernel takes ",
              c10::DeviceTypeName(device_type), " tensors");
  TORCH_CHECK(dist_float(info.grad) && dist_float(info.state), op,
              ": grads and exp_avgs must be float32, bfloat16 or float16, got ", info.grad, " and ", info.state);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& g = grads[i];
    const at::Tensor& m = exp_avgs[i];
    const at::Tensor& b = packed[i];
    TORCH_CHECK(g.device() == device && m.device() == device && b.device() == device, op, ": tensor ", i,
                ": grads, exp_avgs and packed must all be on ", device);
    TORCH_CHECK(g.scalar_type() == info.grad && m.scalar_type() == info.state, op, ": tensor ", i,
                ": all grads and all exp_avgs of one call must share a dtype");
    TORCH_CHECK(m.sizes() == g.sizes(), op, ": tensor ", i, ": grad shape ", g.sizes(), " and exp_avg shape ",
                m.sizes(), " must be equal");
    TORCH_CHECK(b.scalar_type() == at::kByte && b.numel() >= (g.numel() + 3) / 4, op, ": packed[", i,
                "] must be a uint8 tensor of at least ceil(numel / 4) = ", (g.numel() + 3) / 4, " bytes, got ",
                b.scalar_type(), " of ", b.numel());
    TORCH_CHECK(g.is_contiguous() && m.is_contiguous() && b.is_contiguous(), op, ": tensor ", i,
                ": grads, exp_avgs and packed must be contiguous");
  }
  return info;
}

inline at::ScalarType check_dist_apply(const char* op, at::TensorList params, at::TensorList votes, int64_t bits,
                                       int64_t divisor, c10::DeviceType device_type) {
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, op, ": bits must be 2, 4 or 8, got ", bits);
  TORCH_CHECK(divisor >= 1 && divisor <= 127, op, ": divisor must be in [1, 127], got ", divisor);
  const size_t n = params.size();
  TORCH_CHECK(votes.size() == n, op, ": params and votes must have the same length, got ", n, " and ",
              votes.size());
  if (n == 0) return at::kFloat;
  const at::ScalarType dtype = params[0].scalar_type();
  const c10::Device device = params[0].device();
  TORCH_CHECK(device.type() == device_type, op, ": params[0] is on ", device, ", this kernel takes ",
              c10::DeviceTypeName(device_type), " tensors");
  TORCH_CHECK(dist_float(dtype), op, ": params must be float32, bfloat16 or float16, got ", dtype);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& v = votes[i];
    const int64_t need = (p.numel() * bits + 7) / 8;
    TORCH_CHECK(p.device() == device && v.device() == device, op, ": tensor ", i,
                ": params and votes must be on ", device);
    TORCH_CHECK(p.scalar_type() == dtype, op, ": tensor ", i, ": all params of one call must share a dtype");
    TORCH_CHECK(v.scalar_type() == at::kByte && v.numel() >= need, op, ": votes[", i,
                "] must be a uint8 tensor of at least ceil(numel * bits / 8) = ", need, " bytes, got ",
                v.scalar_type(), " of ", v.numel());
    TORCH_CHECK(p.is_contiguous() && v.is_contiguous(), op, ": tensor ", i, ": params and votes must be contiguous");
  }
  return dtype;
}

// The pointer tables of a checked dist_lion_pack_ call, as the executors take them.
struct PackLists {
  std::vector<const void*> grads;
  std::vector<void*> exp_avgs;
  std::vector<uint8_t*> packed;
  std::vector<int64_t> numels;
  DistPackList list;

  PackLists(at::TensorList g, at::TensorList m, at::TensorList out, const DistPackInfo& info)
      : grads(g.size()), exp_avgs(g.size()), packed(g.size()), numels(g.size()) {
    for (size_t i = 0; i < g.size(); ++i) {
      grads[i] = g[i].data_ptr();
      exp_avgs[i] = m[i].data_ptr();
      packed[i] = out[i].data_ptr<uint8_t>();
      numels[i] = g[i].numel();
    }
    list.count = static_cast<int64_t>(g.size());
    list.grads = grads.data();
    list.exp_avgs = exp_avgs.data();
    list.packed = packed.data();
    list.numels = numels.data();
    list.grad_dtype = core_dtype(info.grad);
    list.state_dtype = core_dtype(info.state);
  }
  PackLists(const PackLists&) = delete;  // `list` points into the vectors
  PackLists& operator=(const PackLists&) = delete;
};

// The pointer tables of a checked dist_lion_apply_ call.
struct ApplyLists {
  std::vector<void*> params;
  std::vector<const uint8_t*> votes;
  std::vector<int64_t> numels;
  DistApplyList list;

  ApplyLists(at::TensorList p, at::TensorList v, at::ScalarType dtype)
      : params(p.size()), votes(p.size()), numels(p.size()) {
    for (size_t i = 0; i < p.size(); ++i) {
      params[i] = p[i].data_ptr();
      votes[i] = v[i].data_ptr<uint8_t>();
      numels[i] = p[i].numel();
    }
    list.count = static_cast<int64_t>(p.size());
    list.params = params.data();
    list.votes = votes.data();
    list.numels = numels.data();
    list.param_dtype = core_dtype(dtype);
  }
  ApplyLists(const ApplyLists&) = delete;
  ApplyLists& operator=(const ApplyLists&) = delete;
};

inline void check_dist_vote(const char* op, const at::Tensor& received, const at::Tensor& out, int64_t world_size,
                            int64_t out_bits, bool majority, c10::DeviceType device_type) {
  TORCH_CHECK(world_size >= 1 && world_size <= 127, op, ": world_size must be in [1, 127], got ", world_size);
  TORCH_CHECK(majority ? out_bits == 2 : (out_bits == 2 || out_bits == 4 || out_bits == 8), op,
              ": out_bits must be 2 for majority, 2, 4 or 8 for average, got ", out_bits);
  TORCH_CHECK(received.device().type() == device_type && out.device() == received.device(), op,
              ": received and out must be ", c10::DeviceTypeName(device_type), " tensors on one device");
  TORCH_CHECK(received.scalar_type() == at::kByte && out.scalar_type() == at::kByte && received.is_contiguous() &&
                  out.is_contiguous(),
              op, ": received and out must be contiguous uint8 tensors");
  TORCH_CHECK(received.numel() % world_size == 0, op, ": received has ", received.numel(),
              " bytes, not a multiple of world_size ", world_size);
  const int64_t slice = received.numel() / world_size;
  TORCH_CHECK(out.numel() == slice * out_bits / 2, op, ": out must hold ", slice * out_bits / 2, " bytes, got ",
              out.numel());
}

}  // namespace binding
}  // namespace sign_kernels
