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

// Storage for the scalars the descriptor takes by pointer (NOTE: [executor memory]: host
// memory for the CPU executor), read from their CPU tensors here (no synchronisation).
struct ScalarHold {
  float grad_scale = 1.0f, found_inf = 0.0f, clip = 1.0f;
};

// An optional CPU scalar as the descriptor takes it: null, or its value read into `hold`.
const float* host_scalar(const c10::optional<at::Tensor>& t, float& hold) {
  if (!t.has_value()) return nullptr;
  hold = t->item<float>();
  return &hold;
}

// Fills the arguments every op shares. A set found_inf reaches the executor, which
// then changes nothing (Tiger still fills its sums out).
void common_args(const char* op, Common& c, ScalarHold& hold, double lr, const c10::optional<at::Tensor>& lr_t,
                 const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& found_inf,
                 bool stochastic_rounding, const c10::optional<at::Tensor>& clip) {
  const c10::Device cpu_device(c10::kCPU);
  check_scalar(op, "lr_t", lr_t, cpu_device, true);
  check_scalar(op, "grad_scale", grad_scale, cpu_device, true);
  check_scalar(op, "found_inf", found_inf, cpu_device, true);
  check_scalar(op, "clip", clip, cpu_device, true);
  c.clip = host_scalar(clip, hold.clip);
  c.lr = lr_t.has_value() ? lr_t->item<float>() : static_cast<float>(lr);
  c.grad_scale = host_scalar(grad_scale, hold.grad_scale);
  c.found_inf = host_scalar(found_inf, hold.found_inf);
  c.stochastic_rounding = stochastic_rounding;
}

void lion_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList steps, double lr,
              const c10::optional<at::Tensor>& lr_t, double beta1, double beta2, double weight_decay,
              const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& found_inf,
              c10::IntArrayRef seeds, bool stochastic_rounding, const c10::optional<at::Tensor>& clip,
              const c10::optional<at::TensorList>& exp_avg_scales, const c10::optional<at::TensorList>& residuals) {
  const auto info = check_lists("lion_", params, grads, exp_avgs, steps, seeds, c10::kCPU, false);
  LionArgs a;
  ScalarHold hold;
  common_args("lion_", a.common, hold, lr, lr_t, grad_scale, found_inf, stochastic_rounding, clip);
  binding::lion_args(a, beta1, beta2, weight_decay);
  binding::Lists l("lion_", params, grads, exp_avgs, steps, seeds, info);
  const binding::CompressedLists q("lion_", l, params, exp_avgs, exp_avg_scales, residuals, stochastic_rounding);
  const char* err = cpu::lion_step(l.list, a);
  TORCH_CHECK(err == nullptr, "lion_: ", err);
}

void tiger_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList steps,
               c10::IntArrayRef roles, double lr, const c10::optional<at::Tensor>& lr_t, double beta,
               double weight_decay, int64_t grad_accum_steps, double shrink_ratio,
               const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& found_inf,
               c10::IntArrayRef seeds, bool stochastic_rounding, const c10::optional<at::Tensor>& stats,
               at::OptionalIntArrayRef stats_nan, at::OptionalIntArrayRef stats_sumsq,
               at::OptionalIntArrayRef stats_n, const c10::optional<at::Tensor>& sumsq_out,
               at::OptionalIntArrayRef sumsq_out_at, const c10::optional<at::Tensor>& clip,
               const c10::optional<at::TensorList>& exp_avg_scales, const c10::optional<at::TensorList>& residuals) {
  const auto info = check_lists("tiger_", params, grads, exp_avgs, steps, seeds, c10::kCPU, false);
  const std::vector<int64_t> rows = binding::check_tiger_roles("tiger_", params, roles, grad_accum_steps);
  TigerArgs a;
  binding::tiger_args("tiger_", a, params, roles, rows, beta, weight_decay, grad_accum_steps, shrink_ratio, stats,
                      stats_nan, stats_sumsq, stats_n, sumsq_out, sumsq_out_at, c10::Device(c10::kCPU));
  ScalarHold hold;
  common_args("tiger_", a.common, hold, lr, lr_t, grad_scale, found_inf, stochastic_rounding, clip);
  binding::Lists l("tiger_", params, grads, exp_avgs, steps, seeds, info);
  const binding::CompressedLists q("tiger_", l, params, exp_avgs, exp_avg_scales, residuals, stochastic_rounding);
  const char* err = cpu::tiger_step(l.list, a);
  TORCH_CHECK(err == nullptr, "tiger_: ", err);
}

