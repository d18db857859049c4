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
#include "hadamard.h"

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

/* Combine each (sequence, head)'s pieces into out [B, H, D]: rescale to the global max, then
 * (rotated: an int8 pool of Hadamard rows) rotate the result back, H o.
 * part: per (sequence, piece) acc [H, D], max [H], sum [H]. */
#define DEFINE_COMBINE(NAME, T, STORE)                                                         \
static void NAME(const float *part, int64_t splits, T *out, int64_t B, int64_t H, int64_t D, \
                 int64_t rotated) {                                                            \
    const int64_t stride = H * (D + 2);                                                        \
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
            for (int64_t d = 0; d < D; d++) o[d] /= l;                                         \
            if (rotated) hadamard_rotate(o, D);                                                \
            for (int64_t d = 0; d < D; d++) op[d] = STORE(o[d]);                               \
        }                                                                                      \
    }                                                                                          \
}

DEFINE_COMBINE(combine_bf16, uint16_t, bf16_store)
DEFINE_COMBINE(combine_f32, float, f32_store)

#define MIN_SPLIT_TOKENS 64 /* a context is split across tasks only into pieces this long */

/* Pieces per sequence: enough tasks for two per thread (a sequence's kv heads are
 * `tasks_per_piece` tasks already), never pieces shorter than MIN_SPLIT_TOKENS. */
static int64_t pieces_per_sequence(const int64_t *context_lens, int64_t B, int64_t tasks_per_piece) {
    int64_t longest = 0;
    for (int64_t b = 0; b < B; b++) longest = context_lens[b] > longest ? context_lens[b] : longest;
    const int64_t per_seq = B * tasks_per_piece;
    int64_t splits = (2 * omp_get_max_threads() + per_seq - 1) / per_seq;
    if (splits > longest / MIN_SPLIT_TOKENS) splits = longest / MIN_SPLIT_TOKENS;
    return splits < 1 ? 1 : splits;
}

/* Tasks: (sequence, piece of its context); every task serves all H query heads, reading
 * each K/V row of its piece once, whole (all kv heads: contiguous memory). Few sequences
 * are split into pieces so every thread has work; each piece leaves its max, sum of
 * exponentials and weighted V sum per head in `part`, combined at the end (as
 * flash-decoding does). */
#define DEFINE_KERNEL(NAME, T, LOAD, STORE, FAST_OK, FAST_DOT, COMBINE)                               \
void NAME(const T *q, int64_t q_stride, const T *k_cache, const T *v_cache,                   \
          const int64_t *tables, int64_t max_blocks, const int64_t *context_lens, T *out,     \
          int64_t B, int64_t H, int64_t kvH, int64_t D, int64_t bs, float scale) {            \
    const int64_t g = H / kvH, row = kvH * D;                                                  \
    const int64_t splits = pieces_per_sequence(context_lens, B, 1);                            \
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
    COMBINE(part, splits, out, B, H, D, 0);                                                    \
    free(part);                                                                                \
}

static DEFINE_KERNEL(generic_attention_bf16, uint16_t, bf16_load, bf16_store, fast_dot_bf16_ok, fast_dot_bf16, combine_bf16)
DEFINE_KERNEL(paged_decode_attention_f32, float, f32_load, f32_store, fast_dot_f32_ok, fast_dot_f32, combine_f32)

/* scores [g, n] -> exp(scores - max[i]) in place, sum[i] = their row sums (the fast tasks' softmax). */
static inline void exp_scores(float *scores, const float *max, float *sum, int64_t g, int64_t n) {
    for (int64_t i = 0; i < g; i++) {
        float l = 0.f;
        for (int64_t t = 0; t < n; t++) {
            const float e = expf(scores[i * n + t] - max[i]);
            scores[i * n + t] = e;
            l += e;
        }
        sum[i] = l;
    }
}

#if defined(__AVX512BF16__)
/* The bf16 fast path (AVX512-BF16, D = 64 or 128, H / kvH <= FAST_MAX_GROUP; other builds:
 * the plain-C tasks below, any D % 8 == 0 up to FAST_MAX_D): tasks are
 * (sequence, piece, kv head), so the g query heads that share a kv head read each K/V row
 * together; q.k with exact bf16 products; V rows widened once per row and summed into
 * float32 accumulators held in registers (heads in chunks of 256 / D). */
#define FAST_MAX_GROUP 8
/* Rows are prefetched this many tokens ahead (blocks of a sequence need not be adjacent, so
 * the hardware prefetcher loses the stream at each block edge): ~10% at 4k context here. */
#define PREFETCH_TOKENS 16

static inline void prefetch_row(const uint16_t *row, int64_t D) { /* D bf16 = D * 2 bytes */
    for (int64_t c = 0; c < D * 2; c += 64) _mm_prefetch((const char *)row + c, _MM_HINT_T0);
}

