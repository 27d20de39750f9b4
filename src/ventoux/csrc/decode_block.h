// ---- A decode step's norms, its attention, and its whole transformer block (fastnorm.py, fastattention.py,
// fastblock.py). Included at the end of both builds (cpu_kernels.c, cpu_kernels_avx2.c): it is written once over
// each build's own vector parts (the products, rotate_rolled, attend_task, silu_mul, the bfloat16 conversions).
// Between two weight streams, each call from Python into a kernel or a PyTorch op runs cold, about 100 us on a
// 2-core Xeon VM whatever it computes, and a block's decode step made ten of them: about 1.2 ms a layer. Here the
// block's steps run back to back in C, in model.Block.forward's order and with its roundings: each step's result
// is what that step's kernel returns.

// n values of a bfloat16 (bf16_io) or float32 array as float32.
static void floats_of(float* dst, const void* src, int64_t n, int bf16_io) {
  if (bf16_io) floats_from_bf16(dst, (const uint16_t*)src, n);
  else memcpy(dst, src, n * sizeof(float));
}

// ---- RMS norm of a decode step's rows, after the residual add (RMSNorm and Block.forward's x + attention) ----
// Between two weight streams every small PyTorch op runs cold (about 90 us each on a 2-core Xeon VM): the add and
// the norm's four ops cost about 470 us a call there, this one about 180. h = x + r (r NULL: no add, h not
// written), n = w * (h / sqrt(mean(h^2) + eps)), rounded where RMSNorm.forward rounds: bf16_io, everything
// bfloat16 (h, the normalized row and n each rounded once); else float32. The squares are summed in 16 float32
// partial sums, PyTorch's in its own order: the same numbers up to float32 rounding. Requires dim % 16 == 0.
void vx_add_rms_norm(const void* x, const void* r, const void* w, float eps, int64_t rows, int64_t dim, void* h,
                     void* n, int bf16_io) {
  const int64_t size = bf16_io ? 2 : 4;
  float* hf = malloc(3 * dim * sizeof(float));
  float *rf = hf + dim, *wf = rf + dim;
  floats_of(wf, w, dim, bf16_io);
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t at = row * dim * size;
    floats_of(hf, (const char*)x + at, dim, bf16_io);
    if (r) {
      floats_of(rf, (const char*)r + at, dim, bf16_io);
      for (int64_t i = 0; i < dim; ++i) hf[i] += rf[i];
      if (bf16_io) {  // h rounded, and normalized as rounded
        bf16_from_floats((uint16_t*)((char*)h + at), hf, dim);
        floats_from_bf16(hf, (const uint16_t*)((char*)h + at), dim);
      } else {
        memcpy((char*)h + at, hf, dim * sizeof(float));
      }
    }
    float part[16] = {0};
    for (int64_t i = 0; i < dim; i += 16)
      for (int j = 0; j < 16; ++j) part[j] += hf[i + j] * hf[i + j];
    float sum = 0.f;
    for (int j = 0; j < 16; ++j) sum += part[j];
    const float scale = 1.f / sqrtf(sum / (float)dim + eps);
    for (int64_t i = 0; i < dim; ++i) hf[i] *= scale;
    if (bf16_io) {  // the normalized row rounded to bfloat16 (RMSNorm's .to(x.dtype)), then times w, rounded
      uint16_t* out = (uint16_t*)((char*)n + at);
      bf16_from_floats(out, hf, dim);
      floats_from_bf16(hf, out, dim);
      for (int64_t i = 0; i < dim; ++i) hf[i] *= wf[i];
      bf16_from_floats(out, hf, dim);
    } else {
      float* out = (float*)((char*)n + at);
      for (int64_t i = 0; i < dim; ++i) out[i] = wf[i] * hf[i];
    }
  }
  free(hf);
}

// One head: dst = x * c + roll(x, D/2) * s, in x's dtype; c, s (D) float32; xf (2D floats) scratch. The build's
// rotate_rolled does the arithmetic.
static inline void rotate_head(void* dst, const void* x, const float* c, const float* s, int64_t D, const int BF16,
                               float* xf) {
  float* xr = xf + D;
  const int64_t half = D / 2;
  floats_of(xf, x, D, BF16);
  memcpy(xr, xf + half, (D - half) * sizeof(float));  // xr[i] = x[(i - D/2) mod D]
  memcpy(xr + (D - half), xf, half * sizeof(float));
  rotate_rolled(dst, xf, xr, c, s, D, BF16);
}

// One (row, KV head) task of vx_decode_attention: the new key rotated into its slot, the value copied there, the
// G query heads rotated, then attention over the cache.
static inline __attribute__((always_inline)) void rotate_store_attend_task(
    const char* q, const char* k, const char* v, const float* c, const float* s, char* kt, char* vt, int64_t slot,
    const uint8_t* ok, int64_t G, int64_t S, int64_t D, float scale, char* out, const int BF16, float* scores,
    float* qf, float* row, char* qr) {
  const int64_t size = BF16 ? 2 : 4;
  rotate_head(kt + slot * D * size, k, c, s, D, BF16, qf);
  memcpy(vt + slot * D * size, v, D * size);
  for (int64_t g = 0; g < G; ++g) rotate_head(qr + g * D * size, q + g * D * size, c, s, D, BF16, qf);
  attend_task(qr, kt, vt, ok, 0, G, S, D, scale, out, BF16, scores, qf, row);
}

