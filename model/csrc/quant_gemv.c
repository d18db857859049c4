/* Weight-only 8-bit matmul for decode: y[M, N] = x[M, K] @ W^T, W in groups of 32 columns
 * with a bf16 scale and zero per group (model/quant.py packs it, `native_pack`):
 *
 *   sz    [N, K / 32, 2] bf16: (scale, zero);  w = (c - c0) * scale + zero
 *   q8:   c0 = 128, c in 0..255 (GGUF Q8_0: c = code + 128, zero = 0). codes [N, K] bytes;
 *         per 64 columns, 32 words: word i = c[i] | c[32 + i] << 8.
 *   K is a multiple of 64 (the packer pads with zero groups), x [M, K] contiguous, out
 *   [M, N] contiguous; x, out bf16 (`_bf16`) or float32 (`_f32`).
 *
 * With AVX512-BF16 (bf16 variant): a nibble n OR 0x4300 is the bf16 number 128 + n, so
 * _mm512_dpbf16_ps multiplies codes by x exactly (float32 sums) with no conversion; an
 * 8-bit code is two such planes (the high nibble as 256 + 16 h). (A 4-bit variant of this
 * kernel measured no faster than torch's int4 kernel and was dropped.) Per group:
 *   sum_k w x = scale * D + (zero - (c0 + offset) * scale) * sum_k x,  D = sum (offset + c) x,
 * the second term per row from per-group sums of x computed once per call. One OpenMP
 * chunk of rows per thread; up to 8 rows of x per pass over a weight row. Elsewhere (and
 * for float32 x) a portable loop dequantizes a row to float32 and takes dot products.
 * Built by model/native.py; no torch headers.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#define QG 32 /* group size */
#define QG_MAX_ROWS 8

/* code k of a row (the q8 layout above) */
static inline int q8_code(const uint8_t *row, int64_t k) {
    const int64_t base = k / 64 * 64, r = k - base;
    return row[base + 2 * (r % 32) + r / 32];
}

/* The portable path: one weight row at a time into float32, then M dot products. */
#define DEFINE_GENERIC(NAME, T, LOAD, STORE, CODE, C0)                                         \
static void NAME(const T *x, int64_t M, int64_t K, const uint8_t *codes, const uint16_t *sz,  \
                 T *out, int64_t N, int64_t row_bytes) {                                       \
    float *xf = malloc(sizeof(float) * M * K);                                                 \
    for (int64_t i = 0; i < M * K; i++) xf[i] = LOAD(x[i]);                                    \
    _Pragma("omp parallel for schedule(static)")                                               \
    for (int64_t n = 0; n < N; n++) {                                                          \
        const uint8_t *row = codes + n * row_bytes;                                            \
        const uint16_t *s = sz + n * (K / QG) * 2;                                             \
        float w[K];                                                                            \
        for (int64_t k = 0; k < K; k++)                                                        \
            w[k] = (float)(CODE - (C0)) * bf16_load(s[k / QG * 2])                        \
                   + bf16_load(s[k / QG * 2 + 1]);                                        \
        for (int64_t m = 0; m < M; m++) {                                                      \
            const float *xm = xf + m * K;                                                      \
            float acc = 0.f;                                                                   \
            for (int64_t k = 0; k < K; k++) acc += w[k] * xm[k];                               \
            out[m * N + n] = STORE(acc);                                                       \
        }                                                                                      \
    }                                                                                          \
    free(xf);                                                                                  \
}

DEFINE_GENERIC(q8_generic_f32, float, f32_load, f32_store, q8_code(row, k), 128)

void quant_matmul_q8_f32(const float *x, int64_t M, int64_t K, const uint8_t *codes, const uint16_t *sz,
                         float *out, int64_t N) {
    q8_generic_f32(x, M, K, codes, sz, out, N, K);
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>

#define TERN_AND_OR 0xEA /* (a & b) | c */

/* Per row: float32 scales into sf[G], and bias[m] = sum_g (zero - off * scale) sumx[m][g]. */
static inline __attribute__((always_inline)) void row_scales(const uint16_t *sz, int64_t G, float off,
                                                             const float *sumx, const int MM, float *sf,
                                                             __m512 *bias) {
    const __m512i hi_mask = _mm512_set1_epi32((int)0xFFFF0000u);
    const __m512 offv = _mm512_set1_ps(off);
    for (int m = 0; m < MM; m++) bias[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g += 16) {
        const __mmask16 mask = G - g >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (G - g)) - 1);
        const __m512i v = _mm512_maskz_loadu_epi32(mask, sz + 2 * g); /* (scale | zero << 16) */
        const __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
        const __m512 z = _mm512_castsi512_ps(_mm512_and_si512(v, hi_mask));
        const __m512 coef = _mm512_fnmadd_ps(offv, s, z);
        _mm512_storeu_ps(sf + g, s); /* sf has room: a masked store is slow on AMD */
        for (int m = 0; m < MM; m++)
            bias[m] = _mm512_fmadd_ps(coef, _mm512_maskz_loadu_ps(mask, sumx + m * G + g), bias[m]);
    }
}

