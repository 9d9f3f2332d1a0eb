// The CPU kernels compiled for AVX-512 (F, BW, VL, DQ; 512-bit vectors), x86-64 only,
// chosen at run time by sign_cpu.cpp.
//
// The standard headers and sign_math.h are included first, for the default target;
// only the kernels below the pragma are compiled for AVX-512, and sign_math.h's
// always-inline functions are inlined into them (default -> avx512 inlining is allowed).
// No FMA is enabled: NOTE: [no contraction] in sign_math.h.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#ifdef _OPENMP
#include <omp.h>
#endif
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../core/sign_math.h"
#include "sign_cpu.h"

#pragma GCC push_options
#pragma GCC diagnostic push
// GCC 12's AVX-512 headers build masked intrinsics on _mm512_undefined_*(): false alarms.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,prefer-vector-width=512")
#include <immintrin.h>
#define SK_CPU_ISA avx512
#define SK_CPU_SIMBA_AVX512BW 1  // NOTE: [Simba with AVX-512 BW]
#define SK_CPU_Q8_AVX512 1       // NOTE: [int8 momentum with AVX-512]
#define SK_CPU_FMA 1             // the target has FMA: Tiger's sums of squares use it (add_square)
#include "sign_cpu_kernels.inc"
#undef SK_CPU_FMA
#undef SK_CPU_Q8_AVX512
#undef SK_CPU_SIMBA_AVX512BW
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif
