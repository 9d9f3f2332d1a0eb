// cuda_ops.cu -- the CUDA implementations of torch.ops.sign_kernels.{lion_,tiger_,simba_},
// Distributed Lion's passes and sumsq_ (the norm pass of clipping inside the step).
//
// A thin layer over the framework-free core (csrc/cuda/launch.h): check the lists
// (common.h, shared with the CPU binding, plus the CUDA-only rules below), turn them into
// pointer arrays, take the current stream, call the core. The schemas are declared once,
// in sign_kernels/_ops.py; the argument order here is theirs.
//
// NOTE: [device scalars]
// steps, lr_t, grad_scale, found_inf and clip (and sumsq_'s scale) are read by the kernels on
// the device: no host synchronisation, and a captured CUDA graph replays with the current
// values. lr_t, grad_scale, found_inf and clip may also be CPU scalars (read here, at no sync
// cost; grad_scale and clip are then staged on the device, where the kernels' exact division
// and product read them); device ones must be on the params' device, and are converted to
// fp32 when they are not (a 1-element temporary, stream-ordered by the caching allocator).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // at::cuda::getCurrentCUDAStream is this one, without cuBLAS/cuSPARSE headers
#include <torch/library.h>

#include <vector>

#include "../core/sign_math.h"
#include "../cuda/launch.h"
#include "common.h"

