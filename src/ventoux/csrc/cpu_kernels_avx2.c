// ventoux's CPU kernels for x86 CPUs with AVX2, FMA and F16C but no AVX-512 (most laptops and desktops): the
// same functions, layouts and numbers as cpu_kernels.c (read its header first), on 256-bit registers.
// cpu_kernels.py builds this file with -march=x86-64-v3 (plus -mavxvnni where the CPU has AVX-VNNI) and picks
// it by the CPU's flags, or by VENTOUX_CPU_ISA=avx2.
//
// Integer dot products: with AVX-VNNI, vpdpbusd on 256-bit registers; without, vpmaddubsw (unsigned x signed
// bytes -> pairs summed in int16) then vpmaddwd (pairs of int16 -> int32), as llama.cpp's AVX2 path does. The
// int16 pair sums cannot overflow: one side is at most 127 (|q| of the activations, or int8 weights in
// [-127, 127] times the activations' signs) or 15 (int4 codes). The activations are quantized exactly as
// cpu_kernels.c does, and integer sums are exact, so only the float sums' order differs from the AVX-512 path.
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 32  // activation quantization block
#define ROWS 4    // weight rows read together: more memory streams in flight, and a prefetch ahead
#define GEMV_MAX_ROWS 8  // more activation rows than this reuse each weight enough for a tiled product
#define TILE 16   // int8 and int4 weight rows interleaved in the decode kernels' layout (before vx_int8_gemv)
#ifndef AHEAD
#define AHEAD 4096  // bytes: how far ahead of its tile reads the decode kernel prefetches, every line
#endif
#ifndef FAR_AHEAD
#define FAR_AHEAD 8192  // bytes: how far ahead into L2 bf16 decode prefetches a weight row read alone (cpu_kernels.c)
#endif

// VX_EVEX_VNNI (tests only, on AVX-512 VNNI CPUs): the 256-bit vpdpbusd in its AVX-512 encoding, so that the
// AVX-VNNI form of this file is tested on CPUs that lack AVX-VNNI's own encoding.
#if defined(__AVXVNNI__) || defined(VX_EVEX_VNNI)
#define VNNI256 1
#endif

// acc + the dot products of unsigned bytes u with signed bytes s, 4 bytes per int32 lane.
static inline __m256i dot_us(__m256i acc, __m256i u, __m256i s) {
#if defined(VX_EVEX_VNNI)
  return _mm256_dpbusd_epi32(acc, u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

static inline float bf16(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// 8 bfloat16 or float16 values -> float32 lanes.
static inline __m256 half8(const uint16_t* p, int is_bf16) {
  const __m128i h = _mm_loadu_si128((const __m128i*)p);
  return is_bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)) : _mm256_cvtph_ps(h);
}

// One block of 32 activations -> int8 q = round(x / d) with d = max|x| / 127 (in *d): cpu_kernels.c's numbers,
// the 32 codes in order in one register.
static inline __m256i quantize_codes(const float* x, float* d_out) {
  __m256 v[4], mx = _mm256_setzero_ps(), odd = _mm256_setzero_ps();  // odd: x - x, NaN where x is inf or NaN
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(x + 8 * i);
    mx = _mm256_max_ps(mx, _mm256_andnot_ps(_mm256_set1_ps(-0.f), v[i]));
    odd = _mm256_add_ps(odd, _mm256_sub_ps(v[i], v[i]));
  }
  const int finite = !_mm256_movemask_ps(_mm256_cmp_ps(odd, _mm256_setzero_ps(), _CMP_NEQ_UQ));  // as cpu_kernels.c
  const float d = finite ? hmax(mx) / 127.f : NAN, inv_d = 1.f / d;
  const __m256 inv = _mm256_set1_ps(inv_d < INFINITY ? inv_d : 0.f);  // as cpu_kernels.c
  __m256i i[4];
  for (int j = 0; j < 4; ++j) i[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inv));
  // saturating packs work within 128-bit halves: the permute puts the 32 bytes back in order
  const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
  *d_out = d;
  return _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// One block of 32 activations -> its int8 codes in q; returns their scale d.
static inline float quantize_block(const float* x, int8_t* q) {
  float d;
  _mm256_storeu_si256((__m256i*)q, quantize_codes(x, &d));
  return d;
}

static void quant_gemm(const float* x, int64_t M, int64_t K, const uint8_t* w, int bits, const uint16_t* scales,
                       const uint16_t* zeros, int64_t group, int64_t N, float* y, int nthreads);

