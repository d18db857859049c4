/* Decode-time paged attention on the CPU, reading K/V in place through the block table.
 *
 * One query token per sequence. Shapes (element strides given where not contiguous):
 *   q        [B, H, D]           row stride q_stride (elements between sequences)
 *   k_cache  [num_blocks, bs, kvH, D]   (v_cache alike)
 *   tables   [B, max_blocks] int64;  context_lens [B] int64 (>= 1)
 *   out      [B, H, D] contiguous
 * Query head h reads kv head h / (H / kvH) (GQA). Scores, softmax and the weighted sum
 * are in float32, two passes over the context: K (scores), V (weighted sums). Tasks are
 * described above DEFINE_KERNEL. Built by model/native.py; no torch headers.
 */
#include <float.h>
#include <omp.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

/* q.k for bf16 rows of D elements (D % 32 == 0) with AVX512-BF16 where the build has it:
 * exact products, float32 sums. Elsewhere the generic loop below does the same work. */
#if defined(__AVX512BF16__)
#include <immintrin.h>
static inline int fast_dot_bf16_ok(int64_t D) { return D % 32 == 0; }
static inline float fast_dot_bf16(const uint16_t *a, const uint16_t *b, int64_t D) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 32)
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(a + d), (__m512bh)_mm512_loadu_si512(b + d));
    return _mm512_reduce_add_ps(acc);
}
#else
static inline int fast_dot_bf16_ok(int64_t D) { (void)D; return 0; }
static inline float fast_dot_bf16(const uint16_t *a, const uint16_t *b, int64_t D) { (void)a; (void)b; (void)D; return 0.f; }
#endif
static inline int fast_dot_f32_ok(int64_t D) { (void)D; return 0; }
static inline float fast_dot_f32(const float *a, const float *b, int64_t D) { (void)a; (void)b; (void)D; return 0.f; }

#define MIN_SPLIT_TOKENS 64 /* a context is split across tasks only into pieces this long */

/* Tasks: (sequence, piece of its context); every task serves all H query heads, reading
 * each K/V row of its piece once, whole (all kv heads: contiguous memory). Few sequences
 * are split into pieces so every thread has work; each piece leaves its max, sum of
 * exponentials and weighted V sum per head in `part`, combined at the end (as
 * flash-decoding does). */