void simba_cpu(at::TensorList params, at::TensorList grads, at::TensorList sign_counts, at::TensorList steps,
               double lr, const c10::optional<at::Tensor>& lr_t, int64_t window_size, int64_t threshold_count,
               double weight_decay, const c10::optional<at::Tensor>& grad_scale,
               const c10::optional<at::Tensor>& found_inf, c10::IntArrayRef seeds, bool stochastic_rounding,
               const c10::optional<at::Tensor>& clip) {
  const auto info = check_lists("simba_", params, grads, sign_counts, steps, seeds, c10::kCPU, true);
  binding::check_simba_window("simba_", window_size, threshold_count);
  SimbaArgs a;
  ScalarHold hold;
  common_args("simba_", a.common, hold, lr, lr_t, grad_scale, found_inf, stochastic_rounding, clip);
  binding::simba_args(a, window_size, threshold_count, weight_decay);
  const binding::Lists l("simba_", params, grads, sign_counts, steps, seeds, info);
  const char* err = cpu::simba_step(l.list, a);
  TORCH_CHECK(err == nullptr, "simba_: ", err);
}

// The norm pass of clipping inside the step (NOTE: [clipping inside the step] in
// sign_kernels/_ops.py; the order: NOTE: [norm pass order] in csrc/cpu/sign_cpu_kernels.inc).
void sumsq_cpu(at::TensorList tensors, const c10::optional<at::Tensor>& scale, const at::Tensor& out) {
  const binding::SumsqLists l("sumsq_", tensors, out, c10::kCPU);
  check_scalar("sumsq_", "scale", scale, c10::Device(c10::kCPU), true);
  SumsqArgs a;
  float scale_hold = 1.0f;
  a.scale = host_scalar(scale, scale_hold);
  a.out = out.data_ptr<double>();
  const char* err = cpu::sumsq_step(l.list, a);
  TORCH_CHECK(err == nullptr, "sumsq_: ", err);
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
  m.impl("sumsq_", &sumsq_cpu);
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
                        const c10::optional<at::Tensor>& found_inf, const c10::optional<at::Tensor>& clip) {
  const auto info = binding::check_dist_pack("dist_lion_pack_", grads, exp_avgs, packed, c10::kCPU);
  binding::check_scalar("dist_lion_pack_", "grad_scale", grad_scale, c10::Device(c10::kCPU), true);
  binding::check_scalar("dist_lion_pack_", "found_inf", found_inf, c10::Device(c10::kCPU), true);
  binding::check_scalar("dist_lion_pack_", "clip", clip, c10::Device(c10::kCPU), true);
  DistPackArgs a;
  a.beta1 = static_cast<float>(beta1);
  a.beta2 = static_cast<float>(beta2);
  ScalarHold hold;
  a.grad_scale = host_scalar(grad_scale, hold.grad_scale);
  a.found_inf = host_scalar(found_inf, hold.found_inf);
  a.clip = host_scalar(clip, hold.clip);
  const binding::PackLists l(grads, exp_avgs, packed, info);
  const char* err = cpu::dist_lion_pack(l.list, a);
  TORCH_CHECK(err == nullptr, "dist_lion_pack_: ", err);
}

void dist_lion_apply_cpu(at::TensorList params, at::TensorList votes, int64_t bits, int64_t divisor, double lr,
                         const c10::optional<at::Tensor>& lr_t, double weight_decay,
                         const c10::optional<at::Tensor>& found_inf) {
  const auto dtype = binding::check_dist_apply("dist_lion_apply_", params, votes, bits, divisor, c10::kCPU);
  binding::check_scalar("dist_lion_apply_", "lr_t", lr_t, c10::Device(c10::kCPU), true);
  binding::check_scalar("dist_lion_apply_", "found_inf", found_inf, c10::Device(c10::kCPU), true);
  DistApplyArgs a;
  a.bits = static_cast<int32_t>(bits);
  a.divisor = static_cast<float>(divisor);
  a.lr = lr_t.has_value() ? lr_t->item<float>() : static_cast<float>(lr);
  a.weight_decay = static_cast<float>(weight_decay);
  ScalarHold hold;
  a.found_inf = host_scalar(found_inf, hold.found_inf);
  const binding::ApplyLists l(params, votes, dtype);
  const char* err = cpu::dist_lion_apply(l.list, a);
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
