/* llmctl's CPU kernels for decoding in float32 (AVX2 + FMA, OpenMP), called through ctypes by
 * llmctl/core/generate/cpu_kernels.py, which holds the torch definitions they are tested against:
 *
 *   llmctl_linear_f32          y = x @ w^T (+ bias) for a few rows of x
 *   llmctl_rms_norm_f32        y = w * (x * rsqrt(mean(x^2) + eps)), row by row
 *   llmctl_decode_attention_f32 one decode step of attention for every row of a batch: RoPE on the new
 *                              query and key, both written with the value into the KV cache, then
 *                              softmax(q k^T * scale) v over the row's unmasked cache slots (GQA)
 *
 * Compiled by llmctl.core.generate.cpu_kernels with -O3 -mavx2 -mfma -fopenmp; the OpenMP runtime is the one torch has
 * already loaded (libgomp.so.1), so these threads are torch's threads.
 *
 * --- linear ---
 * x: [m, k] rows of stride ldx; w: [n, k] row-major (nn.Linear's layout); bias: [n] or NULL;
 * y: [m, n] contiguous. Meant for m <= 16 (decoding one to a few tokens per sequence), where the product
 * is bound by streaming w from memory once: each thread takes a contiguous block of w's rows and reads
 * each row once, computing its dot products with every row of x (which stays in cache). Register tiles
 * of up to 3 rows of x by 4 rows of w, 8-wide AVX2 FMA accumulators over k, then horizontal sums.
 *
 * Summation order: per output, eight interleaved partial sums over k (lane j takes k = j mod 8), added
 * pairwise at the end, then the scalar tail, then the bias.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

static inline float hsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);                              /* 4 lanes */
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));           /* 2 */
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 0x55));    /* 1 */
    return _mm_cvtss_f32(lo);
}

/* MR rows of x by NR rows of w, over the whole of k. Inlined with constant MR/NR, so acc stays in registers. */
static inline __attribute__((always_inline)) void tile(const float *x, int64_t ldx, const float *w,
                                                        int64_t k, const float *bias, float *y,
                                                        int64_t ldy, const int MR, const int NR) {
    __m256 acc[3][8];
#pragma GCC unroll 3
    for (int i = 0; i < MR; i++)
#pragma GCC unroll 8
        for (int j = 0; j < NR; j++) acc[i][j] = _mm256_setzero_ps();
    int64_t p = 0;
    for (; p + 8 <= k; p += 8) {
        __m256 xv[3];
#pragma GCC unroll 3
        for (int i = 0; i < MR; i++) xv[i] = _mm256_loadu_ps(x + i * ldx + p);
#pragma GCC unroll 8
        for (int j = 0; j < NR; j++) {
            __m256 wv = _mm256_loadu_ps(w + j * k + p);
#pragma GCC unroll 3
            for (int i = 0; i < MR; i++) acc[i][j] = _mm256_fmadd_ps(xv[i], wv, acc[i][j]);
        }
    }
#pragma GCC unroll 3
    for (int i = 0; i < MR; i++)
#pragma GCC unroll 8
        for (int j = 0; j < NR; j++) {
            float s = hsum(acc[i][j]);
            for (int64_t q = p; q < k; q++) s += x[i * ldx + q] * w[j * k + q];
            y[i * ldy + j] = bias ? s + bias[j] : s;
        }
}

/* Rows [m0, m) of x against w's rows [n0, n1): tiles of 3 (then 2, 1) rows of x by 4 (then 1) of w. */
static void block(const float *x, int64_t ldx, int64_t m, const float *w, int64_t k, const float *bias,
                  float *y, int64_t n, int64_t n0, int64_t n1) {
    int64_t j = n0;
    if (m == 1)
        for (; j + 8 <= n1; j += 8) tile(x, ldx, w + j * k, k, bias ? bias + j : 0, y + j, n, 1, 8);
    for (; j + 4 <= n1; j += 4) {
        const float *wj = w + j * k, *bj = bias ? bias + j : 0;
        int64_t i = 0;
        for (; i + 3 <= m; i += 3) tile(x + i * ldx, ldx, wj, k, bj, y + i * n + j, n, 3, 4);
        if (m - i == 2) tile(x + i * ldx, ldx, wj, k, bj, y + i * n + j, n, 2, 4);
        if (m - i == 1) tile(x + i * ldx, ldx, wj, k, bj, y + i * n + j, n, 1, 4);
    }
    for (; j < n1; j++) {
        const float *wj = w + j * k, *bj = bias ? bias + j : 0;
        for (int64_t i = 0; i < m; i++) tile(x + i * ldx, ldx, wj, k, bj, y + i * n + j, n, 1, 1);
    }
}

void llmctl_linear_f32(const float *x, int64_t ldx, int64_t m, const float *w, int64_t n, int64_t k,
                       const float *bias, float *y) {
    /* Blocks of 16 rows of w (64 B of every row's start share no cache line with another thread's). */
    const int64_t nblocks = (n + 15) / 16;
    /* Small products (under 128 KiB of weights) stay on one thread: waking the team costs more. */
#pragma omp parallel for schedule(static) if (n * k >= (1 << 15))
    for (int64_t b = 0; b < nblocks; b++) {
        int64_t n0 = b * 16, n1 = n0 + 16 < n ? n0 + 16 : n;
        block(x, ldx, m, w, k, bias, y, n, n0, n1);
    }
}

