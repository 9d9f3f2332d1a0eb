// cpu_ops.cpp -- the CPU implementations of the ops in sign_kernels/_ops.py (the schemas are
// declared once, there): the CPU executor (csrc/cpu) under the op templates of ops.h, and the
// kernels' parallel loops on torch's intra-op thread pool. Stable ABI only (NOTE: [stable ABI]).
#include <mutex>
#include <optional>
#include <set>
#include <thread>

#include "../cpu/dist_lion.h"
#include "../cpu/sign_cpu.h"
#include "ops.h"

namespace sign_kernels {
namespace {

using namespace binding;

// NOTE: [one descriptor path] in ops.h. Every pointer the CPU executor reads is host memory:
// the scalars are read from their CPU tensors here (no synchronisation) into Scalars.
struct CpuExecutor {
  static constexpr DeviceType kDevice = DeviceType::CPU;

  struct Guard {
    explicit Guard(const Device&) {}
  };

  struct Scalars {
    float values[4] = {};  // an op holds at most three (grad_scale, found_inf, clip)
    int used = 0;
    const float* hold(float v) {
      values[used] = v;
      return &values[used++];
    }
  };

  static std::optional<Device> device(const Tensors&) { return Device(DeviceType::CPU); }

  // An optional CPU scalar as the executor takes it: null, or its value held in `s`.
  static const float* held(const OptTensor& t, Scalars& s) { return t.has_value() ? s.hold(host_float(*t)) : nullptr; }

  static const float* scale(const char* op, const char* name, const OptTensor& t, const Device& device, Scalars& s) {
    check_scalar(op, name, t, device, true);
    return held(t, s);
  }

  static const float* dist_scalar(const char* op, const char* name, const OptTensor& t, const Device& device,
                                  Scalars& s) {
    return scale(op, name, t, device, s);
  }

  // A set found_inf reaches the executor, which then changes nothing (Tiger still fills its
  // sums out): there is always something to run.
  static bool common_args(const char* op, Common& c, Scalars& s, double lr, const OptTensor& lr_t,
                          const OptTensor& grad_scale, const OptTensor& found_inf, bool stochastic_rounding,
                          const OptTensor& clip, const Device& device, bool /*run_skipped*/ = false) {
    check_scalar(op, "lr_t", lr_t, device, true);
    check_scalar(op, "grad_scale", grad_scale, device, true);
    check_scalar(op, "found_inf", found_inf, device, true);
    check_scalar(op, "clip", clip, device, true);
    c.clip = held(clip, s);
    c.lr = lr_t.has_value() ? host_float(*lr_t) : static_cast<float>(lr);
    c.grad_scale = held(grad_scale, s);
    c.found_inf = held(found_inf, s);
    c.stochastic_rounding = stochastic_rounding;
    return true;
  }

  static void check(const char* op, const char* err) { SK_CHECK(err == nullptr, op, ": ", err); }
  static void run(const char* op, const TensorList& l, const LionArgs& a, const Device&) {
    check(op, cpu::lion_step(l, a));
  }
  static void run(const char* op, const TensorList& l, const TigerArgs& a, const Device&) {
    check(op, cpu::tiger_step(l, a));
  }
  static void run(const char* op, const TensorList& l, const SimbaArgs& a, const Device&) {
    check(op, cpu::simba_step(l, a));
  }
  static void run(const char* op, const SumsqList& l, const SumsqArgs& a, const Device&) {
    check(op, cpu::sumsq_step(l, a));
  }
  static void run(const char* op, const DistPackList& l, const DistPackArgs& a, const Device&) {
    check(op, cpu::dist_lion_pack(l, a));
  }
  static void run(const char* op, const DistApplyList& l, const DistApplyArgs& a, const Device&) {
    check(op, cpu::dist_lion_apply(l, a));
  }
};

// Distributed Lion's vote on one rank's slice: CPU only (on CUDA it runs as a few torch ops,
// sign_kernels/distributed/_wire.py).
void dist_lion_vote_cpu(const Tensor& received, const Tensor& out, int64_t world_size, int64_t out_bits,
                        bool majority) {
  check_dist_vote("dist_lion_vote_", received, out, world_size, out_bits, majority, DeviceType::CPU);
  const char* err = cpu::dist_lion_vote(static_cast<const uint8_t*>(received.data_ptr()), world_size,
                                        received.numel() / world_size, static_cast<uint8_t*>(out.data_ptr()),
                                        static_cast<int>(out_bits), majority);
  CpuExecutor::check("dist_lion_vote_", err);
}

// NOTE: [parallel loops on torch's pool] The core's parallel loops run on torch's intra-op
// thread pool through torch::stable::parallel_for, which calls at::parallel_for inside libtorch:
// torch's own OpenMP build runs it, so the binding needs no -fopenmp (the inline ATen version
// it replaces ran serially without it: NOTE: [OpenMP in the binding] in setup.py's history).
// The body never throws (the core returns its errors), so nothing unwinds through libtorch's C shim.
void torch_parallel_for(int64_t n, void* ctx, void (*body)(void*, int64_t, int64_t)) {
  torch::stable::parallel_for(0, n, 1, [&](int64_t b, int64_t e) { body(ctx, b, e); });
}

const bool kParallelHooked = (cpu::set_parallel_for(&torch_parallel_for), true);

}  // namespace

// The number of distinct threads that run `items` work items through the kernels'
// parallel hook: torch.get_num_threads() (capped by items) when torch's parallel backend
// runs the loop, 1 if it ran serially (sign_kernels._C.cpu_threads_used; tests/test_ops.py).
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

STABLE_TORCH_LIBRARY_IMPL(sign_kernels, CPU, m) {
  m.impl("lion_", TORCH_BOX(&lion_<CpuExecutor>));
  m.impl("tiger_", TORCH_BOX(&tiger_<CpuExecutor>));
  m.impl("simba_", TORCH_BOX(&simba_<CpuExecutor>));
  m.impl("sumsq_", TORCH_BOX(&sumsq_<CpuExecutor>));
  m.impl("dist_lion_pack_", TORCH_BOX(&dist_lion_pack_<CpuExecutor>));
  m.impl("dist_lion_apply_", TORCH_BOX(&dist_lion_apply_<CpuExecutor>));
  m.impl("dist_lion_vote_", TORCH_BOX(&dist_lion_vote_cpu));
}

}  // namespace sign_kernels