static inline __m512 widen_bf16(const uint16_t *p) { /* 16 bf16 -> 16 float32 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* acc[h][:] += sum_t p[h][t] * v[t][:] for HN heads of D (compile-time) elements. */
#define DEFINE_V_PASS(NAME, D, HN)                                                             \
static inline void NAME(const uint16_t *v_cache, const int64_t *table, int64_t t0, int64_t n,  \
                        int64_t bs, int64_t row, const float *p, int64_t p_stride, float *acc, \
                        int64_t acc_stride) {                                                  \
    __m512 o[HN][D / 16];                                                                      \
    for (int h = 0; h < HN; h++)                                                               \
        for (int c = 0; c < D / 16; c++) o[h][c] = _mm512_setzero_ps();                        \
    for (int64_t t = 0; t < n; t++) {                                                          \
        const int64_t tok = t0 + t;                                                            \
        const uint16_t *vr = v_cache + (table[tok / bs] * bs + tok % bs) * row;                \
        if (t + PREFETCH_TOKENS < n) {                                                         \
            const int64_t ft = tok + PREFETCH_TOKENS;                                          \
            prefetch_row(v_cache + (table[ft / bs] * bs + ft % bs) * row, D);                  \
        }                                                                                      \
        __m512 v[D / 16];                                                                      \
        for (int c = 0; c < D / 16; c++) v[c] = widen_bf16(vr + 16 * c);                       \
        for (int h = 0; h < HN; h++) {                                                         \
            const __m512 ph = _mm512_set1_ps(p[h * p_stride + t]);                             \
            for (int c = 0; c < D / 16; c++) o[h][c] = _mm512_fmadd_ps(ph, v[c], o[h][c]);     \
        }                                                                                      \
    }                                                                                          \
    for (int h = 0; h < HN; h++)                                                               \
        for (int c = 0; c < D / 16; c++) _mm512_storeu_ps(acc + h * acc_stride + 16 * c, o[h][c]); \
}
DEFINE_V_PASS(v_pass_64_1, 64, 1)
DEFINE_V_PASS(v_pass_64_2, 64, 2)
DEFINE_V_PASS(v_pass_64_3, 64, 3)
DEFINE_V_PASS(v_pass_64_4, 64, 4)
DEFINE_V_PASS(v_pass_128_1, 128, 1)
DEFINE_V_PASS(v_pass_128_2, 128, 2)

/* V pass for heads [0, g): chunks of at most 256 / D heads. vr: the kv head's V base. */
static void v_pass(const uint16_t *vr, const int64_t *table, int64_t t0, int64_t n, int64_t bs, int64_t row,
                   int64_t D, int64_t g, const float *p, int64_t p_stride, float *acc) {
    const int64_t chunk = D == 64 ? 4 : 2;
    for (int64_t h = 0; h < g; h += chunk) {
        const int64_t hn = g - h < chunk ? g - h : chunk;
        const float *ph = p + h * p_stride;
        float *ah = acc + h * D;
        if (D == 64) {
            if (hn == 4) v_pass_64_4(vr, table, t0, n, bs, row, ph, p_stride, ah, D);
            else if (hn == 3) v_pass_64_3(vr, table, t0, n, bs, row, ph, p_stride, ah, D);
            else if (hn == 2) v_pass_64_2(vr, table, t0, n, bs, row, ph, p_stride, ah, D);
            else v_pass_64_1(vr, table, t0, n, bs, row, ph, p_stride, ah, D);
        } else if (hn == 2) v_pass_128_2(vr, table, t0, n, bs, row, ph, p_stride, ah, D);
        else v_pass_128_1(vr, table, t0, n, bs, row, ph, p_stride, ah, D);
    }
}

/* One task: kv head j of sequence piece [t0, t0 + n); scores [g, n] scratch. Leaves acc
 * [g, D] (strided by D within the piece's [H, D]), max and sum of its g heads. */
static void fast_task(const uint16_t *qb, const uint16_t *k_cache, const uint16_t *v_cache, const int64_t *table,
                      int64_t t0, int64_t n, int64_t j, int64_t g, int64_t row, int64_t D, int64_t bs, float scale,
                      float *scores, float *acc, float *max, float *sum) {
    __m512bh qv[FAST_MAX_GROUP][4];
    for (int64_t i = 0; i < g; i++)
        for (int64_t c = 0; c < D / 32; c++) qv[i][c] = (__m512bh)_mm512_loadu_si512(qb + (j * g + i) * D + 32 * c);
    for (int64_t i = 0; i < g; i++) max[i] = -FLT_MAX;
    for (int64_t t = 0; t < n; t++) { /* K pass: each row read once for the g heads */
        const int64_t tok = t0 + t;
        const uint16_t *kr = k_cache + (table[tok / bs] * bs + tok % bs) * row + j * D;
        if (t + PREFETCH_TOKENS < n) {
            const int64_t ft = tok + PREFETCH_TOKENS;
            prefetch_row(k_cache + (table[ft / bs] * bs + ft % bs) * row + j * D, D);
        }
        __m512bh k[4];
        for (int64_t c = 0; c < D / 32; c++) k[c] = (__m512bh)_mm512_loadu_si512(kr + 32 * c);
        for (int64_t i = 0; i < g; i++) {
            __m512 a = _mm512_setzero_ps();
            for (int64_t c = 0; c < D / 32; c++) a = _mm512_dpbf16_ps(a, qv[i][c], k[c]);
            const float s = _mm512_reduce_add_ps(a) * scale;
            scores[i * n + t] = s;
            max[i] = s > max[i] ? s : max[i];
        }
    }
    exp_scores(scores, max, sum, g, n);
    v_pass(v_cache + j * D, table, t0, n, bs, row, D, g, scores, n, acc);
}

static int fast_attention_ok(int64_t H, int64_t kvH, int64_t D) {
    return (D == 64 || D == 128) && H % kvH == 0 && H / kvH <= FAST_MAX_GROUP;
}
#else
/* The same tasks in plain C for the other variants (AVX2 + FMA, x86-64 baseline, armv8-a):
 * each K/V row is widened to float32 once into a buffer and serves the g query heads of its
 * kv head; the compiler vectorizes the dot products and the V sums for the variant's ISA
 * (-ffast-math lets it reorder the sums). q.k is exact bf16 products summed in float32, then
 * scaled, as on AVX512-BF16. D a multiple of 8 up to FAST_MAX_D. */
#define FAST_MAX_GROUP 8
#define FAST_MAX_D 256
#define PREFETCH_TOKENS 16 /* as above: the next rows of a block table are not adjacent */

static inline void widen_row(const uint16_t *restrict p, float *restrict out, int64_t D) {
    for (int64_t d = 0; d < D; d++) out[d] = bf16_load(p[d]);
}

static inline void prefetch_row(const uint16_t *row, int64_t D) { /* D bf16 = D * 2 bytes */
    for (int64_t c = 0; c < D * 2; c += 64) __builtin_prefetch((const char *)row + c);
}

static inline float dot_f32(const float *restrict a, const float *restrict b, int64_t D) {
    float s = 0.f;
    for (int64_t d = 0; d < D; d++) s += a[d] * b[d];
    return s;
}

static void fast_task(const uint16_t *qb, const uint16_t *k_cache, const uint16_t *v_cache, const int64_t *table,
                      int64_t t0, int64_t n, int64_t j, int64_t g, int64_t row, int64_t D, int64_t bs, float scale,
                      float *scores, float *acc, float *max, float *sum) {
    float qf[FAST_MAX_GROUP * FAST_MAX_D], r[FAST_MAX_D];
    for (int64_t i = 0; i < g; i++) widen_row(qb + (j * g + i) * D, qf + i * D, D);
    for (int64_t i = 0; i < g; i++) max[i] = -FLT_MAX;
    for (int64_t t = 0; t < n; t++) { /* K pass: each row widened once for the g heads */
        const int64_t tok = t0 + t;
        if (t + PREFETCH_TOKENS < n) {
            const int64_t ft = tok + PREFETCH_TOKENS;
            prefetch_row(k_cache + (table[ft / bs] * bs + ft % bs) * row + j * D, D);
        }
        widen_row(k_cache + (table[tok / bs] * bs + tok % bs) * row + j * D, r, D);
        for (int64_t i = 0; i < g; i++) {
            const float s = dot_f32(qf + i * D, r, D) * scale;
            scores[i * n + t] = s;
            max[i] = s > max[i] ? s : max[i];
        }
    }
    exp_scores(scores, max, sum, g, n);
    for (int64_t i = 0; i < g * D; i++) acc[i] = 0.f;
    for (int64_t t = 0; t < n; t++) { /* V pass: acc[i][:] += p[i][t] * v[t][:] */
        const int64_t tok = t0 + t;
        if (t + PREFETCH_TOKENS < n) {
            const int64_t ft = tok + PREFETCH_TOKENS;
            prefetch_row(v_cache + (table[ft / bs] * bs + ft % bs) * row + j * D, D);
        }
        widen_row(v_cache + (table[tok / bs] * bs + tok % bs) * row + j * D, r, D);
        for (int64_t i = 0; i < g; i++) {
            const float p = scores[i * n + t];
            float *restrict a = acc + i * D;
            for (int64_t d = 0; d < D; d++) a[d] += p * r[d];
        }
    }
}

static int fast_attention_ok(int64_t H, int64_t kvH, int64_t D) {
    return D % 8 == 0 && D <= FAST_MAX_D && H % kvH == 0 && H / kvH <= FAST_MAX_GROUP;
}
#endif

/* Tasks (sequence, piece, kv head) of `fast_task` (either build), combined per sequence. */

static void fast_attention_bf16(const uint16_t *q, int64_t q_stride, const uint16_t *k_cache, const uint16_t *v_cache,
                                const int64_t *tables, int64_t max_blocks, const int64_t *context_lens, uint16_t *out,
                                int64_t B, int64_t H, int64_t kvH, int64_t D, int64_t bs, float scale) {
    const int64_t g = H / kvH, row = kvH * D, splits = pieces_per_sequence(context_lens, B, kvH);
    const int64_t stride = H * (D + 2); /* per piece: acc [H, D], max [H], sum [H] */
    float *part = malloc(sizeof(float) * B * splits * stride);
    _Pragma("omp parallel for collapse(3) schedule(dynamic, 1)")
    for (int64_t b = 0; b < B; b++) {
        for (int64_t sp = 0; sp < splits; sp++) {
            for (int64_t j = 0; j < kvH; j++) {
                const int64_t len = context_lens[b], per = (len + splits - 1) / splits;
                const int64_t t0 = sp * per, t1 = t0 + per < len ? t0 + per : len, n = t1 - t0;
                float *acc = part + (b * splits + sp) * stride, *max = acc + H * D + j * g, *sum = max + H;
                if (n <= 0) { /* an empty piece: weight 0 in the combine, whose sums must stay finite */
                    for (int64_t i = 0; i < g; i++) { max[i] = -FLT_MAX; sum[i] = 0.f; }
                    for (int64_t i = 0; i < g * D; i++) acc[j * g * D + i] = 0.f;
                    continue;
                }
                float *scores = malloc(sizeof(float) * g * n);
                fast_task(q + b * q_stride, k_cache, v_cache, tables + b * max_blocks, t0, n, j, g, row, D, bs,
                          scale, scores, acc + j * g * D, max, sum);
                free(scores);
            }
        }
    }
    combine_bf16(part, splits, out, B, H, D, 0);
    free(part);
}

void paged_decode_attention_bf16(const uint16_t *q, int64_t q_stride, const uint16_t *k_cache,
                                 const uint16_t *v_cache, const int64_t *tables, int64_t max_blocks,
                                 const int64_t *context_lens, uint16_t *out, int64_t B, int64_t H, int64_t kvH,
                                 int64_t D, int64_t bs, float scale) {
    if (fast_attention_ok(H, kvH, D)) {
        fast_attention_bf16(q, q_stride, k_cache, v_cache, tables, max_blocks, context_lens, out, B, H, kvH, D, bs,
                            scale);
        return;
    }
    generic_attention_bf16(q, q_stride, k_cache, v_cache, tables, max_blocks, context_lens, out, B, H, kvH, D, bs,
                           scale);
}

/* int8 K/V pools (model/kv_quant.py's rows: D codes then a bf16 scale per (token, kv head);
 * a token's row is kvH * (D + 2) bytes), read in place: intrinsics on AVX-512 and on AVX2 +
 * FMA (int8_task_fast), plain C elsewhere (the compiler vectorizes the widening dot products
 * and V sums for the variant's ISA). Tasks
 * (sequence, piece, kv head) as fast_task's: the g query heads of a kv head share each row;
 * score = (scale * q) . codes * k_scale, acc += (p * v_scale) * codes, in float32. Rows of
 * format 2 (rotated: H x, H the Hadamard matrix) are read with a rotated query, H q, and the
 * combined output rotated back; the tasks are the same. */
/* kv head j's row of a sequence's token `tok`: the pool slot through the block table, row =
 * kvH * w bytes per slot, w = D + 2 per head. */
static inline const int8_t *int8_row(const int8_t *cache, const int64_t *table, int64_t tok, int64_t bs,
                                     int64_t row, int64_t j, int64_t w) {
    return cache + (table[tok / bs] * bs + tok % bs) * row + j * w;
}

static inline float int8_scale(const int8_t *r, int64_t D) {
    uint16_t s;
    memcpy(&s, r + D, 2);
    return bf16_load(s);
}

static inline void prefetch_int8(const int8_t *r, int64_t D) { /* D + 2 bytes: one or two lines */
    __builtin_prefetch(r);
    __builtin_prefetch(r + D + 1);
}

static inline float dot_int8(const float *restrict q, const int8_t *restrict k, int64_t D) {
    float s = 0.f;
    for (int64_t d = 0; d < D; d++) s += q[d] * (float)k[d];
    return s;
}

#if defined(__AVX512F__)
#include <immintrin.h>
#define INT8_FAST_MAX_D 128
#define INT8_FAST_MAX_GROUP 8
/* 16 int8 codes -> 16 float32 */
static inline __m512 widen_int8(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

/* int8_task with AVX-512 (D % 16 == 0, D <= 128, g <= 8): each row widened once into
 * registers for the g heads, V sums in acc (L1-resident). */
static void int8_task_avx512(const float *qf, const int8_t *k_cache, const int8_t *v_cache, const int64_t *table,
                             int64_t t0, int64_t n, int64_t j, int64_t g, int64_t row, int64_t D, int64_t bs,
                             float *scores, float *acc, float *max, float *sum) {
    const int64_t w = D + 2, chunks = D / 16;
    __m512 qv[INT8_FAST_MAX_GROUP][INT8_FAST_MAX_D / 16], r[INT8_FAST_MAX_D / 16];
    for (int64_t i = 0; i < g; i++)
        for (int64_t c = 0; c < chunks; c++) qv[i][c] = _mm512_loadu_ps(qf + i * D + 16 * c);
    for (int64_t i = 0; i < g; i++) max[i] = -FLT_MAX;
    for (int64_t t = 0; t < n; t++) { /* K pass */
        const int64_t tok = t0 + t;
        if (t + PREFETCH_TOKENS < n) {
            const int64_t ft = tok + PREFETCH_TOKENS;
            prefetch_int8(int8_row(k_cache, table, ft, bs, row, j, w), D);
        }
        const int8_t *kr = int8_row(k_cache, table, tok, bs, row, j, w);
        const float ks = int8_scale(kr, D);
        for (int64_t c = 0; c < chunks; c++) r[c] = widen_int8(kr + 16 * c);
        for (int64_t i = 0; i < g; i++) {
            __m512 a = _mm512_mul_ps(qv[i][0], r[0]);
            for (int64_t c = 1; c < chunks; c++) a = _mm512_fmadd_ps(qv[i][c], r[c], a);
            const float s = _mm512_reduce_add_ps(a) * ks;
            scores[i * n + t] = s;
            max[i] = s > max[i] ? s : max[i];
        }
    }
    exp_scores(scores, max, sum, g, n);
    __m512 o[INT8_FAST_MAX_GROUP][INT8_FAST_MAX_D / 16];
    for (int64_t i = 0; i < g; i++)
        for (int64_t c = 0; c < chunks; c++) o[i][c] = _mm512_setzero_ps();
    for (int64_t t = 0; t < n; t++) { /* V pass */
        const int64_t tok = t0 + t;
        if (t + PREFETCH_TOKENS < n) {
            const int64_t ft = tok + PREFETCH_TOKENS;
            prefetch_int8(int8_row(v_cache, table, ft, bs, row, j, w), D);
        }
        const int8_t *vr = int8_row(v_cache, table, tok, bs, row, j, w);
        const float vs = int8_scale(vr, D);
        for (int64_t c = 0; c < chunks; c++) r[c] = widen_int8(vr + 16 * c);
        for (int64_t i = 0; i < g; i++) {
            const __m512 p = _mm512_set1_ps(scores[i * n + t] * vs);
            for (int64_t c = 0; c < chunks; c++) o[i][c] = _mm512_fmadd_ps(p, r[c], o[i][c]);
        }
    }
    for (int64_t i = 0; i < g; i++)
        for (int64_t c = 0; c < chunks; c++) _mm512_storeu_ps(acc + i * D + 16 * c, o[i][c]);
}
static inline int int8_fast_ok(int64_t D, int64_t g) {
    return D % 16 == 0 && D <= INT8_FAST_MAX_D && g <= INT8_FAST_MAX_GROUP;
}
#define int8_task_fast int8_task_avx512
#elif defined(__AVX2__) && defined(__FMA__)
#define ROWS_AVX2 1 /* int8 pools take rows_task_avx2 (below) */
#endif

#if defined(ROWS_AVX2) || defined(__AVX512F__)
/* The AVX2 + FMA tasks (rows_task_avx2) read a pool in one of two row formats, a compile-time
 * FMT: ROW_INT8 (D codes + a bf16 scale, as above) or ROW_BF16 (D bf16, scale 1). bf16 pools
 * under float32 queries take them in every build with AVX2 (x86-64-v3 and v4). A float32 pool
 * keeps the generic kernel: its tasks stream whole rows (all kv heads), which measured faster
 * at 4-8k tokens than these per-kv-head tasks (memory-bound at 46 KB a token). */
#include <immintrin.h>
enum { ROW_INT8, ROW_BF16 };
#define ROWS_MAX_D 128
#define ROWS_MAX_GROUP 8
#define ROWS_K_TOKENS 4   /* K pass: tokens whose q.k sums are reduced together (one hsum4) */
#define ROWS_V_TOKENS 16  /* V pass: tokens whose rows stay in L1 across the column groups */
/* Bytes of one kv head's row. */
static inline int64_t head_bytes(int64_t D, const int FMT) { return FMT == ROW_INT8 ? D + 2 : 2 * D; }
/* A sequence's pool slots token by token: one division where a task starts, none per row. */
typedef struct { const int64_t *table; int64_t bs, blk, off; } slot_cursor;
static inline slot_cursor slot_at(const int64_t *table, int64_t bs, int64_t tok) {
    return (slot_cursor){table, bs, tok / bs, tok % bs};
}
static inline void slot_next(slot_cursor *c) {
    if (++c->off == c->bs) { c->off = 0; c->blk++; }
}
/* kv head j's row (w bytes) of the cursor's token, row = bytes per pool slot (all kv heads);
 * only read for tokens inside the sequence (the table ends there). */
static inline const uint8_t *head_row(const uint8_t *cache, const slot_cursor *c, int64_t row, int64_t j, int64_t w) {
    return cache + (c->table[c->blk] * c->bs + c->off) * row + j * w;
}
/* Elements e .. e + 7 of a row -> 8 float32 */
static inline __m256 widen8_row(const uint8_t *r, int64_t e, const int FMT) {
    if (FMT == ROW_INT8) return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(r + e))));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(r + 2 * e))), 16));
}
static inline float row_scale(const uint8_t *r, int64_t D, const int FMT) {
    return FMT == ROW_INT8 ? int8_scale((const int8_t *)r, D) : 1.f;
}
static inline void prefetch_head_row(const uint8_t *r, int64_t w) { /* w bytes: one to four lines */
    for (int64_t c = 0; c < w; c += 64) __builtin_prefetch(r + c);
    __builtin_prefetch(r + w - 1);
}
/* [sum(a0), sum(a1), sum(a2), sum(a3)] */
static inline __m128 hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
static inline float hsum8(__m256 a) { return _mm_cvtss_f32(hsum4(a, a, a, a)); }

