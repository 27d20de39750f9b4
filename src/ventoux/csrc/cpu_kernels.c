// ventoux's CPU kernels, for x86 CPUs with AVX-512 VNNI (loaded by cpu_kernels.py, which builds this file with
// -O3 -march=native -fopenmp). int8 / int6 / int4 products are computed the way llama.cpp computes its Q8_0 / Q4
// products: the activations are quantized to int8 per block of 32 inputs (one float scale each), multiplied
// with the int8 / int4 weights by integer dot products (vpdpbusd), one float multiply-add per block. 16-bit
// products convert each weight to float32 exactly (a shift for bf16, vcvtph2ps for fp16) and multiply in
// float32; bf16 weights times bf16 activations at decode use vdpbf16ps where the CPU has it (dot_bf16_rows).
//
//   vx_int8_gemv: x (M, K) float32, w (N/16, K/4, 16, 4) int8, scales (N/16, K/g, 16) bf16, g (g = K: one scale
//                 a row, (N padded,))                                                   -> y (M, N) float32
//   vx_int4_gemv: x (M, K) float32, w (N/16, K/8, 16, 4) uint8, scales, zeros (N/16, K/g, 16) bf16, g
//                                                    -> y (M, N) float32 (bf16_io: x and y bfloat16)
//   vx_int6_gemv: as vx_int4_gemv, w (N/16, K/32, 384) uint8: int4's nibbles and the codes' top 2 bits
//   vx_half_gemv: x (M, K) float32, w (N, K) bf16 or fp16     -> y (M, N) float32 (bf16_io: x and y bfloat16)
//   vx_half_gemm: x (M, K) and w (N, K), both bf16 or both fp16                         -> y (M, N) the same
//
// Decoding (a few rows) is bound by the memory bandwidth: the gemv kernels share weight rows among OpenMP threads (the
// same runtime as PyTorch's), read ROWS at a time (int8, int4: one or two tiles of 16 interleaved rows), prefetching
// ahead, and reuse each row from L1 for the M activation rows (16-bit: two rows a converted weight line; at K = 256 and
// 8 rows the float32 multiply-adds bound them, not the conversions). PyTorch's own bf16 / fp16 products at batch 1
// reach about 60% of the bandwidth here. Prefill (more than GEMV_MAX_ROWS rows) is bound by arithmetic: vx_int8_gemv
// and vx_int4_gemv pass it to quant_gemm, and vx_half_gemm is its 16-bit counterpart, both register-tiled (at the end
// of the file).
//
// 16-bit weights are ventoux's device-independent layout (qlinear.py); int8 and int4 weights are its tiled
// form (before vx_int8_gemv and vx_int4_gemv), whose bytes are the device-independent ones: int4 byte j of a row
// holds inputs 2j (low nibble) and 2j+1 (high). Requires K % 128 == 0 (the 16-bit products: K % 32 == 0).
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
#define AHEAD 4096  // bytes: how far ahead of its tile reads a decode kernel prefetches, every line
#endif
#ifndef FAR_AHEAD
#define FAR_AHEAD 8192  // bytes: how far ahead into L2 some one- and two-row decode kernels prefetch (int4, bf16)
#endif
// Why into L2, that far: a product that does arithmetic on each line holds fewer loads in flight than a plain read
// (its instructions fill the reorder window while they wait on memory), and the hardware prefetcher alone does not
// make up for it. AMD Zen 4, from DRAM, a float32 bf16 row product (benchmarks/read_patterns.c), GB/s, one thread /
// two: one row 17.3 / 28.0, 8 KB ahead into L2 27.4 / 31.6, a plain read 27.5 / 32.9 (1-2 KB into L1: no faster).

// Up to 16 bfloat16 values -> float32 lanes (a bfloat16 is the high half of a float32); masked lanes are 0.
static inline __m512 bf16x16(const uint16_t* p, __mmask16 mask) {
  const __m256i h = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline float bf16(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// One block of 32 activations -> int8 q = round(x / d) with d = max|x| / 127 (in *d_out), the 32 codes in order
// in one register. A block holding an inf or a NaN gets d = NaN (and codes 0), so that every product it enters is
// NaN, not finite, as the float product's is: the maximum would drop a NaN, and an inf would give a code of the
// wrong sign (x - x is 0 for every finite x, NaN for the others). A block whose max|x| is under 127 / FLT_MAX
// (3.7e-37), or 0, gets codes 0: 1 / d would be inf, and every code -128 (the wrong sign for positive x).
static inline __m256i quantize_codes(const float* x, float* d_out) {
  const __m512 a = _mm512_loadu_ps(x), b = _mm512_loadu_ps(x + 16), zero = _mm512_setzero_ps();
  const int finite = !(_mm512_cmp_ps_mask(_mm512_sub_ps(a, a), zero, _CMP_NEQ_UQ) |
                       _mm512_cmp_ps_mask(_mm512_sub_ps(b, b), zero, _CMP_NEQ_UQ));
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
  const float d = finite ? amax / 127.f : NAN, inv_d = 1.f / d;  // inf where d is 0 or tiny, NaN where d is
  const __m512 inv = _mm512_set1_ps(inv_d < INFINITY ? inv_d : 0.f);
  const __m128i qa = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(a, inv)));
  const __m128i qb = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(b, inv)));
  *d_out = d;
  return _mm256_inserti128_si256(_mm256_castsi128_si256(qa), qb, 1);
}

// One block of 32 activations -> its int8 codes in q; returns their scale d.
// The sum of 32 int8 codes: byte pairs, then int16 pairs, then the 8 lanes, exact.
static inline int code_sum(__m256i q) {
  const __m256i quads = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), q), _mm256_set1_epi16(1));
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(quads), _mm256_extracti128_si256(quads, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
  return _mm_cvtsi128_si32(s4);
}

static inline float quantize_block(const float* x, int8_t* q) {
  float d;
  _mm256_storeu_si256((__m256i*)q, quantize_codes(x, &d));
  return d;
}

static void quant_gemm(const void* x, int64_t M, int64_t K, const uint8_t* w, int bits, const uint16_t* scales,
                       const uint16_t* zeros, int64_t group, int64_t N, void* y, int nthreads, int bf16_io);

// int8 weights in the vnni kernel's tiles, as int4's (the comment before vx_int4_gemv): rows in tiles of 16 (N
// padded with zero rows), byte (t, c, r, i) = weight (16t + r, 4c + i), so that one 64-byte load holds 4 inputs of
// 16 rows; scales (N/16, G, 16), one per group of K/G inputs of each row (G = 1: one a row, int8; G = K/32: Q8_0's
// int8-g32). vpdpbusd wants one unsigned side: the codes become q + 128 (one xor, shared by the M rows) and each
// block's sum starts at -128 times the block's sum of the quantized x: exact integers. Each block's sum meets its
// activation scale in one multiply-add, into a group's sums, which meet the group's 16 weight scales in another
// (one a row: at the end).
static inline __attribute__((always_inline)) void int8_tile(const int8_t* wt, const uint16_t* st, int64_t K,
                                                           int64_t group, const int8_t* xq, const float* dx,
                                                           const int32_t* xs, const int NT, const int MR,
                                                           float* out) {
  // NT tiles (TILE * K bytes apart) times MR activation rows, as int4_tile: out (NT, MR, 16)
  const __m512i flip = _mm512_set1_epi8((char)0x80);
  const int64_t B = K / BLOCK, G = K / group, per_group = group / BLOCK;
  __m512 acc[2][GEMV_MAX_ROWS], ga[2][GEMV_MAX_ROWS];
  for (int v = 0; v < NT; ++v)
    for (int m = 0; m < MR; ++m) acc[v][m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    for (int v = 0; v < NT; ++v)
      for (int m = 0; m < MR; ++m) ga[v][m] = _mm512_setzero_ps();
    for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {  // one block: 32 inputs, 512 bytes a tile
      __m512i u[2][8];
      for (int v = 0; v < NT; ++v) {
        // Prefetches AHEAD only for more than two activation rows: for one or two, a tile's 512-byte blocks follow
        // each other fast enough for the hardware prefetcher alone, and the prefetches slowed it (AMD Zen 4, from
        // DRAM, two threads: M = 1 29.5 -> 31.0 GB/s without them, M = 2 37.9 -> 43.5; one thread, M = 1 21.0 ->
        // 25.2), while at M = 8, where the sums take longer, they keep the weights coming (21.5 against 13.8)
        const int8_t* p = wt + v * TILE * K + b * 512;
        if (MR > 2)
          for (int j = 0; j < 8; ++j) _mm_prefetch((const char*)(p + AHEAD + 64 * j), _MM_HINT_T0);
        for (int j = 0; j < 8; ++j) u[v][j] = _mm512_xor_si512(_mm512_loadu_si512(p + 64 * j), flip);
      }
      for (int m = 0; m < MR; ++m) {
        const int32_t* q = (const int32_t*)(xq + m * K + b * BLOCK);
        __m512i d0[2], d1[2];
        for (int v = 0; v < NT; ++v) {
          d0[v] = _mm512_set1_epi32(xs[m * B + b]);
          d1[v] = _mm512_setzero_si512();
        }
        for (int j = 0; j < 8; j += 2) {
          const __m512i even = _mm512_set1_epi32(q[j]), odd = _mm512_set1_epi32(q[j + 1]);
          for (int v = 0; v < NT; ++v) {
            d0[v] = _mm512_dpbusd_epi32(d0[v], u[v][j], even);
            d1[v] = _mm512_dpbusd_epi32(d1[v], u[v][j + 1], odd);
          }
        }
        const __m512 d = _mm512_set1_ps(dx[m * B + b]);
        for (int v = 0; v < NT; ++v)
          ga[v][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(d0[v], d1[v])), d, ga[v][m]);
      }
    }
    for (int v = 0; v < NT; ++v) {
      const __m512 s = bf16x16(st + v * G * TILE + g * TILE, 0xFFFF);
      for (int m = 0; m < MR; ++m) acc[v][m] = _mm512_fmadd_ps(s, ga[v][m], acc[v][m]);
    }
  }
  for (int v = 0; v < NT; ++v)
    for (int m = 0; m < MR; ++m) _mm512_storeu_ps(out + (v * MR + m) * TILE, acc[v][m]);
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

