// common.h -- what the CPU and CUDA torch bindings share: the argument checks, and the
// code that turns checked tensor lists into the executors' one descriptor
// (csrc/core/descriptor.h). ops.h runs them in one order for both executors.
//
// The Python optimizers group tensors correctly before calling an op; these checks
// refuse whatever they should never send (STYLE.md: group in Python, check in C++),
// with a message naming the op, the list, the tensor index and the rule.
//
// Written on torch's stable ABI alone (NOTE: [stable ABI] in stable.h).
#pragma once

#include "stable.h"

#include "../core/descriptor.h"
#include "../core/sign_math.h"

#include <cstdint>
#include <string>
#include <vector>

namespace sign_kernels {
namespace binding {

// The descriptor's dtype of a dtype the checks below admit.
inline DType core_dtype(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return DType::kFloat32;
    case ScalarType::BFloat16: return DType::kBFloat16;
    case ScalarType::Half: return DType::kFloat16;
    case ScalarType::Short: return DType::kInt16;
    case ScalarType::Char: return DType::kInt8;
    default: break;
  }
  fail("sign_kernels: no kernel dtype for ", dtype_name(t));  // the checks admit none
}

// Pointer tables of the descriptors: tensor i's data pointer as the executors take it, and its
// element count. The descriptor structs point into these vectors, so the structs that own
// them are neither copied nor moved.
template <class P>
std::vector<P> data_ptrs(const Tensors& t) {
  std::vector<P> out(t.size());
  for (size_t i = 0; i < t.size(); ++i) out[i] = static_cast<P>(t[i].data_ptr());
  return out;
}

inline Ints numels(const Tensors& t) {
  Ints out(t.size());
  for (size_t i = 0; i < t.size(); ++i) out[i] = t[i].numel();
  return out;
}

// Checks the parallel lists of one call and returns their common dtypes.
struct ListInfo {
  ScalarType param, grad, state;
};

inline ListInfo check_lists(const char* op, const Tensors& params, const Tensors& grads, const Tensors& states,
                            const Tensors& steps, const Ints& seeds, DeviceType device_type, bool counters) {
  const int64_t n = static_cast<int64_t>(params.size());
  SK_CHECK(static_cast<int64_t>(grads.size()) == n && static_cast<int64_t>(states.size()) == n &&
               static_cast<int64_t>(steps.size()) == n && static_cast<int64_t>(seeds.size()) == n,
           op, ": params, grads, state, steps and seeds must have the same length, got ", n, ", ", grads.size(),
           ", ", states.size(), ", ", steps.size(), ", ", seeds.size());
  ListInfo info{ScalarType::Float, ScalarType::Float, counters ? ScalarType::Short : ScalarType::Float};
  if (n == 0) return info;
  info = {params[0].scalar_type(), grads[0].scalar_type(), states[0].scalar_type()};
  const Device device = params[0].device();
  SK_CHECK(device.type() == device_type, op, ": params[0] is on ", device_str(device), ", this kernel takes ",
           device_type_name(device_type, false), " tensors");
  for (int64_t i = 0; i < n; ++i) {
    const Tensor& p = params[i];
    const Tensor& g = grads[i];
    const Tensor& s = states[i];
    const Tensor& t = steps[i];
    const Device pd = p.device(), gd = g.device(), sd = s.device();
    SK_CHECK(pd == device && gd == device && sd == device, op, ": tensor ", i,
             ": params, grads and state must all be on ", device_str(device), " (got ", device_str(pd), ", ",
             device_str(gd), ", ", device_str(sd), ")");
    const ScalarType pt = p.scalar_type(), gt = g.scalar_type(), st = s.scalar_type();
    SK_CHECK(pt == info.param && gt == info.grad && st == info.state, op, ": tensor ", i,
             ": all params, all grads and all state tensors of one call must share a dtype (", dtype_name(info.param),
             "/", dtype_name(info.grad), "/", dtype_name(info.state), "), got ", dtype_name(pt), "/", dtype_name(gt),
             "/", dtype_name(st));
    const Shape shape = p.sizes(), g_shape = g.sizes(), s_shape = s.sizes();
    SK_CHECK(g_shape == shape && s_shape == shape, op, ": tensor ", i, ": param shape ", shape_str(shape),
             ", grad shape ", shape_str(g_shape), " and state shape ", shape_str(s_shape), " must be equal");
    SK_CHECK(p.is_contiguous() && g.is_contiguous() && s.is_contiguous(), op, ": tensor ", i,
             ": params, grads and state must be contiguous");
    SK_CHECK(!is_sparse(p) && !is_sparse(g), op, ": tensor ", i, ": sparse tensors are not supported");
    SK_CHECK(t.numel() == 1 && t.scalar_type() == ScalarType::Long, op, ": steps[", i,
             "] must be a 1-element int64 tensor, got ", dtype_name(t.scalar_type()), " of ", t.numel(), " elements");
    SK_CHECK(seeds[i] >= 0 && seeds[i] <= 0xFFFFFFFFLL, op, ": seeds[", i, "] must be in [0, 2^32), got ", seeds[i]);
  }
  const bool fused_param =
      info.param == ScalarType::Float || info.param == ScalarType::BFloat16 || info.param == ScalarType::Half;
  const bool grad_ok = info.grad == info.param || info.grad == ScalarType::Float;
  const bool state_ok = counters ? info.state == ScalarType::Short
                                 : (info.state == info.param || info.state == ScalarType::Float ||
                                    info.state == ScalarType::BFloat16 || info.state == ScalarType::Char);
  SK_CHECK(fused_param && grad_ok && state_ok, op, ": unsupported dtypes (param ", dtype_name(info.param), ", grad ",
           dtype_name(info.grad), ", state ", dtype_name(info.state),
           "): params float32/bfloat16/float16, grads the param dtype or float32, ",
           counters ? "int16 counters" : "state the param dtype, float32, bfloat16 or int8 (with its scales)");
  return info;
}

// The pointer tables of one checked call, as the executors take them. Each step is read
// by the executor where it runs (NOTE: [executor memory]), so it must be on the params'
// device: the optimizers keep it there.
struct Lists {
  std::vector<void*> params, states;
  std::vector<const void*> grads;
  Ints numels, seeds;
  std::vector<const int64_t*> steps;
  TensorList list;

