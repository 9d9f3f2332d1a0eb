// cpu_ops.cpp -- the CPU implementations of torch.ops.sign_kernels.{lion_,tiger_,simba_}.
// The schemas are declared once, in sign_kernels/_ops.py.
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <mutex>
#include <set>
#include <thread>
#include <vector>

#include "../core/sign_math.h"
#include "../cpu/sign_cpu.h"
#include "common.h"

namespace sign_kernels {
namespace {

using binding::check_lists;
using binding::check_scalar;

// Host views of one call's tensors (the core takes raw pointers).
struct HostLists {
  std::vector<void*> params, states;
  std::vector<const void*> grads;
  std::vector<int64_t> numels, steps;
  std::vector<uint32_t> seeds;
  cpu::TensorList list;

  HostLists(at::TensorList p, at::TensorList g, at::TensorList s, at::TensorList st, c10::IntArrayRef sd,
            const binding::ListInfo& info) {
    const size_t n = p.size();
    params.resize(n);
    states.resize(n);
    grads.resize(n);
    numels.resize(n);
    steps.resize(n);
    seeds.resize(n);
    for (size_t i = 0; i < n; ++i) {
      params[i] = p[i].data_ptr();
      grads[i] = g[i].data_ptr();
      states[i] = s[i].data_ptr();
      numels[i] = p[i].numel();
      steps[i] = st[i].item<int64_t>();  // a CPU scalar: no synchronisation
      seeds[i] = static_cast<uint32_t>(sd[i]);
    }
    list.count = static_cast<int64_t>(n);
    list.params = params.data();
    list.grads = grads.data();
    list.states = states.data();
    list.numels = numels.data();
    list.steps = steps.data();
    list.seeds = seeds.data();
    list.param_dtype = static_cast<cpu::DType>(binding::dtype_code(info.param));
    list.grad_dtype = static_cast<cpu::DType>(binding::dtype_code(info.grad));
    list.state_dtype = static_cast<cpu::DType>(binding::dtype_code(info.state));
  }
};

// Fills the arguments every op shares; returns false when GradScaler found an inf
// (the step is skipped and nothing is written).
bool common_args(const char* op, cpu::Common& c, double lr, const c10::optional<at::Tensor>& lr_t,
                 const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& found_inf,
                 bool stochastic_rounding) {
  const c10::Device cpu_device(c10::kCPU);
  check_scalar(op, "lr_t", lr_t, cpu_device, true);
  check_scalar(op, "grad_scale", grad_scale, cpu_device, true);
  check_scalar(op, "found_inf", found_inf, cpu_device, true);
  if (found_inf.has_value() && found_inf->item<float>() != 0.0f) return false;
  c.lr = lr_t.has_value() ? lr_t->item<float>() : static_cast<float>(lr);
  c.has_grad_scale = grad_scale.has_value();
  c.grad_scale = c.has_grad_scale ? grad_scale->item<float>() : 1.0f;
  c.stochastic_rounding = stochastic_rounding;
  return true;
}

void lion_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList steps, double lr,
              const c10::optional<at::Tensor>& lr_t, double beta1, double beta2, double weight_decay,
              const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& found_inf,
              c10::IntArrayRef seeds, bool stochastic_rounding) {
  const auto info = check_lists("lion_", params, grads, exp_avgs, steps, seeds, c10::kCPU, false);
  cpu::LionArgs a;
  if (!common_args("lion_", a.common, lr, lr_t, grad_scale, found_inf, stochastic_rounding)) return;
  a.beta1 = static_cast<float>(beta1);
  a.beta2 = static_cast<float>(beta2);
  a.weight_decay = static_cast<float>(weight_decay);
  HostLists h(params, grads, exp_avgs, steps, seeds, info);
  const char* err = cpu::lion_step(h.list, a);
  TORCH_CHECK(err == nullptr, "lion_: ", err);
}

void tiger_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList steps,
               c10::IntArrayRef roles, double lr, const c10::optional<at::Tensor>& lr_t, double beta,
               double weight_decay, int64_t grad_accum_steps, double shrink_ratio,
               const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& found_inf,
               c10::IntArrayRef seeds, bool stochastic_rounding, const c10::optional<at::Tensor>& stats,
               at::OptionalIntArrayRef stats_nan, at::OptionalIntArrayRef stats_sumsq,
               at::OptionalIntArrayRef stats_n, const c10::optional<at::Tensor>& sumsq_out,
               at::OptionalIntArrayRef sumsq_out_at) {
  const auto info = check_lists("tiger_", params, grads, exp_avgs, steps, seeds, c10::kCPU, false);
  const std::vector<int64_t> rows = binding::check_tiger_roles("tiger_", params, roles, grad_accum_steps);
  const bool given = binding::check_tiger_stats("tiger_", params, roles, stats, stats_nan, stats_sumsq, stats_n,
                                                c10::Device(c10::kCPU));
  const std::vector<int32_t> role32(roles.begin(), roles.end());
  cpu::TigerArgs a;
  if (given) {  // NOTE: [Tiger statistics input]
    a.stats = stats->data_ptr<double>();
    a.stats_nan = stats_nan->data();
    a.stats_sumsq = stats_sumsq->data();
    a.stats_n = stats_n->data();
  }
  if (binding::check_tiger_sumsq_out("tiger_", params, roles, sumsq_out, sumsq_out_at, c10::Device(c10::kCPU))) {
    a.sumsq_out = sumsq_out->data_ptr<double>();  // NOTE: [Tiger sums of squares out]
    a.sumsq_out_at = sumsq_out_at->data();
  }
  if (!common_args("tiger_", a.common, lr, lr_t, grad_scale, found_inf, stochastic_rounding)) {
    if (a.sumsq_out == nullptr) return;
    a.skip = true;  // nothing is updated; the sums out still describe theta
  }
  a.beta = static_cast<float>(beta);
  a.weight_decay = static_cast<float>(weight_decay);
  a.shrink_ratio = static_cast<float>(shrink_ratio);
  a.grad_accum_steps = grad_accum_steps;
  a.roles = role32.data();
  a.row_sizes = rows.data();
  HostLists h(params, grads, exp_avgs, steps, seeds, info);
  const char* err = cpu::tiger_step(h.list, a);
  TORCH_CHECK(err == nullptr, "tiger_: ", err);
}