/* V pass for G query heads, CW column chunks (8 floats) at a time: the G x CW accumulators
 * live in registers (G * CW <= 12 of the 16 ymm) while ROWS_V_TOKENS rows go by, then go back
 * to acc [G, D]; the next column group re-reads those rows from L1. G, CW and FMT are constants
 * after inlining (rows_v_pass dispatches). p = softmax weight * the row's scale. */
static inline __attribute__((always_inline)) void rows_v_pass_g(
        const uint8_t *v_cache, const int64_t *table, int64_t t0, int64_t n, int64_t j, int64_t row, int64_t D,
        int64_t bs, const float *scores, float *acc, const int G, const int CW, const int FMT) {
    const int64_t w = head_bytes(D, FMT), chunks = D / 8;
    for (int64_t i = 0; i < G * D; i++) acc[i] = 0.f;
    slot_cursor at = slot_at(table, bs, t0), ahead = slot_at(table, bs, t0 + PREFETCH_TOKENS);
    for (int64_t tb = 0; tb < n; tb += ROWS_V_TOKENS) {
        const int64_t nb = n - tb < ROWS_V_TOKENS ? n - tb : ROWS_V_TOKENS;
        const uint8_t *vr[ROWS_V_TOKENS];
        float p[ROWS_V_TOKENS][ROWS_MAX_GROUP];
        for (int64_t u = 0; u < nb; u++, slot_next(&at), slot_next(&ahead)) {
            if (tb + u + PREFETCH_TOKENS < n) prefetch_head_row(head_row(v_cache, &ahead, row, j, w), w);
            vr[u] = head_row(v_cache, &at, row, j, w);
            const float vs = row_scale(vr[u], D, FMT);
            for (int i = 0; i < G; i++) p[u][i] = scores[i * n + tb + u] * vs;
        }
        for (int64_t c0 = 0; c0 < chunks; c0 += CW) {
            __m256 o[ROWS_MAX_GROUP][4];
            for (int i = 0; i < G; i++)
                for (int c = 0; c < CW; c++) o[i][c] = _mm256_loadu_ps(acc + i * D + 8 * (c0 + c));
            for (int64_t u = 0; u < nb; u++)
                for (int c = 0; c < CW; c++) {
                    const __m256 r = widen8_row(vr[u], 8 * (c0 + c), FMT);
                    for (int i = 0; i < G; i++) o[i][c] = _mm256_fmadd_ps(_mm256_set1_ps(p[u][i]), r, o[i][c]);
                }
            for (int i = 0; i < G; i++)
                for (int c = 0; c < CW; c++) _mm256_storeu_ps(acc + i * D + 8 * (c0 + c), o[i][c]);
        }
    }
}