#define DEFINE_KERNEL(NAME, T, LOAD, STORE, FAST_OK, FAST_DOT)                                 \
void NAME(const T *q, int64_t q_stride, const T *k_cache, const T *v_cache,                   \
          const int64_t *tables, int64_t max_blocks, const int64_t *context_lens, T *out,     \
          int64_t B, int64_t H, int64_t kvH, int64_t D, int64_t bs, float scale) {            \
    const int64_t g = H / kvH, row = kvH * D, threads = omp_get_max_threads();                 \
    int64_t longest = 0;                                                                       \
    for (int64_t b = 0; b < B; b++) longest = context_lens[b] > longest ? context_lens[b] : longest; \
    int64_t splits = (2 * threads + B - 1) / B; /* pieces per sequence */                      \
    if (splits > longest / MIN_SPLIT_TOKENS) splits = longest / MIN_SPLIT_TOKENS;             \
    if (splits < 1) splits = 1;                                                                \
    const int64_t stride = H * (D + 2); /* per task: acc [H, D], max [H], sum [H] */          \
    float *part = malloc(sizeof(float) * B * splits * stride);                                 \
    const int fast = FAST_OK(D);                                                               \
    _Pragma("omp parallel for collapse(2) schedule(dynamic, 1)")                               \
    for (int64_t b = 0; b < B; b++) {                                                          \
        for (int64_t sp = 0; sp < splits; sp++) {                                              \
            const int64_t len = context_lens[b], *table = tables + b * max_blocks;             \
            const int64_t per = (len + splits - 1) / splits;                                   \
            const int64_t t0 = sp * per, t1 = t0 + per < len ? t0 + per : len, n = t1 - t0;   \
            float *acc = part + (b * splits + sp) * stride, *max = acc + H * D, *sum = max + H; \
            for (int64_t i = 0; i < H * D; i++) acc[i] = 0.f;                                  \
            for (int64_t i = 0; i < H; i++) { max[i] = -FLT_MAX; sum[i] = 0.f; }               \
            if (n <= 0) continue;                                                              \
            const T *qb = q + b * q_stride;                                                    \
            float *scores = malloc(sizeof(float) * (n * H + H * D)); /* [H, n] */              \
            float *qf = scores + n * H; /* [H, D] */                                           \
            for (int64_t i = 0; i < H * D; i++) qf[i] = LOAD(qb[i]) * scale;                   \
            for (int64_t t = t0; t < t1; t++) { /* K pass: each row read once, whole */        \
                const T *kr = k_cache + (table[t / bs] * bs + t % bs) * row;                   \
                for (int64_t i = 0; i < H; i++) {                                              \
                    const T *kp = kr + (i / g) * D;                                            \
                    float s = 0.f;                                                             \
                    if (fast) s = FAST_DOT(qb + i * D, kp, D) * scale;                         \
                    else for (int64_t d = 0; d < D; d++) s += qf[i * D + d] * LOAD(kp[d]);     \
                    scores[i * n + t - t0] = s;                                                \
                    max[i] = s > max[i] ? s : max[i];                                          \
                }                                                                              \
            }                                                                                  \
            for (int64_t i = 0; i < H; i++)                                                    \
                for (int64_t t = 0; t < n; t++) {                                              \
                    const float e = expf(scores[i * n + t] - max[i]);                          \
                    scores[i * n + t] = e;                                                     \
                    sum[i] += e;                                                               \
                }                                                                              \
            for (int64_t t = t0; t < t1; t++) { /* V pass: weighted sums */                    \
                const T *vr = v_cache + (table[t / bs] * bs + t % bs) * row;                   \
                for (int64_t i = 0; i < H; i++) {                                              \
                    const T *vp = vr + (i / g) * D;                                            \
                    const float p = scores[i * n + t - t0];                                    \
                    float *a = acc + i * D;                                                    \
                    for (int64_t d = 0; d < D; d++) a[d] += p * LOAD(vp[d]);                   \
                }                                                                              \
            }                                                                                  \
            free(scores);                                                                      \
        }                                                                                      \
    }                                                                                          \
    _Pragma("omp parallel for collapse(2) schedule(static)")                                   \
    for (int64_t b = 0; b < B; b++) {                                                          \
        for (int64_t h = 0; h < H; h++) { /* combine the pieces: rescale to the global max */ \
            float m = -FLT_MAX, l = 0.f, o[D];                                                 \
            for (int64_t sp = 0; sp < splits; sp++) {                                          \
                const float pm = part[(b * splits + sp) * stride + H * D + h];                 \
                m = pm > m ? pm : m;                                                           \
            }                                                                                  \
            for (int64_t d = 0; d < D; d++) o[d] = 0.f;                                        \
            for (int64_t sp = 0; sp < splits; sp++) {                                          \
                const float *pt = part + (b * splits + sp) * stride;                           \
                const float w = pt[H * D + H + h] > 0.f ? expf(pt[H * D + h] - m) : 0.f;       \
                l += w * pt[H * D + H + h];                                                    \
                for (int64_t d = 0; d < D; d++) o[d] += w * pt[h * D + d];                     \
            }                                                                                  \
            T *op = out + (b * H + h) * D;                                                     \
            for (int64_t d = 0; d < D; d++) op[d] = STORE(o[d] / l);                           \
        }                                                                                      \
    }                                                                                          \
    free(part);                                                                                \
}

DEFINE_KERNEL(paged_decode_attention_bf16, uint16_t, bf16_load, bf16_store, fast_dot_bf16_ok, fast_dot_bf16)
DEFINE_KERNEL(paged_decode_attention_f32, float, f32_load, f32_store, fast_dot_f32_ok, fast_dot_f32)
