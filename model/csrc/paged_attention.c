/* Decode-time paged attention on the CPU, reading K/V in place through the block table.
 *
 * One query token per sequence. Shapes (element strides given where not contiguous):
 *   q        [B, H, D]           row stride q_stride (elements between sequences)
 *   k_cache  [num_blocks, bs, kvH, D]   (v_cache alike)
 *   tables   [B, max_blocks] int64;  context_lens [B] int64 (>= 1)
 *   out      [B, H, D] contiguous
 * Query head h reads kv head h / (H / kvH) (GQA). Scores, softmax and the weighted sum
 * are in float32. One OpenMP task per sequence (per (sequence, kv head) below
 * MIN_SEQS_FOR_ROW_TASKS sequences, to use every thread) serves all its query heads, so
 * each K/V row is read from memory once per step. Two passes over the context: K
 * (scores), V (weighted sums). Built by model/native.py; no torch headers.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even; inputs are finite */
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

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

#define MIN_SEQS_FOR_ROW_TASKS 4 /* from this batch on, one task per sequence reads whole rows */

#define DEFINE_KERNEL(NAME, T, LOAD, STORE, FAST_OK, FAST_DOT)                                 \
void NAME(const T *q, int64_t q_stride, const T *k_cache, const T *v_cache,                   \
          const int64_t *tables, int64_t max_blocks, const int64_t *context_lens, T *out,     \
          int64_t B, int64_t H, int64_t kvH, int64_t D, int64_t bs, float scale) {            \
    const int64_t kv_per_task = B >= MIN_SEQS_FOR_ROW_TASKS ? kvH : 1;                         \
    const int64_t tasks = kvH / kv_per_task, nh = kv_per_task * (H / kvH), row = kvH * D;     \
    const int fast = FAST_OK(D);                                                               \
    _Pragma("omp parallel for collapse(2) schedule(dynamic, 1)")                               \
    for (int64_t b = 0; b < B; b++) {                                                          \
        for (int64_t task = 0; task < tasks; task++) {                                         \
            /* heads h0 .. h0 + nh - 1 read kv heads kv0 .. kv0 + kv_per_task - 1 */           \
            const int64_t len = context_lens[b], kv0 = task * kv_per_task, h0 = kv0 * (H / kvH); \
            const int64_t g = H / kvH, *table = tables + b * max_blocks;                       \
            const T *qb = q + b * q_stride + h0 * D;                                           \
            float *scores = malloc(sizeof(float) * (len * nh + 2 * nh * D)); /* [nh, len] */   \
            float *qf = scores + len * nh, *acc = qf + nh * D; /* [nh, D] each */              \
            float max[nh], sum[nh];                                                            \
            for (int64_t i = 0; i < nh * D; i++) { qf[i] = LOAD(qb[i]) * scale; acc[i] = 0.f; } \
            for (int64_t i = 0; i < nh; i++) { max[i] = -FLT_MAX; sum[i] = 0.f; }             \
            for (int64_t t = 0, blk = 0; t < len; blk++) { /* K pass: each row read once */    \
                const T *kr = k_cache + table[blk] * bs * row + kv0 * D;                       \
                for (int64_t end = t + bs < len ? t + bs : len; t < end; t++, kr += row) {     \
                    for (int64_t i = 0; i < nh; i++) {                                         \
                        const T *kp = kr + (i / g) * D;                                        \
                        float s = 0.f;                                                         \
                        if (fast) s = FAST_DOT(qb + i * D, kp, D) * scale;                     \
                        else for (int64_t d = 0; d < D; d++) s += qf[i * D + d] * LOAD(kp[d]); \
                        scores[i * len + t] = s;                                               \
                        max[i] = s > max[i] ? s : max[i];                                      \
                    }                                                                          \
                }                                                                              \
            }                                                                                  \
            for (int64_t i = 0; i < nh; i++)                                                   \
                for (int64_t t = 0; t < len; t++) {                                            \
                    const float e = expf(scores[i * len + t] - max[i]);                        \
                    scores[i * len + t] = e;                                                   \
                    sum[i] += e;                                                               \
                }                                                                              \
            for (int64_t t = 0, blk = 0; t < len; blk++) { /* V pass: weighted sums */         \
                const T *vr = v_cache + table[blk] * bs * row + kv0 * D;                       \
                for (int64_t end = t + bs < len ? t + bs : len; t < end; t++, vr += row) {     \
                    for (int64_t i = 0; i < nh; i++) {                                         \
                        const T *vp = vr + (i / g) * D;                                        \
                        const float p = scores[i * len + t];                                   \
                        float *a = acc + i * D;                                                \
                        for (int64_t d = 0; d < D; d++) a[d] += p * LOAD(vp[d]);               \
                    }                                                                          \
                }                                                                              \
            }                                                                                  \
            for (int64_t i = 0; i < nh; i++) {                                                 \
                T *op = out + (b * H + h0 + i) * D;                                            \
                for (int64_t d = 0; d < D; d++) op[d] = STORE(acc[i * D + d] / sum[i]);        \
            }                                                                                  \
            free(scores);                                                                      \
        }                                                                                      \
    }                                                                                          \
}

#define LOAD_F32(x) (x)
#define STORE_F32(x) (x)
DEFINE_KERNEL(paged_decode_attention_bf16, uint16_t, bf16_to_f32, f32_to_bf16, fast_dot_bf16_ok, fast_dot_bf16)
DEFINE_KERNEL(paged_decode_attention_f32, float, LOAD_F32, STORE_F32, fast_dot_f32_ok, fast_dot_f32)