/* Column chunks per group: the widest of 4 / 2 / 1 that fits G * CW <= 12 and divides D / 8. */
static inline int rows_v_columns(int64_t g, int64_t D) {
    const int64_t chunks = D / 8;
    for (int cw = 4; cw > 1; cw /= 2)
        if (g * cw <= 12 && chunks % cw == 0) return cw;
    return 1;
}

#define ROWS_V_CASE(G)                                                                                    \
    case G:                                                                                               \
        if (cw == 4) rows_v_pass_g(v_cache, table, t0, n, j, row, D, bs, scores, acc, G, 4, FMT);        \
        else if (cw == 2) rows_v_pass_g(v_cache, table, t0, n, j, row, D, bs, scores, acc, G, 2, FMT);   \
        else rows_v_pass_g(v_cache, table, t0, n, j, row, D, bs, scores, acc, G, 1, FMT);                \
        break;
static inline __attribute__((always_inline)) void rows_v_pass(
        const uint8_t *v_cache, const int64_t *table, int64_t t0, int64_t n, int64_t j, int64_t g, int64_t row,
        int64_t D, int64_t bs, const float *scores, float *acc, const int FMT) {
    const int cw = rows_v_columns(g, D);
    switch (g) {
        ROWS_V_CASE(1) ROWS_V_CASE(2) ROWS_V_CASE(3) ROWS_V_CASE(4)
        ROWS_V_CASE(5) ROWS_V_CASE(6) ROWS_V_CASE(7) ROWS_V_CASE(8)
    }
}

