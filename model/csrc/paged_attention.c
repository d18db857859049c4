/* Decode-time paged attention on the CPU, reading K/V in place through the block table.
 *
 * One query token per sequence. Shapes (element strides given where not contiguous):
 *   q        [B, H, D]           row stride q_stride (elements between sequences)
 *   k_cache  [num_blocks, bs, kvH, D]   (v_cache alike)
 *   tables   [B, max_blocks] int64;  context_lens [B] int64 (>= 1)
 *   out      [B, H, D] contiguous
 * Query head h reads kv head h / (H / kvH) (GQA). Scores, softmax and the weighted sum
 * are in float32; one OpenMP task per (sequence, query head), two passes over the context
 * (K: scores; V: weighted sum). The query heads sharing a kv head re-read its rows, mostly
 * from cache: serving them together in one task measured slower (the inner loops stop
 * vectorizing). Built by model/native.py; no torch headers.
 */
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

#define DEFINE_KERNEL(NAME, T, LOAD, STORE, FAST_OK, FAST_DOT)                                                    \
void NAME(const T *q, int64_t q_stride, const T *k_cache, const T *v_cache,                   \
          const int64_t *tables, int64_t max_blocks, const int64_t *context_lens, T *out,     \
          int64_t B, int64_t H, int64_t kvH, int64_t D, int64_t bs, float scale) {            \
    const int64_t group = H / kvH;                                                             \
    _Pragma("omp parallel for collapse(2) schedule(dynamic, 1)")                               \
    for (int64_t b = 0; b < B; b++) {                                                          \
        for (int64_t h = 0; h < H; h++) {                                                      \
            const int64_t len = context_lens[b], kvh = h / group;                              \
            const int64_t *table = tables + b * max_blocks;                                    \
            float *scores = malloc(sizeof(float) * len);                                       \
            float qf[D], acc[D];                                                               \
            const T *qp = q + b * q_stride + h * D;                                            \
            for (int64_t d = 0; d < D; d++) { qf[d] = LOAD(qp[d]) * scale; acc[d] = 0.f; }     \
            float max = -INFINITY;                                                             \
            const int fast = FAST_OK(D);                                                       \
            for (int64_t t = 0, blk = 0; t < len; blk++) { /* K pass: scores */                \
                const T *kp = k_cache + (table[blk] * bs * kvH + kvh) * D;                     \
                for (int64_t end = t + bs < len ? t + bs : len; t < end; t++, kp += kvH * D) { \
                    float s = 0.f;                                                             \
                    if (fast) s = FAST_DOT(qp, kp, D) * scale;                                 \
                    else for (int64_t d = 0; d < D; d++) s += qf[d] * LOAD(kp[d]);             \
                    scores[t] = s;                                                             \
                    max = s > max ? s : max;                                                   \
                }                                                                              \
            }                                                                                  \
            float sum = 0.f;                                                                   \
            for (int64_t t = 0; t < len; t++) { scores[t] = expf(scores[t] - max); sum += scores[t]; } \
            for (int64_t t = 0, blk = 0; t < len; blk++) { /* V pass: weighted sum */          \
                const T *vp = v_cache + (table[blk] * bs * kvH + kvh) * D;                     \
                for (int64_t end = t + bs < len ? t + bs : len; t < end; t++, vp += kvH * D) { \
                    const float p = scores[t];                                                 \
                    for (int64_t d = 0; d < D; d++) acc[d] += p * LOAD(vp[d]);                 \
                }                                                                              \
            }                                                                                  \
            T *op = out + (b * H + h) * D;                                                     \
            for (int64_t d = 0; d < D; d++) op[d] = STORE(acc[d] / sum);                       \
            free(scores);                                                                      \
        }                                                                                      \
    }                                                                                          \
}

#define LOAD_F32(x) (x)
#define STORE_F32(x) (x)
DEFINE_KERNEL(paged_decode_attention_bf16, uint16_t, bf16_to_f32, f32_to_bf16, fast_dot_bf16_ok, fast_dot_bf16)
DEFINE_KERNEL(paged_decode_attention_f32, float, LOAD_F32, STORE_F32, fast_dot_f32_ok, fast_dot_f32)