  Lists(const char* op, const Tensors& p, const Tensors& g, const Tensors& s, const Tensors& st, const Ints& sd,
        const ListInfo& info)
      : params(data_ptrs<void*>(p)), states(data_ptrs<void*>(s)), grads(data_ptrs<const void*>(g)),
        numels(binding::numels(p)), seeds(sd), steps(p.size()) {
    // check_lists ran first: every param is on params[0]'s device (one device read, not one per
    // tensor: each is a call through the stable ABI's C shim).
    const Device device = p.empty() ? Device(DeviceType::CPU) : p[0].device();
    for (size_t i = 0; i < p.size(); ++i) {
      const Device step_device = st[i].device();
      SK_CHECK(step_device == device, op, ": steps[", i, "] is on ", device_str(step_device),
               "; the kernels read the step where the params are, so it must be on ", device_str(device),
               " (the optimizers keep it there)");
      steps[i] = static_cast<const int64_t*>(st[i].data_ptr());
    }
    list.count = static_cast<int64_t>(p.size());
    list.params = params.data();
    list.grads = grads.data();
    list.states = states.data();
    list.numels = numels.data();
    list.steps = steps.data();
    list.seeds = seeds.data();
    list.param_dtype = core_dtype(info.param);
    list.grad_dtype = core_dtype(info.grad);
    list.state_dtype = core_dtype(info.state);
  }
  Lists(const Lists&) = delete;  // `list` points into the vectors
  Lists& operator=(const Lists&) = delete;
};

inline void check_scalar(const char* op, const char* name, const OptTensor& t, const Device& device,
                         bool same_device) {
  if (!t.has_value()) return;
  SK_CHECK(t->numel() == 1, op, ": ", name, " must hold one element, got ", t->numel());
  SK_CHECK(is_floating(t->scalar_type()), op, ": ", name, " must be floating point, got ",
           dtype_name(t->scalar_type()));
  if (same_device) {
    const Device d = t->device();
    SK_CHECK(d == device, op, ": ", name, " is on ", device_str(d), ", the params on ", device_str(device));
  }
}

// Tiger's per-tensor roles; returns each tensor's row size (the last dim; 1 for 0-d).
inline Ints check_tiger_roles(const char* op, const Tensors& params, const Ints& roles, int64_t grad_accum_steps) {
  SK_CHECK(roles.size() == params.size(), op, ": roles must have one entry per param, got ", roles.size(), " for ",
           params.size());
  SK_CHECK(grad_accum_steps >= 1, op, ": grad_accum_steps must be >= 1, got ", grad_accum_steps);
  Ints rows(roles.size());
  for (size_t i = 0; i < roles.size(); ++i) {
    const int64_t dim = params[i].dim();
    SK_CHECK(roles[i] >= kRoleElementwise && roles[i] <= kRoleMatrix, op, ": roles[", i,
             "] must be 0 (elementwise), 1 (gain), 2 (embedding) or 3 (matrix), got ", roles[i]);
    SK_CHECK(roles[i] != kRoleEmbedding || dim >= 2, op, ": roles[", i, "] is embedding but the param has ", dim,
             " dims");
    rows[i] = dim > 0 ? params[i].size(dim - 1) : 1;
  }
  return rows;
}

// The fp64 buffer of Tiger's given statistics or sums out: contiguous, 1-D, on the params' device.
inline void check_fp64_buffer(const char* op, const char* name, const Tensor& s, const Device& device) {
  SK_CHECK(s.scalar_type() == ScalarType::Double && s.dim() == 1 && s.is_contiguous(), op, ": ", name,
           " must be a contiguous 1-D float64 tensor, got ", dtype_name(s.scalar_type()), " of shape ",
           shape_str(s.sizes()));
  const Device d = s.device();
  SK_CHECK(d == device, op, ": ", name, " is on ", device_str(d), ", the params on ", device_str(device));
}

// `at` (tensor i's index into a buffer of `len` entries) is -1 or the start of its sums: one
// entry, or one per row for an embedding. Written so that at + count cannot overflow.
inline void check_sums_index(const char* op, const char* list, const char* buffer, size_t i, int64_t at,
                             const Tensor& param, int64_t role, int64_t len) {
  const int64_t dim = param.dim();
  const int64_t row = dim > 0 ? param.size(dim - 1) : 0;
  const int64_t count = role == kRoleEmbedding && row > 0 ? param.numel() / row : 1;
  SK_CHECK(at >= -1 && (at < 0 || (at <= len && count <= len - at)), op, ": ", list, "[", i, "] = ", at,
           " is neither -1 nor the start of ", count, " entries of ", buffer, " (numel ", len, ")");
}

// Tiger's optional given statistics (NOTE: [Tiger statistics input] in sign_kernels/_ops.py):
// all four or none; indices inside `stats` (an embedding's row sums too) or -1; n >= 1 where
// sums are given. Returns whether they are given.
inline bool check_tiger_stats(const char* op, const Tensors& params, const Ints& roles, const OptTensor& stats,
                              const OptInts& stats_nan, const OptInts& stats_sumsq, const OptInts& stats_n,
                              const Device& device) {
  const bool any = stats.has_value() || stats_nan.has_value() || stats_sumsq.has_value() || stats_n.has_value();
  if (!any) return false;
  SK_CHECK(stats.has_value() && stats_nan.has_value() && stats_sumsq.has_value() && stats_n.has_value(), op,
           ": stats, stats_nan, stats_sumsq and stats_n are given together or not at all");
  const Tensor& s = *stats;
  check_fp64_buffer(op, "stats", s, device);
  const size_t n = params.size();
  SK_CHECK(stats_nan->size() == n && stats_sumsq->size() == n && stats_n->size() == n, op,
           ": stats_nan, stats_sumsq and stats_n must have one entry per param (", n, "), got ", stats_nan->size(),
           ", ", stats_sumsq->size(), ", ", stats_n->size());
  const int64_t len = s.numel();
  for (size_t i = 0; i < n; ++i) {
    const int64_t at_nan = (*stats_nan)[i], at_sq = (*stats_sumsq)[i];
    SK_CHECK(at_nan >= -1 && at_nan < len, op, ": stats_nan[", i, "] = ", at_nan,
             " is neither -1 nor an index of stats (numel ", len, ")");
    check_sums_index(op, "stats_sumsq", "stats", i, at_sq, params[i], roles[i], len);
    SK_CHECK(at_sq < 0 || (*stats_n)[i] >= 1, op, ": stats_n[", i, "] must be >= 1 where stats_sumsq[", i,
             "] is given, got ", (*stats_n)[i]);
  }
  return true;
}

// Tiger's sums of squares out (NOTE: [Tiger sums of squares out] in sign_kernels/_ops.py);
// returns whether they are wanted.
inline bool check_tiger_sumsq_out(const char* op, const Tensors& params, const Ints& roles,
                                  const OptTensor& sumsq_out, const OptInts& sumsq_out_at, const Device& device) {
  if (!sumsq_out.has_value() && !sumsq_out_at.has_value()) return false;
  SK_CHECK(sumsq_out.has_value() && sumsq_out_at.has_value(), op,
           ": sumsq_out and sumsq_out_at are given together or not at all");
  const Tensor& s = *sumsq_out;
  check_fp64_buffer(op, "sumsq_out", s, device);
  const size_t n = params.size();
  SK_CHECK(sumsq_out_at->size() == n, op, ": sumsq_out_at must have one entry per param (", n, "), got ",
           sumsq_out_at->size());
  const int64_t len = s.numel();
  for (size_t i = 0; i < n; ++i)
    check_sums_index(op, "sumsq_out_at", "sumsq_out", i, (*sumsq_out_at)[i], params[i], roles[i], len);
  return true;
}

// Lion's and Simba's arguments past the shared ones (Simba's window checked by check_simba_window).
inline void lion_args(LionArgs& a, double beta1, double beta2, double weight_decay) {
  a.beta1 = static_cast<float>(beta1);
  a.beta2 = static_cast<float>(beta2);
  a.weight_decay = static_cast<float>(weight_decay);
}

inline void simba_args(SimbaArgs& a, int64_t window_size, int64_t threshold_count, double weight_decay) {
  a.window_size = static_cast<int32_t>(window_size);
  a.threshold_count = static_cast<int32_t>(threshold_count);
  a.weight_decay = static_cast<float>(weight_decay);
}

// Tiger's arguments past the shared ones, for params whose roles check_tiger_roles passed
// (`rows` is what it returned; `roles` and `rows` must outlive the call): the optional
// given statistics and sums out are checked against `device`, where the executor reads them.
inline void tiger_args(const char* op, TigerArgs& a, const Tensors& params, const Ints& roles, const Ints& rows,
                       double beta, double weight_decay, int64_t grad_accum_steps, double shrink_ratio,
                       const OptTensor& stats, const OptInts& stats_nan, const OptInts& stats_sumsq,
                       const OptInts& stats_n, const OptTensor& sumsq_out, const OptInts& sumsq_out_at,
                       const Device& device) {
  a.beta = static_cast<float>(beta);
  a.weight_decay = static_cast<float>(weight_decay);
  a.shrink_ratio = static_cast<float>(shrink_ratio);
  a.grad_accum_steps = grad_accum_steps;
  a.roles = roles.data();
  a.row_sizes = rows.data();
  if (check_tiger_stats(op, params, roles, stats, stats_nan, stats_sumsq, stats_n, device)) {
    a.stats = static_cast<const double*>(stats->data_ptr());  // NOTE: [Tiger statistics input]
    a.stats_nan = stats_nan->data();
    a.stats_sumsq = stats_sumsq->data();
    a.stats_n = stats_n->data();
  }
  if (check_tiger_sumsq_out(op, params, roles, sumsq_out, sumsq_out_at, device)) {
    a.sumsq_out = static_cast<double*>(sumsq_out->data_ptr());  // NOTE: [Tiger sums of squares out]
    a.sumsq_out_at = sumsq_out_at->data();
  }
}

inline void check_simba_window(const char* op, int64_t window_size, int64_t threshold_count) {
  SK_CHECK(window_size >= 1 && window_size <= 32767, op, ": window_size must be in [1, 32767], got ", window_size);
  SK_CHECK(threshold_count >= 0 && threshold_count <= window_size, op,
           ": threshold_count must be in [0, window_size], got ", threshold_count);
}

// 8-bit momentum's block scales and the correction byte (NOTE: [8-bit momentum and the
// correction byte] in sign_kernels/_ops.py), checked and set into a checked call's `list`.
struct CompressedLists {
  std::vector<void*> scales, residuals;
  Ints rows;