/* K pass over ROWS_K_TOKENS rows kr (their scales ks; nk <= 4 of them real, the rest copies of
 * the first) for HG (1..3) query heads qf [HG, D]: each row chunk is widened once in a register
 * and serves the HG heads, whose HG x 4 sums stay in registers (no row is stored widened);
 * then one hadd tree per head gives its 4 scores. Writes scores[i * n + t + u], u < nk, and
 * raises the heads' running maxima mx. */
static inline __attribute__((always_inline)) void rows_k_tokens(
        const uint8_t *const *kr, const float *ks, int64_t nk, const float *qf, int64_t D, float *scores, int64_t n,
        int64_t t, __m128 *mx, const int HG, const int FMT) {
    __m256 a[3][ROWS_K_TOKENS];
    for (int i = 0; i < HG; i++)
        for (int u = 0; u < ROWS_K_TOKENS; u++) a[i][u] = _mm256_setzero_ps();
    for (int64_t e = 0; e < D; e += 8)
        for (int u = 0; u < ROWS_K_TOKENS; u++) {
            const __m256 r = widen8_row(kr[u], e, FMT);
            for (int i = 0; i < HG; i++) a[i][u] = _mm256_fmadd_ps(_mm256_loadu_ps(qf + i * D + e), r, a[i][u]);
        }
    for (int i = 0; i < HG; i++) {
        __m128 s4 = hsum4(a[i][0], a[i][1], a[i][2], a[i][3]);
        if (FMT == ROW_INT8) s4 = _mm_mul_ps(s4, _mm_setr_ps(ks[0], ks[1], ks[2], ks[3]));
        float *si = scores + i * n + t;
        if (nk == ROWS_K_TOKENS) {
            _mm_storeu_ps(si, s4);
            mx[i] = _mm_max_ps(mx[i], s4);
        } else {
            float v[4];
            _mm_storeu_ps(v, s4);
            for (int64_t u = 0; u < nk; u++) {
                si[u] = v[u];
                mx[i] = _mm_max_ps(mx[i], _mm_set1_ps(v[u]));
            }
        }
    }
}

