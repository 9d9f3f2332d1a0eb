// cuda_ops.cu -- the CUDA implementations of the ops in sign_kernels/_ops.py but
// dist_lion_vote_ (CPU only): the framework-free core (csrc/cuda/launch.h, dist_lion.h) under the
// op templates of ops.h, which check the lists (common.h, shared with the CPU binding) and turn
// them into the one descriptor. What is CUDA's own is here: the device scalars, the device guard,
// the current stream, the scratch memory and the launch errors. Stable ABI only (NOTE: [stable
// ABI] in stable.h).
//
// NOTE: [device scalars]
// steps, lr_t, grad_scale, found_inf and clip (and sumsq_'s scale) are read by the kernels on
// the device: no host synchronisation, and a captured CUDA graph replays with the current
// values. lr_t, grad_scale, found_inf and clip may also be CPU scalars (read here, at no sync
// cost; grad_scale and clip are then staged on the device, where the kernels' exact division
// and product read them); device ones must be on the params' device, and are converted to
// fp32 when they are not (a 1-element temporary, stream-ordered by the caching allocator).
#include <cuda_runtime_api.h>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>

#include <optional>
#include <vector>

#include "../cuda/dist_lion.h"
#include "../cuda/launch.h"
#include "ops.h"

namespace sign_kernels {
namespace {

using namespace binding;
namespace core = sign_kernels::cuda;

// NOTE: [one descriptor path] in ops.h.
struct CudaExecutor {
  static constexpr DeviceType kDevice = DeviceType::CUDA;

  struct Guard {
    torch::stable::accelerator::DeviceGuard guard;
    explicit Guard(const Device& device) : guard(device.index()) {}
  };

  // The device tensors whose data the descriptor points at (a converted or staged scalar, the
  // scratch), kept alive until the kernels are enqueued: the caching allocator orders any reuse
  // after them on the stream (and keeps them graph-private under capture).
  struct Scalars {
    std::vector<Tensor> keep;
    template <class T>
    T* hold(Tensor t) {
      keep.push_back(std::move(t));
      return static_cast<T*>(keep.back().data_ptr());
    }
  };

  static std::optional<Device> device(const Tensors& tensors) {
    if (tensors.empty()) return std::nullopt;
    return tensors[0].device();
  }

  // A scalar argument as the kernels take it: a device fp32 tensor, or a host value.
  struct Scalar {
    OptTensor device;
    bool on_host = false;
    float host = 0.0f;
  };

  static Scalar scalar_arg(const char* op, const char* name, const OptTensor& t, const Device& device) {
    Scalar s;
    if (!t.has_value()) return s;
    check_scalar(op, name, t, device, false);
    if (t->is_cpu()) {
      s.on_host = true;
      s.host = host_float(*t);
      return s;
    }
    const Device d = t->device();
    SK_CHECK(d == device, op, ": ", name, " is on ", device_str(d), ", the params on ", device_str(device),
             " (device scalars must be on the params' device; CPU scalars are read on the host)");
    s.device = t->scalar_type() == ScalarType::Float ? *t : torch::stable::to(*t, ScalarType::Float);
    return s;
  }

  static const float* device_ptr(const Scalar& s, Scalars& held) {
    return s.device.has_value() ? held.hold<const float>(*s.device) : nullptr;
  }

  // A 1-element fp32 tensor holding `value` on `device`.
  static Tensor device_value(float value, const Device& device) {
    return torch::stable::full(Shape(), value, ScalarType::Float, std::nullopt, device);
  }

  // A checked scalar as a device fp32 pointer: a host one is staged on the device, so that the
  // kernels compute with it exactly as with a device one.
  static const float* staged(const Scalar& s, Scalars& held, const Device& device) {
    if (!s.on_host) return device_ptr(s, held);
    return held.hold<const float>(device_value(s.host, device));
  }

  // sumsq_'s scale is taken as grad_scale is: read on the device, a CPU one staged there, so
  // the kernels' exact division reads it the same way.
  static const float* scale(const char* op, const char* name, const OptTensor& t, const Device& device,
                            Scalars& held) {
    return staged(scalar_arg(op, name, t, device), held, device);
  }

  // Distributed Lion's scalars: any device, copied to the params' one as fp32 (contiguous).
  static const float* dist_scalar(const char* op, const char* name, const OptTensor& t, const Device& device,
                                  Scalars& held) {
    check_scalar(op, name, t, device, false);
    if (!t.has_value()) return nullptr;
    return held.hold<const float>(torch::stable::contiguous(
        torch::stable::to(*t, ScalarType::Float, std::nullopt, device)));
  }

