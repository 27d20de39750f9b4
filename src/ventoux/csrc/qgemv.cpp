// Quantized matrix-vector products for decoding on x86 CPUs with AVX-512 VNNI, as llama.cpp does them:
// the activations are quantized to int8 per block of 32 (one float scale each), then multiplied with the
// int8 / int4 weights by integer dot products (vpdpbusd), one float multiply-add per block.
//
//   int8_gemv(x (M, K) float, qweight (N, K) int8, scales (N,))                       -> (M, N) float32
//   int4_gemv(x (M, K) float, qweight (N, K/2) uint8, scales (N, G), zeros (N, G), g) -> (M, N) float32
//
// Weights are ventoux's device-independent layout (see qlinear.py): no repacking. Rows are split across
// torch's threads; each weight row is read once from memory and reused from L1 for the M activations.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;  // activation quantization block

// Quantize one activation row per block of 32: q = round(x / d), d = max|x| / 127.
// Calls `put(k, q)` for each element and `scale(b, d)` for each block b.
template <typename Put, typename Scale>
void quantize_row(const float* x, int64_t K, Put put, Scale scale) {
  for (int64_t b = 0; b < K / kBlock; ++b) {
    const float* xb = x + b * kBlock;
    float amax = 0.f;
    for (int i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(xb[i]));
    const float d = amax / 127.f;
    const float inv = d > 0.f ? 1.f / d : 0.f;
    for (int i = 0; i < kBlock; ++i) put(b * kBlock + i, static_cast<int>(std::nearbyint(xb[i] * inv)));
    scale(b, d);
  }
}

// Up to 16 bfloat16 values -> float32 lanes (a bfloat16 is the high half of a float32); masked lanes are 0.
inline __m512 bf16x16(const uint16_t* p, __mmask16 mask) {
  const __m256i h = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

}  // namespace

at::Tensor int8_gemv(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& scales_in) {
  const auto x = x_in.to(at::kFloat).contiguous();
  const auto scales = scales_in.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  TORCH_CHECK(x.device().is_cpu() && qweight.device().is_cpu(), "int8_gemv: CPU tensors only");
  TORCH_CHECK(K % 128 == 0 && qweight.size(1) == K && qweight.scalar_type() == at::kChar && qweight.is_contiguous(),
              "int8_gemv: qweight must be contiguous int8 (N, K) with K % 128 == 0");
  const int64_t C = K / 64;  // 64-byte chunks per row: two activation blocks each
  // |q| as unsigned bytes, the sign of q as a bit mask per chunk, and each chunk's block scales spread over
  // the 16 int32 lanes of a dot product (lanes 0-7 sum block 2c, lanes 8-15 block 2c+1)
  std::vector<uint8_t> absq(M * K);
  std::vector<uint64_t> neg(M * C, 0);
  std::vector<float> dvec(M * C * 16);
  const float* xp = x.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    quantize_row(
        xp + m * K, K,
        [&](int64_t k, int q) {
          absq[m * K + k] = static_cast<uint8_t>(std::abs(q));
          if (q < 0) neg[m * C + k / 64] |= uint64_t{1} << (k % 64);
        },
        [&](int64_t b, float d) {
          for (int i = 0; i < 8; ++i) dvec[(m * C + b / 2) * 16 + (b % 2) * 8 + i] = d;
        });
  }
  auto y = at::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  const int8_t* wp = qweight.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    const __m512i zero = _mm512_setzero_si512();
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* w = wp + n * K;
      for (int64_t m = 0; m < M; ++m) {
        const uint8_t* a = absq.data() + m * K;
        const uint64_t* ng = neg.data() + m * C;
        const float* dv = dvec.data() + m * C * 16;
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        for (int64_t c = 0; c < C; c += 2) {  // C is even: K % 128 == 0
          // dot(|q|, sign(q) * w) == dot(q, w), with the unsigned x signed product vpdpbusd takes
          __m512i w0 = _mm512_loadu_si512(w + c * 64), w1 = _mm512_loadu_si512(w + c * 64 + 64);
          w0 = _mm512_mask_sub_epi8(w0, ng[c], zero, w0);
          w1 = _mm512_mask_sub_epi8(w1, ng[c + 1], zero, w1);
          const __m512i p0 = _mm512_dpbusd_epi32(zero, _mm512_loadu_si512(a + c * 64), w0);
          const __m512i p1 = _mm512_dpbusd_epi32(zero, _mm512_loadu_si512(a + c * 64 + 64), w1);
          acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p0), _mm512_loadu_ps(dv + c * 16), acc0);
          acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p1), _mm512_loadu_ps(dv + c * 16 + 16), acc1);
        }
        yp[m * N + n] = sp[n] * _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
      }
    }
  });
  return y;
}