/* One task with AVX2 + FMA (D % 8 == 0, D <= 128, g <= 8): kv head j of sequence piece
 * [t0, t0 + n), qf [g, D] already times the softmax scale; scores [g, n] scratch; leaves acc
 * [g, D], max, sum. K pass: rows_k_tokens, 4 rows at a time, for the g heads in groups of up
 * to 3 (a group's 12 sums fill the registers beside the row chunk). V pass: rows_v_pass. */
static inline __attribute__((always_inline)) void rows_task_avx2(
        const float *qf, const uint8_t *k_cache, const uint8_t *v_cache, const int64_t *table, int64_t t0, int64_t n,
        int64_t j, int64_t g, int64_t row, int64_t D, int64_t bs, float *scores, float *acc, float *max, float *sum,
        const int FMT) {
    const int64_t w = head_bytes(D, FMT);
    __m128 mx[ROWS_MAX_GROUP]; /* per head: running max of its scores */
    for (int64_t i = 0; i < g; i++) mx[i] = _mm_set1_ps(-FLT_MAX);
    slot_cursor at = slot_at(table, bs, t0), ahead = slot_at(table, bs, t0 + PREFETCH_TOKENS);
    for (int64_t t = 0; t < n; t += ROWS_K_TOKENS) { /* K pass */
        const int64_t nk = n - t < ROWS_K_TOKENS ? n - t : ROWS_K_TOKENS;
        const uint8_t *kr[ROWS_K_TOKENS];
        float ks[ROWS_K_TOKENS];
        for (int64_t u = 0; u < nk; u++, slot_next(&at), slot_next(&ahead)) {
            if (t + u + PREFETCH_TOKENS < n) prefetch_head_row(head_row(k_cache, &ahead, row, j, w), w);
            kr[u] = head_row(k_cache, &at, row, j, w);
            ks[u] = row_scale(kr[u], D, FMT);
        }
        for (int64_t u = nk; u < ROWS_K_TOKENS; u++) { kr[u] = kr[0]; ks[u] = ks[0]; }
        for (int64_t i = 0; i < g; i += 3) {
            const int64_t hg = g - i < 3 ? g - i : 3;
            if (hg == 3) rows_k_tokens(kr, ks, nk, qf + i * D, D, scores + i * n, n, t, mx + i, 3, FMT);
            else if (hg == 2) rows_k_tokens(kr, ks, nk, qf + i * D, D, scores + i * n, n, t, mx + i, 2, FMT);
            else rows_k_tokens(kr, ks, nk, qf + i * D, D, scores + i * n, n, t, mx + i, 1, FMT);
        }
    }
    for (int64_t i = 0; i < g; i++) {
        float m4[4];
        _mm_storeu_ps(m4, mx[i]);
        max[i] = m4[0];
        for (int u = 1; u < 4; u++) max[i] = m4[u] > max[i] ? m4[u] : max[i];
    }
    exp_scores(scores, max, sum, g, n);
    rows_v_pass(v_cache, table, t0, n, j, g, row, D, bs, scores, acc, FMT);
}
/* rows_task_avx2 with the head size as a constant where it is 64 or 128 (the loops over a
 * row's chunks unroll), else as it comes. */