namespace sign_kernels {
namespace {

using binding::check_lists;
using binding::check_scalar;
namespace core = sign_kernels::cuda;

// A scalar argument as the kernels take it: a device fp32 pointer, or a host value.
struct Scalar {
  at::Tensor device;  // keeps a converted copy alive for the call
  bool on_host = false;
  float host = 0.0f;
  const float* ptr() const { return device.defined() ? device.data_ptr<float>() : nullptr; }
};

Scalar scalar_arg(const char* op, const char* name, const c10::optional<at::Tensor>& t, c10::Device device) {
  Scalar s;
  if (!t.has_value()) return s;
  check_scalar(op, name, t, device, false);
  if (t->device().is_cpu()) {
    s.on_host = true;
    s.host = t->item<float>();
    return s;
  }
  TORCH_CHECK(t->device() == device, op, ": ", name, " is on ", t->device(), ", the params on ", device,
              " (device scalars must be on the params' device; CPU scalars are read on the host)");
  s.device = t->scalar_type() == at::kFloat ? *t : t->to(at::kFloat);
  return s;
}

// A checked scalar as a device fp32 pointer: a host one is staged on the device (a 1-element
// tensor kept in `keep`), so that the kernels compute with it exactly as with a device one.
const float* staged(const Scalar& s, std::vector<Scalar>& keep, c10::Device device) {
  if (!s.on_host) return s.ptr();
  keep.push_back(Scalar{at::full({}, s.host, at::TensorOptions().dtype(at::kFloat).device(device))});
  return keep.back().ptr();
}

// Fills the shared arguments; returns false when a CPU found_inf is set (nothing to do), unless
// `run_skipped` (a skipped Tiger step still fills its sums out): then the set flag is staged on
// the device, where the kernels read it. Scalars hold the device copies referenced by `c` and
// must outlive the launch call.
bool common_args(const char* op, Common& c, std::vector<Scalar>& keep, double lr,
                 const c10::optional<at::Tensor>& lr_t, const c10::optional<at::Tensor>& grad_scale,
                 const c10::optional<at::Tensor>& found_inf, bool stochastic_rounding,
                 const c10::optional<at::Tensor>& clip, c10::Device device, bool run_skipped = false) {
  keep.reserve(8);  // the references below must survive the push_back of a staged scale, clip or flag
  keep.push_back(scalar_arg(op, "lr_t", lr_t, device));
  keep.push_back(scalar_arg(op, "grad_scale", grad_scale, device));
  keep.push_back(scalar_arg(op, "found_inf", found_inf, device));
  keep.push_back(scalar_arg(op, "clip", clip, device));
  const Scalar& l = keep[0];
  const Scalar& gs = keep[1];
  const Scalar& fi = keep[2];
  const Scalar& cl = keep[3];
  const bool skipped = fi.on_host && fi.host != 0.0f;  // NaN != 0 too, as on the device
  if (skipped && !run_skipped) return false;
  c.lr = l.on_host ? l.host : static_cast<float>(lr);
  c.lr_ptr = l.ptr();
  // A host scale or clip still goes through the kernels' exact division and product
  // (NOTE: [CUDA gradient used] in csrc/cuda/sign_functors.cuh): staged on the device.
  c.grad_scale = staged(gs, keep, device);
  c.clip = staged(cl, keep, device);
  if (skipped) {
    keep.push_back(Scalar{at::full({}, 1.0f, at::TensorOptions().dtype(at::kFloat).device(device))});
    c.found_inf = keep.back().ptr();
  } else {
    c.found_inf = fi.ptr();
  }
  c.stochastic_rounding = stochastic_rounding;
  return true;
}

cudaStream_t current_stream(c10::Device device) {
  return c10::cuda::getCurrentCUDAStream(device.index()).stream();
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

void lion_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList steps,
               double lr, const c10::optional<at::Tensor>& lr_t, double beta1, double beta2, double weight_decay,
               const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& found_inf,
               c10::IntArrayRef seeds, bool stochastic_rounding, const c10::optional<at::Tensor>& clip,
               const c10::optional<at::TensorList>& exp_avg_scales, const c10::optional<at::TensorList>& residuals) {
  const auto info = check_lists("lion_", params, grads, exp_avgs, steps, seeds, c10::kCUDA, false);
  // 8-bit momentum and the correction byte (NOTE: [8-bit momentum and the correction byte] in
  // sign_kernels/_ops.py): checked and set into the list as on the CPU, whatever found_inf says.
  binding::Lists l("lion_", params, grads, exp_avgs, steps, seeds, info);
  const binding::CompressedLists q("lion_", l, params, exp_avgs, exp_avg_scales, residuals, stochastic_rounding);
  if (params.empty()) return;
  const c10::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  LionArgs a;
  std::vector<Scalar> keep;
  if (!common_args("lion_", a.common, keep, lr, lr_t, grad_scale, found_inf, stochastic_rounding, clip, device))
    return;
  binding::lion_args(a, beta1, beta2, weight_decay);
  check_launch("lion_", core::lion(l.list, a, current_stream(device)));
}

void tiger_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList steps,
                c10::IntArrayRef roles, double lr, const c10::optional<at::Tensor>& lr_t, double beta,
                double weight_decay, int64_t grad_accum_steps, double shrink_ratio,
                const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& found_inf,
                c10::IntArrayRef seeds, bool stochastic_rounding, const c10::optional<at::Tensor>& stats,
                at::OptionalIntArrayRef stats_nan, at::OptionalIntArrayRef stats_sumsq,
                at::OptionalIntArrayRef stats_n, const c10::optional<at::Tensor>& sumsq_out,
                at::OptionalIntArrayRef sumsq_out_at, const c10::optional<at::Tensor>& clip,
                const c10::optional<at::TensorList>& exp_avg_scales, const c10::optional<at::TensorList>& residuals) {
  const auto info = check_lists("tiger_", params, grads, exp_avgs, steps, seeds, c10::kCUDA, false);
  binding::Lists l("tiger_", params, grads, exp_avgs, steps, seeds, info);
  const binding::CompressedLists q("tiger_", l, params, exp_avgs, exp_avg_scales, residuals, stochastic_rounding);
  const std::vector<int64_t> rows = binding::check_tiger_roles("tiger_", params, roles, grad_accum_steps);
  if (params.empty()) return;
  const c10::Device device = params[0].device();
  TigerArgs a;
  // NOTE: [Tiger statistics input]: read by the kernels on the device, never here; the sums
  // out are written by the kernels (NOTE: [CUDA sums of squares out]).
  binding::tiger_args("tiger_", a, params, roles, rows, beta, weight_decay, grad_accum_steps, shrink_ratio, stats,
                      stats_nan, stats_sumsq, stats_n, sumsq_out, sumsq_out_at, device);
  const c10::cuda::CUDAGuard guard(device);
  std::vector<Scalar> keep;
  const bool run_skipped = a.sumsq_out != nullptr;  // a skipped step still fills its sums out
  if (!common_args("tiger_", a.common, keep, lr, lr_t, grad_scale, found_inf, stochastic_rounding, clip, device,
                   run_skipped))
    return;
  a.workspace_bytes = core::tiger_workspace_bytes(l.list, a);
  TORCH_CHECK(a.workspace_bytes > 0, "tiger_: invalid tensor shapes for the given roles");
  // Scratch from the caching allocator: stream-ordered, and graph-private under capture.
  const at::Tensor workspace = at::empty({static_cast<int64_t>(a.workspace_bytes)},
                                         at::TensorOptions().dtype(at::kByte).device(device));
  a.workspace = workspace.data_ptr();
  check_launch("tiger_", core::tiger(l.list, a, current_stream(device)));
}

void simba_cuda(at::TensorList params, at::TensorList grads, at::TensorList sign_counts, at::TensorList steps,
                double lr, const c10::optional<at::Tensor>& lr_t, int64_t window_size, int64_t threshold_count,
                double weight_decay, const c10::optional<at::Tensor>& grad_scale,
                const c10::optional<at::Tensor>& found_inf, c10::IntArrayRef seeds, bool stochastic_rounding,
                const c10::optional<at::Tensor>& clip) {
  const auto info = check_lists("simba_", params, grads, sign_counts, steps, seeds, c10::kCUDA, true);
  binding::check_simba_window("simba_", window_size, threshold_count);
  if (params.empty()) return;
  const c10::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  SimbaArgs a;
  std::vector<Scalar> keep;
  if (!common_args("simba_", a.common, keep, lr, lr_t, grad_scale, found_inf, stochastic_rounding, clip, device))
    return;
  binding::simba_args(a, window_size, threshold_count, weight_decay);
  const binding::Lists l("simba_", params, grads, sign_counts, steps, seeds, info);
  check_launch("simba_", core::simba(l.list, a, current_stream(device)));
}

}  // namespace