  CompressedLists(const char* op, Lists& l, const Tensors& params, const Tensors& states,
                  const OptTensors& exp_avg_scales, const OptTensors& residual, bool stochastic_rounding) {
    const size_t n = params.size();
    const bool int8 = n > 0 && states[0].scalar_type() == ScalarType::Char;
    SK_CHECK(int8 == exp_avg_scales.has_value() || n == 0, op,
             ": int8 momentum and exp_avg_scales are given together or not at all");
    if (exp_avg_scales.has_value()) {
      SK_CHECK(exp_avg_scales->size() == n, op, ": exp_avg_scales has ", exp_avg_scales->size(), " tensors for ", n,
               " params");
      rows.resize(n);
      for (size_t i = 0; i < n; ++i) {
        const Tensor& m = states[i];
        const Tensor& sc = (*exp_avg_scales)[i];
        SK_CHECK(m.dim() >= 2, op, ": tensor ", i, ": int8 momentum needs >= 2 dims (rows of blocks), got ", m.dim());
        const Shape shape = m.sizes();
        const int64_t cols = shape.back();
        Ints want(shape.begin(), shape.end());
        want.back() = (cols + kQBlock - 1) / kQBlock;
        const Device md = m.device(), scd = sc.device();
        SK_CHECK(sc.scalar_type() == ScalarType::BFloat16 && sc.is_contiguous() && sc.sizes() == Shape(want) &&
                     scd == md,
                 op, ": tensor ", i, ": exp_avg_scales must be a contiguous bf16 tensor of shape ", shape_str(want),
                 " on ", device_str(md), ", got ", dtype_name(sc.scalar_type()), " ", shape_str(sc.sizes()), " on ",
                 device_str(scd));
        rows[i] = cols;
      }
      scales = data_ptrs<void*>(*exp_avg_scales);
      l.list.scales = scales.data();
      l.list.row_sizes = rows.data();
    }
    if (residual.has_value()) {
      SK_CHECK(!stochastic_rounding, op, ": residuals (the correction byte) and stochastic_rounding are exclusive");
      SK_CHECK(residual->size() == n, op, ": residuals has ", residual->size(), " tensors for ", n, " params");
      for (size_t i = 0; i < n; ++i) {
        const Tensor& p = params[i];
        const Tensor& r = (*residual)[i];
        const ScalarType pt = p.scalar_type();
        SK_CHECK(pt == ScalarType::BFloat16 || pt == ScalarType::Half, op, ": tensor ", i,
                 ": the correction byte is for bf16 and fp16 params, got ", dtype_name(pt));
        SK_CHECK(r.scalar_type() == ScalarType::Char && r.is_contiguous() && r.sizes() == p.sizes() &&
                     r.device() == p.device(),
                 op, ": tensor ", i, ": residuals must be contiguous int8 tensors of the param's shape and device");
      }
      residuals = data_ptrs<void*>(*residual);
      l.list.residuals = residuals.data();
    }
  }
  CompressedLists(const CompressedLists&) = delete;
  CompressedLists& operator=(const CompressedLists&) = delete;
};

// The norm pass (sumsq_): the tensors share a fused dtype and out's device; out is a contiguous
// 1-D fp64 tensor with one entry per tensor. Returns the tables the executors take.
struct SumsqLists {
  std::vector<const void*> tensors;
  Ints numels;
  SumsqList list;