static inline __attribute__((always_inline)) void q8_row(const uint8_t *wc, const uint16_t *sz,
                                                         const uint16_t *x, int64_t K, const float *sumx,
                                                         const int MM, float *res) {
    const int64_t G = K / QG;
    float sf[(G + 15) / 16 * 16];
    __m512 tot[QG_MAX_ROWS], bias[QG_MAX_ROWS];
    row_scales(sz, G, 512.f, sumx, MM, sf, bias);
    for (int m = 0; m < MM; m++) tot[m] = _mm512_setzero_ps();
    const __m512i lo4 = _mm512_set1_epi16(0x000F), one28 = _mm512_set1_epi16(0x4300);
    const __m512i hi4 = _mm512_set1_epi16(0x0078), two56 = _mm512_set1_epi16(0x4380);
    for (int64_t k = 0; k < K; k += 64, wc += 64) {
        const __m512i w = _mm512_loadu_si512(wc);
        /* group a (low bytes): 128 + low nibble, 256 + 16 * high nibble; group b alike */
        const __m512i a0 = _mm512_ternarylogic_epi32(w, lo4, one28, TERN_AND_OR);
        const __m512i a1 = _mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 1), hi4, two56, TERN_AND_OR);
        const __m512i b0 = _mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 8), lo4, one28, TERN_AND_OR);
        const __m512i b1 = _mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 9), hi4, two56, TERN_AND_OR);
        const __m512 sa = _mm512_set1_ps(sf[k / QG]), sb = _mm512_set1_ps(sf[k / QG + 1]);
        for (int m = 0; m < MM; m++) {
            const __m512bh xa = (__m512bh)_mm512_loadu_si512(x + m * K + k);
            const __m512bh xb = (__m512bh)_mm512_loadu_si512(x + m * K + k + 32);
            const __m512 da = _mm512_dpbf16_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)a0, xa), (__m512bh)a1, xa);
            const __m512 db = _mm512_dpbf16_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)b0, xb), (__m512bh)b1, xb);
            tot[m] = _mm512_fmadd_ps(db, sb, _mm512_fmadd_ps(da, sa, tot[m]));
        }
    }
    for (int m = 0; m < MM; m++) res[m] = _mm512_reduce_add_ps(_mm512_add_ps(tot[m], bias[m]));
}

#define ROW_CASES(ROWFN)                                                                       \
    switch (mm) {                                                                              \
    case 1: ROWFN(row, s, xm, K, sx, 1, res); break;                                           \
    case 2: ROWFN(row, s, xm, K, sx, 2, res); break;                                           \
    case 3: ROWFN(row, s, xm, K, sx, 3, res); break;                                           \
    case 4: ROWFN(row, s, xm, K, sx, 4, res); break;                                           \
    case 5: ROWFN(row, s, xm, K, sx, 5, res); break;                                           \
    case 6: ROWFN(row, s, xm, K, sx, 6, res); break;                                           \
    case 7: ROWFN(row, s, xm, K, sx, 7, res); break;                                           \
    default: ROWFN(row, s, xm, K, sx, 8, res); break;                                          \
    }

#define DEFINE_FAST(NAME, ROWFN, ROW_BYTES)                                                    \
void NAME(const uint16_t *x, int64_t M, int64_t K, const uint8_t *codes, const uint16_t *sz,  \
          uint16_t *out, int64_t N) {                                                          \
    const int64_t G = K / QG;                                                                  \
    float *sumx = malloc(sizeof(float) * M * G);                                               \
    for (int64_t i = 0; i < M * G; i++) {                                                      \
        float acc = 0.f;                                                                       \
        for (int j = 0; j < QG; j++) acc += bf16_load(x[i * QG + j]);                     \
        sumx[i] = acc;                                                                         \
    }                                                                                          \
    _Pragma("omp parallel for schedule(static)")                                               \
    for (int64_t n = 0; n < N; n++) {                                                          \
        const uint8_t *row = codes + n * (ROW_BYTES);                                          \
        const uint16_t *s = sz + n * G * 2;                                                    \
        for (int64_t m0 = 0; m0 < M; m0 += QG_MAX_ROWS) {                                      \
            const int mm = M - m0 < QG_MAX_ROWS ? (int)(M - m0) : QG_MAX_ROWS;                 \
            const uint16_t *xm = x + m0 * K;                                                   \
            const float *sx = sumx + m0 * G;                                                   \
            float res[QG_MAX_ROWS];                                                            \
            ROW_CASES(ROWFN)                                                                   \
            for (int m = 0; m < mm; m++) out[(m0 + m) * N + n] = bf16_store(res[m]);       \
        }                                                                                      \
    }                                                                                          \
    free(sumx);                                                                                \
}

DEFINE_FAST(quant_matmul_q8_bf16, q8_row, K)

#else

DEFINE_GENERIC(q8_generic_bf16, uint16_t, bf16_load, bf16_store, q8_code(row, k), 128)

void quant_matmul_q8_bf16(const uint16_t *x, int64_t M, int64_t K, const uint8_t *codes, const uint16_t *sz,
                          uint16_t *out, int64_t N) {
    q8_generic_bf16(x, M, K, codes, sz, out, N, K);
}

#endif