// int8 weights in the vnni kernel's tiles (cpu_kernels.c, before its vx_int8_gemv): byte (t, c, r, i) = weight
// (16t + r, 4c + i); a 64-byte line is two vectors of 8 rows times 4 inputs. Scales (N/16, G, 16), one per group
// of K/G inputs (G = 1: one a row): a group's block sums, each times its activation scale, are summed, then
// multiplied by the group's scales, as cpu_kernels.c does.
static inline __attribute__((always_inline)) void int8_tile(const int8_t* wt, const uint16_t* st, int64_t K,
                                                           int64_t group, const int8_t* xq, const float* dx,
                                                           const int MR, float* out) {
  const int64_t B = K / BLOCK, G = K / group, per_group = group / BLOCK;
  __m256 acc[GEMV_MAX_ROWS][2], ga[GEMV_MAX_ROWS][2];
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    for (int m = 0; m < MR; ++m) ga[m][0] = ga[m][1] = _mm256_setzero_ps();
    for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {  // one block: 32 inputs, 512 bytes
      const int8_t* p = wt + b * 512;
      for (int j = 0; j < 8; ++j) _mm_prefetch((const char*)(p + AHEAD + 64 * j), _MM_HINT_T0);
      for (int m = 0; m < MR; ++m) {
        const int32_t* q = (const int32_t*)(xq + m * K + b * BLOCK);
        __m256i dot[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
        for (int j = 0; j < 8; ++j) {
          const __m256i qv = _mm256_set1_epi32(q[j]);
          for (int h = 0; h < 2; ++h) {  // rows 8h .. 8h + 7
            // dot(|w|, sign(w) * q) == dot(w, q), in the unsigned x signed form the products take: |w| as an
            // unsigned byte is exact for w = -128 too, and the codes q (-127..127) negate exactly
            const __m256i wv = _mm256_loadu_si256((const __m256i*)(p + 64 * j + 32 * h));
            dot[h] = dot_us(dot[h], _mm256_abs_epi8(wv), _mm256_sign_epi8(qv, wv));
          }
        }
        const __m256 d = _mm256_set1_ps(dx[m * B + b]);
        for (int h = 0; h < 2; ++h) ga[m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[h]), d, ga[m][h]);
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 s = half8(st + g * TILE + 8 * h, 1);
      for (int m = 0; m < MR; ++m) acc[m][h] = _mm256_fmadd_ps(s, ga[m][h], acc[m][h]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(out + m * TILE + 8 * h, acc[m][h]);
}

static void bf16_from_floats(uint16_t* dst, const float* src, int64_t n);
static void floats_from_bf16(float* dst, const uint16_t* src, int64_t n);

// The gemv kernels' bf16_io: x and y bfloat16 (a bf16 model's activations), converted a block at a time here.
// Activations at..at + BLOCK of x as float32 (into buf when they are bfloat16).
static inline const float* x_block(const void* xv, int64_t at, int bf16_io, float* buf) {
  if (!bf16_io) return (const float*)xv + at;
  floats_from_bf16(buf, (const uint16_t*)xv + at, BLOCK);
  return buf;
}

// rows float32 results into y from element at (rounded to bfloat16 as PyTorch rounds, where bf16_io).
static inline void store_y(void* yv, int64_t at, const float* out, int rows, int bf16_io) {
  if (bf16_io) bf16_from_floats((uint16_t*)yv + at, out, rows);
  else memcpy((float*)yv + at, out, rows * sizeof(float));
}

// quant_gemm on bf16_io's x and y: through float32 copies (this build's tile reads float32).
static void quant_gemm_io(const void* xv, int64_t M, int64_t K, const uint8_t* w, int bits, const uint16_t* scales,
                          const uint16_t* zeros, int64_t group, int64_t N, void* yv, int nthreads, int bf16_io) {
  if (!bf16_io) {
    quant_gemm(xv, M, K, w, bits, scales, zeros, group, N, yv, nthreads);
    return;
  }
  float* x = malloc(M * K * sizeof(float));
  float* y = malloc(M * N * sizeof(float));
  floats_from_bf16(x, xv, M * K);
  quant_gemm(x, M, K, w, bits, scales, zeros, group, N, y, nthreads);
  bf16_from_floats(yv, y, M * N);
  free(x);
  free(y);
}

// bf16_io: x and y are bfloat16, as in cpu_kernels.c.
void vx_int8_gemv(const void* xv, int64_t M, int64_t K, const int8_t* w, const uint16_t* scales, int64_t group,
                  int64_t N, void* yv, int nthreads, int bf16_io) {
  if (M > GEMV_MAX_ROWS) {  // prefill: a tiled product (at the end of this file)
    quant_gemm_io(xv, M, K, (const uint8_t*)w, 8, scales, NULL, group, N, yv, nthreads, bf16_io);
    return;
  }
  const int64_t B = K / BLOCK, G = K / group, T = (N + TILE - 1) / TILE;
  int8_t* xq = malloc(M * K);  // the quantized activations, and their block scales
  float* dx = malloc(M * B * sizeof(float));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < B; ++b) {
      float block[BLOCK];
      dx[m * B + b] = quantize_block(x_block(xv, m * K + b * BLOCK, bf16_io, block), xq + m * K + b * BLOCK);
    }
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t t = 0; t < T; ++t) {
    float out[GEMV_MAX_ROWS * TILE];
    const int8_t* wt = w + t * TILE * K;
    const uint16_t* st = scales + t * G * TILE;
    switch (M) {  // M as a constant: the sums stay in registers
      case 1: int8_tile(wt, st, K, group, xq, dx, 1, out); break;
      case 2: int8_tile(wt, st, K, group, xq, dx, 2, out); break;
      default: int8_tile(wt, st, K, group, xq, dx, (int)M, out); break;
    }
    const int rows = N - t * TILE < TILE ? (int)(N - t * TILE) : TILE;
    for (int64_t m = 0; m < M; ++m) store_y(yv, m * N + t * TILE, out + m * TILE, rows, bf16_io);
  }
  free(xq);
  free(dx);
}

// The int4 weights in the vnni kernel's tiles, as in cpu_kernels.c (read its comment before vx_int4_gemv): 16
// rows side by side, 4 bytes each per 8 inputs. Here a 64-byte line is two vectors of 8 rows. int6's tiles add
// each block's 128 bytes of top bits after its 256 nibble bytes (cpu_kernels.c, before with_top_bits).

// A block's integer dot products for 8 rows: lo and hi the codes of the even and odd inputs of its 4 lines, q the
// activations (per 8 inputs the even 4, then the odd 4). int4 with VNNI keeps hi in place (16 x code).
static inline __attribute__((always_inline)) __m256i nibble_dot(const __m256i* lo, const __m256i* hi,
                                                               const int32_t* q, const int BITS) {
#if !defined(VNNI256)
  if (BITS == 4) {  // the 8 int16 pair sums of a lane (each at most 2 * 15 * 127) added before widening: one vpmaddwd
    __m256i pairs = _mm256_setzero_si256();
    for (int j = 0; j < 4; ++j)
      pairs = _mm256_add_epi16(pairs, _mm256_add_epi16(_mm256_maddubs_epi16(lo[j], _mm256_set1_epi32(q[2 * j])),
                                                       _mm256_maddubs_epi16(hi[j], _mm256_set1_epi32(q[2 * j + 1]))));
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
  }
#endif
  __m256i dl = _mm256_setzero_si256(), dh = dl;  // int6 without VNNI: widened every step, a code is up to 63
  for (int j = 0; j < 4; ++j) {
    dl = dot_us(dl, lo[j], _mm256_set1_epi32(q[2 * j]));
    dh = dot_us(dh, hi[j], _mm256_set1_epi32(q[2 * j + 1]));
  }
  return _mm256_add_epi32(dl, BITS == 4 ? _mm256_srai_epi32(dh, 4) : dh);
}

// One tile of 16 rows times M activation rows (BITS 4 or 6 and MR constants in each use; int4 takes it for
// MR > 1): out (MR, 16). Each half of a block's bytes is split into codes once for the MR rows. The same float
// operations in the same order for every MR: a row's result is the same alone or in a batch.
static inline __attribute__((always_inline)) void int4_tile_rows(const uint8_t* wt, const uint16_t* st,
                                                                const uint16_t* zt, int64_t K, int64_t group,
                                                                const int32_t* xq, const float* dx, const float* xs,
                                                                const int BITS, const int MR, float* out) {
  const __m256i low4 = _mm256_set1_epi8(0x0F), top2 = _mm256_set1_epi8(0x30);
  const int64_t B = K / BLOCK, G = K / group, per_group = group / BLOCK, block_bytes = BLOCK * TILE * BITS / 8;
  __m256 acc[GEMV_MAX_ROWS][2];
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    for (int h = 0; h < 2; ++h) {  // rows 8h .. 8h + 7
      const __m256 s = half8(st + g * TILE + 8 * h, 1);
      for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {  // one block: 32 inputs
        const uint8_t* p = wt + b * block_bytes + 32 * h;
        for (int j = 0; j < block_bytes / 64 && h == 0; ++j)
          _mm_prefetch((const char*)(p + AHEAD + 64 * j), _MM_HINT_T0);
        __m256i lo[4], hi[4];  // the codes of each line's even and odd inputs
        if (BITS == 4)
          for (int j = 0; j < 4; ++j) {
            const __m256i v = _mm256_loadu_si256((const __m256i*)(p + 64 * j));
            lo[j] = _mm256_and_si256(v, low4);
#if defined(VNNI256)  // the high nibbles in place (16 x code), exact after the sums: one instruction fewer
            hi[j] = _mm256_andnot_si256(low4, v);
#else  // vpmaddubsw's int16 pair sums must stay under 2^15: codes, not 16 x codes
            hi[j] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
#endif
          }
        else
          for (int a = 0; a < 2; ++a) {  // each line's top bits moved to bits 4-5 of its codes
            const __m256i top = _mm256_loadu_si256((const __m256i*)(p + 256 + 64 * a));
            for (int e = 0; e < 2; ++e) {
              const __m256i v = _mm256_loadu_si256((const __m256i*)(p + 64 * (2 * a + e)));
              const __m256i even = e ? top : _mm256_slli_epi16(top, 4), odd = e ? _mm256_srli_epi16(top, 2)
                                                                              : _mm256_slli_epi16(top, 2);
              lo[2 * a + e] = _mm256_or_si256(_mm256_and_si256(v, low4), _mm256_and_si256(even, top2));
              hi[2 * a + e] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), low4),
                                              _mm256_and_si256(odd, top2));
            }
          }
        for (int m = 0; m < MR; ++m) {
          const __m256i dot = nibble_dot(lo, hi, xq + (m * (K / 8) + b * 4) * 2, BITS);
          const __m256 d = _mm256_set1_ps(dx[m * B + b]);
          acc[m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(s, d), acc[m][h]);
        }
      }
      // w = (q - middle) s + z = q s + off (middle 8, or 32 for int6): plus off times the group's sum of the x
      const __m256 middle = _mm256_set1_ps(BITS == 4 ? 8.f : 32.f);
      const __m256 off = _mm256_fnmadd_ps(middle, s, half8(zt + g * TILE + 8 * h, 1));
      for (int m = 0; m < MR; ++m) acc[m][h] = _mm256_fmadd_ps(off, _mm256_set1_ps(xs[m * G + g]), acc[m][h]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    _mm256_storeu_ps(out + m * TILE, acc[m][0]);
    _mm256_storeu_ps(out + m * TILE + 8, acc[m][1]);
  }
}

