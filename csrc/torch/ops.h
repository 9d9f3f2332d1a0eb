// ops.h -- the kernels of the ops in sign_kernels/_ops.py, once for the CPU and CUDA bindings.
//
// NOTE: [one descriptor path] Each op is one function template over an executor E
// (CpuExecutor in cpu_ops.cpp, CudaExecutor in cuda_ops.cu). The template checks the arguments
// and fills the descriptor (common.h, dist_lion_checks.h) in one order for both; E supplies
// only what depends on where the memory lives:
//
//   E::kDevice                the device type of E's dispatch key (CPU, CUDA)
//   E::device(tensors)        the device the call runs on, or nullopt when there is nothing to
//                             run (CUDA without tensors: no device to check the scalars against)
//   E::Guard{device}          makes `device` current for the call (CUDA); nothing on the CPU
//   E::Scalars                storage of the scalars the descriptor takes by pointer (NOTE:
//                             [executor memory] in csrc/core/descriptor.h), alive for the call
//   E::common_args(...)       Common's scalars; false: nothing to run (NOTE: [device scalars])
//   E::scale(...)             a scale read exactly as grad_scale is (sumsq_)
//   E::dist_scalar(...)       a Distributed Lion scalar as an fp32 pointer in executor memory
//   E::run(op, list, args, device)  the executor's call for one descriptor; throws on its error
//
// So a new dtype is a change to the checks and core_dtype (common.h) and a new op one template
// here plus an E::run overload per executor; the registrations list the templates.
#pragma once

#include "common.h"
#include "dist_lion_checks.h"

#include <optional>