// A pass's results, out (tiles, M, 16) for the tiles from t on, into y (M, N): the rows that exist.
static inline void store_tiles(void* yv, const float* out, int64_t t, int tiles, int64_t M, int64_t N, int bf16_io) {
  for (int u = 0; u < tiles; ++u) {
    const int rows = N - (t + u) * TILE < TILE ? (int)(N - (t + u) * TILE) : TILE;
    for (int64_t m = 0; m < M; ++m) store_y(yv, m * N + (t + u) * TILE, out + (u * M + m) * TILE, rows, bf16_io);
  }
}

// bf16_io: x and y are bfloat16, as vx_int4_gemv's (read its comment).
void vx_int8_gemv(const void* xv, int64_t M, int64_t K, const int8_t* w, const uint16_t* scales, int64_t group,
                  int64_t N, void* yv, int nthreads, int bf16_io) {
  if (M > GEMV_MAX_ROWS) {  // prefill: a tiled product (at the end of this file)
    quant_gemm(xv, M, K, (const uint8_t*)w, 8, scales, NULL, group, N, yv, nthreads, bf16_io);
    return;
  }
  const int64_t B = K / BLOCK, G = K / group, T = (N + TILE - 1) / TILE;
  int8_t* xq = malloc(M * K);  // the quantized activations, their block scales and -128 x their block sums
  float* dx = malloc(M * B * sizeof(float));
  int32_t* xs = malloc(M * B * sizeof(int32_t));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < B; ++b) {
      int8_t* q = xq + m * K + b * BLOCK;
      float block[BLOCK];
      dx[m * B + b] = quantize_block(x_block(xv, m * K + b * BLOCK, bf16_io, block), q);
      int sum = 0;
      for (int i = 0; i < BLOCK; ++i) sum += q[i];
      xs[m * B + b] = -128 * sum;
    }
  const int NT = M <= 2 ? 2 : 1;  // two tiles a pass, as vx_int4_gemv; at 2 rows, since a tile holds 8 vectors
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t pass = 0; pass < (T + NT - 1) / NT; ++pass) {
    float out[2 * GEMV_MAX_ROWS * TILE];
    const int64_t t = pass * NT;
    const int tiles = T - t < NT ? 1 : NT;
    const int8_t* wt = w + t * TILE * K;
    const uint16_t* st = scales + t * G * TILE;
    if (tiles == 2 && M == 1) int8_tile(wt, st, K, group, xq, dx, xs, 2, 1, out);  // constants: the sums stay
    else if (tiles == 2 && M == 2) int8_tile(wt, st, K, group, xq, dx, xs, 2, 2, out);  // in registers
    else if (tiles == 2) int8_tile(wt, st, K, group, xq, dx, xs, 2, (int)M, out);  // no rows
    else switch (M) {
      case 1: int8_tile(wt, st, K, group, xq, dx, xs, 1, 1, out); break;
      case 2: int8_tile(wt, st, K, group, xq, dx, xs, 1, 2, out); break;
      case 3: int8_tile(wt, st, K, group, xq, dx, xs, 1, 3, out); break;
      case 4: int8_tile(wt, st, K, group, xq, dx, xs, 1, 4, out); break;
      default: int8_tile(wt, st, K, group, xq, dx, xs, 1, (int)M, out); break;
    }
    store_tiles(yv, out, t, tiles, M, N, bf16_io);
  }
  free(xq);
  free(dx);
  free(xs);
}

// The int4 weights arrive in the vnni kernel's own layout (cpu_kernels.tile_int4, done once at load time: a byte
// permutation of the device-independent one). Rows come in tiles of TILE = 16 (N padded with zero rows), and a
// tile holds, for each 8 inputs c, 4 bytes of each of its 16 rows side by side: byte (t, c, r, i) is canonical
// byte 4c + i of row 16t + r (input 8c + 2i in the low nibble, 8c + 2i + 1 in the high). Scales and zeros are
// (N/16, G, 16). One 64-byte load then holds 8 inputs of 16 rows, an int32 lane a row: vpdpbusd with 4 even
// (low nibbles) or odd (high nibbles) activations broadcast sums 16 rows at once, the scales apply per block
// as one vector, there is no horizontal sum, and each thread reads one sequential stream. llama.cpp's CPU_REPACK
// interleaves Q4_0 rows the same way (8 rows there).

// int6 (vx_int6_gemv) extends the int4 tiles: w = (q - 32) s + z with q in 0..63, whose low 4 bits are int4's
// nibbles in int4's order and whose top 2 bits follow each block's 256 nibble bytes, 128 more bytes: line a (0, 1)
// of them holds, at byte 4r + i, the top bits of the inputs that bytes 4r + i of nibble lines 2a and 2a + 1 hold
// (bits 0-1: line 2a's even input, 2-3: its odd one, 4-5 and 6-7: line 2a + 1's). A tile's block is then one run
// of 384 bytes, read in one stream; llama.cpp's Q6_K splits its codes the same way (4 + 2 bits).

// low | (high & 0x30): a nibble and its two top bits, which `high` holds at bits 4-5 (one vpternlogd).
static inline __m512i with_top_bits(__m512i low, __m512i high) {
  return _mm512_ternarylogic_epi32(low, high, _mm512_set1_epi8(0x30), 0xF8);
}