at::Tensor int4_gemv(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& scales,
                     const at::Tensor& zeros, int64_t group) {
  const auto x = x_in.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0), G = K / group;
  TORCH_CHECK(x.device().is_cpu() && qweight.device().is_cpu(), "int4_gemv: CPU tensors only");
  TORCH_CHECK(K % 128 == 0 && qweight.size(1) * 2 == K && qweight.scalar_type() == at::kByte &&
                  qweight.is_contiguous(), "int4_gemv: qweight must be contiguous uint8 (N, K/2), K % 128 == 0");
  TORCH_CHECK((group == 32 || group == 64 || group == 128) && scales.scalar_type() == at::kBFloat16 &&
                  zeros.scalar_type() == at::kBFloat16 && scales.is_contiguous() && zeros.is_contiguous() &&
                  scales.size(0) == N && scales.size(1) == G && zeros.sizes() == scales.sizes(),
              "int4_gemv: scales and zeros must be contiguous bfloat16 (N, K/group), group 32, 64 or 128");
  const int64_t C = K / 128;  // 64-byte chunks of a packed row: 128 inputs, byte j = inputs 2j (low), 2j+1 (high)
  // The activations split by parity to meet the low and high nibbles of each byte; the 16 int32 lanes of a
  // chunk's dot product each sum 8 consecutive inputs, so lane l is in block 4c + l/4 and group (128c + 8l)/g.
  const int64_t Gp = (G + 15) / 16 * 16;  // G padded to whole 16-lane vectors (the padding stays zero)
  std::vector<int8_t> xe(M * K / 2), xo(M * K / 2);
  std::vector<float> dvec(M * C * 16), xsum(M * Gp, 0.f);
  const float* xp = x.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    int block_sum = 0;
    quantize_row(
        xp + m * K, K,
        [&](int64_t k, int q) {
          (k % 2 ? xo : xe)[m * K / 2 + k / 2] = static_cast<int8_t>(q);
          block_sum += q;
        },
        [&](int64_t b, float d) {
          for (int i = 0; i < 4; ++i) dvec[m * C * 16 + b * 4 + i] = d;
          // each group's sum of the quantized x, for the zeros' term: the same x as the dot products see,
          // so the product is w . x_quantized (the q * s and zero terms nearly cancel; their errors must too)
          xsum[m * Gp + b * kBlock / group] += d * static_cast<float>(block_sum);
          block_sum = 0;
        });
  }
  // lane -> index of its scale among the chunk's 128 / g scales
  const __m512i lane_group = group == 32   ? _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3)
                             : group == 64 ? _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1)
                                           : _mm512_setzero_si512();
  const int64_t per_chunk = 128 / group;
  const __mmask16 chunk_mask = static_cast<__mmask16>((1u << per_chunk) - 1);
  auto y = at::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = qweight.data_ptr<uint8_t>();
  const auto* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::BFloat16>());
  const auto* zp = reinterpret_cast<const uint16_t*>(zeros.data_ptr<at::BFloat16>());
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    std::vector<float> s(Gp, 0.f), off(Gp, 0.f);  // this row's scales and zero terms, as float
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* w = wp + n * K / 2;
      for (int64_t g = 0; g < G; g += 16) {
        const __mmask16 mask = G - g >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (G - g)) - 1);
        const __m512 sv = bf16x16(sp + n * G + g, mask), zv = bf16x16(zp + n * G + g, mask);
        _mm512_mask_storeu_ps(s.data() + g, mask, sv);
        _mm512_mask_storeu_ps(off.data() + g, mask, _mm512_fnmadd_ps(_mm512_set1_ps(8.f), sv, zv));  // z - 8 s
      }
      for (int64_t m = 0; m < M; ++m) {
        const int8_t* e = xe.data() + m * K / 2;
        const int8_t* o = xo.data() + m * K / 2;
        const float* dv = dvec.data() + m * C * 16;
        const float* xs = xsum.data() + m * Gp;
        __m512 acc = _mm512_setzero_ps(), zacc = _mm512_setzero_ps();
        for (int64_t c = 0; c < C; ++c) {
          const __m512i p = _mm512_loadu_si512(w + c * 64);
          const __m512i lo = _mm512_and_si512(p, low4), hi = _mm512_and_si512(_mm512_srli_epi16(p, 4), low4);
          __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(e + c * 64));
          dot = _mm512_dpbusd_epi32(dot, hi, _mm512_loadu_si512(o + c * 64));
          // the chunk's scales, one per lane (its 128 / g scales are in the first lanes of the load)
          const __m512 sc = _mm512_permutexvar_ps(lane_group, _mm512_maskz_loadu_ps(chunk_mask, s.data() + c * per_chunk));
          acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(sc, _mm512_loadu_ps(dv + c * 16)), acc);
        }
        // w = (q - 8) s + z: the sum over q s is acc; the rest is (z - 8 s) times each group's sum of x
        for (int64_t g = 0; g < Gp; g += 16)
          zacc = _mm512_fmadd_ps(_mm512_loadu_ps(off.data() + g), _mm512_loadu_ps(xs + g), zacc);
        yp[m * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc, zacc));
      }
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_gemv", &int8_gemv, "int8 weights x int8-quantized activations (AVX-512 VNNI)");
  m.def("int4_gemv", &int4_gemv, "int4 weights x int8-quantized activations (AVX-512 VNNI)");
}
