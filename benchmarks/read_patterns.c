// How fast a bf16 decode product (float32 arithmetic, AVX2: cpu_kernels_avx2.c's bf16_rows) reads its weights
// from DRAM, by the order it reads them and how it prefetches, against a plain read of the same bytes: the test
// behind FAR_AHEAD. Six copies of a 14336 x 4096 bf16 weight (705 MB) are read in turn; the median of each
// pattern's calls is printed in GB/s. ventoux against itself: no peer runs here (decode.py and interleaved.py
// compare with llama.cpp).
//
//   gcc -O3 -fopenmp -march=x86-64-v3 benchmarks/read_patterns.c -o /tmp/read_patterns
//   OMP_NUM_THREADS=2 /tmp/read_patterns 8      # rounds (each reads every copy once per pattern)
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define K 4096
#define N 14336
#define COPIES 6
#define MAX_ROUNDS 64

static float hsum(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  return _mm_cvtss_f32(_mm_add_ss(a, _mm_shuffle_ps(a, a, 1)));
}

static void plain_read(const uint16_t* w, const float* x, float* y) {
  (void)x;
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    const uint16_t* p = w + (int64_t)n * K;
    __m256i a = _mm256_setzero_si256(), b = a;
    for (int k = 0; k < K; k += 32) {
      a = _mm256_xor_si256(a, _mm256_loadu_si256((const __m256i*)(p + k)));
      b = _mm256_xor_si256(b, _mm256_loadu_si256((const __m256i*)(p + k + 16)));
    }
    y[n] = (float)_mm256_extract_epi32(_mm256_xor_si256(a, b), 0);
  }
}

// ROWS weight rows side by side, two sums a row; AHEAD bytes ahead of every line prefetched with HINT (0: none,
// as the next rows' heads prefetch of bf16_rows is left out here)
#define PRODUCT(NAME, ROWS, AHEAD, HINT)                                                                    \
  static void NAME(const uint16_t* w, const float* x, float* y) {                                          \
    const float *xe = x, *xo = x + K / 2;                                                                   \
    const __m256i high = _mm256_set1_epi32((int)0xFFFF0000u);                                               \
    _Pragma("omp parallel for schedule(static)") for (int n = 0; n < N; n += ROWS) {                       \
      __m256 acc[ROWS][2];                                                                                  \
      for (int r = 0; r < ROWS; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();                           \
      for (int k = 0; k < K; k += 32) {                                                                     \
        const __m256 e0 = _mm256_loadu_ps(xe + k / 2), o0 = _mm256_loadu_ps(xo + k / 2);                    \
        const __m256 e1 = _mm256_loadu_ps(xe + k / 2 + 8), o1 = _mm256_loadu_ps(xo + k / 2 + 8);            \
        for (int r = 0; r < ROWS; ++r) {                                                                    \
          const uint16_t* p = w + (int64_t)(n + r) * K + k;                                                 \
          if (AHEAD) _mm_prefetch((const char*)p + AHEAD, HINT);                                            \
          const __m256i v0 = _mm256_loadu_si256((const __m256i*)p);                                         \
          const __m256i v1 = _mm256_loadu_si256((const __m256i*)(p + 16));                                  \
          acc[r][0] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v0, 16)), e0, acc[r][0]);       \
          acc[r][1] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v0, high)), o0, acc[r][1]);      \
          acc[r][0] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v1, 16)), e1, acc[r][0]);       \
          acc[r][1] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v1, high)), o1, acc[r][1]);      \
        }                                                                                                   \
      }                                                                                                     \
      for (int r = 0; r < ROWS; ++r) y[n + r] = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));                  \
    }                                                                                                       \
  }

PRODUCT(four_rows, 4, 0, _MM_HINT_T1)
PRODUCT(one_row, 1, 0, _MM_HINT_T1)
PRODUCT(one_row_l1_1k, 1, 1024, _MM_HINT_T0)
PRODUCT(one_row_l1_2k, 1, 2048, _MM_HINT_T0)
PRODUCT(one_row_l2_4k, 1, 4096, _MM_HINT_T1)
PRODUCT(one_row_l2_8k, 1, 8192, _MM_HINT_T1)
PRODUCT(one_row_l2_16k, 1, 16384, _MM_HINT_T1)
PRODUCT(four_rows_l2_8k, 4, 8192, _MM_HINT_T1)

typedef void (*pattern)(const uint16_t*, const float*, float*);

static int by_value(const void* a, const void* b) {
  const double x = *(const double*)a, y = *(const double*)b;
  return (x > y) - (x < y);
}

int main(int argc, char** argv) {
  const pattern patterns[] = {plain_read, four_rows, one_row, one_row_l1_1k, one_row_l1_2k,
                              one_row_l2_4k, one_row_l2_8k, one_row_l2_16k, four_rows_l2_8k};
  const char* names[] = {"plain read", "four rows side by side", "one row", "one row, 1 KB ahead into L1",
                         "one row, 2 KB ahead into L1", "one row, 4 KB ahead into L2", "one row, 8 KB ahead into L2",
                         "one row, 16 KB ahead into L2", "four rows, 8 KB ahead into L2"};
  const int P = sizeof patterns / sizeof *patterns;
  int rounds = argc > 1 ? atoi(argv[1]) : 8;
  if (rounds < 1 || rounds > MAX_ROUNDS) rounds = 8;
  uint16_t* w[COPIES];
  for (int c = 0; c < COPIES; ++c) {
    w[c] = aligned_alloc(64, (size_t)N * K * 2);
    for (size_t i = 0; i < (size_t)N * K; ++i) w[c][i] = (uint16_t)(0x3F80 + i % 7);  // bf16 1.0 and near
  }
  float *x = aligned_alloc(64, K * 4), *y = aligned_alloc(64, N * 4);
  for (int i = 0; i < K; ++i) x[i] = 1.f / (i + 1);
  static double t[16][MAX_ROUNDS * COPIES];
  for (int r = 0; r < rounds; ++r)  // patterns in turn, round after round: each sees the same spells
    for (int p = 0; p < P; ++p)
      for (int c = 0; c < COPIES; ++c) {
        const double t0 = omp_get_wtime();
        patterns[p](w[c], x, y);
        t[p][r * COPIES + c] = omp_get_wtime() - t0;
      }
  printf("%d threads, %d rounds of %d copies, 14336 x 4096 bf16 (GB/s, medians)\n", omp_get_max_threads(), rounds,
         COPIES);
  for (int p = 0; p < P; ++p) {
    qsort(t[p], rounds * COPIES, sizeof(double), by_value);
    printf("%-32s %5.1f\n", names[p], (double)N * K * 2 / t[p][rounds * COPIES / 2] / 1e9);
  }
  return 0;
}