// NT tiles of 16 rows (NT * 16 rows, tiles TILE * K * BITS / 8 bytes apart) times MR activation rows (BITS 4 or 6,
// NT and MR constants in each use): out (NT, MR, 16). Two tiles at a time share each activation broadcast and the
// loop's overhead: with the weights in the caches, 10-15% faster at 1 to 4 rows than one (benchmarks/kernel_ab.py).
static inline __attribute__((always_inline)) void int4_tile(const uint8_t* wt, const uint16_t* st,
                                                           const uint16_t* zt, int64_t K, int64_t group,
                                                           const int32_t* xq, const float* dx, const float* xs,
                                                           const int BITS, const int NT, const int MR, float* out) {
  const __m512i low4 = _mm512_set1_epi8(0x0F), high4 = _mm512_set1_epi8((char)0xF0), zero = _mm512_setzero_si512();
  const int64_t B = K / BLOCK, G = K / group, per_group = group / BLOCK;
  const int64_t block_bytes = BLOCK * TILE * BITS / 8;  // a tile's bytes for one block: 256 (int4) or 384 (int6)
  __m512 acc[2][GEMV_MAX_ROWS];
  for (int u = 0; u < NT; ++u)
    for (int m = 0; m < MR; ++m) acc[u][m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512 s[2];
    for (int u = 0; u < NT; ++u) s[u] = bf16x16(st + u * G * TILE + g * TILE, 0xFFFF);
    for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {  // one block: 32 inputs
      __m512i lo[2][4], hi[2][4];  // int4: the high nibbles stay in place (16 x code), exact after the sums
      for (int u = 0; u < NT; ++u) {
        const uint8_t* p = wt + u * B * block_bytes + b * block_bytes;
        // AHEAD into L1 for more than two activation rows, FAR_AHEAD into L2 for one or two (AMD Zen 4, from
        // DRAM, two threads: M = 1 +7-17%, M = 2 +1-22% over AHEAD into L1; no prefetch was no faster than that)
        if (MR > 2)
          for (int j = 0; j < block_bytes / 64; ++j) _mm_prefetch((const char*)(p + AHEAD + 64 * j), _MM_HINT_T0);
        else
          for (int j = 0; j < block_bytes / 64; ++j) _mm_prefetch((const char*)(p + FAR_AHEAD + 64 * j), _MM_HINT_T1);
        if (BITS == 4)
          for (int j = 0; j < 4; ++j) {
            const __m512i v = _mm512_loadu_si512(p + 64 * j);
            lo[u][j] = _mm512_and_si512(v, low4);
            hi[u][j] = _mm512_and_si512(v, high4);
          }
        else
          for (int a = 0; a < 2; ++a) {  // each line's top bits moved to bits 4-5 of its codes (see with_top_bits)
            const __m512i top = _mm512_loadu_si512(p + 256 + 64 * a);
            for (int e = 0; e < 2; ++e) {
              const __m512i v = _mm512_loadu_si512(p + 64 * (2 * a + e));
              const __m512i low = _mm512_and_si512(v, low4), high = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
              lo[u][2 * a + e] = with_top_bits(low, e ? top : _mm512_slli_epi16(top, 4));
              hi[u][2 * a + e] = with_top_bits(high, e ? _mm512_srli_epi16(top, 2) : _mm512_slli_epi16(top, 2));
            }
          }
      }
      for (int m = 0; m < MR; ++m) {
        const int32_t* q = xq + (m * (K / 8) + b * 4) * 2;  // per 8 inputs: the even, then the odd 4
        __m512i dl[2], dh[2];
        for (int u = 0; u < NT; ++u) dl[u] = dh[u] = zero;
        for (int j = 0; j < 4; ++j) {
          const __m512i even = _mm512_set1_epi32(q[2 * j]), odd = _mm512_set1_epi32(q[2 * j + 1]);
          for (int u = 0; u < NT; ++u) {
            dl[u] = _mm512_dpbusd_epi32(dl[u], lo[u][j], even);
            dh[u] = _mm512_dpbusd_epi32(dh[u], hi[u][j], odd);
          }
        }
        const __m512 d = _mm512_set1_ps(dx[m * B + b]);
        for (int u = 0; u < NT; ++u) {
          const __m512i dot = _mm512_add_epi32(dl[u], BITS == 4 ? _mm512_srai_epi32(dh[u], 4) : dh[u]);
          acc[u][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(s[u], d), acc[u][m]);
        }
      }
    }
    // w = (q - middle) s + z = q s + off (middle: 8, or 32 for int6): plus off times the group's sum of the x
    const __m512 middle = _mm512_set1_ps(BITS == 4 ? 8.f : 32.f);
    for (int u = 0; u < NT; ++u) {
      const __m512 off = _mm512_fnmadd_ps(middle, s[u], bf16x16(zt + u * G * TILE + g * TILE, 0xFFFF));
      for (int m = 0; m < MR; ++m) acc[u][m] = _mm512_fmadd_ps(off, _mm512_set1_ps(xs[m * G + g]), acc[u][m]);
    }
  }
  for (int u = 0; u < NT; ++u)
    for (int m = 0; m < MR; ++m) _mm512_storeu_ps(out + (u * MR + m) * TILE, acc[u][m]);
}

// One block of 32 activations quantized as quantize_block does, in vx_int4_gemv's order: per 8 inputs the even 4,
// then the odd 4 (one byte shuffle), with the sum of the 32 codes: a few vector instructions, no scalar loop (at
// K = 4096 the scalar form cost 6.5 us a call, a fifth of a 512-row product hot in L2).
static inline float int4_quantize_block(const float* x, int32_t* eo, int* sum) {
  float d;
  const __m256i q = quantize_codes(x, &d);
  const __m256i order = _mm256_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15,
                                         0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);
  _mm256_storeu_si256((__m256i*)eo, _mm256_shuffle_epi8(q, order));
  *sum = code_sum(q);  // of the (saturated) codes
  return d;
}

// Up to 16 float32 lanes -> bfloat16, rounded to nearest even as PyTorch rounds (a NaN stays a quiet NaN).
static inline __m256i bf16_round16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v), top = _mm512_srli_epi32(u, 16);
  const __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(top, _mm512_set1_epi32(1)));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_or_si512(top, _mm512_set1_epi32(0x40)));
  return _mm512_cvtepi32_epi16(r);
}

static void bf16_from_floats(uint16_t* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);
    _mm256_mask_storeu_epi16(dst + i, mask, bf16_round16(_mm512_maskz_loadu_ps(mask, src + i)));
  }
}

static void floats_from_bf16(float* dst, const uint16_t* src, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(dst + i, mask, bf16x16(src + i, mask));
  }
}

// The tiles of a pass (one or two) times M activation rows, BITS and the tiles constants in each call.
#define INT4_TILES(BITS, NT)                                                             \
  switch (M) { /* M as a constant too: the sums stay in registers */                     \
    case 1: int4_tile(wt, st, zt, K, group, xq, dx, xs, BITS, NT, 1, out); break;        \
    case 2: int4_tile(wt, st, zt, K, group, xq, dx, xs, BITS, NT, 2, out); break;        \
    case 3: int4_tile(wt, st, zt, K, group, xq, dx, xs, BITS, NT, 3, out); break;        \
    case 4: int4_tile(wt, st, zt, K, group, xq, dx, xs, BITS, NT, 4, out); break;        \
    default: int4_tile(wt, st, zt, K, group, xq, dx, xs, BITS, NT, (int)M, out); break; \
  }

// vx_int4_gemv and vx_int6_gemv (bits 4 or 6). bf16_io: x and y are bfloat16 (a bf16 model's activations), read
// and written as such, y rounded once as PyTorch's .to(torch.bfloat16) rounds: no conversion calls around the
// kernel (about 4 us a call in PyTorch).
static void nibble_gemv(const void* xv, int64_t M, int64_t K, const uint8_t* w, int bits, const uint16_t* scales,
                        const uint16_t* zeros, int64_t group, int64_t N, void* yv, int nthreads, int bf16_io) {
  if (M > GEMV_MAX_ROWS) {  // prefill: a tiled product (at the end of this file)
    quant_gemm(xv, M, K, w, bits, scales, zeros, group, N, yv, nthreads, bf16_io);
    return;
  }
  const int64_t B = K / BLOCK, G = K / group, T = (N + TILE - 1) / TILE;
  // per 8 inputs, the quantized activations as two int32: the even 4, then the odd 4 (they meet the low and
  // high nibbles); per block its scale; per group the sum of the quantized x (the zeros' term), from the same
  // quantized x as the dot products see: the q s and zero terms nearly cancel, so must their errors
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
  // two tiles a pass at up to 4 rows, one at more: their sums would outgrow the registers
  const int NT = M <= 4 ? 2 : 1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t pass = 0; pass < (T + NT - 1) / NT; ++pass) {
    float out[2 * GEMV_MAX_ROWS * TILE];
    const int64_t t = pass * NT;
    const int tiles = T - t < NT ? 1 : NT;
    const uint8_t* wt = w + t * TILE * K * bits / 8;
    const uint16_t *st = scales + t * G * TILE, *zt = zeros + t * G * TILE;
    if (bits == 4 && tiles == 2) INT4_TILES(4, 2)
    else if (bits == 4) INT4_TILES(4, 1)
    else if (tiles == 2) INT4_TILES(6, 2)
    else INT4_TILES(6, 1)
    store_tiles(yv, out, t, tiles, M, N, bf16_io);
  }
  free(xq);
  free(dx);
  free(xs);
}

void vx_int4_gemv(const void* xv, int64_t M, int64_t K, const uint8_t* w, const uint16_t* scales,
                  const uint16_t* zeros, int64_t group, int64_t N, void* yv, int nthreads, int bf16_io) {
  nibble_gemv(xv, M, K, w, 4, scales, zeros, group, N, yv, nthreads, bf16_io);
}

// w: the int6 tiles (the comment before with_top_bits), (N/16, K/32, 384) bytes.
void vx_int6_gemv(const void* xv, int64_t M, int64_t K, const uint8_t* w, const uint16_t* scales,
                  const uint16_t* zeros, int64_t group, int64_t N, void* yv, int nthreads, int bf16_io) {
  nibble_gemv(xv, M, K, w, 6, scales, zeros, group, N, yv, nthreads, bf16_io);
}

// 16 bfloat16 or float16 values -> float32 lanes.
static inline __m512 half16(const uint16_t* p, int bf16) {
  const __m256i h = _mm256_loadu_si256((const __m256i*)p);
  return bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)) : _mm512_cvtph_ps(h);
}

