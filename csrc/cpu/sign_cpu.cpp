// sign_cpu.cpp -- the public entry points of the CPU executor (sign_cpu.h).
//
// NOTE: [ISA dispatch]
// The kernels are memory-bound only if the core keeps up: an fp32 Lion element costs
// about 16 vector operations, and with 16-byte SSE2 vectors two cores of a recent
// server process ~1.1 G elements/s -- below what their memory delivers (measured here:
// Lion 26 GB/s with SSE2 against 43-51 GB/s with AVX2 on the same 2-core VM). So the
// kernels are compiled twice, for the baseline target and for AVX2, and the AVX2 ones
// are used where the CPU supports them. The results are bit-identical: the same fp32
// operations in the same order, no FMA.
#include "sign_cpu.h"

#include <cstdlib>
#include <cstring>

namespace sign_kernels {
namespace cpu {

#define SK_DECLARE_VARIANT(ns)                                       \
  namespace ns {                                                     \
  const char* lion_step(const TensorList& t, const LionArgs& a);     \
  const char* tiger_step(const TensorList& t, const TigerArgs& a);   \
  const char* simba_step(const TensorList& t, const SimbaArgs& a);   \
  }
SK_DECLARE_VARIANT(baseline)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SK_HAVE_AVX2_KERNELS 1
SK_DECLARE_VARIANT(avx2)
#endif
#undef SK_DECLARE_VARIANT

namespace detail {
ParallelFor g_parallel_for = nullptr;
}  // namespace detail

void set_parallel_for(ParallelFor fn) { detail::g_parallel_for = fn; }

namespace {
bool use_avx2() {
#ifdef SK_HAVE_AVX2_KERNELS
  static const bool yes = [] {
    const char* forced = std::getenv("SIGN_KERNELS_CPU_ISA");
    if (forced != nullptr && std::strcmp(forced, "baseline") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;
  }();
  return yes;
#else
  return false;
#endif
}
}  // namespace

const char* isa() { return use_avx2() ? "avx2" : "baseline"; }

#ifdef SK_HAVE_AVX2_KERNELS
#define SK_DISPATCH(fn, t, a) (use_avx2() ? avx2::fn(t, a) : baseline::fn(t, a))
#else
#define SK_DISPATCH(fn, t, a) baseline::fn(t, a)
#endif

const char* lion_step(const TensorList& t, const LionArgs& a) { return SK_DISPATCH(lion_step, t, a); }
const char* tiger_step(const TensorList& t, const TigerArgs& a) { return SK_DISPATCH(tiger_step, t, a); }
const char* simba_step(const TensorList& t, const SimbaArgs& a) { return SK_DISPATCH(simba_step, t, a); }

}  // namespace cpu
}  // namespace sign_kernels
