/* Weight-only 4/8-bit matmul on 8-bit activations, the way llama.cpp computes decode:
 *
 *   out[M, N] = x[M, K] @ W^T,  W in groups of 32 columns, w = d * c + m per group,
 *   c unsigned (4-bit: 0..15, 8-bit: 0..255), d and m float16.
 *
 * Packed weight (model/quant.py `vnni_pack`): rows in blocks of 16 (N padded with zero
 * rows); per row block and group g a record of 4-bit 320 B / 8-bit 576 B:
 *   4-bit: 4 chunks of 64 B; chunk c, lane r (bytes 4r..4r+3): byte j = c[r][8c + j] | c[r][8c + 4 + j] << 4
 *   8-bit: 8 chunks of 64 B; chunk c, lane r: byte j = c[r][4c + j]
 *   then d[16], m[16] float16 (64 B).
 * Records of a row block follow each other (g = 0..G-1), row blocks follow each other.
 *
 * x is quantized per call and row: per group dx = max|x| / 127, q = round(x / dx) in int8, so
 *   sum_k w x ~= sum_g dx_g * (d_g * sum_k c q + m_g * sum_k q).
 * vpdpbusd multiplies 4 unsigned codes by 4 signed q per 32-bit lane; the 16 lanes are 16
 * output rows, so no horizontal sums are needed and one weight load serves up to VM rows of x.
 * x, out: [M, K] / [M, N] contiguous, bf16 (`_bf16`) or float32 (`_f32`); K a multiple of 32.
 * Built only where the compiler targets AVX512-VNNI (`vnni_available` says); else absent.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#define VG 32       /* group size */
#define VROWS 16    /* output rows per block = lanes */
#define VM 4        /* rows of x per pass over the weights */
#define REC4 320
#define REC8 576

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__F16C__)
#include <immintrin.h>

int vnni_available(void) { return 1; }

/* One group of 32 floats -> 32 int8 codes at q, returns dx; *sq = dx * sum(q). */
static inline float quantize_group(__m512 a, __m512 b, int8_t *q, float *sq) {
    const __m512 amax = _mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b));
    const float mx = _mm512_reduce_max_ps(amax);
    const float dx = mx / 127.f, inv = mx > 0.f ? 127.f / mx : 0.f;
    const __m512 iv = _mm512_set1_ps(inv);
    const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, iv)), qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, iv));
    _mm_storeu_si128((__m128i *)q, _mm512_cvtsepi32_epi8(qa));
    _mm_storeu_si128((__m128i *)(q + 16), _mm512_cvtsepi32_epi8(qb));
    *sq = dx * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
    return dx;
}

static inline __m512 load16_f32(const float *x) { return _mm512_loadu_ps(x); }
static inline __m512 load16_bf16(const uint16_t *x) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)x)), 16));
}

#define DEFINE_QUANTIZE(NAME, T, LOAD16)                                                       \
static void NAME(const T *x, int64_t M, int64_t K, int8_t *q, float *dx, float *sq) {          \
    const int64_t G = K / VG;                                                                  \
    for (int64_t i = 0; i < M * G; i++)                                                        \
        dx[i] = quantize_group(LOAD16(x + i * VG), LOAD16(x + i * VG + 16), q + i * VG, sq + i); \
}
DEFINE_QUANTIZE(quantize_f32, float, load16_f32)
DEFINE_QUANTIZE(quantize_bf16, uint16_t, load16_bf16)

/* acc[m] += dx * (d * ints + m * sum q), for one group. */
#define SCALE_GROUP(rec_dm)                                                                    \
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(rec_dm)));          \
    const __m512 mn = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((rec_dm) + 32)));   \
    for (int m = 0; m < MM; m++) {                                                             \
        const __m512 ints = _mm512_cvtepi32_ps(_mm512_add_epi32(ia[m], ib[m]));                \
        acc[m] = _mm512_fmadd_ps(ints, _mm512_mul_ps(d, _mm512_set1_ps(dx[m * G + g])), acc[m]); \
        acc[m] = _mm512_fmadd_ps(mn, _mm512_set1_ps(sq[m * G + g]), acc[m]);                   \
    }

static inline __attribute__((always_inline)) void block4(const uint8_t *rec, int64_t G, int64_t K,
                                                         const int8_t *q, const float *dx, const float *sq,
                                                         const int MM, __m512 *acc) {
    const __m512i nib = _mm512_set1_epi8(0x0F);
    for (int m = 0; m < MM; m++) acc[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++, rec += REC4) {
        __m512i ia[VM], ib[VM];
        for (int m = 0; m < MM; m++) ia[m] = ib[m] = _mm512_setzero_si512();
        for (int c = 0; c < 4; c++) {
            const __m512i w = _mm512_loadu_si512(rec + 64 * c);
            const __m512i lo = _mm512_and_si512(w, nib), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), nib);
            for (int m = 0; m < MM; m++) {
                const int32_t *qw = (const int32_t *)(q + m * K + g * VG);
                ia[m] = _mm512_dpbusd_epi32(ia[m], lo, _mm512_set1_epi32(qw[2 * c]));
                ib[m] = _mm512_dpbusd_epi32(ib[m], hi, _mm512_set1_epi32(qw[2 * c + 1]));
            }
        }
        SCALE_GROUP(rec + 256)
    }
}