// One block's 16 rows times one activation row: the dot products of both halves (rows 0..7, 8..15), the block
// streamed 32 bytes at a time, each activation broadcast once for both halves (few registers live: a form that
// keeps the nibbles of a whole block, as int4_tile_rows, spills at one row).
static inline __attribute__((always_inline)) void int4_block1(const uint8_t* p, const int32_t* q, __m256i* dot0,
                                                             __m256i* dot1) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
#if defined(VNNI256)
  __m256i dl0 = _mm256_setzero_si256(), dh0 = dl0, dl1 = dl0, dh1 = dl0;
  for (int j = 0; j < 4; ++j) {
    const __m256i v0 = _mm256_loadu_si256((const __m256i*)(p + 64 * j));
    const __m256i v1 = _mm256_loadu_si256((const __m256i*)(p + 64 * j + 32));
    const __m256i qe = _mm256_set1_epi32(q[2 * j]), qo = _mm256_set1_epi32(q[2 * j + 1]);
    dl0 = dot_us(dl0, _mm256_and_si256(v0, low4), qe);
    dh0 = dot_us(dh0, _mm256_andnot_si256(low4, v0), qo);  // 16 x the high nibbles: shifted back below
    dl1 = dot_us(dl1, _mm256_and_si256(v1, low4), qe);
    dh1 = dot_us(dh1, _mm256_andnot_si256(low4, v1), qo);
  }
  *dot0 = _mm256_add_epi32(dl0, _mm256_srai_epi32(dh0, 4));
  *dot1 = _mm256_add_epi32(dl1, _mm256_srai_epi32(dh1, 4));
#else
  __m256i pairs0 = _mm256_setzero_si256(), pairs1 = pairs0;
  for (int j = 0; j < 4; ++j) {
    const __m256i v0 = _mm256_loadu_si256((const __m256i*)(p + 64 * j));
    const __m256i v1 = _mm256_loadu_si256((const __m256i*)(p + 64 * j + 32));
    const __m256i qe = _mm256_set1_epi32(q[2 * j]), qo = _mm256_set1_epi32(q[2 * j + 1]);
    pairs0 = _mm256_add_epi16(pairs0, _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(v0, low4), qe),
                                                       _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v0, 4), low4), qo)));
    pairs1 = _mm256_add_epi16(pairs1, _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(v1, low4), qe),
                                                       _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v1, 4), low4), qo)));
  }
  *dot0 = _mm256_madd_epi16(pairs0, _mm256_set1_epi16(1));
  *dot1 = _mm256_madd_epi16(pairs1, _mm256_set1_epi16(1));
#endif
}

// One tile of 16 rows times M activation rows (MR, a constant in each use): out (MR, 16). The same float
// operations in the same order for every MR (and as cpu_kernels.c's lanes): a row's result is the same alone
// or in a batch.
static inline __attribute__((always_inline)) void int4_tile(const uint8_t* wt, const uint16_t* st,
                                                           const uint16_t* zt, int64_t K, int64_t group,
                                                           const int32_t* xq, const float* dx, const float* xs,
                                                           const int MR, float* out) {
  if (MR > 1) {
    int4_tile_rows(wt, st, zt, K, group, xq, dx, xs, 4, MR, out);
    return;
  }
  const int64_t G = K / group, per_group = group / BLOCK;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0;  // rows 0..7 and 8..15
  for (int64_t g = 0; g < G; ++g) {
    const __m256 s0 = half8(st + g * TILE, 1), s1 = half8(st + g * TILE + 8, 1);
    for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {  // one block: 32 inputs, 256 bytes
      const uint8_t* p = wt + b * 256;
      for (int j = 0; j < 4; ++j) _mm_prefetch((const char*)(p + AHEAD + 64 * j), _MM_HINT_T0);
      __m256i dot0, dot1;
      int4_block1(p, xq + b * 8, &dot0, &dot1);
      const __m256 d = _mm256_set1_ps(dx[b]);
      a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot0), _mm256_mul_ps(s0, d), a0);
      a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot1), _mm256_mul_ps(s1, d), a1);
#if !defined(VNNI256)
      // the sums kept in registers: gcc kept them on the stack, each block's multiply-add then waiting on a store
      // and a load (AMD Zen 4, weights hot in L2, one thread: 5-10% faster; the AVX-VNNI form is not measured)
      __asm__("" : "+x"(a0), "+x"(a1));
#endif
    }
    // w = (q - 8) s + z = q s + off: plus off times the group's sum of the quantized x
    const __m256 sum = _mm256_set1_ps(xs[g]);
    a0 = _mm256_fmadd_ps(_mm256_fnmadd_ps(_mm256_set1_ps(8.f), s0, half8(zt + g * TILE, 1)), sum, a0);
    a1 = _mm256_fmadd_ps(_mm256_fnmadd_ps(_mm256_set1_ps(8.f), s1, half8(zt + g * TILE + 8, 1)), sum, a1);
  }
  _mm256_storeu_ps(out, a0);
  _mm256_storeu_ps(out + 8, a1);
}

// One block of 32 activations quantized as quantize_block does, in vx_int4_gemv's order (per 8 inputs the even 4,
// then the odd 4: one byte shuffle), with the sum of the 32 codes: as cpu_kernels.c, no scalar loop.
static inline float int4_quantize_block(const float* x, int32_t* eo, int* sum) {
  float d;
  const __m256i q = quantize_codes(x, &d);
  const __m256i order = _mm256_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15,
                                         0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);
  _mm256_storeu_si256((__m256i*)eo, _mm256_shuffle_epi8(q, order));
  const __m256i quads = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), q), _mm256_set1_epi16(1));
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(quads), _mm256_extracti128_si256(quads, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
  *sum = _mm_cvtsi128_si32(s4);
  return d;
}

// 8 float32 lanes -> bfloat16, rounded to nearest even as PyTorch rounds (a NaN stays a quiet NaN).
static inline __m128i bf16_round8(__m256 v) {
  const __m256i u = _mm256_castps_si256(v), top = _mm256_srli_epi32(u, 16);
  const __m256i bias = _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), _mm256_and_si256(top, _mm256_set1_epi32(1)));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
  r = _mm256_blendv_epi8(r, _mm256_or_si256(top, _mm256_set1_epi32(0x40)), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  const __m256i packed = _mm256_packus_epi32(r, r);  // every value fits 16 bits: no saturation
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}

static void bf16_from_floats(uint16_t* dst, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm_storeu_si128((__m128i*)(dst + i), bf16_round8(_mm256_loadu_ps(src + i)));
  if (i < n) {
    float f[8] = {0};
    uint16_t h[8];
    memcpy(f, src + i, (n - i) * sizeof(float));
    _mm_storeu_si128((__m128i*)h, bf16_round8(_mm256_loadu_ps(f)));
    memcpy(dst + i, h, (n - i) * sizeof(uint16_t));
  }
}

static void floats_from_bf16(float* dst, const uint16_t* src, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, half8(src + i, 1));
  for (; i < n; ++i) dst[i] = bf16(src[i]);
}