TORCH_LIBRARY_IMPL(sign_kernels, CUDA, m) {
  m.impl("lion_", &lion_cuda);
  m.impl("tiger_", &tiger_cuda);
  m.impl("simba_", &simba_cuda);
}

}  // namespace sign_kernels

// ---------------------------------------------------------------------------------------
// Distributed Lion's fused passes (sign_kernels/distributed; csrc/cuda/dist_lion.h).
#include "../cuda/dist_lion.h"
#include "dist_lion_checks.h"

namespace sign_kernels {
namespace {

// An optional scalar as a device fp32 pointer (NOTE: [device scalars]); `hold` keeps a
// converted copy alive until the kernels are enqueued (the caching allocator orders its reuse).
const float* device_scalar(const c10::optional<at::Tensor>& t, c10::Device device, at::Tensor& hold) {
  if (!t.has_value()) return nullptr;
  hold = t->to(device, at::kFloat).contiguous();
  return hold.data_ptr<float>();
}

void dist_lion_pack_cuda(at::TensorList grads, at::TensorList exp_avgs, at::TensorList packed, double beta1,
                         double beta2, const c10::optional<at::Tensor>& grad_scale,
                         const c10::optional<at::Tensor>& found_inf, const c10::optional<at::Tensor>& clip) {
  const auto info = binding::check_dist_pack("dist_lion_pack_", grads, exp_avgs, packed, c10::kCUDA);
  if (grads.empty()) return;
  const c10::Device device = grads[0].device();
  binding::check_scalar("dist_lion_pack_", "grad_scale", grad_scale, device, false);
  binding::check_scalar("dist_lion_pack_", "found_inf", found_inf, device, false);
  binding::check_scalar("dist_lion_pack_", "clip", clip, device, false);
  const c10::cuda::CUDAGuard guard(device);
  at::Tensor scale_hold, found_hold, clip_hold;
  DistPackArgs a;
  a.beta1 = static_cast<float>(beta1);
  a.beta2 = static_cast<float>(beta2);
  a.grad_scale = device_scalar(grad_scale, device, scale_hold);
  a.found_inf = device_scalar(found_inf, device, found_hold);
  a.clip = device_scalar(clip, device, clip_hold);  // NOTE: [clipping inside the step]
  const binding::PackLists l(grads, exp_avgs, packed, info);
  const cudaError_t err = core::dist_lion_pack(l.list, a, c10::cuda::getCurrentCUDAStream(device.index()));
  TORCH_CHECK(err == cudaSuccess, "dist_lion_pack_: CUDA launch failed: ", cudaGetErrorString(err));
}

void dist_lion_apply_cuda(at::TensorList params, at::TensorList votes, int64_t bits, int64_t divisor, double lr,
                          const c10::optional<at::Tensor>& lr_t, double weight_decay,
                          const c10::optional<at::Tensor>& found_inf) {
  const auto dtype = binding::check_dist_apply("dist_lion_apply_", params, votes, bits, divisor, c10::kCUDA);
  if (params.empty()) return;
  const c10::Device device = params[0].device();
  binding::check_scalar("dist_lion_apply_", "lr_t", lr_t, device, false);
  binding::check_scalar("dist_lion_apply_", "found_inf", found_inf, device, false);
  const c10::cuda::CUDAGuard guard(device);
  at::Tensor lr_hold, found_hold;
  DistApplyArgs a;
  a.bits = static_cast<int32_t>(bits);
  a.divisor = static_cast<float>(divisor);
  a.lr = static_cast<float>(lr);
  a.lr_ptr = device_scalar(lr_t, device, lr_hold);
  a.weight_decay = static_cast<float>(weight_decay);
  a.found_inf = device_scalar(found_inf, device, found_hold);
  const binding::ApplyLists l(params, votes, dtype);
  const cudaError_t err = core::dist_lion_apply(l.list, a, c10::cuda::getCurrentCUDAStream(device.index()));
  TORCH_CHECK(err == cudaSuccess, "dist_lion_apply_: CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(sign_kernels, CUDA, m) {
  m.impl("dist_lion_pack_", &dist_lion_pack_cuda);
  m.impl("dist_lion_apply_", &dist_lion_apply_cuda);
}

}  // namespace sign_kernels

// ---------------------------------------------------------------------------------------
// The norm pass of clipping inside the step (NOTE: [clipping inside the step] in
// sign_kernels/_ops.py; NOTE: [CUDA sums of squares for clipping] in csrc/cuda/sumsq.cu).
namespace sign_kernels {
namespace {

void sumsq_cuda(at::TensorList tensors, const c10::optional<at::Tensor>& scale, const at::Tensor& out) {
  const binding::SumsqLists l("sumsq_", tensors, out, c10::kCUDA);
  if (tensors.empty()) return;
  const c10::Device device = out.device();
  const c10::cuda::CUDAGuard guard(device);
  // The scale as grad_scale is taken (NOTE: [device scalars]): read on the device, a CPU one
  // staged there, so the kernels' exact division reads it the same way.
  std::vector<Scalar> keep;
  keep.reserve(2);
  keep.push_back(scalar_arg("sumsq_", "scale", scale, device));
  SumsqArgs a;
  a.scale = staged(keep[0], keep, device);
  a.out = out.data_ptr<double>();
  a.workspace_bytes = core::sumsq_workspace_bytes(l.list);
  TORCH_CHECK(a.workspace_bytes > 0, "sumsq_: invalid tensor list");
  // Per-chunk partial sums, from the caching allocator: stream-ordered, graph-private under capture.
  const at::Tensor workspace = at::empty({static_cast<int64_t>(a.workspace_bytes)},
                                         at::TensorOptions().dtype(at::kByte).device(device));
  a.workspace = workspace.data_ptr();
  check_launch("sumsq_", core::sumsq(l.list, a, current_stream(device)));
}

}  // namespace

TORCH_LIBRARY_IMPL(sign_kernels, CUDA, m) { m.impl("sumsq_", &sumsq_cuda); }

}  // namespace sign_kernels