namespace sign_kernels {
namespace binding {

// The end of a Lion, Tiger or Simba call: Common's scalars on `device`, then the executor.
template <class E, class Args>
void run_step(const char* op, const TensorList& list, Args& a, const Device& device, double lr,
              const OptTensor& lr_t, const OptTensor& grad_scale, const OptTensor& found_inf,
              bool stochastic_rounding, const OptTensor& clip, bool run_skipped = false) {
  const typename E::Guard guard{device};
  typename E::Scalars s;
  if (!E::common_args(op, a.common, s, lr, lr_t, grad_scale, found_inf, stochastic_rounding, clip, device,
                      run_skipped))
    return;
  E::run(op, list, a, device);
}

template <class E>
void lion_(const Tensors& params, const Tensors& grads, const Tensors& exp_avgs, const Tensors& steps, double lr,
           const OptTensor& lr_t, double beta1, double beta2, double weight_decay, const OptTensor& grad_scale,
           const OptTensor& found_inf, const Ints& seeds, bool stochastic_rounding, const OptTensor& clip,
           const OptTensors& exp_avg_scales, const OptTensors& residuals) {
  const ListInfo info = check_lists("lion_", params, grads, exp_avgs, steps, seeds, E::kDevice, false);
  // 8-bit momentum and the correction byte (NOTE: [8-bit momentum and the correction byte] in
  // sign_kernels/_ops.py): checked and set into the list whatever found_inf says.
  Lists l("lion_", params, grads, exp_avgs, steps, seeds, info);
  const CompressedLists q("lion_", l, params, exp_avgs, exp_avg_scales, residuals, stochastic_rounding);
  const std::optional<Device> device = E::device(params);
  if (!device) return;
  LionArgs a;
  lion_args(a, beta1, beta2, weight_decay);
  run_step<E>("lion_", l.list, a, *device, lr, lr_t, grad_scale, found_inf, stochastic_rounding, clip);
}

template <class E>
void tiger_(const Tensors& params, const Tensors& grads, const Tensors& exp_avgs, const Tensors& steps,
            const Ints& roles, double lr, const OptTensor& lr_t, double beta, double weight_decay,
            int64_t grad_accum_steps, double shrink_ratio, const OptTensor& grad_scale, const OptTensor& found_inf,
            const Ints& seeds, bool stochastic_rounding, const OptTensor& stats, const OptInts& stats_nan,
            const OptInts& stats_sumsq, const OptInts& stats_n, const OptTensor& sumsq_out,
            const OptInts& sumsq_out_at, const OptTensor& clip, const OptTensors& exp_avg_scales,
            const OptTensors& residuals) {
  const ListInfo info = check_lists("tiger_", params, grads, exp_avgs, steps, seeds, E::kDevice, false);
  Lists l("tiger_", params, grads, exp_avgs, steps, seeds, info);
  const CompressedLists q("tiger_", l, params, exp_avgs, exp_avg_scales, residuals, stochastic_rounding);
  const Ints rows = check_tiger_roles("tiger_", params, roles, grad_accum_steps);
  const std::optional<Device> device = E::device(params);
  if (!device) return;
  TigerArgs a;
  // NOTE: [Tiger statistics input]: read by the executor where it runs, never here; the sums
  // out are written by it (NOTE: [CUDA sums of squares out]).
  tiger_args("tiger_", a, params, roles, rows, beta, weight_decay, grad_accum_steps, shrink_ratio, stats, stats_nan,
             stats_sumsq, stats_n, sumsq_out, sumsq_out_at, *device);
  const bool run_skipped = a.sumsq_out != nullptr;  // a skipped step still fills its sums out
  run_step<E>("tiger_", l.list, a, *device, lr, lr_t, grad_scale, found_inf, stochastic_rounding, clip, run_skipped);
}

template <class E>
void simba_(const Tensors& params, const Tensors& grads, const Tensors& sign_counts, const Tensors& steps, double lr,
            const OptTensor& lr_t, int64_t window_size, int64_t threshold_count, double weight_decay,
            const OptTensor& grad_scale, const OptTensor& found_inf, const Ints& seeds, bool stochastic_rounding,
            const OptTensor& clip) {
  const ListInfo info = check_lists("simba_", params, grads, sign_counts, steps, seeds, E::kDevice, true);
  check_simba_window("simba_", window_size, threshold_count);
  const Lists l("simba_", params, grads, sign_counts, steps, seeds, info);
  const std::optional<Device> device = E::device(params);
  if (!device) return;
  SimbaArgs a;
  simba_args(a, window_size, threshold_count, weight_decay);
  run_step<E>("simba_", l.list, a, *device, lr, lr_t, grad_scale, found_inf, stochastic_rounding, clip);
}

// The norm pass of clipping inside the step (NOTE: [clipping inside the step] in
// sign_kernels/_ops.py; the orders: NOTE: [norm pass order] in csrc/cpu/sign_cpu_kernels.inc,
// NOTE: [CUDA sums of squares for clipping] in csrc/cuda/sumsq.cu).
template <class E>
void sumsq_(const Tensors& tensors, const OptTensor& scale, const Tensor& out) {
  const SumsqLists l("sumsq_", tensors, out, E::kDevice);
  const std::optional<Device> device = E::device(tensors);
  if (!device) return;
  const typename E::Guard guard{*device};
  typename E::Scalars s;
  SumsqArgs a;
  a.scale = E::scale("sumsq_", "scale", scale, *device, s);
  a.out = static_cast<double*>(out.data_ptr());
  E::run("sumsq_", l.list, a, *device);
}

// Distributed Lion's fused passes (sign_kernels/distributed; NOTE: [wire fields] in
// csrc/core/dist_lion_math.h).
template <class E>
void dist_lion_pack_(const Tensors& grads, const Tensors& exp_avgs, const Tensors& packed, double beta1,
                     double beta2, const OptTensor& grad_scale, const OptTensor& found_inf, const OptTensor& clip) {
  const DistPackInfo info = check_dist_pack("dist_lion_pack_", grads, exp_avgs, packed, E::kDevice);
  const std::optional<Device> device = E::device(grads);
  if (!device) return;
  const typename E::Guard guard{*device};
  typename E::Scalars s;
  DistPackArgs a;
  a.beta1 = static_cast<float>(beta1);
  a.beta2 = static_cast<float>(beta2);
  a.grad_scale = E::dist_scalar("dist_lion_pack_", "grad_scale", grad_scale, *device, s);
  a.found_inf = E::dist_scalar("dist_lion_pack_", "found_inf", found_inf, *device, s);
  a.clip = E::dist_scalar("dist_lion_pack_", "clip", clip, *device, s);  // NOTE: [clipping inside the step]
  const PackLists l(grads, exp_avgs, packed, info);
  E::run("dist_lion_pack_", l.list, a, *device);
}

template <class E>
void dist_lion_apply_(const Tensors& params, const Tensors& votes, int64_t bits, int64_t divisor, double lr,
                      const OptTensor& lr_t, double weight_decay, const OptTensor& found_inf) {
  const ScalarType dtype = check_dist_apply("dist_lion_apply_", params, votes, bits, divisor, E::kDevice);
  const std::optional<Device> device = E::device(params);
  if (!device) return;
  const typename E::Guard guard{*device};
  typename E::Scalars s;
  DistApplyArgs a;
  a.bits = static_cast<int32_t>(bits);
  a.divisor = static_cast<float>(divisor);
  a.lr = static_cast<float>(lr);
  a.lr_ptr = E::dist_scalar("dist_lion_apply_", "lr_t", lr_t, *device, s);
  a.weight_decay = static_cast<float>(weight_decay);
  a.found_inf = E::dist_scalar("dist_lion_apply_", "found_inf", found_inf, *device, s);
  const ApplyLists l(params, votes, dtype);
  E::run("dist_lion_apply_", l.list, a, *device);
}

}  // namespace binding
}  // namespace sign_kernels