// vx_int4_gemv and vx_int6_gemv (bits 4 or 6). bf16_io: x and y are bfloat16, as in cpu_kernels.c.
static void nibble_gemv(const void* xv, int64_t M, int64_t K, const uint8_t* w, int bits, const uint16_t* scales,
                        const uint16_t* zeros, int64_t group, int64_t N, void* yv, int nthreads, int bf16_io) {
  if (M > GEMV_MAX_ROWS) {  // prefill: a tiled product (at the end of this file)
    quant_gemm_io(xv, M, K, w, bits, scales, zeros, group, N, yv, nthreads, bf16_io);
    return;
  }
  const int64_t B = K / BLOCK, G = K / group, T = (N + TILE - 1) / TILE;
  // as cpu_kernels.c: per 8 inputs the even 4 and the odd 4 quantized activations, per block its scale, per
  // group the sum of the quantized x
  int32_t* xq = malloc(M * K / 8 * 2 * sizeof(int32_t));
  float* dx = malloc(M * B * sizeof(float));
  float* xs = calloc(M * G, sizeof(float));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < B; ++b) {
      int sum;
      float block[BLOCK];
      const float* xb = x_block(xv, m * K + b * BLOCK, bf16_io, block);
      const float d = int4_quantize_block(xb, xq + (m * K / 8 + b * 4) * 2, &sum);
      dx[m * B + b] = d;
      xs[m * G + b * BLOCK / group] += d * (float)sum;
    }
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t t = 0; t < T; ++t) {
    float out[GEMV_MAX_ROWS * TILE];
    const uint8_t* wt = w + t * TILE * K * bits / 8;
    const uint16_t *st = scales + t * G * TILE, *zt = zeros + t * G * TILE;
    if (bits == 6) switch (M) {  // M as a constant: the sums stay in registers
      case 1: int4_tile_rows(wt, st, zt, K, group, xq, dx, xs, 6, 1, out); break;
      case 2: int4_tile_rows(wt, st, zt, K, group, xq, dx, xs, 6, 2, out); break;
      case 3: int4_tile_rows(wt, st, zt, K, group, xq, dx, xs, 6, 3, out); break;
      case 4: int4_tile_rows(wt, st, zt, K, group, xq, dx, xs, 6, 4, out); break;
      default: int4_tile_rows(wt, st, zt, K, group, xq, dx, xs, 6, (int)M, out); break;
    }
    else switch (M) {
      case 1: int4_tile(wt, st, zt, K, group, xq, dx, xs, 1, out); break;
      case 2: int4_tile(wt, st, zt, K, group, xq, dx, xs, 2, out); break;
      case 3: int4_tile(wt, st, zt, K, group, xq, dx, xs, 3, out); break;
      case 4: int4_tile(wt, st, zt, K, group, xq, dx, xs, 4, out); break;
      default: int4_tile_rows(wt, st, zt, K, group, xq, dx, xs, 4, (int)M, out); break;  // 5..8 rows
    }
    const int rows = N - t * TILE < TILE ? (int)(N - t * TILE) : TILE;
    for (int64_t m = 0; m < M; ++m) store_y(yv, m * N + t * TILE, out + m * TILE, rows, bf16_io);
  }
  free(xq);
  free(dx);
  free(xs);
}

void vx_int4_gemv(const void* xv, int64_t M, int64_t K, const uint8_t* w, const uint16_t* scales,
                  const uint16_t* zeros, int64_t group, int64_t N, void* yv, int nthreads, int bf16_io) {
  nibble_gemv(xv, M, K, w, 4, scales, zeros, group, N, yv, nthreads, bf16_io);
}

void vx_int6_gemv(const void* xv, int64_t M, int64_t K, const uint8_t* w, const uint16_t* scales,
                  const uint16_t* zeros, int64_t group, int64_t N, void* yv, int nthreads, int bf16_io) {
  nibble_gemv(xv, M, K, w, 6, scales, zeros, group, N, yv, nthreads, bf16_io);
}

// R rows of a bf16 weight times MB activation rows (R and MB constants in each use; MB * R <= ROWS), the activations
// split by parity (row m's even inputs at xeo + m * K, then its odd ones), as in cpu_kernels.c: << 16 and
// & 0xFFFF0000 of 8 pairs give 8 even and 8 odd weights as exact float32. A line's two even products are summed
// before they join the row's even sum (the odd likewise): each of the two sums waits on one add a line, not on two
// multiply-adds, so one weight row alone is not held to their latency (hot in cache, one activation row: 65-76 GB/s
// against 49 for the plain chain; its extra adds cost four rows side by side 4-8% from DRAM at M = 4 and 8). A
// row's sums run in this order whatever R and MB are, so its product is the same bits alone and in a batch. Four
// rows side by side prefetch the next rows' heads into L2 (as half_rows' there); one row alone (one sequential
// stream a thread) prefetches every line FAR_AHEAD into L2.
static inline __attribute__((always_inline)) void bf16_rows(const uint16_t* wr, int64_t K, const float* xeo,
                                                           const int MB, const int R, float* out) {
  const __m256i high = _mm256_set1_epi32((int)0xFFFF0000u);
  __m256 acc[ROWS][2];  // (m, r): even and odd inputs
  for (int i = 0; i < MB * R; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 32)  // one 64-byte line of each row
    for (int r = 0; r < R; ++r) {
      const uint16_t* p = wr + r * K + k;
      if (R == 1) _mm_prefetch((const char*)p + FAR_AHEAD, _MM_HINT_T1);
      else if (k < 1024) _mm_prefetch((const char*)(p + ROWS * K), _MM_HINT_T1);  // the next rows' heads, L2
      const __m256i v0 = _mm256_loadu_si256((const __m256i*)p), v1 = _mm256_loadu_si256((const __m256i*)(p + 16));
      const __m256 we0 = _mm256_castsi256_ps(_mm256_slli_epi32(v0, 16));  // even and odd weights, both halves
      const __m256 wo0 = _mm256_castsi256_ps(_mm256_and_si256(v0, high));
      const __m256 we1 = _mm256_castsi256_ps(_mm256_slli_epi32(v1, 16));
      const __m256 wo1 = _mm256_castsi256_ps(_mm256_and_si256(v1, high));
      for (int m = 0; m < MB; ++m) {
        const float *xe = xeo + m * K + k / 2, *xo = xe + K / 2;
        const __m256 even = _mm256_fmadd_ps(we1, _mm256_loadu_ps(xe + 8), _mm256_mul_ps(we0, _mm256_loadu_ps(xe)));
        const __m256 odd = _mm256_fmadd_ps(wo1, _mm256_loadu_ps(xo + 8), _mm256_mul_ps(wo0, _mm256_loadu_ps(xo)));
        acc[m * R + r][0] = _mm256_add_ps(acc[m * R + r][0], even);
        acc[m * R + r][1] = _mm256_add_ps(acc[m * R + r][1], odd);
      }
    }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) out[m * ROWS + r] = hsum(_mm256_add_ps(acc[m * R + r][0], acc[m * R + r][1]));
}