void simba_cpu(at::TensorList params, at::TensorList grads, at::TensorList sign_counts, at::TensorList steps,
               double lr, const c10::optional<at::Tensor>& lr_t, int64_t window_size, int64_t threshold_count,
               double weight_decay, const c10::optional<at::Tensor>& grad_scale,
               const c10::optional<at::Tensor>& found_inf, c10::IntArrayRef seeds, bool stochastic_rounding) {
  const auto info = check_lists("simba_", params, grads, sign_counts, steps, seeds, c10::kCPU, true);
  binding::check_simba_window("simba_", window_size, threshold_count);
  cpu::SimbaArgs a;
  if (!common_args("simba_", a.common, lr, lr_t, grad_scale, found_inf, stochastic_rounding)) return;
  a.window_size = static_cast<int32_t>(window_size);
  a.threshold_count = static_cast<int32_t>(threshold_count);
  a.weight_decay = static_cast<float>(weight_decay);
  HostLists h(params, grads, sign_counts, steps, seeds, info);
  const char* err = cpu::simba_step(h.list, a);
  TORCH_CHECK(err == nullptr, "simba_: ", err);
}

// The core's parallel loops run on torch's intra-op thread pool.
void torch_parallel_for(int64_t n, void* ctx, void (*body)(void*, int64_t, int64_t)) {
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) { body(ctx, b, e); });
}

const bool kParallelHooked = (cpu::set_parallel_for(&torch_parallel_for), true);

}  // namespace

// The number of distinct threads that run `items` work items through the kernels'
// parallel hook: torch.get_num_threads() (capped by items) when the binding was compiled
// with torch's parallel backend, 1 when at::parallel_for was compiled serial
// (NOTE: [OpenMP in the binding] in setup.py).
int64_t cpu_threads_used(int64_t items) {
  std::mutex mu;
  std::set<std::thread::id> ids;
  auto body = [&](int64_t, int64_t) {
    std::lock_guard<std::mutex> lock(mu);
    ids.insert(std::this_thread::get_id());
  };
  torch_parallel_for(items, &body, [](void* ctx, int64_t b, int64_t e) { (*static_cast<decltype(body)*>(ctx))(b, e); });
  return static_cast<int64_t>(ids.size());
}

TORCH_LIBRARY_IMPL(sign_kernels, CPU, m) {
  m.impl("lion_", &lion_cpu);
  m.impl("tiger_", &tiger_cpu);
  m.impl("simba_", &simba_cpu);
}

}  // namespace sign_kernels

// ---------------------------------------------------------------------------------------
// Distributed Lion's fused passes (sign_kernels/distributed; csrc/cpu/dist_lion.h).
#include "../cpu/dist_lion.h"
#include "dist_lion_checks.h"