// q (B, H*G*D), k and v (B, H*D): a row's new token from the products, rows q_row, k_row, v_row elements apart;
// cos, sin (B, D): its rotary tables; kc, vc (B, H, S, D): the cache, written at slots[b] of each row; allowed (B, S)
// the slots it may attend to, after the write; out (B, H*G*D). bf16: q, k, v, cos, sin, kc, vc and out bfloat16,
// else float32. D % 16 == 0, G <= ATTEND_MAX_G (the caller checks).
void vx_decode_attention(const void* q, int64_t q_row, const void* k, int64_t k_row, const void* v, int64_t v_row,
                         const void* cos, const void* sin, void* kc, void* vc, const int64_t* slots,
                         const uint8_t* allowed, int64_t B, int64_t H, int64_t G, int64_t S, int64_t D, float scale,
                         void* out, int bf16, int nthreads) {
  const int64_t size = bf16 ? 2 : 4;
  float* tables = malloc(2 * B * D * sizeof(float));  // cos then sin, float32
  floats_of(tables, cos, B * D, bf16);
  floats_of(tables + B * D, sin, B * D, bf16);
#pragma omp parallel num_threads(nthreads)
  {
    float* scores = malloc(G * S * sizeof(float));
    float* qf = malloc((G + 1) * D * sizeof(float));
    float* row = malloc(D * sizeof(float));
    char* qr = malloc(G * D * size);  // the task's query heads, rotated
#pragma omp for schedule(static)
    for (int64_t task = 0; task < B * H; ++task) {
      const int64_t b = task / H, h = task % H;
      const char* qt = (const char*)q + (b * q_row + h * G * D) * size;
      const char* kt = (const char*)k + (b * k_row + h * D) * size;
      const char* vt = (const char*)v + (b * v_row + h * D) * size;
      const float *c = tables + b * D, *s = tables + (B + b) * D;
      char* kct = (char*)kc + task * S * D * size;
      char* vct = (char*)vc + task * S * D * size;
      char* ot = (char*)out + task * G * D * size;
      if (bf16) rotate_store_attend_task(qt, kt, vt, c, s, kct, vct, slots[b], allowed + b * S, G, S, D, scale, ot, 1,
                                         scores, qf, row, qr);
      else rotate_store_attend_task(qt, kt, vt, c, s, kct, vct, slots[b], allowed + b * S, G, S, D, scale, ot, 0,
                                    scores, qf, row, qr);
    }
    free(scores);
    free(qf);
    free(row);
    free(qr);
  }
  free(tables);
}

// ---- The block: its layers' kernels and shape, then one call for its decode step -------------------------------
enum { VX_INT8 = 0, VX_INT4 = 1, VX_HALF = 2, VX_INT6 = 3 };

typedef struct {  // one linear layer on a kernel: its arguments to vx_int8_gemv, vx_int4_gemv (vx_int6_gemv) or
                  // vx_half_gemv
  int64_t kind, K, N, group, half_bf16;  // half_bf16: VX_HALF's weight is bfloat16 (else float16)
  const void *w, *scales, *zeros;
} vx_product;

typedef struct {  // the products of one input: one joined product (fusedproducts.py), n = 1, or one a layer
  vx_product p[3];
  int64_t n;
} vx_products;

typedef struct {  // a block's weights and shape (cpu_kernels.BlockLayout mirrors it)
  vx_products qkv, gate_up;
  vx_product wo, w2;
  const void *attention_norm, *ffn_norm;
  float eps, scale;  // the norms' epsilon; attention's 1/sqrt(head_dim)
  int64_t dim, hidden, n_heads, n_kv_heads, head_dim;
} vx_block;

static void product(const vx_product* p, const void* x, int64_t M, void* y, int nthreads, int bf16_io) {
  if (p->kind == VX_INT8)
    vx_int8_gemv(x, M, p->K, p->w, p->scales, p->group, p->N, y, nthreads, bf16_io);
  else if (p->kind == VX_INT4)
    vx_int4_gemv(x, M, p->K, p->w, p->scales, p->zeros, p->group, p->N, y, nthreads, bf16_io);
  else if (p->kind == VX_INT6)
    vx_int6_gemv(x, M, p->K, p->w, p->scales, p->zeros, p->group, p->N, y, nthreads, bf16_io);
  else
    vx_half_gemv(x, M, p->K, p->w, (int)p->half_bf16, p->N, y, nthreads, bf16_io);
}