// bf16_io: x and y are bfloat16 (float32 copies made and rounded here, as in vx_int4_gemv).
void vx_half_gemv(const void* xv, int64_t M, int64_t K, const uint16_t* w, int is_bf16, int64_t N, void* yv,
                  int nthreads, int bf16_io) {
  float* x = bf16_io ? malloc(M * K * sizeof(float)) : (float*)xv;
  float* y = bf16_io ? malloc(M * N * sizeof(float)) : (float*)yv;
  if (bf16_io) floats_from_bf16(x, xv, M * K);
  float* xeo = NULL;  // bf16: the activations split by parity, (M, 2, K/2)
  if (is_bf16) {
    xeo = malloc(M * K * sizeof(float));
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; k += 2) {
        xeo[m * K + k / 2] = x[m * K + k];
        xeo[m * K + K / 2 + k / 2] = x[m * K + k + 1];
      }
  }
  // bf16 weight rows read side by side: one for one or two activation rows (AMD Zen 4, from DRAM, two threads: M = 1
  // +9-12%, M = 2 +3-22% over four; without the prefetch FAR_AHEAD, one row was slower than four), four for more,
  // whose lines each activation row reuses from the caches
  const int together = is_bf16 && M <= 2 ? 1 : ROWS;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t n0 = 0; n0 < N; n0 += 16) {
    const int64_t n1 = n0 + 16 < N ? n0 + 16 : N;
    for (int64_t n = n0; n < n1; n += together) {
      const int R = n1 - n < together ? (int)(n1 - n) : together;
      const uint16_t* wr = w + n * K;
      if (is_bf16) {
        float out[2 * ROWS];
        if (M <= 2) {  // one weight row times both activation rows
          if (M == 2) bf16_rows(wr, K, xeo, 2, 1, out);
          else if (M == 1) bf16_rows(wr, K, xeo, 1, 1, out);
          for (int64_t m = 0; m < M; ++m) y[m * N + n] = out[m * ROWS];
        } else
          for (int64_t m = 0; m < M; ++m) {
            if (R == ROWS) bf16_rows(wr, K, xeo + m * K, 1, ROWS, out);
            else bf16_rows(wr, K, xeo + m * K, 1, R, out);
            for (int r = 0; r < R; ++r) y[m * N + n + r] = out[r];
          }
        continue;
      }
      for (int64_t m = 0; m < M; ++m) {
        const float* xm = x + m * K;
        __m256 acc[ROWS][2];  // two sums a row: the multiply-adds of one row do not wait on each other
        for (int r = 0; r < ROWS; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
        for (int64_t k = 0; k < K; k += 32) {  // one 64-byte line of each row
          const __m256 x0 = _mm256_loadu_ps(xm + k), x1 = _mm256_loadu_ps(xm + k + 8);
          const __m256 x2 = _mm256_loadu_ps(xm + k + 16), x3 = _mm256_loadu_ps(xm + k + 24);
          for (int r = 0; r < R; ++r) {
            const uint16_t* p = wr + r * K + k;
            if (k < 1024) _mm_prefetch((const char*)(p + ROWS * K), _MM_HINT_T1);  // the next rows' heads, L2
            acc[r][0] = _mm256_fmadd_ps(half8(p, 0), x0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(half8(p + 8, 0), x1, acc[r][1]);
            acc[r][0] = _mm256_fmadd_ps(half8(p + 16, 0), x2, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(half8(p + 24, 0), x3, acc[r][1]);
          }
        }
        for (int r = 0; r < R; ++r) y[m * N + n + r] = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
      }
    }
    if (bf16_io)
      for (int64_t m = 0; m < M; ++m) bf16_from_floats((uint16_t*)yv + m * N + n0, y + m * N + n0, n1 - n0);
  }
  free(xeo);
  if (bf16_io) {
    free(x);
    free(y);
  }
}

// vx_half_gemm: cpu_kernels.c's tiled 16-bit product with 8-lane vectors: rows transposed into xp (MC/8, K, 8)
// float32, a tile of GEMM_MB x 8 rows by GEMM_NR outputs in 12 of the 16 registers, weights converted once
// per GEMM_KC inputs (ws), sums in yt (N, MC) between input blocks (GEMM_NB outputs a thread at a time, over all
// of K), rounded to 16 bits at the end.
#define GEMM_MC 256
#define GEMM_KC 256
#define GEMM_NR 6
#define GEMM_MB 2
#define GEMM_NB 240  // outputs a thread takes at a time (a multiple of GEMM_NR)

static inline __attribute__((always_inline)) void half_tile(const float* xp, int64_t K, int64_t k0, int64_t k1,
                                                            const float* ws, int mb, int nr, float* yt, int64_t Mp) {
  __m256 acc[GEMM_NR][GEMM_MB];
  for (int n = 0; n < nr; ++n)
    for (int b = 0; b < mb; ++b) acc[n][b] = k0 ? _mm256_loadu_ps(yt + n * Mp + b * 8) : _mm256_setzero_ps();
  for (int64_t k = k0; k < k1; ++k) {
    __m256 xv[GEMM_MB];
    for (int b = 0; b < mb; ++b) xv[b] = _mm256_loadu_ps(xp + b * 8 * K + k * 8);
    for (int n = 0; n < nr; ++n) {
      const __m256 wv = _mm256_broadcast_ss(ws + n * GEMM_KC + (k - k0));
      for (int b = 0; b < mb; ++b) acc[n][b] = _mm256_fmadd_ps(xv[b], wv, acc[n][b]);
    }
  }
  for (int n = 0; n < nr; ++n)
    for (int b = 0; b < mb; ++b) _mm256_storeu_ps(yt + n * Mp + b * 8, acc[n][b]);
}

// The weights of the tile after this one (rows n.., inputs k0..) into L2 while this one computes: its rows lie
// GEMM_NR * K apart from these, out of the hardware prefetcher's reach, and converting them waited on memory for
// 7% of the time (N = 14336, one core; 3-4% faster with this).
static inline void prefetch_next_tile(const uint16_t* w, int64_t K, int64_t n, int64_t k0, int64_t end) {
  if (k0 >= K) return;
  const int64_t k1 = k0 + GEMM_KC < K ? k0 + GEMM_KC : K;
  // every line of each row's piece: a weight memory-mapped from its file may start off a line, and its piece
  // then spans one line more (9 of 512 bytes), which left out waited on memory (the AVX2 product 10% slower)
  for (int64_t r = n; r < n + GEMM_NR && r < end; ++r) {
    const uintptr_t last = (uintptr_t)(w + r * K + k1) - 1;
    for (uintptr_t a = (uintptr_t)(w + r * K + k0) & ~(uintptr_t)63; a <= last; a += 64)
      _mm_prefetch((const char*)a, _MM_HINT_T1);
  }
}

static inline float half_to_float(uint16_t h, int is_bf16) { return is_bf16 ? bf16(h) : _cvtsh_ss(h); }

static inline uint16_t float_to_half(float f, int is_bf16) {  // round to nearest even, as PyTorch rounds
  if (!is_bf16) return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40);  // NaN stays a (quiet) NaN
  return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

void vx_half_gemm(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, int is_bf16, int64_t N, uint16_t* y,
                  int nthreads) {
  const int64_t MC = M < GEMM_MC ? (M + 7) / 8 * 8 : GEMM_MC;
  float* xp = malloc(MC * K * sizeof(float));
  float* yt = malloc(N * MC * sizeof(float));
  for (int64_t m0 = 0; m0 < M; m0 += MC) {
    const int64_t rows = M - m0 < MC ? M - m0 : MC, Mp = (rows + 7) / 8 * 8, blocks = Mp / 8;
#pragma omp parallel num_threads(nthreads)
    {
      float* ws = malloc(GEMM_NR * GEMM_KC * sizeof(float));
#pragma omp for schedule(static)
      for (int64_t m = 0; m < Mp; ++m) {  // rows past M are zero
        float* dst = xp + (m / 8) * 8 * K + m % 8;
        const uint16_t* src = x + (m0 + m) * K;
        for (int64_t k = 0; k < K; ++k) dst[k * 8] = m < rows ? half_to_float(src[k], is_bf16) : 0.f;
      }
      // About GEMM_NB outputs at a time, all K for them: their float sums (yt) stay in L2 between input blocks
      // (all N of them, 7 MB at N = 14336, cost a tenth of the time from L3). As many blocks for each thread:
      // 240 at N = 1024 gave one thread 720 outputs and the other 304.
      const int64_t threads = omp_get_num_threads();
      const int64_t blocks_n = ((N + GEMM_NB - 1) / GEMM_NB + threads - 1) / threads * threads;
      const int64_t NB = ((N + blocks_n - 1) / blocks_n + GEMM_NR - 1) / GEMM_NR * GEMM_NR;
#pragma omp for schedule(static)
      for (int64_t nb = 0; nb < N; nb += NB)
        for (int64_t k0 = 0; k0 < K; k0 += GEMM_KC) {
          const int64_t k1 = k0 + GEMM_KC < K ? k0 + GEMM_KC : K, end = nb + NB < N ? nb + NB : N;
          for (int64_t n = nb; n < end; n += GEMM_NR) {
            const int nr = end - n < GEMM_NR ? (int)(end - n) : GEMM_NR;
            prefetch_next_tile(w, K, n + GEMM_NR < end ? n + GEMM_NR : nb, n + GEMM_NR < end ? k0 : k1, end);
            for (int r = 0; r < nr; ++r)
              for (int64_t k = k0; k < k1; k += 8) _mm256_storeu_ps(ws + r * GEMM_KC + k - k0, half8(w + (n + r) * K + k, is_bf16));
            float* yn = yt + n * Mp;
            if (nr == GEMM_NR) {
              int64_t b = 0;
              for (; b + GEMM_MB <= blocks; b += GEMM_MB)
                half_tile(xp + b * 8 * K, K, k0, k1, ws, GEMM_MB, GEMM_NR, yn + b * 8, Mp);
              for (; b < blocks; ++b) half_tile(xp + b * 8 * K, K, k0, k1, ws, 1, GEMM_NR, yn + b * 8, Mp);
            } else {
              for (int r = 0; r < nr; ++r)
                for (int64_t b = 0; b < blocks; ++b)
                  half_tile(xp + b * 8 * K, K, k0, k1, ws + r * GEMM_KC, 1, 1, yn + r * Mp + b * 8, Mp);
            }
          }
        }
#pragma omp for schedule(static)
      for (int64_t n0 = 0; n0 < N; n0 += 16) {  // yt (N, Mp) float32 -> y rows m0.. (M, N), 16 columns at a time
        const int64_t n1 = n0 + 16 < N ? n0 + 16 : N;
        for (int64_t m = 0; m < rows; ++m)
          for (int64_t n = n0; n < n1; ++n) y[(m0 + m) * N + n] = float_to_half(yt[n * Mp + m], is_bf16);
      }
      free(ws);
    }
  }
  free(xp);
  free(yt);
}

// quant_gemm: cpu_kernels.c's tiled product for many rows with 8-lane vectors: 8 rows of x times 4 consecutive
// inputs fill a 32-byte vector ((MC/8, K/4, 8, 4) int8); 4 codes of one output broadcast give 8 rows of that
// output per dot product. int4 codes are unsigned (0..15) and multiply x as they are; int8 codes are signed
// q (no +128: vpmaddubsw's pair sums must stay under 2^15), so |q| multiplies x after x takes q's signs (|q| as
// an unsigned byte is exact for q = -128, where sign(x) * q would overflow; x, from -127 to 127, negates exactly).
// A tile of Q_MB x 8 rows by Q_NR outputs keeps its int32 block sums in registers; its float sums live in yt (in
// L1), updated once per block of 32 inputs.
#define Q_MC 256
#define Q_KC 256  // inputs a chunk; a group may end in a later chunk (each chunk takes the scales it overlaps)
#define Q_NR 4
#define Q_MB 2

static inline __attribute__((always_inline)) void quant_tile(const int8_t* xq, const float* dx, const float* xs,
                                                            int64_t K, int64_t G, int64_t group, int64_t k0,
                                                            int64_t k1, const int8_t* qs, int bits, const float* s,
                                                            const float* off, int mb, int nr, float* yt,
                                                            int64_t Mp) {
  for (int64_t k = k0; k < k1; k += BLOCK) {
    __m256i dot[Q_NR][Q_MB];
    for (int n = 0; n < nr; ++n)
      for (int b = 0; b < mb; ++b) dot[n][b] = _mm256_setzero_si256();
    if (bits != 8) {
      for (int64_t j = k; j < k + BLOCK; j += 4) {
        __m256i xv[Q_MB];
        for (int b = 0; b < mb; ++b) xv[b] = _mm256_loadu_si256((const __m256i*)(xq + b * 8 * K + j * 8));
        for (int n = 0; n < nr; ++n) {
          int32_t codes;
          memcpy(&codes, qs + n * Q_KC + (j - k0), 4);
          const __m256i wv = _mm256_set1_epi32(codes);
#if defined(VNNI256)
          for (int b = 0; b < mb; ++b) dot[n][b] = dot_us(dot[n][b], wv, xv[b]);
#else  // int4: int16 pair sums, at most 8 * 2 * 15 * 127 over a block, widened once below; int6: every step
          for (int b = 0; b < mb; ++b)
            dot[n][b] = bits == 4 ? _mm256_add_epi16(dot[n][b], _mm256_maddubs_epi16(wv, xv[b]))
                                  : dot_us(dot[n][b], wv, xv[b]);
#endif
        }
      }
#if !defined(VNNI256)
      if (bits == 4)
        for (int n = 0; n < nr; ++n)
          for (int b = 0; b < mb; ++b) dot[n][b] = _mm256_madd_epi16(dot[n][b], _mm256_set1_epi16(1));
#endif
    } else {
      for (int64_t j = k; j < k + BLOCK; j += 4) {
        __m256i xv[Q_MB];
        for (int b = 0; b < mb; ++b) xv[b] = _mm256_loadu_si256((const __m256i*)(xq + b * 8 * K + j * 8));
        for (int n = 0; n < nr; ++n) {
          int32_t codes;
          memcpy(&codes, qs + n * Q_KC + (j - k0), 4);
          const __m256i wv = _mm256_set1_epi32(codes), aw = _mm256_abs_epi8(wv);
          for (int b = 0; b < mb; ++b) dot[n][b] = dot_us(dot[n][b], aw, _mm256_sign_epi8(xv[b], wv));
        }
      }
    }
    const int64_t blk = k / BLOCK, g = k / group;
    const int zero_term = (k + BLOCK) % group == 0;
    for (int b = 0; b < mb; ++b) {
      const __m256 d = _mm256_loadu_ps(dx + b * 8 * (K / BLOCK) + blk * 8);
      const __m256 sum = _mm256_loadu_ps(xs + b * 8 * G + g * 8);
      for (int n = 0; n < nr; ++n) {
        float* yp = yt + n * Mp + b * 8;
        __m256 acc = k ? _mm256_loadu_ps(yp) : _mm256_setzero_ps();
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[n][b]), _mm256_mul_ps(d, _mm256_set1_ps(s[n * G + g])), acc);
        if (zero_term) acc = _mm256_fmadd_ps(_mm256_set1_ps(off[n * G + g]), sum, acc);  // the group's zero term
        _mm256_storeu_ps(yp, acc);
      }
    }
  }
}