  SumsqLists(const char* op, const Tensors& t, const Tensor& out, DeviceType device_type) {
    const Device out_device = out.device();
    SK_CHECK(out_device.type() == device_type, op, ": out is on ", device_str(out_device), ", this kernel takes ",
             device_type_name(device_type, false), " tensors");
    check_fp64_buffer(op, "out", out, out_device);
    SK_CHECK(out.numel() == static_cast<int64_t>(t.size()), op, ": out has ", out.numel(), " entries for ",
             t.size(), " tensors (one sum per tensor)");
    const ScalarType dtype = t.empty() ? ScalarType::Float : t[0].scalar_type();
    SK_CHECK(dtype == ScalarType::Float || dtype == ScalarType::BFloat16 || dtype == ScalarType::Half, op,
             ": tensors must be float32, bfloat16 or float16, got ", dtype_name(dtype));
    for (size_t i = 0; i < t.size(); ++i) {
      const ScalarType ti = t[i].scalar_type();
      SK_CHECK(ti == dtype, op, ": tensor ", i, " is ", dtype_name(ti), "; all tensors of one call share a dtype (",
               dtype_name(dtype), ")");
      const Device d = t[i].device();
      SK_CHECK(d == out_device, op, ": tensor ", i, " is on ", device_str(d), ", out on ", device_str(out_device));
      SK_CHECK(t[i].is_contiguous() && !is_sparse(t[i]), op, ": tensor ", i, " must be a contiguous dense tensor");
    }
    tensors = data_ptrs<const void*>(t);
    numels = binding::numels(t);
    list.count = static_cast<int64_t>(t.size());
    list.tensors = tensors.data();
    list.numels = numels.data();
    list.dtype = core_dtype(dtype);
  }
  SumsqLists(const SumsqLists&) = delete;  // `list` points into the vectors
  SumsqLists& operator=(const SumsqLists&) = delete;
};

}  // namespace binding
}  // namespace sign_kernels