// R weight rows times MB (1 or 2) activation rows, constants where the sums fit in registers: out (MB, ROWS).
// Each weight line is loaded and converted once, then multiplied into the sums of both rows. A row's sums see
// the same operations in the same order whatever MB and R are (two sums a weight row, added and reduced alike at
// the end), so a row's result is bit-identical alone or in any batch: the engine's batching relies on it.
// x: the activations as vx_half_gemv lays them out, ld floats from one 32-input line to the next. bf16: a 64-byte
// load holds 16 pairs, a pair's even input in the low half: << 16 and & 0xFFFF0000 make both exact float32 (a
// bfloat16 is the high half of one), two simple instructions for 32 weights, no widening shuffle. fp16: vcvtph2ps.
// Prefetches: the first 2 KB of the next ROWS rows into L2 (their streams start before the hardware prefetcher
// finds them). Every line of the next rows into L2, as before, read DRAM no faster and cost 8% with the weights
// hot in L2; without the next rows' heads DRAM reads were 4% slower (1 thread, thread CPU time, 4096 x 14336
// weights rotated, 4096 x 128 hot; the AVX2 build alike). Within a row the hardware prefetcher needs no help: each
// row 1 KB ahead into L1, as before, read DRAM slower on AMD Zen 4 (in-process A/B, one thread, without it: bf16
// 18.8 -> 21.3 GB/s, fp16 16.7 -> 19.3; the AVX2 build 16.6 -> 19.1 and 17.3 -> 19.8).
static inline __attribute__((always_inline)) void half_rows(const uint16_t* wr, int64_t K, const float* x,
                                                           int64_t ld, const int bf16, const int MB, const int R,
                                                           float* out) {
  const __m512i high = _mm512_set1_epi32((int)0xFFFF0000u);
  __m512 acc[2][ROWS][2];  // two sums a weight row: the multiply-adds do not wait on each other
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) acc[m][r][0] = acc[m][r][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {  // one 64-byte line of each row
    const float* xk = x + k / 32 * ld;
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const uint16_t* p = wr + r * K + k;
      if (k < 1024) _mm_prefetch((const char*)(p + ROWS * K), _MM_HINT_T1);  // the next rows' heads, L2
      __m512 w0, w1;
      if (bf16) {
        const __m512i v = _mm512_loadu_si512(p);
        w0 = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
        w1 = _mm512_castsi512_ps(_mm512_and_si512(v, high));
      } else {
        w0 = half16(p, 0);
        w1 = half16(p + 16, 0);
      }
      for (int m = 0; m < MB; ++m) {
        acc[m][r][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xk + 32 * m), acc[m][r][0]);
        acc[m][r][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xk + 32 * m + 16), acc[m][r][1]);
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) out[m * ROWS + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][r][0], acc[m][r][1]));
}

// A pair of activation rows (or the last one) times R weight rows: R == ROWS (16 sums in the 32 registers) as a
// constant, a shorter tail (N % ROWS) as a variable. More rows a call (4 x 2, 8 x 1) read more activations a
// weight line, from L2 once they outgrow L1: slower at K = 4096 (A/B in the commit message).
#define HALF_ROWS(BF16, MB) \
  (R == ROWS ? half_rows(wr, K, x, ld, BF16, MB, ROWS, out) : half_rows(wr, K, x, ld, BF16, MB, R, out))

static inline __attribute__((always_inline)) void half_block(const uint16_t* wr, int64_t K, const float* x,
                                                            int64_t ld, int bf16, int MB, int R, float* out) {
  if (bf16) MB == 2 ? HALF_ROWS(1, 2) : HALF_ROWS(1, 1);
  else MB == 2 ? HALF_ROWS(0, 2) : HALF_ROWS(0, 1);
}

#if defined(__AVX512BF16__)
// bf16 weights times bf16 activations (bf16_io), on CPUs with AVX512_BF16: vdpbf16ps multiplies a 64-byte line's
// 16 pairs by the activations' pairs as they are (a product of two bf16 is exact in float32) into one sum a lane:
// one instruction a line where the float32 form takes a shift, an and and two multiply-adds, and a product from
// DRAM reads about 20% faster on one core (AMD Zen 5; figures in the commit). Its sums run in another order than
// the float32 form's (and flush subnormals), no less precise. A row's sums take the same operations in the same
// order whatever MB and R are: bit-identical alone or in a batch, as half_rows.
// One or two activation rows (decode) take one weight row at a time (R = 1), so that each thread reads its share
// of the weights as one sequential stream, which the hardware prefetcher follows best: from DRAM on AMD Zen 4, one
// thread 20.8 -> 28.3 GB/s, two threads 31.7 -> 34.1 (4 rows side by side before). More activation rows reuse
// each weight line more and read their own lines from L2: there ROWS weight rows at a time, whose lines are
// reused by each pair (at M = 8, one row at a time was 13.5 GB/s against 20.4). One row times two activation rows
// prefetches FAR_AHEAD into L2 (from DRAM on Zen 4, two threads: +15-30%); one activation row does not (one
// instruction a line keeps enough loads in flight: from DRAM no faster with it, hot 9% slower).
static inline __attribute__((always_inline)) void dot_bf16_rows(const uint16_t* wr, int64_t K, const uint16_t* x,
                                                               const int MB, const int R, float* out) {
  __m512 acc[2][ROWS][2];  // two sums a weight row, for alternate lines: the adds do not wait on each other
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) acc[m][r][0] = acc[m][r][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 64)
    for (int h = 0; h < 2 && k + 32 * h < K; ++h)  // a constant h: the sums stay in registers
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        if (R == 1 && MB == 2) _mm_prefetch((const char*)(wr + k + 32 * h) + FAR_AHEAD, _MM_HINT_T1);
        const __m512bh v = (__m512bh)_mm512_loadu_si512(wr + r * K + k + 32 * h);
        for (int m = 0; m < MB; ++m)
          acc[m][r][h] = _mm512_dpbf16_ps(acc[m][r][h], v, (__m512bh)_mm512_loadu_si512(x + m * K + k + 32 * h));
      }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) out[m * ROWS + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][r][0], acc[m][r][1]));
}

#define DOT_BF16_ROWS(MB)                                          \
  (R == ROWS ? dot_bf16_rows(wr, K, xm, MB, ROWS, out)               \
   : R == 1  ? dot_bf16_rows(wr, K, xm, MB, 1, out)                  \
             : dot_bf16_rows(wr, K, xm, MB, R, out))

static void dot_bf16_gemv(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, uint16_t* y,
                          int nthreads) {
  const int together = M <= 2 ? 1 : ROWS;  // weight rows read side by side
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t n0 = 0; n0 < N; n0 += 16) {
    const int64_t n1 = n0 + 16 < N ? n0 + 16 : N;
    float yb[GEMV_MAX_ROWS * 16];
    for (int64_t n = n0; n < n1; n += together) {
      const int R = n1 - n < together ? (int)(n1 - n) : together;
      const uint16_t* wr = w + n * K;
      for (int64_t m0 = 0; m0 < M; m0 += 2) {  // activation rows two at a time (or the last one)
        float out[2 * ROWS];
        const uint16_t* xm = x + m0 * K;
        if (M - m0 >= 2) DOT_BF16_ROWS(2);
        else DOT_BF16_ROWS(1);
        for (int m = 0; m < 2 && m0 + m < M; ++m)
          for (int r = 0; r < R; ++r) yb[(m0 + m) * 16 + n - n0 + r] = out[m * ROWS + r];
      }
    }
    for (int64_t m = 0; m < M; ++m) bf16_from_floats(y + m * N + n0, yb + m * 16, n1 - n0);
  }
}
#endif