static void quant_gemm(const float* x, int64_t M, int64_t K, const uint8_t* w, int bits, const uint16_t* scales,
                       const uint16_t* zeros, int64_t group, int64_t N, float* y, int nthreads) {
  const int64_t MC = M < Q_MC ? (M + 7) / 8 * 8 : Q_MC, G = K / group, B = K / BLOCK;
  int8_t* xq = malloc(MC * K);                    // (MC/8, K/4, 8, 4)
  float* dx = malloc(MC * B * sizeof(float));     // (MC/8, K/32, 8): each block's scale
  float* xs = malloc(MC * G * sizeof(float));     // (MC/8, G, 8): each group's sum of the quantized x
  float* yt = malloc(N * MC * sizeof(float));
  for (int64_t m0 = 0; m0 < M; m0 += MC) {
    const int64_t rows = M - m0 < MC ? M - m0 : MC, Mp = (rows + 7) / 8 * 8, blocks = Mp / 8;
#pragma omp parallel num_threads(nthreads)
    {
      int8_t* qs = malloc(Q_NR * Q_KC);                    // the tile's codes, one byte each
      float* s = malloc(Q_NR * G * sizeof(float));         // its scales as float
      float* off = malloc(Q_NR * G * sizeof(float));       // and the offsets: w = code * s + off
#pragma omp for schedule(static)
      for (int64_t m = 0; m < Mp; ++m) {  // rows past M are zero
        int8_t* dst = xq + (m / 8) * 8 * K + (m % 8) * 4;
        float* dm = dx + (m / 8) * 8 * B + m % 8;
        float* sm = xs + (m / 8) * 8 * G + m % 8;
        for (int64_t g = 0; g < G; ++g) sm[g * 8] = 0.f;
        for (int64_t b = 0; b < B; ++b) {
          int8_t q[BLOCK];
          float d = 0.f;
          if (m < rows) d = quantize_block(x + (m0 + m) * K + b * BLOCK, q);
          else memset(q, 0, BLOCK);
          int sum = 0;
          for (int i = 0; i < BLOCK; ++i) sum += q[i];
          for (int i = 0; i < BLOCK; i += 4) memcpy(dst + (b * BLOCK + i) * 8, q + i, 4);
          dm[b * 8] = d;
          sm[(b * BLOCK / group) * 8] += d * (float)sum;
        }
      }
      for (int64_t k0 = 0; k0 < K; k0 += Q_KC) {  // the implicit barrier of each omp for orders the blocks
        const int64_t k1 = k0 + Q_KC < K ? k0 + Q_KC : K;
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n += Q_NR) {
          const int nr = N - n < Q_NR ? (int)(N - n) : Q_NR;
          for (int r = 0; r < nr; ++r) {
            if (bits == 8) {
              const uint8_t* t = w + (n + r) / TILE * TILE * K + (n + r) % TILE * 4;  // in vx_int8_gemv's tiles
              for (int64_t k = k0; k < k1; k += 4) memcpy(qs + r * Q_KC + k - k0, t + k / 4 * 64, 4);
              for (int64_t g = k0 / group; g <= (k1 - 1) / group; ++g) {  // scales as int4's: (N/16, G, 16)
                s[r * G + g] = bf16(scales[(((n + r) / TILE) * G + g) * TILE + (n + r) % TILE]);
                off[r * G + g] = 0.f;
              }
            } else {  // int4, int6: 64 codes at a time, low nibble first; int6 adds each code's top bits
              const int64_t R = n + r;  // its bytes in vx_int4_gemv's tiles (vx_int6_gemv's): 4 of them every 64
              const int* p = (const int*)(w + (R / TILE) * TILE * K * bits / 8 + (R % TILE) * 4);
              const __m256i every64 = _mm256_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112), low4 = _mm256_set1_epi8(15);
              const __m256i int6_lines = _mm256_setr_epi32(0, 16, 32, 48, 96, 112, 128, 144);  // 384 bytes a block
              const __m256i three = _mm256_set1_epi8(3);
              for (int64_t k = k0; k < k1; k += 64) {  // 8 nibble lines (int6: of two blocks, and 4 top-bit lines)
                const int* q = bits == 4 ? p + k / 8 * 16 : p + k / 32 * 96;
                const __m256i v = _mm256_i32gather_epi32(q, bits == 4 ? every64 : int6_lines, 4);
                __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
                if (bits == 6) {
                  // line 2a's top bits are the low half of top-bit line a's bytes, line 2a + 1's the high half: one
                  // int32 a line, in v's order, its bytes holding the even input's top bits at 0-1, the odd's at 2-3
                  const __m256i t = _mm256_cvtepu32_epi64(_mm_i32gather_epi32(q, _mm_setr_epi32(64, 80, 160, 176), 4));
                  const __m256i top = _mm256_and_si256(_mm256_or_si256(t, _mm256_slli_epi64(t, 28)), low4);
                  lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(top, three), 4));
                  hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(top, 2), three), 4));
                }
                const __m256i a = _mm256_unpacklo_epi8(lo, hi), b = _mm256_unpackhi_epi8(lo, hi);  // in lane order
                _mm256_storeu_si256((__m256i*)(qs + r * Q_KC + k - k0), _mm256_permute2x128_si256(a, b, 0x20));
                _mm256_storeu_si256((__m256i*)(qs + r * Q_KC + k - k0 + 32), _mm256_permute2x128_si256(a, b, 0x31));
              }
              for (int64_t g = k0 / group; g <= (k1 - 1) / group; ++g) {  // w = (q - middle) s + z = q s + off
                const int64_t at = ((R / TILE) * G + g) * TILE + R % TILE;
                s[r * G + g] = bf16(scales[at]);
                off[r * G + g] = bf16(zeros[at]) - (bits == 4 ? 8.f : 32.f) * s[r * G + g];
              }
            }
          }
          float* yn = yt + n * Mp;
          if (nr == Q_NR) {
            int64_t b = 0;
            for (; b + Q_MB <= blocks; b += Q_MB)
              quant_tile(xq + b * 8 * K, dx + b * 8 * B, xs + b * 8 * G, K, G, group, k0, k1, qs, bits, s, off,
                         Q_MB, Q_NR, yn + b * 8, Mp);
            for (; b < blocks; ++b)
              quant_tile(xq + b * 8 * K, dx + b * 8 * B, xs + b * 8 * G, K, G, group, k0, k1, qs, bits, s, off, 1,
                         Q_NR, yn + b * 8, Mp);
          } else {
            for (int r = 0; r < nr; ++r)
              for (int64_t b = 0; b < blocks; ++b)
                quant_tile(xq + b * 8 * K, dx + b * 8 * B, xs + b * 8 * G, K, G, group, k0, k1, qs + r * Q_KC, bits,
                           s + r * G, off + r * G, 1, 1, yn + r * Mp + b * 8, Mp);
          }
        }
      }
