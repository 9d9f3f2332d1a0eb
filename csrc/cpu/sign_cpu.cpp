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

#include "../core/sign_math.h"

#include <cstdlib>
#include <cstring>

namespace sign_kernels {
namespace cpu {

#define SK_DECLARE_VARIANT(ns)                                       \
  namespace ns {                                                     \
  const char* lion_step(const TensorList& t, const LionArgs& a);     \
  const char* tiger_step(const TensorList& t, const TigerArgs& a);   \
  const char* simba_step(const TensorList& t, const SimbaArgs& a);   \
  const char* sumsq_step(const SumsqList& t, const SumsqArgs& a);    \
  }
SK_DECLARE_VARIANT(baseline)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SK_HAVE_AVX2_KERNELS 1
SK_DECLARE_VARIANT(avx2)
SK_DECLARE_VARIANT(avx512)
#endif
#undef SK_DECLARE_VARIANT

namespace detail {
ParallelFor g_parallel_for = nullptr;
}  // namespace detail

void set_parallel_for(ParallelFor fn) { detail::g_parallel_for = fn; }

namespace {
enum class Isa { kBaseline, kAvx2, kAvx512 };

// The best variant this CPU runs, or the one SIGN_KERNELS_CPU_ISA names (if supported).
Isa detect() {
#ifdef SK_HAVE_AVX2_KERNELS
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");  // every AVX2 x86 so far
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("fma");
  const char* forced = std::getenv("SIGN_KERNELS_CPU_ISA");
  if (forced != nullptr && std::strcmp(forced, "baseline") == 0) return Isa::kBaseline;
  if (forced != nullptr && std::strcmp(forced, "avx2") == 0 && avx2) return Isa::kAvx2;
  return avx512 ? Isa::kAvx512 : (avx2 ? Isa::kAvx2 : Isa::kBaseline);
#else
  return Isa::kBaseline;
#endif
}

Isa current() {
  static const Isa isa = detect();
  return isa;
}
}  // namespace

const char* isa() {
  switch (current()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

#ifdef SK_HAVE_AVX2_KERNELS
#define SK_DISPATCH(fn, t, a)                                             \
  (current() == Isa::kAvx512 ? avx512::fn(t, a)                           \
                             : current() == Isa::kAvx2 ? avx2::fn(t, a) : baseline::fn(t, a))
#else
#define SK_DISPATCH(fn, t, a) baseline::fn(t, a)
#endif

const char* lion_step(const TensorList& t, const LionArgs& a) { return SK_DISPATCH(lion_step, t, a); }
const char* sumsq_step(const SumsqList& t, const SumsqArgs& a) { return SK_DISPATCH(sumsq_step, t, a); }
// NOTE: [Tiger windows]
// The NaN guard must see a tensor's whole gradient before any of it is written, so Tiger
// reads g twice: in its read-only pre-pass and in its update pass. Both passes run over a
// window of consecutive tensors (about g_tiger_window elements; a larger tensor is a
// window of its own) before the next window starts, so the update pass finds the window's
// g -- and, on a first step, theta -- still in the last-level cache instead of reading it
// from memory again (GPT-2 small on a 2-core VM: 1.36 -> 1.21 x Lion's step time). Each
// window is a whole call on a sub-list, and nothing in a call couples tensors (the chunk
// partial sums are combined per tensor), so the results are the same bits for any cut.
// A tensor larger than the cache (an embedding table) still reads its g from memory twice.
namespace {
int64_t g_tiger_window = int64_t{1} << 20;
}  // namespace

int64_t set_tiger_window(int64_t n) {
  const int64_t old = g_tiger_window;
  if (n >= 1) g_tiger_window = n;
  return old;
}

const char* tiger_step(const TensorList& t, const TigerArgs& a) {
  // Windows serve the pre-pass's reads only. A call with none (every NaN count given, and
  // every matrix's and embedding's sums: a steady step under GradScaler, NOTE: [GradScaler's
  // flag as the NaN guard] in sign_kernels/optim/tiger.py) runs whole: cut into windows it
  // waits at ~50 more parallel regions (GPT-2: 1.07-1.11x Lion's time against 1.00-1.03x).
  bool reads_ahead = a.stats == nullptr;
  for (int64_t i = 0; i < t.count && !reads_ahead; ++i)
    reads_ahead = a.stats_nan[i] < 0 ||
                  ((a.roles[i] == kRoleMatrix || a.roles[i] == kRoleEmbedding) && a.stats_sumsq[i] < 0);
  if (!reads_ahead) return SK_DISPATCH(tiger_step, t, a);
  for (int64_t begin = 0; begin < t.count;) {
    int64_t end = begin + 1, elems = t.numels[begin];
    while (end < t.count && elems + t.numels[end] <= g_tiger_window) elems += t.numels[end++];
    TensorList tw = t;
    tw.count = end - begin;
    tw.params = t.params + begin;
    tw.grads = t.grads + begin;
    tw.states = t.states + begin;
    tw.numels = t.numels + begin;
    tw.steps = t.steps + begin;
    tw.seeds = t.seeds + begin;
    if (t.scales != nullptr) tw.scales = t.scales + begin;
    if (t.row_sizes != nullptr) tw.row_sizes = t.row_sizes + begin;
    if (t.residuals != nullptr) tw.residuals = t.residuals + begin;
    TigerArgs aw = a;
    aw.roles = a.roles + begin;
    aw.row_sizes = a.row_sizes + begin;
    if (a.stats != nullptr) {
      aw.stats_nan = a.stats_nan + begin;
      aw.stats_sumsq = a.stats_sumsq + begin;
      aw.stats_n = a.stats_n + begin;
    }
    if (a.sumsq_out != nullptr) aw.sumsq_out_at = a.sumsq_out_at + begin;
    // Every window has the same dtypes: an unsupported combination fails in the first,
    // before anything is written.
    if (const char* err = SK_DISPATCH(tiger_step, tw, aw)) return err;
    begin = end;
  }
  return nullptr;
}
const char* simba_step(const TensorList& t, const SimbaArgs& a) { return SK_DISPATCH(simba_step, t, a); }

}  // namespace cpu
}  // namespace sign_kernels
