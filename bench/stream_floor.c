// The memory floor of a step's access pattern: one pass that reads and writes exactly the
// streams a step reads and writes (same element sizes, same order, same threads), with one
// multiply-add per element so every store depends on its loads, and nothing else. A kernel
// with that pattern cannot be faster than this pass on this machine; the ratio of two
// patterns' floors is the best time ratio the two steps can reach here (bench/NOTES.md,
// "The stream floor of the 8-bit and clipping targets").
//
//   gcc -O2 -march=native -fopenmp bench/stream_floor.c -o /tmp/stream_floor
//   OMP_NUM_THREADS=2 /tmp/stream_floor [elements] [rounds]
//
// Patterns (bytes per element: read + written), the GPT-2 list's 124M elements by default:
//   lion       fp32 θ, g, m                       r 12  w 8   (fp32 Lion)
//   lion-int8  fp32 θ, g, int8 codes (+ 2 B/64)   r 9   w 5   (Lion, momentum_dtype=int8)
//   ec-int8    bf16 θ, int8 ρ, bf16 g, int8 codes r 6   w 4   (bf16 + correction byte + int8)
//   sr-int8    bf16 θ, bf16 g, int8 codes         r 5   w 3   (bf16 + SR + int8)
//   lion+clip  a read of g (the norm pass), then lion   r 16  w 8
// Rounds are interleaved (one pass of every pattern per round); the output is each pattern's
// median and its median per-round ratio to "lion".
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static int cmp(const void* a, const void* b) {
  const double x = *(const double*)a, y = *(const double*)b;
  return (x > y) - (x < y);
}

static double median(double* v, int n) {
  qsort(v, n, sizeof(double), cmp);
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static __m512 bf16_load(const uint16_t* x) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)x)), 16));
}
static void bf16_store(uint16_t* x, __m512 v) {
  _mm256_storeu_si256((__m256i*)x, _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16)));
}
static __m512 i8_load(const int8_t* x) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)x)));
}
static void i8_store(int8_t* x, __m512 v) { _mm_storeu_si128((__m128i*)x, _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(v))); }

// One pass of an int8 pattern over blocks of 64 elements with a 2-byte scale each: the param
// side of 16 elements at j (the macro's argument, a block of statements), then their codes.
#define INT8_PASS(...)                                         \
  _Pragma("omp parallel for schedule(static)")                 \
  for (long i = 0; i < n; i += 64) {                           \
    const __m512 s = _mm512_set1_ps((float)sc[i / 64]);        \
    for (long j = i; j < i + 64; j += 16) {                    \
      __VA_ARGS__                                              \
      i8_store(c + j, _mm512_fmadd_ps(i8_load(c + j), s, h));  \
    }                                                          \
    sc[i / 64] = (uint16_t)(sc[i / 64] + 1);                   \
  }

enum { LION, LION_INT8, EC_INT8, SR_INT8, LION_CLIP, NPAT };
static const char* kNames[NPAT] = {"lion", "lion-int8", "ec-int8", "sr-int8", "lion+clip"};

int main(int argc, char** argv) {
  const long n = (argc > 1 ? atol(argv[1]) : 124439808L) / 64 * 64;
  const int rounds = argc > 2 && atoi(argv[2]) > 0 && atoi(argv[2]) <= 64 ? atoi(argv[2]) : 15;
  float *p = aligned_alloc(64, n * 4), *g = aligned_alloc(64, n * 4), *m = aligned_alloc(64, n * 4);
  uint16_t *pb = aligned_alloc(64, n * 2), *gb = aligned_alloc(64, n * 2), *sc = aligned_alloc(64, n / 32 + 64);
  int8_t *c = aligned_alloc(64, n), *rho = aligned_alloc(64, n);
#pragma omp parallel for schedule(static)
  for (long i = 0; i < n; ++i) {
    p[i] = g[i] = m[i] = 1.0f;
    pb[i] = gb[i] = 0x3F80;
    c[i] = rho[i] = 1;
  }
  const __m512 b = _mm512_set1_ps(0.5f), h = _mm512_set1_ps(0.25f);
  double t[NPAT][64], ratio[NPAT][64];
  double sink = 0;
  for (int r = 0; r < rounds + 2; ++r) {  // two warm-up rounds
    double d[NPAT];
    for (int k = 0; k < NPAT; ++k) {
      const double t0 = now();
      if (k == LION_CLIP) {
        double s = 0;
#pragma omp parallel reduction(+ : s)
        {
          __m512 acc = _mm512_setzero_ps();
#pragma omp for schedule(static)
          for (long i = 0; i < n; i += 16) {
            const __m512 gv = _mm512_load_ps(g + i);
            acc = _mm512_fmadd_ps(gv, gv, acc);
          }
          s += _mm512_reduce_add_ps(acc);
        }
        sink += s;
      }
      switch (k) {
        case LION:
        case LION_CLIP:
#pragma omp parallel for schedule(static)
          for (long i = 0; i < n; i += 16) {
            const __m512 gv = _mm512_load_ps(g + i);
            _mm512_store_ps(p + i, _mm512_fmadd_ps(_mm512_load_ps(p + i), b, gv));
            _mm512_store_ps(m + i, _mm512_fmadd_ps(_mm512_load_ps(m + i), b, gv));
          }
          break;
        case LION_INT8:
          INT8_PASS({
            const __m512 gv = _mm512_load_ps(g + j);
            _mm512_store_ps(p + j, _mm512_fmadd_ps(_mm512_load_ps(p + j), b, gv));
          });
          break;
        case EC_INT8:
          INT8_PASS({
            const __m512 gv = bf16_load(gb + j);
            const __m512 pv = _mm512_fmadd_ps(bf16_load(pb + j), b, _mm512_mul_ps(i8_load(rho + j), gv));
            bf16_store(pb + j, pv);
            i8_store(rho + j, pv);
          });
          break;
        case SR_INT8:
          INT8_PASS({
            const __m512 gv = bf16_load(gb + j);
            bf16_store(pb + j, _mm512_fmadd_ps(bf16_load(pb + j), b, gv));
          });
          break;
      }
      d[k] = now() - t0;
    }
    if (r < 2) continue;
    for (int k = 0; k < NPAT; ++k) {
      t[k][r - 2] = d[k];
      ratio[k][r - 2] = d[k] / d[LION];
    }
  }
  printf("{\"elements\": %ld, \"rounds\": %d, \"patterns\": {", n, rounds);
  for (int k = 0; k < NPAT; ++k)
    printf("%s\"%s\": {\"ms_p50\": %.3f, \"ratio_to_lion_p50\": %.3f}", k ? ", " : "", kNames[k],
           1e3 * median(t[k], rounds), median(ratio[k], rounds));
  printf("}, \"sink\": %g}\n", sink + p[1] + c[2] + pb[3]);
  return 0;
}