static inline __attribute__((always_inline)) void rows_task_avx2_d(
        const float *qf, const uint8_t *k_cache, const uint8_t *v_cache, const int64_t *table, int64_t t0, int64_t n,
        int64_t j, int64_t g, int64_t row, int64_t D, int64_t bs, float *scores, float *acc, float *max, float *sum,
        const int FMT) {
    if (D == 64) rows_task_avx2(qf, k_cache, v_cache, table, t0, n, j, g, row, 64, bs, scores, acc, max, sum, FMT);
    else if (D == 128) rows_task_avx2(qf, k_cache, v_cache, table, t0, n, j, g, row, 128, bs, scores, acc, max, sum, FMT);
    else rows_task_avx2(qf, k_cache, v_cache, table, t0, n, j, g, row, D, bs, scores, acc, max, sum, FMT);
}
static inline int rows_fast_ok(int64_t D, int64_t g) { return D % 8 == 0 && D <= ROWS_MAX_D && g <= ROWS_MAX_GROUP; }
#endif

#if defined(ROWS_AVX2)
static void int8_task_avx2(const float *qf, const int8_t *k_cache, const int8_t *v_cache, const int64_t *table,
                           int64_t t0, int64_t n, int64_t j, int64_t g, int64_t row, int64_t D, int64_t bs,
                           float *scores, float *acc, float *max, float *sum) {
    rows_task_avx2_d(qf, (const uint8_t *)k_cache, (const uint8_t *)v_cache, table, t0, n, j, g, row, D, bs, scores,
                     acc, max, sum, ROW_INT8);
}
static inline int int8_fast_ok(int64_t D, int64_t g) { return rows_fast_ok(D, g); }
#define int8_task_fast int8_task_avx2
#elif !defined(__AVX512F__)
static inline int int8_fast_ok(int64_t D, int64_t g) { (void)D; (void)g; return 0; }
#define int8_task_fast int8_task
#endif

/* qf [g, D] (already times the softmax scale); scores [g, n] scratch; leaves acc [g, D], max, sum. */
static void int8_task(const float *qf, const int8_t *k_cache, const int8_t *v_cache, const int64_t *table,
                      int64_t t0, int64_t n, int64_t j, int64_t g, int64_t row, int64_t D, int64_t bs,
                      float *scores, float *acc, float *max, float *sum) {
    const int64_t w = D + 2;
    float r[D];
    for (int64_t i = 0; i < g; i++) max[i] = -FLT_MAX;
    for (int64_t t = 0; t < n; t++) { /* K pass */
        const int64_t tok = t0 + t;
        if (t + PREFETCH_TOKENS < n) {
            const int64_t ft = tok + PREFETCH_TOKENS;
            prefetch_int8(int8_row(k_cache, table, ft, bs, row, j, w), D);
        }
        const int8_t *kr = int8_row(k_cache, table, tok, bs, row, j, w);
        const float ks = int8_scale(kr, D);
        for (int64_t i = 0; i < g; i++) {
            const float s = dot_int8(qf + i * D, kr, D) * ks;
            scores[i * n + t] = s;
            max[i] = s > max[i] ? s : max[i];
        }
    }
    exp_scores(scores, max, sum, g, n);
    for (int64_t i = 0; i < g * D; i++) acc[i] = 0.f;
    for (int64_t t = 0; t < n; t++) { /* V pass: codes widened once per row for the g heads */
        const int64_t tok = t0 + t;
        if (t + PREFETCH_TOKENS < n) {
            const int64_t ft = tok + PREFETCH_TOKENS;
            prefetch_int8(int8_row(v_cache, table, ft, bs, row, j, w), D);
        }
        const int8_t *vr = int8_row(v_cache, table, tok, bs, row, j, w);
        const float vs = int8_scale(vr, D);
        for (int64_t d = 0; d < D; d++) r[d] = (float)vr[d];
        for (int64_t i = 0; i < g; i++) {
            const float p = scores[i * n + t] * vs;
            float *restrict a = acc + i * D;
            for (int64_t d = 0; d < D; d++) a[d] += p * r[d];
        }
    }
}

/* One task of a row-format pool: qf [g, D] (already times the softmax scale, rotated where the
 * rows are), kv head j of the piece [t0, t0 + n); scores [g, n] scratch; leaves acc [g, D], max,
 * sum. */
typedef void (*rows_task_fn)(const float *qf, const uint8_t *k_cache, const uint8_t *v_cache, const int64_t *table,
                             int64_t t0, int64_t n, int64_t j, int64_t g, int64_t row, int64_t D, int64_t bs,
                             float *scores, float *acc, float *max, float *sum);

/* Tasks (sequence, piece, kv head) of `task` over pools of `row` bytes a slot, combined per
 * sequence (rotated: an int8 pool of Hadamard rows, whose query is rotated first and output
 * rotated back). The int8 kernels and the bf16 pool under float32 queries share it. */