// bf16_io: x and y are bfloat16 (float32 copies made and rounded here, as in vx_int4_gemv).
void vx_half_gemv(const void* xv, int64_t M, int64_t K, const uint16_t* w, int bf16, int64_t N, void* yv,
                  int nthreads, int bf16_io) {
#if defined(__AVX512BF16__)
  if (bf16 && bf16_io && M <= GEMV_MAX_ROWS) {  // decode; more rows (not HalfLinear's) as below
    dot_bf16_gemv(xv, M, K, w, N, yv, nthreads);
    return;
  }
#endif
  float* x = bf16_io ? malloc(M * K * sizeof(float)) : (float*)xv;
  float* y = bf16_io ? malloc(M * N * sizeof(float)) : (float*)yv;
  if (bf16_io) floats_from_bf16(x, xv, M * K);
  // the activations line by line, (K/32, M, 32): the rows read together lie together (rows K floats apart would
  // share L1 sets); bf16: each 32 inputs split by parity, 16 even then 16 odd
  float* xp = malloc(M * K * sizeof(float));
  for (int64_t k = 0; k < K; k += 32)
    for (int64_t m = 0; m < M; ++m) {
      float* to = xp + (k / 32 * M + m) * 32;
      const float* from = x + m * K + k;
      for (int i = 0; i < 16; ++i) {
        to[i] = from[bf16 ? 2 * i : i];
        to[16 + i] = from[bf16 ? 2 * i + 1 : 16 + i];
      }
    }
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t n0 = 0; n0 < N; n0 += 16) {
    const int64_t n1 = n0 + 16 < N ? n0 + 16 : N;
    for (int64_t n = n0; n < n1; n += ROWS) {
      const int R = n1 - n < ROWS ? (int)(n1 - n) : ROWS;
      // activation rows two at a time; but two rows alone of K > 2048 (their 32 KB of x fill L1) are faster
      // one after the other (A/B at K = 4096: 0.9x paired, 1.15x at K = 1024 and 2048; 4 rows: 1.1x paired)
      const int pairs = M > 2 || K <= 2048;
      for (int64_t m0 = 0; m0 < M; m0 += pairs ? 2 : 1) {
        const int MB = pairs && M - m0 >= 2 ? 2 : 1;
        float out[2 * ROWS];
        half_block(w + n * K, K, xp + m0 * 32, M * 32, bf16, MB, R, out);
        for (int m = 0; m < MB; ++m)
          for (int r = 0; r < R; ++r) y[(m0 + m) * N + n + r] = out[m * ROWS + r];
      }
    }
    if (bf16_io)
      for (int64_t m = 0; m < M; ++m) bf16_from_floats((uint16_t*)yv + m * N + n0, y + m * N + n0, n1 - n0);
  }
  free(xp);
  if (bf16_io) {
    free(x);
    free(y);
  }
}

// vx_half_gemm: x (M, K) and w (N, K), both bf16 or both fp16 -> y (M, N) in the same type, for prefill (M in
// the tens and more), where the product is bound by arithmetic. Float32 multiply-adds of the exactly converted
// values: two 16-lane FMAs a cycle, twice the rate of vdpbf16ps on the CPUs this was tuned on (and all AVX-512
// CPUs have them). Rows are taken GEMM_MC at a time, transposed into xp (MC/16, K, 16) float32 so that one
// vector holds 16 rows of one input; a weight broadcast to all lanes then gives 16 rows of one output at
// once, with no horizontal sums. A tile of GEMM_MB x 16 rows by GEMM_NR outputs keeps its sums in registers
// over GEMM_KC inputs, its weights converted to float32 once (ws, in L1) for every row block; the sums live
// in yt (N, MC) between input blocks (GEMM_NB outputs a thread at a time, over all of K) and are rounded to 16
// bits at the end, as F.linear rounds.
#define GEMM_MC 256
#define GEMM_KC 256
#define GEMM_NR 12
#define GEMM_MB 2
#define GEMM_NB 240  // outputs a thread takes at a time (a multiple of GEMM_NR)

static inline __attribute__((always_inline)) void half_tile(const float* xp, int64_t K, int64_t k0, int64_t k1,
                                                            const float* ws, int mb, int nr, float* yt, int64_t Mp) {
  __m512 acc[GEMM_NR][GEMM_MB];
  for (int n = 0; n < nr; ++n)
    for (int b = 0; b < mb; ++b) acc[n][b] = k0 ? _mm512_loadu_ps(yt + n * Mp + b * 16) : _mm512_setzero_ps();
  for (int64_t k = k0; k < k1; ++k) {
    __m512 xv[GEMM_MB];
    for (int b = 0; b < mb; ++b) xv[b] = _mm512_loadu_ps(xp + b * 16 * K + k * 16);
    for (int n = 0; n < nr; ++n) {
      const __m512 wv = _mm512_set1_ps(ws[n * GEMM_KC + (k - k0)]);
      for (int b = 0; b < mb; ++b) acc[n][b] = _mm512_fmadd_ps(xv[b], wv, acc[n][b]);
    }
  }
  for (int n = 0; n < nr; ++n)
    for (int b = 0; b < mb; ++b) _mm512_storeu_ps(yt + n * Mp + b * 16, acc[n][b]);
}

