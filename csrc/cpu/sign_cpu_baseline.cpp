// The CPU kernels for the compiler's default target (x86-64 baseline, or any other
// architecture). See sign_cpu_kernels.inc and NOTE: [ISA dispatch] in sign_cpu.cpp.
#ifdef _OPENMP
#include <omp.h>
#endif
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../core/sign_math.h"
#include "sign_cpu.h"

#define SK_CPU_ISA baseline
#include "sign_cpu_kernels.inc"
