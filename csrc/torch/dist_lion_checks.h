// dist_lion_checks.h -- argument checks of Distributed Lion's ops and their descriptors
// (csrc/core/descriptor.h), shared by the CPU and CUDA bindings (the Python side never sends what these refuse; NOTE: [wire fields] in
// csrc/core/dist_lion_math.h has the layout of the byte tensors).
#pragma once

#include "common.h"

namespace sign_kernels {
namespace binding {

struct DistPackInfo {
  ScalarType grad, state;
};

inline bool dist_float(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::BFloat16 || t == ScalarType::Half;
}

inline DistPackInfo check_dist_pack(const char* op, const Tensors& grads, const Tensors& exp_avgs,
                                    const Tensors& packed, DeviceType device_type) {
  const size_t n = grads.size();
  SK_CHECK(exp_avgs.size() == n && packed.size() == n, op,
           ": grads, exp_avgs and packed must have the same length, got ", n, ", ", exp_avgs.size(), ", ",
           packed.size());
  DistPackInfo info{ScalarType::Float, ScalarType::Float};
  if (n == 0) return info;
  info = {grads[0].scalar_type(), exp_avgs[0].scalar_type()};
  const Device device = grads[0].device();
  SK_CHECK(device.type() == device_type, op, ": grads[0] is on ", device_str(device), ", this kernel takes ",
           device_type_name(device_type, false), " tensors");
  SK_CHECK(dist_float(info.grad) && dist_float(info.state), op,
           ": grads and exp_avgs must be float32, bfloat16 or float16, got ", dtype_name(info.grad), " and ",
           dtype_name(info.state));
  for (size_t i = 0; i < n; ++i) {
    const Tensor& g = grads[i];
    const Tensor& m = exp_avgs[i];
    const Tensor& b = packed[i];
    SK_CHECK(g.device() == device && m.device() == device && b.device() == device, op, ": tensor ", i,
             ": grads, exp_avgs and packed must all be on ", device_str(device));
    SK_CHECK(g.scalar_type() == info.grad && m.scalar_type() == info.state, op, ": tensor ", i,
             ": all grads and all exp_avgs of one call must share a dtype");
    const Shape g_shape = g.sizes(), m_shape = m.sizes();
    SK_CHECK(m_shape == g_shape, op, ": tensor ", i, ": grad shape ", shape_str(g_shape), " and exp_avg shape ",
             shape_str(m_shape), " must be equal");
    const int64_t need = (g.numel() + 3) / 4;
    SK_CHECK(b.scalar_type() == ScalarType::Byte && b.numel() >= need, op, ": packed[", i,
             "] must be a uint8 tensor of at least ceil(numel / 4) = ", need, " bytes, got ",
             dtype_name(b.scalar_type()), " of ", b.numel());
    SK_CHECK(g.is_contiguous() && m.is_contiguous() && b.is_contiguous(), op, ": tensor ", i,
             ": grads, exp_avgs and packed must be contiguous");
  }
  return info;
}

inline ScalarType check_dist_apply(const char* op, const Tensors& params, const Tensors& votes, int64_t bits,
                                   int64_t divisor, DeviceType device_type) {
  SK_CHECK(bits == 2 || bits == 4 || bits == 8, op, ": bits must be 2, 4 or 8, got ", bits);
  SK_CHECK(divisor >= 1 && divisor <= 127, op, ": divisor must be in [1, 127], got ", divisor);
  const size_t n = params.size();
  SK_CHECK(votes.size() == n, op, ": params and votes must have the same length, got ", n, " and ", votes.size());
  if (n == 0) return ScalarType::Float;
  const ScalarType dtype = params[0].scalar_type();
  const Device device = params[0].device();
  SK_CHECK(device.type() == device_type, op, ": params[0] is on ", device_str(device), ", this kernel takes ",
           device_type_name(device_type, false), " tensors");
  SK_CHECK(dist_float(dtype), op, ": params must be float32, bfloat16 or float16, got ", dtype_name(dtype));
  for (size_t i = 0; i < n; ++i) {
    const Tensor& p = params[i];
    const Tensor& v = votes[i];
    const int64_t need = (p.numel() * bits + 7) / 8;
    SK_CHECK(p.device() == device && v.device() == device, op, ": tensor ", i, ": params and votes must be on ",
             device_str(device));
    SK_CHECK(p.scalar_type() == dtype, op, ": tensor ", i, ": all params of one call must share a dtype");
    SK_CHECK(v.scalar_type() == ScalarType::Byte && v.numel() >= need, op, ": votes[", i,
             "] must be a uint8 tensor of at least ceil(numel * bits / 8) = ", need, " bytes, got ",
             dtype_name(v.scalar_type()), " of ", v.numel());
    SK_CHECK(p.is_contiguous() && v.is_contiguous(), op, ": tensor ", i, ": params and votes must be contiguous");
  }
  return dtype;
}

// The pointer tables of a checked dist_lion_pack_ call, as the executors take them.
struct PackLists {
  std::vector<const void*> grads;
  std::vector<void*> exp_avgs;
  std::vector<uint8_t*> packed;
  Ints numels;
  DistPackList list;

  PackLists(const Tensors& g, const Tensors& m, const Tensors& out, const DistPackInfo& info)
      : grads(data_ptrs<const void*>(g)), exp_avgs(data_ptrs<void*>(m)), packed(data_ptrs<uint8_t*>(out)),
        numels(binding::numels(g)) {
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
  Ints numels;
  DistApplyList list;

  ApplyLists(const Tensors& p, const Tensors& v, ScalarType dtype)
      : params(data_ptrs<void*>(p)), votes(data_ptrs<const uint8_t*>(v)), numels(binding::numels(p)) {
    list.count = static_cast<int64_t>(p.size());
    list.params = params.data();
    list.votes = votes.data();
    list.numels = numels.data();
    list.param_dtype = core_dtype(dtype);
  }
  ApplyLists(const ApplyLists&) = delete;
  ApplyLists& operator=(const ApplyLists&) = delete;
};

inline void check_dist_vote(const char* op, const Tensor& received, const Tensor& out, int64_t world_size,
                            int64_t out_bits, bool majority, DeviceType device_type) {
  SK_CHECK(world_size >= 1 && world_size <= 127, op, ": world_size must be in [1, 127], got ", world_size);
  SK_CHECK(majority ? out_bits == 2 : (out_bits == 2 || out_bits == 4 || out_bits == 8), op,
           ": out_bits must be 2 for majority, 2, 4 or 8 for average, got ", out_bits);
  const Device device = received.device();
  SK_CHECK(device.type() == device_type && out.device() == device, op, ": received and out must be ",
           device_type_name(device_type, false), " tensors on one device");
  SK_CHECK(received.scalar_type() == ScalarType::Byte && out.scalar_type() == ScalarType::Byte &&
               received.is_contiguous() && out.is_contiguous(),
           op, ": received and out must be contiguous uint8 tensors");
  SK_CHECK(received.numel() % world_size == 0, op, ": received has ", received.numel(),
           " bytes, not a multiple of world_size ", world_size);
  const int64_t slice = received.numel() / world_size;
  SK_CHECK(out.numel() == slice * out_bits / 2, op, ": out must hold ", slice * out_bits / 2, " bytes, got ",
           out.numel());
}

}  // namespace binding
}  // namespace sign_kernels