#pragma omp for schedule(static)
      for (int64_t n0 = 0; n0 < N; n0 += 16) {  // yt (N, Mp) -> y rows m0.. (M, N)
        const int64_t n1 = n0 + 16 < N ? n0 + 16 : N;
        for (int64_t m = 0; m < rows; ++m)
          for (int64_t n = n0; n < n1; ++n) y[(m0 + m) * N + n] = yt[n * Mp + m];
      }
      free(qs);
      free(s);
      free(off);
    }
  }
  free(xq);
  free(dx);
  free(xs);
  free(yt);
}

// ---- Attention of one new token per row over the KV cache (a decode step): cpu_kernels.c's vx_attend_decode,
// in 8-lane registers (its comment says why and how). ---------------------------------------------------------
#define ATTEND_MAX_G 16  // query heads a KV head (attend_task keeps per-head values on the stack)
#define ATTEND_GB 4      // query heads whose weighted sums stay in registers together

// e^x for x <= 0, as cpu_kernels.c's attend_exp16; 2^n built in the exponent bits (n >= -126 after the clamp).
static inline __m256 attend_exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.f), x);  // a NaN stays NaN, as attend_exp16's
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}

static inline __m256 attend_load8(const void* p, int64_t at, const int BF16) {
  return BF16 ? half8((const uint16_t*)p + at, 1) : _mm256_loadu_ps((const float*)p + at);
}

static inline float attend_sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// e^(score - max) for 8 slots where allowed (ok: 8 bytes), exactly 0 elsewhere; returns them, stored in sg.
static inline __m256 attend_weights8(float* sg, const uint8_t* ok, __m256 m) {
  const __m256i allowed = _mm256_cmpgt_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)ok)),
                                             _mm256_setzero_si256());
  const __m256 x = _mm256_and_ps(_mm256_loadu_ps(sg), _mm256_castsi256_ps(allowed));  // no NaN from unset scores
  const __m256 e = _mm256_and_ps(attend_exp8(_mm256_sub_ps(x, m)), _mm256_castsi256_ps(allowed));
  _mm256_storeu_ps(sg, e);
  return e;
}