/* --- small ops --- */

static inline float dot(const float *a, const float *b, int64_t n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t p = 0;
    for (; p + 16 <= n; p += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + p), _mm256_loadu_ps(b + p), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + p + 8), _mm256_loadu_ps(b + p + 8), acc1);
    }
    for (; p + 8 <= n; p += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + p), _mm256_loadu_ps(b + p), acc0);
    float s = hsum(_mm256_add_ps(acc0, acc1));
    for (; p < n; p++) s += a[p] * b[p];
    return s;
}

/* y[r] = w * (x[r] * (1 / sqrt(sum(x[r]^2) / dim + eps))): transformers' LlamaRMSNorm in float32.
 * x and y: rows of dim floats at strides ldx and ldy (y may be x). */
void llmctl_rms_norm_f32(const float *x, int64_t ldx, int64_t rows, int64_t dim, const float *w,
                         float eps, float *y, int64_t ldy) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * ldx;
        float *yr = y + r * ldy;
        const float inv = 1.0f / sqrtf(dot(xr, xr, dim) / (float)dim + eps);
        for (int64_t i = 0; i < dim; i++) yr[i] = w[i] * (xr[i] * inv);
    }
}

/* x * cos + rotate_half(x) * sin over one head of d values, with sin's first half already negated
 * (rotate_half(x) = [-x2, x1], so rotate_half(x) * sin = [x2, x1] * [-sin1, sin1] exactly). */
static inline void rope(const float *x, const float *cos, const float *nsin, int64_t d, float *out) {
    const int64_t h = d / 2;
    for (int64_t i = 0; i < h; i++) out[i] = x[i] * cos[i] + x[i + h] * nsin[i];
    for (int64_t i = h; i < d; i++) out[i] = x[i] * cos[i] + x[i - h] * nsin[i];
}

/* One new token per row b of a batch, heads of d values, n_heads query heads sharing n_kv kv heads.
 * qkv: row b at qkv + b * ld_qkv holds q (n_heads * d), k (n_kv * d), v (n_kv * d) (a fused projection).
 * cos, nsin: [batch, d] (nsin: sin with its first half negated). cache_k, cache_v: [batch, n_kv, max_len, d].
 * The new key (rotated) and value go to slot *slot_ptr; the query (rotated) attends to the slots j < kv_len
 * with mask[b * ld_mask + j] != 0. scores: batch * n_heads * kv_len floats of scratch.
 * out: [batch, n_heads * d], each head's softmax(q k^T * scale) v. */
void llmctl_decode_attention_f32(const float *qkv, int64_t ld_qkv, int64_t batch, int64_t n_heads,
                                 int64_t n_kv, int64_t d, const float *cos, const float *nsin,
                                 float *cache_k, float *cache_v, int64_t max_len, const int64_t *slot_ptr,
                                 const uint8_t *mask, int64_t ld_mask, int64_t kv_len, float scale,
                                 float *scores, float *out) {
    const int64_t slot = *slot_ptr, groups = n_heads / n_kv;
    for (int64_t b = 0; b < batch; b++) {
        const float *row = qkv + b * ld_qkv;
        for (int64_t g = 0; g < n_kv; g++) {
            const int64_t at = ((b * n_kv + g) * max_len + slot) * d;
            rope(row + (n_heads + g) * d, cos + b * d, nsin + b * d, d, cache_k + at);
            const float *v = row + (n_heads + n_kv + g) * d;
            for (int64_t i = 0; i < d; i++) cache_v[at + i] = v[i];
        }
    }
    const int64_t work = batch * n_heads * kv_len * d;
#pragma omp parallel for schedule(static) if (work > (1 << 18))
    for (int64_t bh = 0; bh < batch * n_heads; bh++) {
        const int64_t b = bh / n_heads, h = bh % n_heads, g = h / groups;
        float q[512];  /* head_dim <= 512, checked by the caller */
        rope(qkv + b * ld_qkv + h * d, cos + b * d, nsin + b * d, d, q);
        const float *keys = cache_k + (b * n_kv + g) * max_len * d;
        const float *values = cache_v + (b * n_kv + g) * max_len * d;
        const uint8_t *m = mask + b * ld_mask;
        float *s = scores + bh * kv_len, top = -INFINITY;
        for (int64_t j = 0; j < kv_len; j++) {
            s[j] = m[j] ? dot(q, keys + j * d, d) * scale : -INFINITY;
            if (s[j] > top) top = s[j];
        }
        float total = 0.0f;
        for (int64_t j = 0; j < kv_len; j++) {
            s[j] = m[j] ? expf(s[j] - top) : 0.0f;
            total += s[j];
        }
        float *o = out + b * n_heads * d + h * d;
        for (int64_t i = 0; i < d; i++) o[i] = 0.0f;
        for (int64_t j = 0; j < kv_len; j++) {
            if (!m[j]) continue;
            const float p = s[j] / total;
            const float *vj = values + j * d;
            for (int64_t i = 0; i < d; i++) o[i] += p * vj[i];
        }
    }
}