// The outputs of ps on x (M rows) into y, and where each of their parts (of widths[i] columns) begins, part[i],
// with its rows row[i] elements apart: a joined product's parts are column ranges of its (M, N) rows; separate
// products' outputs lie one after the other, each (M, its N).
static void run_products(const vx_products* ps, const void* x, int64_t M, char* y, const int64_t* widths,
                         char** part, int64_t* row, int nthreads, int bf16_io) {
  const int64_t size = bf16_io ? 2 : 4;
  int64_t at = 0;
  for (int64_t i = 0; i < ps->n; ++i) {
    product(&ps->p[i], x, M, y + at * size, nthreads, bf16_io);
    part[i] = y + at * size;
    row[i] = ps->p[i].N;
    at += M * ps->p[i].N;
  }
  for (int64_t i = 1, column = 0; ps->n == 1 && i < 3; ++i) {  // a joined product: its parts side by side
    column += widths[i - 1];
    part[i] = y + column * size;
    row[i] = ps->p[0].N;
  }
}

// out = h + f for M rows of dim values (bfloat16 rounded once, as PyTorch's add; else float32).
static void add_rows(const void* h, const void* f, int64_t M, int64_t dim, void* out, int bf16_io, float* a,
                     float* b) {
  const int64_t size = bf16_io ? 2 : 4;
  for (int64_t m = 0; m < M; ++m) {
    floats_of(a, (const char*)h + m * dim * size, dim, bf16_io);
    floats_of(b, (const char*)f + m * dim * size, dim, bf16_io);
    for (int64_t i = 0; i < dim; ++i) a[i] += b[i];
    if (bf16_io) bf16_from_floats((uint16_t*)out + m * dim, a, dim);
    else memcpy((float*)out + m * dim, a, dim * sizeof(float));
  }
}

// Bytes of the scratch vx_decode_block needs for M rows (its caller allocates it once and reuses it).
int64_t vx_decode_block_scratch(const vx_block* b, int64_t M, int bf16_io) {
  const int64_t nq = b->n_heads * b->head_dim, nkv = b->n_kv_heads * b->head_dim;
  return M * (bf16_io ? 2 : 4) * (4 * b->dim + 2 * nq + 2 * nkv + 3 * b->hidden) + 2 * b->dim * sizeof(float);
}

// x (M, dim): the block's input, one new token a row; cos, sin (M, head_dim); kc, vc (M, Hkv, S, head_dim): this
// layer's cache, written at slots (M,); allowed (M, S) -> out (M, dim), the block's output. bf16_io: x, cos, sin,
// the cache and out bfloat16, else float32. As model.Block.forward: n = attention_norm(x); a = wo(attention(n));
// h = x + a; n = ffn_norm(h); out = h + w2(silu(w1(n)) * w3(n)).
void vx_decode_block(const vx_block* b, const void* x, int64_t M, const void* cos, const void* sin, void* kc, void* vc,
                     const int64_t* slots, const uint8_t* allowed, int64_t S, void* scratch, void* out, int bf16_io,
                     int nthreads) {
  const int64_t size = bf16_io ? 2 : 4, D = b->head_dim, nq = b->n_heads * D, nkv = b->n_kv_heads * D;
  char* n = scratch;                         // (M, dim): a norm's output
  char* qkv = n + M * b->dim * size;         // (M, nq + 2 nkv)
  char* att = qkv + M * (nq + 2 * nkv) * size;  // (M, nq): attention's
  char* a = att + M * nq * size;             // (M, dim): wo's
  char* h = a + M * b->dim * size;           // (M, dim): x + a
  char* gu = h + M * b->dim * size;          // (M, 2 hidden): w1's and w3's
  char* m = gu + 2 * M * b->hidden * size;   // (M, hidden): silu(w1's) * w3's
  char* f = m + M * b->hidden * size;        // (M, dim): w2's
  float* rows = (float*)(f + M * b->dim * size);  // 2 dim floats for add_rows
  char* part[3];
  int64_t row[3];
  vx_add_rms_norm(x, NULL, b->attention_norm, b->eps, M, b->dim, NULL, n, bf16_io);
  const int64_t qkv_widths[3] = {nq, nkv, nkv}, gate_up_widths[3] = {b->hidden, b->hidden, b->hidden};
  run_products(&b->qkv, n, M, qkv, qkv_widths, part, row, nthreads, bf16_io);
  vx_decode_attention(part[0], row[0], part[1], row[1], part[2], row[2], cos, sin, kc, vc, slots, allowed, M,
                      b->n_kv_heads, b->n_heads / b->n_kv_heads, S, D, b->scale, att, bf16_io, nthreads);
  product(&b->wo, att, M, a, nthreads, bf16_io);
  vx_add_rms_norm(x, a, b->ffn_norm, b->eps, M, b->dim, h, n, bf16_io);
  run_products(&b->gate_up, n, M, gu, gate_up_widths, part, row, nthreads, bf16_io);
  silu_mul(part[0], row[0], part[1], row[1], M, b->hidden, m, bf16_io);
  product(&b->w2, m, M, f, nthreads, bf16_io);
  add_rows(h, f, M, b->dim, out, bf16_io, rows, rows + b->dim);
}