namespace sign_kernels {
namespace {

void dist_lion_pack_cpu(at::TensorList grads, at::TensorList exp_avgs, at::TensorList packed, double beta1,
                        double beta2, const c10::optional<at::Tensor>& grad_scale,
                        const c10::optional<at::Tensor>& found_inf) {
  const auto nb = binding::check_dist_pack("dist_lion_pack_", grads, exp_avgs, packed, c10::kCPU);
  binding::check_scalar("dist_lion_pack_", "grad_scale", grad_scale, c10::Device(c10::kCPU), true);
  binding::check_scalar("dist_lion_pack_", "found_inf", found_inf, c10::Device(c10::kCPU), true);
  const size_t n = grads.size();
  std::vector<const void*> g(n);
  std::vector<void*> m(n);
  std::vector<uint8_t*> out(n);
  std::vector<int64_t> numels(n);
  for (size_t i = 0; i < n; ++i) {
    g[i] = grads[i].data_ptr();
    m[i] = exp_avgs[i].data_ptr();
    out[i] = packed[i].data_ptr<uint8_t>();
    numels[i] = grads[i].numel();
  }
  cpu::DistPackList t;
  t.count = static_cast<int64_t>(n);
  t.grads = g.data();
  t.exp_avgs = m.data();
  t.packed = out.data();
  t.numels = numels.data();
  t.grad_dtype = static_cast<cpu::DType>(binding::dtype_code(nb.grad));
  t.state_dtype = static_cast<cpu::DType>(binding::dtype_code(nb.state));
  cpu::DistPackArgs a;
  a.beta1 = static_cast<float>(beta1);
  a.beta2 = static_cast<float>(beta2);
  a.has_grad_scale = grad_scale.has_value();
  a.grad_scale = a.has_grad_scale ? grad_scale->item<float>() : 1.0f;
  a.skip = found_inf.has_value() && found_inf->item<float>() != 0.0f;
  const char* err = cpu::dist_lion_pack(t, a);
  TORCH_CHECK(err == nullptr, "dist_lion_pack_: ", err);
}

void dist_lion_apply_cpu(at::TensorList params, at::TensorList votes, int64_t bits, int64_t divisor, double lr,
                         const c10::optional<at::Tensor>& lr_t, double weight_decay,
                         const c10::optional<at::Tensor>& found_inf) {
  const auto dtype = binding::check_dist_apply("dist_lion_apply_", params, votes, bits, divisor, c10::kCPU);
  binding::check_scalar("dist_lion_apply_", "lr_t", lr_t, c10::Device(c10::kCPU), true);
  binding::check_scalar("dist_lion_apply_", "found_inf", found_inf, c10::Device(c10::kCPU), true);
  if (found_inf.has_value() && found_inf->item<float>() != 0.0f) return;
  const size_t n = params.size();
  std::vector<void*> p(n);
  std::vector<const uint8_t*> v(n);
  std::vector<int64_t> numels(n);
  for (size_t i = 0; i < n; ++i) {
    p[i] = params[i].data_ptr();
    v[i] = votes[i].data_ptr<uint8_t>();
    numels[i] = params[i].numel();
  }
  cpu::DistApplyList t;
  t.count = static_cast<int64_t>(n);
  t.params = p.data();
  t.votes = v.data();
  t.numels = numels.data();
  t.param_dtype = static_cast<cpu::DType>(binding::dtype_code(dtype));
  cpu::DistApplyArgs a;
  a.bits = static_cast<int>(bits);
  a.divisor = static_cast<float>(divisor);
  a.lr = lr_t.has_value() ? lr_t->item<float>() : static_cast<float>(lr);
  a.weight_decay = static_cast<float>(weight_decay);
  const char* err = cpu::dist_lion_apply(t, a);
  TORCH_CHECK(err == nullptr, "dist_lion_apply_: ", err);
}

void dist_lion_vote_cpu(const at::Tensor& received, const at::Tensor& out, int64_t world_size, int64_t out_bits,
                        bool majority) {
  binding::check_dist_vote("dist_lion_vote_", received, out, world_size, out_bits, majority, c10::kCPU);
  const char* err = cpu::dist_lion_vote(received.data_ptr<uint8_t>(), world_size, received.numel() / world_size,
                                        out.data_ptr<uint8_t>(), static_cast<int>(out_bits), majority);
  TORCH_CHECK(err == nullptr, "dist_lion_vote_: ", err);
}

}  // namespace

TORCH_LIBRARY_IMPL(sign_kernels, CPU, m) {
  m.impl("dist_lion_vote_", &dist_lion_vote_cpu);
  m.impl("dist_lion_pack_", &dist_lion_pack_cpu);
  m.impl("dist_lion_apply_", &dist_lion_apply_cpu);
}

}  // namespace sign_kernels