static inline __attribute__((always_inline)) void block8(const uint8_t *rec, int64_t G, int64_t K,
                                                         const int8_t *q, const float *dx, const float *sq,
                                                         const int MM, __m512 *acc) {
    for (int m = 0; m < MM; m++) acc[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++, rec += REC8) {
        __m512i ia[VM], ib[VM];
        for (int m = 0; m < MM; m++) ia[m] = ib[m] = _mm512_setzero_si512();
        for (int c = 0; c < 8; c += 2) {
            const __m512i w0 = _mm512_loadu_si512(rec + 64 * c), w1 = _mm512_loadu_si512(rec + 64 * c + 64);
            for (int m = 0; m < MM; m++) {
                const int32_t *qw = (const int32_t *)(q + m * K + g * VG);
                ia[m] = _mm512_dpbusd_epi32(ia[m], w0, _mm512_set1_epi32(qw[c]));
                ib[m] = _mm512_dpbusd_epi32(ib[m], w1, _mm512_set1_epi32(qw[c + 1]));
            }
        }
        SCALE_GROUP(rec + 512)
    }
}

static inline void store16_f32(float *out, __m512 v, __mmask16 mask) { _mm512_mask_storeu_ps(out, mask, v); }
static inline void store16_bf16(uint16_t *out, __m512 v, __mmask16 mask) {
    float tmp[16];
    _mm512_storeu_ps(tmp, v);
    for (int i = 0; i < 16; i++)
        if (mask >> i & 1) out[i] = bf16_store(tmp[i]);
}

#define BLOCK_CASES(BLOCK)                                                                     \
    switch (mm) {                                                                              \
    case 1: BLOCK(rec, G, K, qm, dxm, sqm, 1, acc); break;                                     \
    case 2: BLOCK(rec, G, K, qm, dxm, sqm, 2, acc); break;                                     \
    case 3: BLOCK(rec, G, K, qm, dxm, sqm, 3, acc); break;                                     \
    default: BLOCK(rec, G, K, qm, dxm, sqm, 4, acc); break;                                    \
    }

#define DEFINE_MATMUL(NAME, T, QUANTIZE, STORE16)                                              \
void NAME(const T *x, int64_t M, int64_t K, const uint8_t *packed, int64_t bits, T *out, int64_t N) { \
    const int64_t G = K / VG, nblocks = (N + VROWS - 1) / VROWS;                               \
    const int64_t rec_bytes = bits == 4 ? REC4 : REC8;                                         \
    int8_t *q = aligned_alloc(64, (size_t)((M * K + 63) / 64 * 64));                           \
    float *dx = malloc(sizeof(float) * M * G), *sq = malloc(sizeof(float) * M * G);            \
    QUANTIZE(x, M, K, q, dx, sq);                                                              \
    _Pragma("omp parallel for schedule(static)")                                               \
    for (int64_t b = 0; b < nblocks; b++) {                                                    \
        const uint8_t *rec = packed + b * G * rec_bytes;                                       \
        const int64_t rows = N - b * VROWS < VROWS ? N - b * VROWS : VROWS;                    \
        const __mmask16 mask = (__mmask16)((1u << rows) - 1);                                  \
        for (int64_t m0 = 0; m0 < M; m0 += VM) {                                               \
            const int mm = M - m0 < VM ? (int)(M - m0) : VM;                                   \
            const int8_t *qm = q + m0 * K;                                                     \
            const float *dxm = dx + m0 * G, *sqm = sq + m0 * G;                                \
            __m512 acc[VM];                                                                    \
            if (bits == 4) { BLOCK_CASES(block4) } else { BLOCK_CASES(block8) }                \
            for (int m = 0; m < mm; m++) STORE16(out + (m0 + m) * N + b * VROWS, acc[m], mask); \
        }                                                                                      \
    }                                                                                          \
    free(q);                                                                                   \
    free(dx);                                                                                  \
    free(sq);                                                                                  \
}

DEFINE_MATMUL(vnni_matmul_f32, float, quantize_f32, store16_f32)
DEFINE_MATMUL(vnni_matmul_bf16, uint16_t, quantize_bf16, store16_bf16)

#else
int vnni_available(void) { return 0; }
void vnni_matmul_f32(const float *x, int64_t M, int64_t K, const uint8_t *packed, int64_t bits, float *out,
                     int64_t N) { (void)x; (void)M; (void)K; (void)packed; (void)bits; (void)out; (void)N; abort(); }
void vnni_matmul_bf16(const uint16_t *x, int64_t M, int64_t K, const uint8_t *packed, int64_t bits, uint16_t *out,
                      int64_t N) { (void)x; (void)M; (void)K; (void)packed; (void)bits; (void)out; (void)N; abort(); }
#endif