  // Fills the shared arguments; returns false when a CPU found_inf is set (nothing to do), unless
  // `run_skipped` (a skipped Tiger step still fills its sums out): then the set flag is staged on
  // the device, where the kernels read it.
  static bool common_args(const char* op, Common& c, Scalars& held, double lr, const OptTensor& lr_t,
                          const OptTensor& grad_scale, const OptTensor& found_inf, bool stochastic_rounding,
                          const OptTensor& clip, const Device& device, bool run_skipped = false) {
    const Scalar l = scalar_arg(op, "lr_t", lr_t, device);
    const Scalar gs = scalar_arg(op, "grad_scale", grad_scale, device);
    const Scalar fi = scalar_arg(op, "found_inf", found_inf, device);
    const Scalar cl = scalar_arg(op, "clip", clip, device);
    const bool skipped = fi.on_host && fi.host != 0.0f;  // NaN != 0 too, as on the device
    if (skipped && !run_skipped) return false;
    c.lr = l.on_host ? l.host : static_cast<float>(lr);
    c.lr_ptr = device_ptr(l, held);
    // A host scale or clip still goes through the kernels' exact division and product
    // (NOTE: [CUDA gradient used] in csrc/cuda/sign_functors.cuh): staged on the device.
    c.grad_scale = staged(gs, held, device);
    c.clip = staged(cl, held, device);
    c.found_inf = skipped ? held.hold<const float>(device_value(1.0f, device)) : device_ptr(fi, held);
    c.stochastic_rounding = stochastic_rounding;
    return true;
  }

  // The current stream of `device`, from the C shim: torch::stable::accelerator::Stream's
  // nativeHandle() is newer than the torch the module targets (NOTE: [target torch version] in
  // setup.py).
  static cudaStream_t stream(const Device& device) {
    void* stream = nullptr;
    STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device.index(), &stream));
    return static_cast<cudaStream_t>(stream);
  }

  // Scratch from the caching allocator: stream-ordered, and graph-private under capture.
  static void* workspace(size_t bytes, const Device& device, Scalars& held) {
    return held.hold<void>(torch::stable::empty({static_cast<int64_t>(bytes)}, ScalarType::Byte, std::nullopt,
                                                device));
  }

  static void check(const char* op, cudaError_t err) {
    SK_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
  }
  static void check_dist(const char* op, cudaError_t err) {
    SK_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
  }

  static void run(const char* op, const TensorList& l, const LionArgs& a, const Device& device) {
    check(op, core::lion(l, a, stream(device)));
  }
  static void run(const char* op, const TensorList& l, const SimbaArgs& a, const Device& device) {
    check(op, core::simba(l, a, stream(device)));
  }
  static void run(const char* op, const TensorList& l, TigerArgs a, const Device& device) {
    a.workspace_bytes = core::tiger_workspace_bytes(l, a);
    SK_CHECK(a.workspace_bytes > 0, op, ": invalid tensor shapes for the given roles");
    Scalars scratch;
    a.workspace = workspace(a.workspace_bytes, device, scratch);
    check(op, core::tiger(l, a, stream(device)));
  }
  static void run(const char* op, const SumsqList& l, SumsqArgs a, const Device& device) {
    a.workspace_bytes = core::sumsq_workspace_bytes(l);
    SK_CHECK(a.workspace_bytes > 0, op, ": invalid tensor list");
    Scalars scratch;  // per-chunk partial sums
    a.workspace = workspace(a.workspace_bytes, device, scratch);
    check(op, core::sumsq(l, a, stream(device)));
  }
  static void run(const char* op, const DistPackList& l, const DistPackArgs& a, const Device& device) {
    check_dist(op, core::dist_lion_pack(l, a, stream(device)));
  }
  static void run(const char* op, const DistApplyList& l, const DistApplyArgs& a, const Device& device) {
    check_dist(op, core::dist_lion_apply(l, a, stream(device)));
  }
};

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(sign_kernels, CUDA, m) {
  m.impl("lion_", TORCH_BOX(&lion_<CudaExecutor>));
  m.impl("tiger_", TORCH_BOX(&tiger_<CudaExecutor>));
  m.impl("simba_", TORCH_BOX(&simba_<CudaExecutor>));
  m.impl("sumsq_", TORCH_BOX(&sumsq_<CudaExecutor>));
  m.impl("dist_lion_pack_", TORCH_BOX(&dist_lion_pack_<CudaExecutor>));
  m.impl("dist_lion_apply_", TORCH_BOX(&dist_lion_apply_<CudaExecutor>));
}

}  // namespace sign_kernels