// The weights of the tile after this one (rows n.., inputs k0..) into L2 while this one computes: its rows lie
// GEMM_NR * K apart from these, out of the hardware prefetcher's reach (as in cpu_kernels_avx2.c).
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
  const int64_t MC = M < GEMM_MC ? (M + 15) / 16 * 16 : GEMM_MC;
  float* xp = malloc(MC * K * sizeof(float));
  float* yt = malloc(N * MC * sizeof(float));
  for (int64_t m0 = 0; m0 < M; m0 += MC) {
    const int64_t rows = M - m0 < MC ? M - m0 : MC, Mp = (rows + 15) / 16 * 16, blocks = Mp / 16;
#pragma omp parallel num_threads(nthreads)
    {
      float* ws = malloc(GEMM_NR * GEMM_KC * sizeof(float));
#pragma omp for schedule(static)
      for (int64_t m = 0; m < Mp; ++m) {  // rows past M are zero
        float* dst = xp + (m / 16) * 16 * K + m % 16;
        const uint16_t* src = x + (m0 + m) * K;
        for (int64_t k = 0; k < K; ++k) dst[k * 16] = m < rows ? half_to_float(src[k], is_bf16) : 0.f;
      }
      // About GEMM_NB outputs at a time, all K for them: their float sums (yt) stay in L2 between input blocks
      // (all N of them, 7 MB at N = 14336, were read from L3 every block), as many blocks for each thread
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
              for (int64_t k = k0; k < k1; k += 16) _mm512_storeu_ps(ws + r * GEMM_KC + k - k0, half16(w + (n + r) * K + k, is_bf16));
            float* yn = yt + n * Mp;
            if (nr == GEMM_NR) {
              int64_t b = 0;
              for (; b + GEMM_MB <= blocks; b += GEMM_MB)
                half_tile(xp + b * 16 * K, K, k0, k1, ws, GEMM_MB, GEMM_NR, yn + b * 16, Mp);
              for (; b < blocks; ++b) half_tile(xp + b * 16 * K, K, k0, k1, ws, 1, GEMM_NR, yn + b * 16, Mp);
            } else {
              for (int r = 0; r < nr; ++r)
                for (int64_t b = 0; b < blocks; ++b)
                  half_tile(xp + b * 16 * K, K, k0, k1, ws + r * GEMM_KC, 1, 1, yn + r * Mp + b * 16, Mp);
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

// quant_gemm: vx_int8_gemv's, vx_int4_gemv's and vx_int6_gemv's product for many rows (prefill), where it is bound by
// arithmetic. The same numbers as the row-by-row kernels: activations quantized to int8 per block of 32 (scale d),
// integer dot products with the weights' codes, then per block sum * d * s plus, per group, off * (sum of x), with the
// weight w = code * s + off: int4 codes 0..15 and off = z - 8 s (int6: 0..63 and z - 32 s); int8 codes q + 128
// (vpdpbusd wants one unsigned side) and each block's sum starting at -128 times the block's sum of x (exact; with one
// scale a row, s is applied once at the end). Laid out like half_gemm: 16 rows of x times 4 inputs fill a 64-byte
// vector, so one vpdpbusd with 4 codes of one output broadcast gives 16 rows of that output, 64 multiply-adds an
// instruction. A tile of MB x 16 rows by Q_NR outputs keeps its int32 block sums and float sums in registers (24 of the
// 32), and each step's MB x vectors (see load_once). Everything the tile reads sits at constant offsets from a few
// pointers, so its loop holds no index arithmetic: x per Q_KC inputs (K/Q_KC, Mp/16, Q_KC/4, 16, 4), per block its
// scales and int8's -128 x sums (K/32, Mp), per group the sums of x for int4's zero term (G, Mp). The Q_NR outputs'
// codes are unpacked to bytes once per Q_KC inputs for all row blocks, (Q_KC/4, Q_NR, 4), from 16 contiguous bytes of
// the weight tiles per 4 (int8) or 8 (int4) inputs (N is padded to whole tiles, so Q_NR rows always exist; int6 adds
// each code's top bits); int4's and int6's x is ordered to match the nibbles (per 16 inputs the even 8, then the odd
// 8). Each thread takes Q_NB outputs over all of K at a time, so that their float sums between chunks (yt) stay in L2.
// Zen 5 runs vpdpbusd, vfmadd and vmulps on the same two pipes: per block an int4 sum takes 8 vpdpbusd and 3 of the
// others (int8: 2, or 1 with one scale a row), the bound of this design.
#define Q_MC 256
#define Q_KC 256  // a multiple of every int4 group size
#define Q_NR 4    // divides TILE
#define Q_MB 3
#define Q_NB 256  // outputs a thread takes at a time

// x loaded once a step and kept in a register for its Q_NR uses: gcc would rather load it again for each (as a
// vpdpbusd operand or not), and the loads then bound the loop (1.5 vpdpbusd a cycle instead of 2 on Zen 5).
static inline __m512i load_once(const int8_t* p) {
  __m512i v;
  __asm__("vmovdqu64 %1, %0" : "=v"(v) : "m"(*(const __m512i*)p));
  return v;
}

static inline __attribute__((always_inline)) void quant_tile(const int8_t* xc, const float* dx, const int32_t* xk,
                                                            const float* xs, int64_t Mp, int64_t k0, int64_t k1,
                                                            int64_t group, const uint8_t* qs, const float* s,
                                                            const float* off, const int BITS, const int ROW_SCALES,
                                                            const int MB, float* yt) {
  __m512 acc[Q_NR][Q_MB];
  for (int n = 0; n < Q_NR; ++n)
    for (int b = 0; b < MB; ++b) acc[n][b] = k0 ? _mm512_loadu_ps(yt + n * Mp + b * 16) : _mm512_setzero_ps();
  const int64_t at = k0 / BLOCK * Mp, g = k0 / group;  // this chunk's first block in dx and xk, its group
  dx += at;
  xk += at;
  s += g * Q_NR;
  off += g * Q_NR;
  xs += g * Mp;
  // blocks left in the group: one loop over the blocks (gcc moved every accumulator at the end of a loop a group)
  int64_t left = (group - k0 % group) / BLOCK;
  for (int64_t k = k0; k < k1; k += BLOCK, xc += 16 * BLOCK, qs += Q_NR * BLOCK, dx += Mp, xk += Mp) {
    __m512i dot[Q_NR][Q_MB];
    for (int b = 0; b < MB; ++b) {
      const __m512i start = BITS == 8 ? _mm512_loadu_si512(xk + b * 16) : _mm512_setzero_si512();
      for (int n = 0; n < Q_NR; ++n) dot[n][b] = start;
    }
    for (int j = 0; j < BLOCK / 4; ++j) {
      __m512i xv[Q_MB];
      for (int b = 0; b < MB; ++b) xv[b] = load_once(xc + b * 16 * Q_KC + j * 64);
      for (int n = 0; n < Q_NR; ++n) {
        int32_t codes;
        memcpy(&codes, qs + (j * Q_NR + n) * 4, 4);
        const __m512i wv = _mm512_set1_epi32(codes);
        for (int b = 0; b < MB; ++b) dot[n][b] = _mm512_dpbusd_epi32(dot[n][b], wv, xv[b]);
      }
    }
    for (int b = 0; b < MB; ++b) {
      const __m512 db = _mm512_loadu_ps(dx + b * 16);
      for (int n = 0; n < Q_NR; ++n)  // int8 with one scale a row: that scale at the end (quant_gemm's last pass)
        acc[n][b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[n][b]),
                                    ROW_SCALES ? db : _mm512_mul_ps(db, _mm512_set1_ps(s[n])), acc[n][b]);
    }
    if (--left == 0) {  // the group's end: its zero term (int4, int6), the next group's scales
      if (BITS != 8)
        for (int b = 0; b < MB; ++b) {
          const __m512 sum = _mm512_loadu_ps(xs + b * 16);
          for (int n = 0; n < Q_NR; ++n) acc[n][b] = _mm512_fmadd_ps(_mm512_set1_ps(off[n]), sum, acc[n][b]);
        }
      s += Q_NR;
      off += Q_NR;
      xs += Mp;
      left = group / BLOCK;
    }
  }
  for (int n = 0; n < Q_NR; ++n)
    for (int b = 0; b < MB; ++b) _mm512_storeu_ps(yt + n * Mp + b * 16, acc[n][b]);
}

// Q_NR consecutive weight rows from row n (n % Q_NR == 0), inputs k0..k1 -> their codes in qs (Q_KC/4, Q_NR, 4)
// and their groups' scales and offsets in s and off (G, Q_NR; int8: no offset). Two steps of 4 (int8) or 8
// (int4) inputs at a time: they lie 64 bytes apart.
static inline void quant_unpack(const uint8_t* w, int bits, const uint16_t* scales, const uint16_t* zeros,
                                int64_t K, int64_t G, int64_t group, int64_t n, int64_t k0, int64_t k1, uint8_t* qs,
                                float* s, float* off) {
  const int64_t t = n / TILE, r = n % TILE;
  // a quarter of the next tile's bytes for these inputs, ahead of its use a few calls later: the weights come
  // from L3 or memory (a tile's bytes for Q_KC inputs are 2 or 4 KB apart, more than the prefetchers follow)
  const int64_t bytes = (k1 - k0) * 2 * bits;
  const char* next = (const char*)w + (t + 1) * TILE * K * bits / 8 + k0 * 2 * bits + r / Q_NR * bytes / 4;
  for (int64_t i = 0; i < bytes / 4; i += 64) _mm_prefetch(next + i, _MM_HINT_T0);
  if (bits == 8) {  // per 4 inputs, 4 bytes of each of the tile's 16 rows: ours are 16 contiguous bytes
    const uint8_t* p = w + t * TILE * K + r * 4;
    for (int64_t k = k0; k < k1; k += 8) {  // q + 128
      const __m256i v = _mm256_loadu2_m128i((const __m128i*)(p + k / 4 * 64 + 64), (const __m128i*)(p + k / 4 * 64));
      _mm256_storeu_si256((__m256i*)(qs + (k - k0) * Q_NR), _mm256_xor_si256(v, _mm256_set1_epi8((char)0x80)));
    }
  } else if (bits == 4) {  // per 8 inputs the same; byte i of a row holds inputs 2i (low nibble) and 2i + 1 (high)
    const uint8_t* p = w + t * TILE * K / 2 + r * 4;
    const __m256i low4 = _mm256_set1_epi8(15);
    for (int64_t k = k0; k < k1; k += 16) {  // the low nibbles of 16 inputs, then the high (x in that order)
      const __m256i v = _mm256_loadu2_m128i((const __m128i*)(p + k / 8 * 64 + 64), (const __m128i*)(p + k / 8 * 64));
      _mm256_storeu_si256((__m256i*)(qs + (k - k0) * Q_NR), _mm256_and_si256(v, low4));
      _mm256_storeu_si256((__m256i*)(qs + (k - k0 + 8) * Q_NR), _mm256_and_si256(_mm256_srli_epi16(v, 4), low4));
    }
  } else {  // int6: int4's nibbles, and per 16 inputs 64 bytes of their top bits (the comment before with_top_bits)
    const uint8_t* p = w + t * TILE * K * 3 / 4 + r * 4;
    const __m256i low4 = _mm256_set1_epi8(15), top2 = _mm256_set1_epi8(0x30);
    for (int64_t k = k0; k < k1; k += 16) {  // as int4's, each code with its top bits at 4-5
      const uint8_t* line = p + k / 32 * 384 + (k % 32) / 16 * 128;  // nibble lines 2a and 2a + 1 of the block
      const __m256i v = _mm256_loadu2_m128i((const __m128i*)(line + 64), (const __m128i*)line);
      const __m128i h = _mm_loadu_si128((const __m128i*)(p + k / 32 * 384 + 256 + (k % 32) / 16 * 64));
      const __m256i top = _mm256_set_m128i(_mm_srli_epi16(h, 4), h);  // line 2a's bits at 0-3, 2a + 1's likewise
      const __m256i even = _mm256_or_si256(_mm256_and_si256(v, low4),
                                           _mm256_and_si256(_mm256_slli_epi16(top, 4), top2));
      const __m256i odd = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), low4),
                                          _mm256_and_si256(_mm256_slli_epi16(top, 2), top2));
      _mm256_storeu_si256((__m256i*)(qs + (k - k0) * Q_NR), even);
      _mm256_storeu_si256((__m256i*)(qs + (k - k0 + 8) * Q_NR), odd);
    }
  }
  for (int64_t g = k0 / group; g <= (k1 - 1) / group; ++g) {  // scales (N/16, G, 16): Q_NR = 4 contiguous
    const int64_t at = (t * G + g) * TILE + r;
    const __m128 sg = _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(_mm_loadl_epi64((const __m128i*)(scales + at))), 16));
    _mm_storeu_ps(s + g * Q_NR, sg);
    if (bits != 8) {  // w = (q - middle) s + z, middle 8 (int4) or 32 (int6)
      const __m128 z = _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(_mm_loadl_epi64((const __m128i*)(zeros + at))), 16));
      _mm_storeu_ps(off + g * Q_NR, _mm_fnmadd_ps(_mm_set1_ps(bits == 4 ? 8.f : 32.f), sg, z));
    }
  }
}