static inline __attribute__((always_inline)) void attend_task(const void* q, const void* k, const void* v,
                                                             const uint8_t* ok, int64_t task, int64_t G, int64_t S,
                                                             int64_t D, float scale, void* out, const int BF16,
                                                             float* scores, float* qf, float* row) {
  for (int64_t i = 0; i < G * D; i += 8)
    _mm256_storeu_ps(qf + i, _mm256_mul_ps(attend_load8(q, task * G * D + i, BF16), _mm256_set1_ps(scale)));
  float top[ATTEND_MAX_G];
  for (int64_t g = 0; g < G; ++g) top[g] = -INFINITY;
  for (int64_t s = 0; s < S; ++s) {
    if (!ok[s]) continue;
    for (int64_t c = 0; c < D; c += 8) _mm256_storeu_ps(row + c, attend_load8(k, (task * S + s) * D + c, BF16));
    for (int64_t g = 0; g < G; ++g) {
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      int64_t c = 0;
      for (; c + 16 <= D; c += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qf + g * D + c), _mm256_loadu_ps(row + c), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qf + g * D + c + 8), _mm256_loadu_ps(row + c + 8), a1);
      }
      if (c < D) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qf + g * D + c), _mm256_loadu_ps(row + c), a0);
      const float dot = attend_sum8(_mm256_add_ps(a0, a1));
      scores[g * S + s] = dot;
      top[g] = dot > top[g] ? dot : top[g];
    }
  }
  float total[ATTEND_MAX_G];
  for (int64_t g = 0; g < G; ++g) {
    float* sg = scores + g * S;
    const __m256 m = _mm256_set1_ps(top[g]);
    __m256 sum = _mm256_setzero_ps();
    int64_t s = 0;
    for (; s + 8 <= S; s += 8) sum = _mm256_add_ps(sum, attend_weights8(sg + s, ok + s, m));
    if (s < S) {  // the last slots through a padded copy
      float tail[8] = {0.f};
      uint8_t tail_ok[8] = {0};
      memcpy(tail, sg + s, (S - s) * sizeof(float));
      memcpy(tail_ok, ok + s, S - s);
      sum = _mm256_add_ps(sum, attend_weights8(tail, tail_ok, m));
      memcpy(sg + s, tail, (S - s) * sizeof(float));
    }
    total[g] = attend_sum8(sum);
  }
  for (int64_t g0 = 0; g0 < G; g0 += ATTEND_GB)
    for (int64_t c0 = 0; c0 < D; c0 += 16) {  // ATTEND_GB query heads x 16 dimensions of the weighted sums
      __m256 acc[ATTEND_GB][2];
      for (int g = 0; g < ATTEND_GB; ++g) acc[g][0] = acc[g][1] = _mm256_setzero_ps();
      for (int64_t s = 0; s < S; ++s) {
        if (!ok[s]) continue;
        const __m256 v0 = attend_load8(v, (task * S + s) * D + c0, BF16);
        const __m256 v1 = c0 + 8 < D ? attend_load8(v, (task * S + s) * D + c0 + 8, BF16) : _mm256_setzero_ps();
        for (int g = 0; g < ATTEND_GB && g0 + g < G; ++g) {
          const __m256 w = _mm256_set1_ps(scores[(g0 + g) * S + s]);
          acc[g][0] = _mm256_fmadd_ps(w, v0, acc[g][0]);
          acc[g][1] = _mm256_fmadd_ps(w, v1, acc[g][1]);
        }
      }
      for (int g = 0; g < ATTEND_GB && g0 + g < G; ++g) {
        const __m256 inv = _mm256_set1_ps(total[g0 + g] <= 0.f ? 0.f : 1.f / total[g0 + g]);  // NaN stays NaN
        for (int j = 0; j < 2 && c0 + 8 * j < D; ++j) {
          const __m256 y = _mm256_mul_ps(acc[g][j], inv);
          const int64_t at = (task * G + g0 + g) * D + c0 + 8 * j;
          if (BF16) _mm_storeu_si128((__m128i*)((uint16_t*)out + at), bf16_round8(y));
          else _mm256_storeu_ps((float*)out + at, y);
        }
      }
    }
}

// As cpu_kernels.c's vx_attend_decode (D % 16 == 0, G <= ATTEND_MAX_G).
void vx_attend_decode(const void* q, const void* k, const void* v, const uint8_t* allowed, int64_t B, int64_t H,
                      int64_t G, int64_t S, int64_t D, float scale, void* out, int bf16, int nthreads) {
#pragma omp parallel num_threads(nthreads)
  {
    float* scores = malloc(G * S * sizeof(float));
    float* qf = malloc(G * D * sizeof(float));
    float* row = malloc(D * sizeof(float));
#pragma omp for schedule(static)
    for (int64_t task = 0; task < B * H; ++task) {
      const uint8_t* ok = allowed + task / H * S;
      if (bf16) attend_task(q, k, v, ok, task, G, S, D, scale, out, 1, scores, qf, row);
      else attend_task(q, k, v, ok, task, G, S, D, scale, out, 0, scores, qf, row);
    }
    free(scores);
    free(qf);
    free(row);
  }
}

// ---- A decode step's attention with its rotary and cache write: cpu_kernels.c's rotate_rolled in 8-lane registers
// (vx_decode_attention, in decode_block.h, says why and how). -------------------------------------------------

// a * b, kept apart from any add after it: the compiler may not fuse the two into one rounding (an FMA).
static inline __m256 product8(__m256 a, __m256 b) {
  __m256 p = _mm256_mul_ps(a, b);
  __asm__("" : "+x"(p));
  return p;
}

static inline __m256 bf16_rounded8(__m256 v) {  // v rounded to bfloat16, as float32 lanes
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bf16_round8(v)), 16));
}

// One head: dst = xf * c + xr * s in the head's dtype, as cpu_kernels.c's rotate_rolled.
static inline void rotate_rolled(void* dst, const float* xf, const float* xr, const float* c, const float* s,
                                 int64_t D, const int BF16) {
  for (int64_t i = 0; i < D; i += 8) {
    __m256 a = product8(_mm256_loadu_ps(xf + i), _mm256_loadu_ps(c + i));
    __m256 b = product8(_mm256_loadu_ps(xr + i), _mm256_loadu_ps(s + i));
    if (BF16) {
      _mm_storeu_si128((__m128i*)((uint16_t*)dst + i), bf16_round8(_mm256_add_ps(bf16_rounded8(a), bf16_rounded8(b))));
    } else {
      _mm256_storeu_ps((float*)dst + i, _mm256_add_ps(a, b));
    }
  }
}

// ---- silu(g) * u for a decode step's feed-forward (decode_block.h): cpu_kernels.c's silu_mul in 8 lanes; e^-x by
// attend_exp8, whose 2^n needs x <= 88 (e^88 is about 1.7e38: silu(x) below -88 is -6e-37 here, not -0).
static void silu_mul(const void* g, int64_t g_row, const void* u, int64_t u_row, int64_t M, int64_t n, void* m,
                     int bf16_io) {
  for (int64_t r = 0; r < M; ++r)
    for (int64_t i = 0; i < n; i += 8) {
      const __m256 x = attend_load8(g, r * g_row + i, bf16_io), up = attend_load8(u, r * u_row + i, bf16_io);
      const __m256 e = attend_exp8(_mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), x), _mm256_set1_ps(88.f)));
      const __m256 s = _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.f), e));
      if (bf16_io)
        _mm_storeu_si128((__m128i*)((uint16_t*)m + r * n + i), bf16_round8(product8(bf16_rounded8(s), up)));
      else
        _mm256_storeu_ps((float*)m + r * n + i, product8(s, up));
    }
}

#include "decode_block.h"
