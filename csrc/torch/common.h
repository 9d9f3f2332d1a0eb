// common.h -- what the CPU and CUDA torch bindings share: the argument checks, and the
// code that turns checked tensor lists into the executors' one descriptor
// (csrc/core/descriptor.h).
//
// The Python optimizers group tensors correctly before calling an op; these checks
// refuse whatever they should never send (STYLE.md: group in Python, check in C++),
// with a message naming the op, the list, the tensor index and the rule.
#pragma once

#include <torch/library.h>
#include <ATen/core/Tensor.h>  // not ATen/ATen.h: the bindings use Tensor methods only (build time)

#include "../core/descriptor.h"
#include "../core/sign_math.h"

#include <cstdint>
#include <string>
#include <vector>

namespace sign_kernels {
namespace binding {

// The descriptor's dtype of a dtype the checks below admit.
inline DType core_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    case at::kShort: return DType::kInt16;
    case at::kChar: return DType::kInt8;
    default: break;
  }
  TORCH_CHECK(false, "sign_kernels: no kernel dtype for ", t);  // the checks admit none
  return DType::kFloat32;
}

// Checks the parallel lists of one call and returns their common dtypes.
struct ListInfo {
  at::ScalarType param, grad, state;
};

inline ListInfo check_lists(const char* op, at::TensorList params, at::TensorList grads, at::TensorList states,
                            at::TensorList steps, c10::IntArrayRef seeds, c10::DeviceType device_type,
                            bool counters) {
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == n && static_cast<int64_t>(states.size()) == n &&
                  static_cast<int64_t>(steps.size()) == n && static_cast<int64_t>(seeds.size()) == n,
              op, ": params, grads, state, steps and seeds must have the same length, got ", n, ", ", grads.size(),
              ", ", states.size(), ", ", steps.size(), ", ", seeds.size());
  ListInfo info{at::kFloat, at::kFloat, counters ? at::kShort : at::kFloat};
  if (n == 0) return info;
  info = {params[0].scalar_type(), grads[0].scalar_type(), states[0].scalar_type()};
  const c10::Device device = params[0].device();
  TORCH_CHECK(device.type() == device_type, op, ": params[0] is on ", device, ", this kernel takes ",
              c10::DeviceTypeName(device_type), " tensors");
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    const at::Tensor& s = states[i];
    const at::Tensor& t = steps[i];
    TORCH_CHECK(p.device() == device && g.device() == device && s.device() == device, op, ": tensor ", i,
                ": params, grads and state must all be on ", device, " (got ", p.device(), ", ", g.device(), ", ",
                s.device(), ")");
    TORCH_CHECK(p.scalar_type() == info.param && g.scalar_type() == info.grad && s.scalar_type() == info.state, op,
                ": tensor ", i, ": all params, all grads and all state tensors of one call must share a dtype (",
                info.param, "/", info.grad, "/", info.state, "), got ", p.scalar_type(), "/", g.scalar_type(), "/",
                s.scalar_type());
    TORCH_CHECK(g.sizes() == p.sizes() && s.sizes() == p.sizes(), op, ": tensor ", i, ": param shape ", p.sizes(),
                ", grad shape ", g.sizes(), " and state shape ", s.sizes(), " must be equal");
    TORCH_CHECK(p.is_contiguous() && g.is_contiguous() && s.is_contiguous(), op, ": tensor ", i,
                ": params, grads and state must be contiguous");
    TORCH_CHECK(!p.is_sparse() && !g.is_sparse(), op, ": tensor ", i, ": sparse tensors are not supported");
    TORCH_CHECK(t.numel() == 1 && t.scalar_type() == at::kLong, op, ": steps[", i,
                "] must be a 1-element int64 tensor, got ", t.scalar_type(), " of ", t.numel(), " elements");
    TORCH_CHECK(seeds[i] >= 0 && seeds[i] <= 0xFFFFFFFFLL, op, ": seeds[", i, "] must be in [0, 2^32), got ",
                seeds[i]);
  }
  const bool fused_param = info.param == at::kFloat || info.param == at::kBFloat16 || info.param == at::kHalf;
  const bool grad_ok = info.grad == info.param || info.grad == at::kFloat;
  const bool state_ok = counters ? info.state == at::kShort
                                 : (info.state == info.param || info.state == at::kFloat || info.state == at::kBFloat16 ||
                                    info.state == at::kChar);
  TORCH_CHECK(fused_param && grad_ok && state_ok, op, ": unsupported dtypes (param ", info.param, ", grad ",
              info.grad, ", state ", info.state,
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
  std::vector<int64_t> numels, seeds;
  std::vector<const int64_t*> steps;
  TensorList list;

  Lists(const char* op, at::TensorList p, at::TensorList g, at::TensorList s, at::TensorList st, c10::IntArrayRef sd,
        const ListInfo& info)
      : params(p.size()), states(p.size()), grads(p.size()), numels(p.size()), seeds(sd.begin(), sd.end()),
        steps(p.size()) {
    for (size_t i = 0; i < p.size(); ++i) {
      TORCH_CHECK(st[i].device() == p[i].device(), op, ": steps[", i, "] is on ", st[i].device(),
                  "; the kernels read the step where the params are, so it must be on ", p[i].device(),
                  " (the optimizers keep it there)");
      params[i] = p[i].data_ptr();
      grads[i] = g[i].data_ptr();
      states[i] = s[i].data_ptr();
      numels[i] = p[i].numel();
      steps[i] = st[i].data_ptr<int64_t>();
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

inline void check_scalar(const char* op, const char* name, const c10::optional<at::Tensor>& t, c10::Device device,
                         bool same_device) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->numel() == 1, op, ": ", name, " must hold one element, got ", t->numel());
  TORCH_CHECK(t->is_floating_point(), op, ": ", name, " must be floating point, got ", t->scalar_type());
  if (same_device)
    TORCH_CHECK(t->device() == device, op, ": ", name, " is on ", t->device(), ", the params on ", device);
}

// Tiger's per-tensor roles; returns each tensor's row size (the last dim; 1 for 0-d).
inline std::vector<int64_t> check_tiger_roles(const char* op, at::TensorList params, c10::IntArrayRef roles,
                                              int64_t grad_accum_steps) {
  TORCH_CHECK(roles.size() == params.size(), op, ": roles must have one entry per param, got ", roles.size(),
              " for ", params.size());
  TORCH_CHECK(grad_accum_steps >= 1, op, ": grad_accum_steps must be >= 1, got ", grad_accum_steps);
  std::vector<int64_t> rows(roles.size());
  for (size_t i = 0; i < roles.size(); ++i) {
    TORCH_CHECK(roles[i] >= kRoleElementwise && roles[i] <= kRoleMatrix, op, ": roles[", i,
                "] must be 0 (elementwise), 1 (gain), 2 (embedding) or 3 (matrix), got ", roles[i]);
    TORCH_CHECK(roles[i] != kRoleEmbedding || params[i].dim() >= 2, op, ": roles[", i,
                "] is embedding but the param has ", params[i].dim(), " dims");
    rows[i] = params[i].dim() > 0 ? params[i].size(-1) : 1;
  }
  return rows;
}

// The fp64 buffer of Tiger's given statistics or sums out: contiguous, 1-D, on the params' device.
inline void check_fp64_buffer(const char* op, const char* name, const at::Tensor& s, c10::Device device) {
  TORCH_CHECK(s.scalar_type() == at::kDouble && s.dim() == 1 && s.is_contiguous(), op, ": ", name,
              " must be a contiguous 1-D float64 tensor, got ", s.scalar_type(), " of shape ", s.sizes());
  TORCH_CHECK(s.device() == device, op, ": ", name, " is on ", s.device(), ", the params on ", device);
}

// `at` (tensor i's index into a buffer of `len` entries) is -1 or the start of its sums: one
// entry, or one per row for an embedding. Written so that at + count cannot overflow.
inline void check_sums_index(const char* op, const char* list, const char* buffer, size_t i, int64_t at,
                             const at::Tensor& param, int64_t role, int64_t len) {
  const int64_t count = role == kRoleEmbedding && param.dim() > 0 && param.size(-1) > 0
                            ? param.numel() / param.size(-1)
                            : 1;
  TORCH_CHECK(at >= -1 && (at < 0 || (at <= len && count <= len - at)), op, ": ", list, "[", i, "] = ", at,
              " is neither -1 nor the start of ", count, " entries of ", buffer, " (numel ", len, ")");
}

// Tiger's optional given statistics (NOTE: [Tiger statistics input] in sign_kernels/_ops.py):
// all four or none; indices inside `stats` (an embedding's row sums too) or -1; n >= 1 where
// sums are given. Returns whether they are given.
inline bool check_tiger_stats(const char* op, at::TensorList params, c10::IntArrayRef roles,
                              const c10::optional<at::Tensor>& stats, at::OptionalIntArrayRef stats_nan,
                              at::OptionalIntArrayRef stats_sumsq, at::OptionalIntArrayRef stats_n,
                              c10::Device device) {
  const bool any = stats.has_value() || stats_nan.has_value() || stats_sumsq.has_value() || stats_n.has_value();
  if (!any) return false;
  TORCH_CHECK(stats.has_value() && stats_nan.has_value() && stats_sumsq.has_value() && stats_n.has_value(), op,
              ": stats, stats_nan, stats_sumsq and stats_n are given together or not at all");
  const at::Tensor& s = *stats;
  check_fp64_buffer(op, "stats", s, device);
  const size_t n = params.size();
  TORCH_CHECK(stats_nan->size() == n && stats_sumsq->size() == n && stats_n->size() == n, op,
              ": stats_nan, stats_sumsq and stats_n must have one entry per param (", n, "), got ", stats_nan->size(),
              ", ", stats_sumsq->size(), ", ", stats_n->size());
  const int64_t len = s.numel();
  for (size_t i = 0; i < n; ++i) {
    const int64_t at_nan = (*stats_nan)[i], at_sq = (*stats_sumsq)[i];
    TORCH_CHECK(at_nan >= -1 && at_nan < len, op, ": stats_nan[", i, "] = ", at_nan,
                " is neither -1 nor an index of stats (numel ", len, ")");
    check_sums_index(op, "stats_sumsq", "stats", i, at_sq, params[i], roles[i], len);
    TORCH_CHECK(at_sq < 0 || (*stats_n)[i] >= 1, op, ": stats_n[", i, "] must be >= 1 where stats_sumsq[", i,
                "] is given, got ", (*stats_n)[i]);
  }
  return true;
}

// Tiger's sums of squares out (NOTE: [Tiger sums of squares out] in sign_kernels/_ops.py);
// returns whether they are wanted.
inline bool check_tiger_sumsq_out(const char* op, at::TensorList params, c10::IntArrayRef roles,
                                  const c10::optional<at::Tensor>& sumsq_out, at::OptionalIntArrayRef sumsq_out_at,
                                  c10::Device device) {
  if (!sumsq_out.has_value() && !sumsq_out_at.has_value()) return false;
  TORCH_CHECK(sumsq_out.has_value() && sumsq_out_at.has_value(), op,
              ": sumsq_out and sumsq_out_at are given together or not at all");
  const at::Tensor& s = *sumsq_out;
  check_fp64_buffer(op, "sumsq_out", s, device);
  const size_t n = params.size();
  TORCH_CHECK(sumsq_out_at->size() == n, op, ": sumsq_out_at must have one entry per param (", n, "), got ",
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
inline void tiger_args(const char* op, TigerArgs& a, at::TensorList params, c10::IntArrayRef roles,
                       const std::vector<int64_t>& rows, double beta, double weight_decay, int64_t grad_accum_steps,
                       double shrink_ratio, const c10::optional<at::Tensor>& stats, at::OptionalIntArrayRef stats_nan,
                       at::OptionalIntArrayRef stats_sumsq, at::OptionalIntArrayRef stats_n,
                       const c10::optional<at::Tensor>& sumsq_out, at::OptionalIntArrayRef sumsq_out_at,
                       c10::Device device) {
  a.beta = static_cast<float>(beta);
  a.weight_decay = static_cast<float>(weight_decay);
  a.shrink_ratio = static_cast<float>(shrink_ratio);
  a.grad_accum_steps = grad_accum_steps;
  a.roles = roles.data();
  a.row_sizes = rows.data();
  if (check_tiger_stats(op, params, roles, stats, stats_nan, stats_sumsq, stats_n, device)) {
    a.stats = stats->data_ptr<double>();  // NOTE: [Tiger statistics input]
    a.stats_nan = stats_nan->data();
    a.stats_sumsq = stats_sumsq->data();
    a.stats_n = stats_n->data();
  }
  if (check_tiger_sumsq_out(op, params, roles, sumsq_out, sumsq_out_at, device)) {
    a.sumsq_out = sumsq_out->data_ptr<double>();  // NOTE: [Tiger sums of squares out]
    a.sumsq_out_at = sumsq_out_at->data();
  }
}

inline void check_simba_window(const char* op, int64_t window_size, int64_t threshold_count) {
  TORCH_CHECK(window_size >= 1 && window_size <= 32767, op, ": window_size must be in [1, 32767], got ",
              window_size);
  TORCH_CHECK(threshold_count >= 0 && threshold_count <= window_size, op,
              ": threshold_count must be in [0, window_size], got ", threshold_count);
}

// 8-bit momentum's block scales and the correction byte (NOTE: [8-bit momentum and the
// correction byte] in sign_kernels/_ops.py), checked and set into a checked call's `list`.
struct CompressedLists {
  std::vector<void*> scales, residuals;
  std::vector<int64_t> rows;

  CompressedLists(const char* op, Lists& l, at::TensorList params, at::TensorList states,
                  const c10::optional<at::TensorList>& exp_avg_scales, const c10::optional<at::TensorList>& residual,
                  bool stochastic_rounding) {
    const size_t n = params.size();
    const bool int8 = n > 0 && states[0].scalar_type() == at::kChar;
    TORCH_CHECK(int8 == exp_avg_scales.has_value() || n == 0, op,
                ": int8 momentum and exp_avg_scales are given together or not at all");
    if (exp_avg_scales.has_value()) {
      TORCH_CHECK(exp_avg_scales->size() == n, op, ": exp_avg_scales has ", exp_avg_scales->size(), " tensors for ",
                  n, " params");
      scales.resize(n);
      rows.resize(n);
      for (size_t i = 0; i < n; ++i) {
        const at::Tensor& m = states[i];
        const at::Tensor& sc = (*exp_avg_scales)[i];
        TORCH_CHECK(m.dim() >= 2, op, ": tensor ", i, ": int8 momentum needs >= 2 dims (rows of blocks), got ",
                    m.dim());
        const int64_t cols = m.size(-1);
        std::vector<int64_t> want(m.sizes().begin(), m.sizes().end());
        want.back() = (cols + kQBlock - 1) / kQBlock;
        TORCH_CHECK(sc.scalar_type() == at::kBFloat16 && sc.is_contiguous() && sc.sizes() == at::IntArrayRef(want) &&
                        sc.device() == m.device(),
                    op, ": tensor ", i, ": exp_avg_scales must be a contiguous bf16 tensor of shape ",
                    at::IntArrayRef(want), " on ", m.device(), ", got ", sc.scalar_type(), " ", sc.sizes(), " on ",
                    sc.device());
        scales[i] = sc.data_ptr();
        rows[i] = cols;
      }
      l.list.scales = scales.data();
      l.list.row_sizes = rows.data();
    }
    if (residual.has_value()) {
      TORCH_CHECK(!stochastic_rounding, op, ": residuals (the correction byte) and stochastic_rounding are exclusive");
      TORCH_CHECK(residual->size() == n, op, ": residuals has ", residual->size(), " tensors for ", n, " params");
      residuals.resize(n);
      for (size_t i = 0; i < n; ++i) {
        const at::Tensor& p = params[i];
        const at::Tensor& r = (*residual)[i];
        TORCH_CHECK(p.scalar_type() == at::kBFloat16 || p.scalar_type() == at::kHalf, op, ": tensor ", i,
                    ": the correction byte is for bf16 and fp16 params, got ", p.scalar_type());
        TORCH_CHECK(r.scalar_type() == at::kChar && r.is_contiguous() && r.sizes() == p.sizes() &&
                        r.device() == p.device(),
                    op, ": tensor ", i, ": residuals must be contiguous int8 tensors of the param's shape and device");
        residuals[i] = r.data_ptr();
      }
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
  std::vector<int64_t> numels;
  SumsqList list;

  SumsqLists(const char* op, at::TensorList t, const at::Tensor& out, c10::DeviceType device_type)
      : tensors(t.size()), numels(t.size()) {
    TORCH_CHECK(out.device().type() == device_type, op, ": out is on ", out.device(), ", this kernel takes ",
                c10::DeviceTypeName(device_type), " tensors");
    check_fp64_buffer(op, "out", out, out.device());
    TORCH_CHECK(out.numel() == static_cast<int64_t>(t.size()), op, ": out has ", out.numel(),
                " entries for ", t.size(), " tensors (one sum per tensor)");
    const at::ScalarType dtype = t.empty() ? at::kFloat : t[0].scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
                ": tensors must be float32, bfloat16 or float16, got ", dtype);
    for (size_t i = 0; i < t.size(); ++i) {
      TORCH_CHECK(t[i].scalar_type() == dtype, op, ": tensor ", i, " is ", t[i].scalar_type(),
                  "; all tensors of one call share a dtype (", dtype, ")");
      TORCH_CHECK(t[i].device() == out.device(), op, ": tensor ", i, " is on ", t[i].device(), ", out on ",
                  out.device());
      TORCH_CHECK(t[i].is_contiguous() && !t[i].is_sparse(), op, ": tensor ", i, " must be a contiguous dense tensor");
      tensors[i] = t[i].data_ptr();
      numels[i] = t[i].numel();
    }
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