// One chunk's row blocks for Q_NR outputs: 3 at a time, then 2 + 2, 2 or 1 (MB a constant in each call).
#define QUANT_TILE(BITS, ROW_SCALES, MB)                                                                         \
  quant_tile(xc + b * 16 * Q_KC, dx + b * 16, xk + b * 16, xs + b * 16, Mp, k0, k1, group, qs, s, off, BITS,    \
             ROW_SCALES, MB, yn + b * 16)
#define QUANT_ROW_BLOCKS(BITS, ROW_SCALES)                                                                       \
  do {                                                                                                           \
    int64_t b = 0;                                                                                               \
    for (; blocks - b >= Q_MB && blocks - b != 4; b += Q_MB) QUANT_TILE(BITS, ROW_SCALES, Q_MB);                \
    for (; blocks - b >= 2; b += 2) QUANT_TILE(BITS, ROW_SCALES, 2);                                             \
    if (b < blocks) QUANT_TILE(BITS, ROW_SCALES, 1);                                                             \
  } while (0)

// 16 rows of 16 floats -> their transpose (r[i][j] -> r[j][i]): in-lane unpacks, then 128-bit lanes moved.
static inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // r[i + c], lane l: rows i..i + 3 of column 4l + c
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
  }
  for (int c = 0; c < 4; ++c) {
    const __m512 ab0 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x44), ab1 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xEE);
    const __m512 cd0 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x44);
    const __m512 cd1 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xEE);
    t[c] = _mm512_shuffle_f32x4(ab0, cd0, 0x88);
    t[4 + c] = _mm512_shuffle_f32x4(ab0, cd0, 0xDD);
    t[8 + c] = _mm512_shuffle_f32x4(ab1, cd1, 0x88);
    t[12 + c] = _mm512_shuffle_f32x4(ab1, cd1, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// bf16_io: x and y are bfloat16, converted here (x a block at a time, y rounded once as vx_int4_gemv rounds).
static void quant_gemm(const void* x, int64_t M, int64_t K, const uint8_t* w, int bits, const uint16_t* scales,
                       const uint16_t* zeros, int64_t group, int64_t N, void* y, int nthreads, int bf16_io) {
  const int64_t MC = M < Q_MC ? (M + 15) / 16 * 16 : Q_MC, G = K / group, B = K / BLOCK;
  const int64_t KP = (K + Q_KC - 1) / Q_KC * Q_KC, NP = (N + Q_NR - 1) / Q_NR * Q_NR;
  int8_t* xq = malloc(MC * KP);                   // (K/Q_KC, Mp/16, Q_KC/4, 16, 4)
  float* dx = malloc(MC * B * sizeof(float));     // (K/32, Mp): each block's scale
  int32_t* xk = malloc(MC * B * sizeof(int32_t)); // (K/32, Mp): -128 x each block's sum of the quantized x
  float* xs = malloc(MC * G * sizeof(float));     // (G, Mp): each group's sum of the quantized x, scaled
  float* yt = malloc(NP * MC * sizeof(float));    // (N, Mp)
  for (int64_t m0 = 0; m0 < M; m0 += MC) {
    const int64_t rows = M - m0 < MC ? M - m0 : MC, Mp = (rows + 15) / 16 * 16, blocks = Mp / 16;
#pragma omp parallel num_threads(nthreads)
    {
      uint8_t* qs = malloc(Q_NR * Q_KC);                   // the Q_NR outputs' codes, one byte each
      float* s = malloc(Q_NR * G * sizeof(float));         // their scales as float
      float* off = malloc(Q_NR * G * sizeof(float));       // and the offsets: w = code * s + off
#pragma omp for schedule(static)
      for (int64_t m = 0; m < Mp; ++m) {  // rows past M are zero
        int8_t* dst = xq + (m / 16) * 16 * Q_KC + (m % 16) * 4;
        float* sums = xs + m;  // the group's, a block at a time (a count: no division a block)
        float group_sum = 0.f;
        int64_t left = group / BLOCK;
        for (int64_t b = 0; b < B; ++b) {
          int32_t q[BLOCK / 4];  // 4 codes each
          float d = 0.f;
          __m256i codes = _mm256_setzero_si256();
          if (m < rows && bf16_io) {
            float xb[BLOCK];
            floats_from_bf16(xb, (const uint16_t*)x + (m0 + m) * K + b * BLOCK, BLOCK);
            codes = quantize_codes(xb, &d);
          } else if (m < rows) {
            codes = quantize_codes((const float*)x + (m0 + m) * K + b * BLOCK, &d);
          }
          // int4, int6: per 16 inputs the even 8, then the odd 8, as quant_unpack orders the nibbles
          const __m256i nibble_order = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                                        0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
          _mm256_storeu_si256((__m256i*)q, bits != 8 ? _mm256_shuffle_epi8(codes, nibble_order) : codes);
          const int64_t k = b * BLOCK;
          for (int i = 0; i < BLOCK / 4; ++i) memcpy(dst + k / Q_KC * Mp * Q_KC + (k % Q_KC + 4 * i) * 16, q + i, 4);
          const int sum = code_sum(codes);
          dx[b * Mp + m] = d;
          xk[b * Mp + m] = -128 * sum;
          group_sum += d * (float)sum;
          if (--left == 0) {
            *sums = group_sum;
            sums += Mp;
            group_sum = 0.f;
            left = group / BLOCK;
          }
        }
      }
      // Q_NB outputs (fewer if that leaves a thread idle) at a time, all K for them: their float sums (yt) stay in
      // L2 between chunks (all N of them, 7 MB at N = 14336, took a sixth of the time from L3)
      const int64_t per_thread = (N + omp_get_num_threads() - 1) / omp_get_num_threads();
      const int64_t NB = per_thread < Q_NB ? (per_thread + Q_NR - 1) / Q_NR * Q_NR : Q_NB;
#pragma omp for schedule(static)
      for (int64_t nb = 0; nb < N; nb += NB)
        for (int64_t k0 = 0; k0 < K; k0 += Q_KC) {
          const int64_t k1 = k0 + Q_KC < K ? k0 + Q_KC : K;
          const int8_t* xc = xq + k0 * Mp;
          for (int64_t n = nb; n < nb + NB && n < N; n += Q_NR) {
            quant_unpack(w, bits, scales, zeros, K, G, group, n, k0, k1, qs, s, off);
            float* yn = yt + n * Mp;
            if (bits != 8) QUANT_ROW_BLOCKS(4, 0);  // int4 and int6 alike
            else if (G > 1) QUANT_ROW_BLOCKS(8, 0);
            else QUANT_ROW_BLOCKS(8, 1);
          }
        }
#pragma omp for schedule(static)
      for (int64_t n0 = 0; n0 < N; n0 += 16) {  // yt (N, Mp) -> y rows m0.. (M, N), 16 x 16 at a time
        const __mmask16 columns = N - n0 >= 16 ? 0xFFFF : (__mmask16)((1u << (N - n0)) - 1);
        const __m512 row_scales = bits == 8 && G == 1 ? bf16x16(scales + n0, columns) : _mm512_set1_ps(1.f);
        for (int64_t m = 0; m < rows; m += 16) {
          __m512 r[16];
          for (int i = 0; i < 16; ++i) r[i] = n0 + i < NP ? _mm512_loadu_ps(yt + (n0 + i) * Mp + m) : _mm512_setzero_ps();
          transpose16(r);
          for (int i = 0; i < 16 && m + i < rows; ++i) {
            const __m512 v = _mm512_mul_ps(r[i], row_scales);
            const int64_t at = (m0 + m + i) * N + n0;
            if (bf16_io) _mm256_mask_storeu_epi16((uint16_t*)y + at, columns, bf16_round16(v));
            else _mm512_mask_storeu_ps((float*)y + at, columns, v);
          }
        }
      }
      free(qs);
      free(s);
      free(off);
    }
  }
  free(xq);
  free(dx);
  free(xk);
  free(xs);
  free(yt);
}

#define ATTEND_MAX_G 16  // query heads a KV head (attend_task keeps per-head values on the stack)

// ---- Attention of one new token per row over the KV cache (a decode step) -----------------------------------
// PyTorch's flash attention for the CPU takes about 240 us a call for a decode step over 257 slots (8 KV heads of
// 128, 2-core Xeon), most of it set-up: a millisecond a token for 4 layers. Here each (row, KV head) pair is a
// task: its G query heads' scores over the allowed slots (float32 dot products, each key row widened once), an
// exact softmax (the max, e^x by vscalefps, the sum), then the values weighted, 4 query heads x 64 dimensions in
// registers at a time. Keys are read once, values D/64 times (a 128-byte half row each time).

// e^x for x <= 0 (a score minus its row's max): x = n ln2 + r, |r| <= ln2/2, e^r by Cephes' degree-6 polynomial
// (relative error about 1e-7), times 2^n by vscalefps. Below -87 (under 2^-125 next to the max's 1) it is clamped;
// a NaN stays NaN (vmaxps returns its second operand where one is NaN), so a NaN or +inf score makes its row NaN, as
// PyTorch's softmax does, not a row that ignores it.
static inline __m512 attend_exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-87.f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

static inline __m512 attend_load16(const void* p, int64_t at, const int BF16) {
  return BF16 ? bf16x16((const uint16_t*)p + at, 0xFFFF) : _mm512_loadu_ps((const float*)p + at);
}

#define ATTEND_GB 4  // query heads whose weighted sums stay in registers together

static inline __attribute__((always_inline)) void attend_task(const void* q, const void* k, const void* v,
                                                             const uint8_t* ok, int64_t task, int64_t G, int64_t S,
                                                             int64_t D, float scale, void* out, const int BF16,
                                                             float* scores, float* qf, float* row) {
  for (int64_t i = 0; i < G * D; i += 16)
    _mm512_storeu_ps(qf + i, _mm512_mul_ps(attend_load16(q, task * G * D + i, BF16), _mm512_set1_ps(scale)));
  float top[ATTEND_MAX_G];
  for (int64_t g = 0; g < G; ++g) top[g] = -INFINITY;
  for (int64_t s = 0; s < S; ++s) {  // scores (G, S); a slot not allowed keeps whatever it held (masked below)
    if (!ok[s]) continue;
    for (int64_t c = 0; c < D; c += 16) _mm512_storeu_ps(row + c, attend_load16(k, (task * S + s) * D + c, BF16));
    for (int64_t g = 0; g < G; ++g) {
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
      int64_t c = 0;
      for (; c + 32 <= D; c += 32) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qf + g * D + c), _mm512_loadu_ps(row + c), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(qf + g * D + c + 16), _mm512_loadu_ps(row + c + 16), a1);
      }
      if (c < D) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qf + g * D + c), _mm512_loadu_ps(row + c), a0);
      const float dot = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
      scores[g * S + s] = dot;
      top[g] = dot > top[g] ? dot : top[g];
    }
  }
  float total[ATTEND_MAX_G];
  for (int64_t g = 0; g < G; ++g) {  // e^(score - max) where allowed, exactly 0 elsewhere
    float* sg = scores + g * S;
    const __m512 m = _mm512_set1_ps(top[g]);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t s = 0; s < S; s += 16) {
      const __mmask16 in = S - s >= 16 ? 0xFFFF : (__mmask16)((1u << (S - s)) - 1);
      const __mmask16 allowed = _mm_mask_cmpneq_epi8_mask(in, _mm_maskz_loadu_epi8(in, ok + s), _mm_setzero_si128());
      const __m512 e = _mm512_maskz_mov_ps(allowed, attend_exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(allowed, sg + s), m)));
      _mm512_mask_storeu_ps(sg + s, in, e);
      sum = _mm512_add_ps(sum, e);
    }
    total[g] = _mm512_reduce_add_ps(sum);
  }
  for (int64_t g0 = 0; g0 < G; g0 += ATTEND_GB)
    for (int64_t c0 = 0; c0 < D; c0 += 64) {  // ATTEND_GB query heads x 64 dimensions of the weighted sums
      __m512 acc[ATTEND_GB][4];
      for (int g = 0; g < ATTEND_GB; ++g)
        for (int j = 0; j < 4; ++j) acc[g][j] = _mm512_setzero_ps();
      for (int64_t s = 0; s < S; ++s) {
        if (!ok[s]) continue;
        __m512 vj[4];
        for (int j = 0; j < 4; ++j)
          vj[j] = c0 + 16 * j < D ? attend_load16(v, (task * S + s) * D + c0 + 16 * j, BF16) : _mm512_setzero_ps();
        for (int g = 0; g < ATTEND_GB && g0 + g < G; ++g) {
          const __m512 w = _mm512_set1_ps(scores[(g0 + g) * S + s]);
          for (int j = 0; j < 4; ++j) acc[g][j] = _mm512_fmadd_ps(w, vj[j], acc[g][j]);
        }
      }
      for (int g = 0; g < ATTEND_GB && g0 + g < G; ++g) {
        const __m512 inv = _mm512_set1_ps(total[g0 + g] <= 0.f ? 0.f : 1.f / total[g0 + g]);  // NaN stays NaN
        for (int j = 0; j < 4 && c0 + 16 * j < D; ++j) {
          const __m512 y = _mm512_mul_ps(acc[g][j], inv);
          const int64_t at = (task * G + g0 + g) * D + c0 + 16 * j;
          if (BF16) _mm256_storeu_si256((__m256i*)((uint16_t*)out + at), bf16_round16(y));
          else _mm512_storeu_ps((float*)out + at, y);
        }
      }
    }
}

