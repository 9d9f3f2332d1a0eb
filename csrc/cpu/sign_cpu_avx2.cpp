// The CPU kernels compiled for AVX2 (x86-64 only), chosen at run time by sign_cpu.cpp.
//
// The standard headers and sign_math.h are included first, for the default target;
// only the kernels below the pragma are compiled for AVX2, and sign_math.h's
// always-inline functions are inlined into them (default -> avx2 inlining is allowed).
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
#pragma GCC target("avx2,fma")
#define SK_CPU_ISA avx2
#define SK_CPU_FMA 1  // Tiger's sums of squares use it (add_square); the fp32 math stays uncontracted
#include "sign_cpu_kernels.inc"
#undef SK_CPU_FMA
#pragma GCC pop_options
#endif
