/* Weight-only quantized matmul for decode: y[M, N] = x[M, K] @ W^T, W in groups of 32
 * columns with a bf16 scale and zero per group (model/quant.py packs it, `native_pack`):
 *
 *   sz    [N, K / 32, 2] bf16: (scale, zero);  w = (c - c0) * scale + zero
 *   q4:   c0 = 8, c in 0..15. codes [N, K / 2] bytes; per 128 columns, 32 little-endian
 *         16-bit words: word i = c[i] | c[32 + i] << 4 | c[64 + i] << 8 | c[96 + i] << 12
 *         (so nibble q of the 32 words is group q of the block, in order); a last block of
 *         64 columns has 16 words: word i = c[i] | c[16 + i] << 4 | c[32 + i] << 8 | c[48 + i] << 12.
 *   q8:   c0 = 128, c in 0..255 (GGUF Q8_0: c = code + 128, zero = 0). codes [N, K] bytes;
 *         per 64 columns, 32 words: word i = c[i] | c[32 + i] << 8.
 *   K is a multiple of 64 (the packer pads with zero groups), x [M, K] contiguous, out
 *   [M, N] contiguous; x, out bf16 (`_bf16`) or float32 (`_f32`).
 *
 * With AVX512-BF16 (bf16 variant): a nibble n OR 0x4300 is the bf16 number 128 + n, so
 * _mm512_dpbf16_ps multiplies codes by x exactly (float32 sums) with no conversion; an
 * 8-bit code is two such planes (the high nibble as 256 + 16 h). Per group:
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

static inline float qg_f32_id(float f) { return f; }

/* code k of a row (q4 / q8 layouts above) */
static inline int q4_code(const uint8_t *row, int64_t K, int64_t k) {
    const int64_t block = k / 128, full = K / 128;
    const int64_t words = block < full ? 32 : 16, base = block * 128, r = k - base;
    const int64_t i = r % words, q = r / words;
    const uint16_t w = (uint16_t)(row[base / 2 + 2 * i] | row[base / 2 + 2 * i + 1] << 8);
    return (w >> (4 * q)) & 0xF;
}

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

DEFINE_GENERIC(q4_generic_bf16, uint16_t, bf16_load, bf16_store, q4_code(row, K, k), 8)
DEFINE_GENERIC(q8_generic_bf16, uint16_t, bf16_load, bf16_store, q8_code(row, k), 128)
DEFINE_GENERIC(q4_generic_f32, float, qg_f32_id, qg_f32_id, q4_code(row, K, k), 8)
DEFINE_GENERIC(q8_generic_f32, float, qg_f32_id, qg_f32_id, q8_code(row, k), 128)

void quant_matmul_q4_f32(const float *x, int64_t M, int64_t K, const uint8_t *codes, const uint16_t *sz,
                         float *out, int64_t N) {
    q4_generic_f32(x, M, K, codes, sz, out, N, K / 2);
}

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

static inline __attribute__((always_inline)) void q4_row(const uint8_t *wc, const uint16_t *sz,
                                                         const uint16_t *x, int64_t K, const float *sumx,
                                                         const int MM, float *res) {
    const int64_t G = K / QG;
    float sf[(G + 15) / 16 * 16];
    __m512 tot[QG_MAX_ROWS], bias[QG_MAX_ROWS];
    row_scales(sz, G, 136.f, sumx, MM, sf, bias);
    for (int m = 0; m < MM; m++) tot[m] = _mm512_setzero_ps();
    const __m512i lo4 = _mm512_set1_epi16(0x000F), one28 = _mm512_set1_epi16(0x4300);
    int64_t k = 0;
    for (; k + 128 <= K; k += 128, wc += 64) {
        const __m512i w = _mm512_loadu_si512(wc);
        __m512i p[4];
        p[0] = _mm512_ternarylogic_epi32(w, lo4, one28, TERN_AND_OR);
        p[1] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 4), lo4, one28, TERN_AND_OR);
        p[2] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 8), lo4, one28, TERN_AND_OR);
        p[3] = _mm512_or_si512(_mm512_srli_epi16(w, 12), one28);
        for (int q = 0; q < 4; q++) {
            const __m512 s = _mm512_set1_ps(sf[k / QG + q]);
            for (int m = 0; m < MM; m++) {
                const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k + 32 * q);
                const __m512 d = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)p[q], xv);
                tot[m] = _mm512_fmadd_ps(d, s, tot[m]);
            }
        }
    }
    if (k < K) { /* 64 columns: 16 words, two groups of two 16-column planes */
        const __m256i w = _mm256_loadu_si256((const __m256i *)wc);
        const __m256i l4 = _mm512_castsi512_si256(lo4), o = _mm512_castsi512_si256(one28);
        const __m256i p0 = _mm256_ternarylogic_epi32(w, l4, o, TERN_AND_OR);
        const __m256i p1 = _mm256_ternarylogic_epi32(_mm256_srli_epi16(w, 4), l4, o, TERN_AND_OR);
        const __m256i p2 = _mm256_ternarylogic_epi32(_mm256_srli_epi16(w, 8), l4, o, TERN_AND_OR);
        const __m256i p3 = _mm256_or_si256(_mm256_srli_epi16(w, 12), o);
        const __m256 s0 = _mm256_set1_ps(sf[k / QG]), s1 = _mm256_set1_ps(sf[k / QG + 1]);
        for (int m = 0; m < MM; m++) {
            const uint16_t *xm = x + m * K + k;
            __m256 d0 = _mm256_dpbf16_ps(_mm256_setzero_ps(), (__m256bh)p0, (__m256bh)_mm256_loadu_si256((const __m256i *)xm));
            d0 = _mm256_dpbf16_ps(d0, (__m256bh)p1, (__m256bh)_mm256_loadu_si256((const __m256i *)(xm + 16)));
            __m256 d1 = _mm256_dpbf16_ps(_mm256_setzero_ps(), (__m256bh)p2, (__m256bh)_mm256_loadu_si256((const __m256i *)(xm + 32)));
            d1 = _mm256_dpbf16_ps(d1, (__m256bh)p3, (__m256bh)_mm256_loadu_si256((const __m256i *)(xm + 48)));
            const __m256 t = _mm256_fmadd_ps(d1, s1, _mm256_mul_ps(d0, s0));
            tot[m] = _mm512_add_ps(tot[m], _mm512_zextps256_ps512(t));
        }
    }
    for (int m = 0; m < MM; m++) res[m] = _mm512_reduce_add_ps(_mm512_add_ps(tot[m], bias[m]));
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

DEFINE_FAST(quant_matmul_q4_bf16, q4_row, K / 2)
DEFINE_FAST(quant_matmul_q8_bf16, q8_row, K)

#else

void quant_matmul_q4_bf16(const uint16_t *x, int64_t M, int64_t K, const uint8_t *codes, const uint16_t *sz,
                          uint16_t *out, int64_t N) {
    q4_generic_bf16(x, M, K, codes, sz, out, N, K / 2);
}

void quant_matmul_q8_bf16(const uint16_t *x, int64_t M, int64_t K, const uint8_t *codes, const uint16_t *sz,
                          uint16_t *out, int64_t N) {
    q8_generic_bf16(x, M, K, codes, sz, out, N, K);
}

#endif