// q (B, H, G, D): the new token's G query heads for each of the H KV heads; k, v (B, H, S, D): the cache; allowed
// (B, S): 1 where the token may attend to the slot; out (B, H, G, D); bf16: q, k, v and out are bfloat16, else
// float32. D % 16 == 0, G <= ATTEND_MAX_G (the caller checks). A row allowed no slot gets zeros.
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

// ---- A decode step's attention with its rotary and cache write (fastattention.KernelAttention) ---------------
// As separate calls between two weight streams, the rotary of q and k (8 PyTorch ops), the two cache writes and
// the attention cost about 470 us a layer on a 2-core Xeon VM, each call cold. Here each (row, KV head) task
// rotates its new key into the row's cache slot, copies the value into it, rotates its G query heads, then
// attends over the cache as vx_attend_decode does. Rotary is model.apply_rotary's x * cos + roll(x, D/2) * sin
// (sin's first half negated by rotary_tables) with each product and the sum rounded as PyTorch's ops round them
// (bfloat16: each to bfloat16; float32: no fused multiply-add), so the cache holds the bits PyTorch would write. The
// task loop, vx_decode_attention, and rotate_head are in decode_block.h (shared by both builds); rotate_rolled is
// this build's part.

// a * b, kept apart from any add after it: the compiler may not fuse the two into one rounding (an FMA).
static inline __m512 product16(__m512 a, __m512 b) {
  __m512 p = _mm512_mul_ps(a, b);
  __asm__("" : "+v"(p));
  return p;
}

static inline __m512 bf16_rounded16(__m512 v) {  // v rounded to bfloat16, as float32 lanes
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16_round16(v)), 16));
}

// One head: dst = xf * c + xr * s in the head's dtype (BF16: bfloat16), xf and xr (D) its float32 values and
// their roll by D/2, c, s (D) float32 (decode_block.h's rotate_head makes them).
static inline void rotate_rolled(void* dst, const float* xf, const float* xr, const float* c, const float* s,
                                 int64_t D, const int BF16) {
  for (int64_t i = 0; i < D; i += 16) {
    __m512 a = product16(_mm512_loadu_ps(xf + i), _mm512_loadu_ps(c + i));
    __m512 b = product16(_mm512_loadu_ps(xr + i), _mm512_loadu_ps(s + i));
    if (BF16) {
      _mm256_storeu_si256((__m256i*)((uint16_t*)dst + i),
                          bf16_round16(_mm512_add_ps(bf16_rounded16(a), bf16_rounded16(b))));
    } else {
      _mm512_storeu_ps((float*)dst + i, _mm512_add_ps(a, b));
    }
  }
}

// ---- silu(g) * u for a decode step's feed-forward (decode_block.h) ---------------------------------------------
// m (M, n) = silu(g) * u, g and u rows g_row and u_row elements apart, rounded as FeedForward's F.silu(a) * b
// rounds: bf16_io, silu's x / (1 + e^-x) to bfloat16, then the product; else float32. e^-x by attend_exp16's
// polynomial (PyTorch's is Sleef's: the same up to float32 rounding). n % 16 == 0.
static void silu_mul(const void* g, int64_t g_row, const void* u, int64_t u_row, int64_t M, int64_t n, void* m,
                     int bf16_io) {
  for (int64_t r = 0; r < M; ++r)
    for (int64_t i = 0; i < n; i += 16) {
      const __m512 x = attend_load16(g, r * g_row + i, bf16_io), up = attend_load16(u, r * u_row + i, bf16_io);
      const __m512 e = attend_exp16(_mm512_sub_ps(_mm512_setzero_ps(), x));  // +inf past e^88: silu(x) = -0
      const __m512 s = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), e));
      if (bf16_io)
        _mm256_storeu_si256((__m256i*)((uint16_t*)m + r * n + i), bf16_round16(product16(bf16_rounded16(s), up)));
      else
        _mm512_storeu_ps((float*)m + r * n + i, product16(s, up));
    }
}

#include "decode_block.h"