#define DEFINE_ROWS_KERNEL(NAME, T, LOAD, COMBINE)                                                \
static void NAME(const T *q, int64_t q_stride, const uint8_t *k_cache, const uint8_t *v_cache,    \
                 const int64_t *tables, int64_t max_blocks, const int64_t *context_lens, T *out,  \
                 int64_t B, int64_t H, int64_t kvH, int64_t D, int64_t bs, float scale, int64_t rotated, \
                 int64_t row, rows_task_fn task) {                                                \
    const int64_t g = H / kvH, splits = pieces_per_sequence(context_lens, B, kvH);                \
    const int64_t stride = H * (D + 2); /* per piece: acc [H, D], max [H], sum [H] */             \
    float *part = malloc(sizeof(float) * B * splits * stride);                                    \
    _Pragma("omp parallel for collapse(3) schedule(dynamic, 1)")                                  \
    for (int64_t b = 0; b < B; b++) {                                                             \
        for (int64_t sp = 0; sp < splits; sp++) {                                                 \
            for (int64_t j = 0; j < kvH; j++) {                                                   \
                const int64_t len = context_lens[b], per = (len + splits - 1) / splits;           \
                const int64_t t0 = sp * per, t1 = t0 + per < len ? t0 + per : len, n = t1 - t0;  \
                float *acc = part + (b * splits + sp) * stride, *max = acc + H * D + j * g, *sum = max + H; \
                if (n <= 0) { /* an empty piece: weight 0 in the combine, whose sums must stay finite */ \
                    for (int64_t i = 0; i < g; i++) { max[i] = -FLT_MAX; sum[i] = 0.f; }          \
                    for (int64_t i = 0; i < g * D; i++) acc[j * g * D + i] = 0.f;                 \
                    continue;                                                                     \
                }                                                                                 \
                float *scores = malloc(sizeof(float) * g * (n + D)), *qf = scores + g * n;       \
                const T *qb = q + b * q_stride + j * g * D;                                       \
                for (int64_t i = 0; i < g * D; i++) qf[i] = LOAD(qb[i]) * scale;                  \
                if (rotated) /* Hadamard rows: scores are (H q).(H k) */                          \
                    for (int64_t i = 0; i < g; i++) hadamard_rotate(qf + i * D, D);               \
                task(qf, k_cache, v_cache, tables + b * max_blocks, t0, n, j, g, row, D, bs, scores, \
                     acc + j * g * D, max, sum);                                                  \
                free(scores);                                                                     \
            }                                                                                     \
        }                                                                                         \
    }                                                                                             \
    COMBINE(part, splits, out, B, H, D, rotated);                                                 \
    free(part);                                                                                   \
}

DEFINE_ROWS_KERNEL(rows_kernel_bf16, uint16_t, bf16_load, combine_bf16)
DEFINE_ROWS_KERNEL(rows_kernel_f32, float, f32_load, combine_f32)

/* The int8 task this build has for the shape: int8_task_fast, else the plain-C int8_task. */
static void int8_task_any(const float *qf, const uint8_t *k_cache, const uint8_t *v_cache, const int64_t *table,
                          int64_t t0, int64_t n, int64_t j, int64_t g, int64_t row, int64_t D, int64_t bs,
                          float *scores, float *acc, float *max, float *sum) {
    (int8_fast_ok(D, g) ? int8_task_fast : int8_task)(qf, (const int8_t *)k_cache, (const int8_t *)v_cache, table,
                                                      t0, n, j, g, row, D, bs, scores, acc, max, sum);
}

#define DEFINE_INT8_KERNEL(SUFFIX, T)                                                             \
void paged_decode_attention_int8_##SUFFIX(const T *q, int64_t q_stride, const int8_t *k_cache,    \
        const int8_t *v_cache, const int64_t *tables, int64_t max_blocks, const int64_t *context_lens, \
        T *out, int64_t B, int64_t H, int64_t kvH, int64_t D, int64_t bs, float scale, int64_t rotated) { \
    rows_kernel_##SUFFIX(q, q_stride, (const uint8_t *)k_cache, (const uint8_t *)v_cache, tables, max_blocks, \
                         context_lens, out, B, H, kvH, D, bs, scale, rotated, kvH * (D + 2), int8_task_any); \
}
DEFINE_INT8_KERNEL(bf16, uint16_t)
DEFINE_INT8_KERNEL(f32, float)

/* float32 queries over a bf16 pool (paged_decode_attention's arguments): rows_kernel_f32 with
 * rows_task_avx2 over ROW_BF16 rows. The products are float32 ones of the pool's (bf16-exact)
 * values, as SDPA over the rows widened to float32 computes them. Where `decode_bf16kv_f32_ok`
 * is 0 (builds without AVX2, D % 8 != 0 or > 128, more than 8 query heads per kv head) the
 * caller takes SDPA; the door itself then aborts. */
#if defined(ROWS_AVX2) || defined(__AVX512F__)
/* A function of its own, reached through the task pointer (inlined into the OpenMP loop, the
 * same task measured 1.6-1.7x slower at 4k tokens). */
static void bf16kv_task_avx2(const float *qf, const uint8_t *k_cache, const uint8_t *v_cache, const int64_t *table,
                             int64_t t0, int64_t n, int64_t j, int64_t g, int64_t row, int64_t D, int64_t bs,
                             float *scores, float *acc, float *max, float *sum) {
    rows_task_avx2_d(qf, k_cache, v_cache, table, t0, n, j, g, row, D, bs, scores, acc, max, sum, ROW_BF16);
}
#endif

int decode_bf16kv_f32_ok(int64_t H, int64_t kvH, int64_t D) {
#if defined(ROWS_AVX2) || defined(__AVX512F__)
    return H % kvH == 0 && rows_fast_ok(D, H / kvH);
#else
    (void)H; (void)kvH; (void)D;
    return 0;
#endif
}

void paged_decode_attention_bf16kv_f32(const float *q, int64_t q_stride, const uint16_t *k_cache,
                                       const uint16_t *v_cache, const int64_t *tables, int64_t max_blocks,
                                       const int64_t *context_lens, float *out, int64_t B, int64_t H, int64_t kvH,
                                       int64_t D, int64_t bs, float scale) {
    if (!decode_bf16kv_f32_ok(H, kvH, D)) abort();
#if defined(ROWS_AVX2) || defined(__AVX512F__)
    rows_kernel_f32(q, q_stride, (const uint8_t *)k_cache, (const uint8_t *)v_cache, tables, max_blocks, context_lens,
                    out, B, H, kvH, D, bs, scale, 0, kvH * 2 * D, bf16kv_task_avx2);
#endif
}
