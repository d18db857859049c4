/* Weight-only 4/5/6/8-bit matmul on 8-bit activations, the way llama.cpp computes decode:
 *
 *   out[M, N] = x[M, K] @ W^T,  W in groups of 32 or 16 columns, w = d * c + m per group,
 *   c unsigned (0 .. 2^bits - 1), d and m float16; symmetric weights store no m (m = -2^(bits-1) d).
 *
 * Packed weight: model/vnni_pack.py (its module doc gives the record layout). Per row block of
 * 16 and 32 columns one record: 4-bit nibbles (256 B) plus one 64-byte plane per code bit above
 * 4 (5, 6 bits), or 512 B of bytes (8 bits); then per scale set d[16] (and m[16]) float16.
 *
 * x is quantized per call and row: per 32 columns dx = max|x| / 127, q = round(x / dx) in int8, so
 *   sum_k w x ~= sum_g dx_g * sum_s (d_gs * sum_k c q + m_gs * sum_k q).
 * vpdpbusd multiplies 4 unsigned codes by 4 signed q per 32-bit lane; the 16 lanes are 16
 * output rows, so no horizontal sums are needed and one weight load serves up to VM rows of x.
 * x: [M, K] contiguous; out: [M, N] with row stride ldo >= N (a column slice of a wider output);
 * bf16 (`_bf16`) or float32 (`_f32`); K a multiple of 32.
 * Built where the compiler targets AVX512-VNNI, and for AVX2 by vnni_gemv_avx2.c (same layout and
 * results); `vnni_available` says. Absent elsewhere. The row reader `vnni_rows_f32` (plain C) is
 * built everywhere.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#define VG 32       /* group size */
#define VROWS 16    /* output rows per block = lanes */
#define VM 4        /* rows of x per pass over the weights */
#define NIBBLES 256 /* a record's 4-bit plane; 64 B per code bit above 4 follow it */
#define CODES8 512  /* a record's 8-bit codes */

static inline int64_t code_bytes(int bits) { return bits == 8 ? CODES8 : NIBBLES + 64 * (bits - 4); }
static inline int64_t record_bytes(int bits, int sets, int sym) { return code_bytes(bits) + (sym ? 32 : 64) * sets; }

/* IEEE half -> float32 (normals, subnormals, inf, nan), plain C: the row reader below is built in
 * every variant. */
static inline float f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1F, m = h & 0x3FF;
    float f;
    if (e == 0) {
        f = (float)m * (1.f / 16777216.f); /* m * 2^-24 */
        return sign ? -f : f;
    }
    const uint32_t u = sign | (e == 31 ? 0x7F800000u | (m << 13) : ((e + 112) << 23) | (m << 13));
    memcpy(&f, &u, 4);
    return f;
}

/* Rows ids [T] of a packed weight [ceil(N / 16), G, record] -> out [T, 32 G] float32, w = d c + m
 * (symmetric: m = -2^(bits - 1) d): model/vnni_pack.py's `packed_rows` in C, for the token
 * embedding read from a tied head (model/packed_embedding.py). Row r of a block is lane r: bytes
 * 4r .. 4r + 3 of each 64-byte vector of its records. nblocks: the weight's row blocks. Returns -1,
 * or the position of the first id outside 0 .. 16 nblocks - 1 (then nothing is written). */
int64_t vnni_rows_f32(const uint8_t *packed, int64_t nblocks, int64_t G, int64_t bits, int64_t group, int64_t sym,
                      const int64_t *ids, int64_t T, float *out) {
    const int64_t sets = VG / group, rec = record_bytes((int)bits, (int)sets, (int)sym);
    const float off = (float)(1 << (bits - 1));
    for (int64_t t = 0; t < T; t++)
        if (ids[t] < 0 || ids[t] >= nblocks * VROWS) return t;
    for (int64_t t = 0; t < T; t++) {
        const int64_t lane = ids[t] % VROWS;
        for (int64_t g = 0; g < G; g++) {
            const uint8_t *record = packed + (ids[t] / VROWS * G + g) * rec, *r = record + 4 * lane; /* its bytes */
            int code[VG];
            if (bits == 8) {
                for (int c = 0; c < 8; c++)
                    for (int j = 0; j < 4; j++) code[4 * c + j] = r[64 * c + j];
            } else {
                for (int c = 0; c < 4; c++)
                    for (int j = 0; j < 4; j++) { /* nibble vectors 2c (low), 2c + 1 (high) */
                        const int byte = r[64 * c + j], v0 = 2 * c, v1 = 2 * c + 1;
                        int lo = byte & 0x0F, hi = byte >> 4;
                        if (bits == 5) {
                            const int plane = r[NIBBLES + j];
                            lo |= ((plane >> v0) & 1) << 4;
                            hi |= ((plane >> v1) & 1) << 4;
                        } else if (bits == 6) { /* plane v / 4, bits 2 (v % 4) .. + 1 */
                            lo |= ((r[NIBBLES + 64 * (v0 / 4) + j] >> (2 * (v0 % 4))) & 3) << 4;
                            hi |= ((r[NIBBLES + 64 * (v1 / 4) + j] >> (2 * (v1 % 4))) & 3) << 4;
                        }
                        code[8 * c + j] = lo;
                        code[8 * c + 4 + j] = hi;
                    }
            }
            const uint8_t *dm = record + code_bytes((int)bits);
            float *o = out + t * G * VG + g * VG;
            for (int64_t s = 0; s < sets; s++) {
                const uint8_t *set = dm + s * (sym ? 32 : 64);
                uint16_t dh, mh;
                memcpy(&dh, set + 2 * lane, 2);
                const float d = f16_to_f32(dh);
                float mn = -off * d;
                if (!sym) {
                    memcpy(&mh, set + 32 + 2 * lane, 2);
                    mn = f16_to_f32(mh);
                }
                for (int64_t k = s * group; k < (s + 1) * group; k++) o[k] = (float)code[k] * d + mn;
            }
        }
    }
    return -1;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__F16C__)
#include <immintrin.h>

int vnni_available(void) { return 1; }

/* One group of 32 floats -> 32 int8 codes at q, returns dx; sq[h] = dx * sum(q) over half h. */
static inline float quantize_group(__m512 a, __m512 b, int8_t *q, float *sq) {
    const __m512 amax = _mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b));
    const float mx = _mm512_reduce_max_ps(amax);
    const float dx = mx / 127.f, inv = mx > 0.f ? 127.f / mx : 0.f;
    const __m512 iv = _mm512_set1_ps(inv);
    const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, iv)), qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, iv));
    _mm_storeu_si128((__m128i *)q, _mm512_cvtsepi32_epi8(qa));
    _mm_storeu_si128((__m128i *)(q + 16), _mm512_cvtsepi32_epi8(qb));
    sq[0] = dx * (float)_mm512_reduce_add_epi32(qa);
    sq[1] = dx * (float)_mm512_reduce_add_epi32(qb);
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
        dx[i] = quantize_group(LOAD16(x + i * VG), LOAD16(x + i * VG + 16), q + i * VG, sq + 2 * i); \
}
DEFINE_QUANTIZE(quantize_f32, float, load16_f32)
DEFINE_QUANTIZE(quantize_bf16, uint16_t, load16_bf16)

/* acc[m] += dx * (d * ints + m * sum q) for scale set s of group g (S sets per 32 columns);
 * symmetric (SYM): m = -OFF * d, so acc[m] += d * (dx * ints - OFF * dx * sum q). */
static inline __attribute__((always_inline)) void scale_set(const uint8_t *dm, const __m512i *ia, const __m512i *ib,
                                                            const float *dx, const float *sq, int64_t g, int64_t G,
                                                            const int s, const int S, const int MM, const int SYM,
                                                            const float OFF, __m512 *acc) {
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)dm));
    const __m512 mn = SYM ? d : _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(dm + 32)));
    for (int m = 0; m < MM; m++) {
        const float *sqg = sq + m * 2 * G + 2 * g;
        const float sum_q = S == 1 ? sqg[0] + sqg[1] : sqg[s];
        const __m512 ints = _mm512_cvtepi32_ps(_mm512_add_epi32(ia[m], ib[m]));
        if (SYM) {
            const __m512 t = _mm512_fmadd_ps(ints, _mm512_set1_ps(dx[m * G + g]), _mm512_set1_ps(-OFF * sum_q));
            acc[m] = _mm512_fmadd_ps(d, t, acc[m]);
        } else {
            acc[m] = _mm512_fmadd_ps(ints, _mm512_mul_ps(d, _mm512_set1_ps(dx[m * G + g])), acc[m]);
            acc[m] = _mm512_fmadd_ps(mn, _mm512_set1_ps(sum_q), acc[m]);
        }
    }
}

/* Bits 4.. of nibble vector v's codes (v = 2 * chunk + 0 for low, 1 for high nibbles) from the
 * high planes h0, h1 (model/vnni_pack.py): 5 bits: bit v of h0; 6 bits: bits 2u, 2u + 1 of plane
 * v / 4 (u = v % 4). The 16-bit shifts keep every bit inside its byte, the mask keeps bits 4..5. */
static inline __attribute__((always_inline)) __m512i high_bits(__m512i h0, __m512i h1, const int BITS, const int v) {
    const __m512i h = BITS == 5 || v < 4 ? h0 : h1;
    const int shift = BITS == 5 ? 4 - v : 4 - 2 * (v % 4);
    const __m512i moved = shift >= 0 ? _mm512_slli_epi16(h, (unsigned)shift) : _mm512_srli_epi16(h, (unsigned)-shift);
    return _mm512_and_si512(moved, _mm512_set1_epi8(BITS == 5 ? 0x10 : 0x30));
}

/* 16 output rows x MM rows of x over all K, for BITS-bit codes, S scale sets per 32 columns. */
static inline __attribute__((always_inline)) void row_block(const uint8_t *rec, int64_t G, int64_t K,
                                                            const int8_t *q, const float *dx, const float *sq,
                                                            const int MM, const int BITS, const int S,
                                                            const int SYM, __m512 *acc) {
    const __m512i nib = _mm512_set1_epi8(0x0F);
    const int64_t codes = code_bytes(BITS), rec_bytes = record_bytes(BITS, S, SYM);
    const float OFF = (float)(1 << (BITS - 1));
    for (int m = 0; m < MM; m++) acc[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++, rec += rec_bytes) {
        __m512i h0 = _mm512_setzero_si512(), h1 = h0;
        if (BITS == 5 || BITS == 6) h0 = _mm512_loadu_si512(rec + NIBBLES);
        if (BITS == 6) h1 = _mm512_loadu_si512(rec + NIBBLES + 64);
        for (int s = 0; s < S; s++) {
            __m512i ia[VM], ib[VM];
            for (int m = 0; m < MM; m++) ia[m] = ib[m] = _mm512_setzero_si512();
            if (BITS == 8) {
                for (int c = s * 8 / S; c < (s + 1) * 8 / S; c += 2) {  /* chunk c: columns 4c..4c+3 */
                    const __m512i w0 = _mm512_loadu_si512(rec + 64 * c), w1 = _mm512_loadu_si512(rec + 64 * c + 64);
                    for (int m = 0; m < MM; m++) {
                        const int32_t *qw = (const int32_t *)(q + m * K + g * VG);
                        ia[m] = _mm512_dpbusd_epi32(ia[m], w0, _mm512_set1_epi32(qw[c]));
                        ib[m] = _mm512_dpbusd_epi32(ib[m], w1, _mm512_set1_epi32(qw[c + 1]));
                    }
                }
            } else {
                for (int c = s * 4 / S; c < (s + 1) * 4 / S; c++) {  /* chunk c: columns 8c..8c+7 */
                    const __m512i w = _mm512_loadu_si512(rec + 64 * c);
                    __m512i lo = _mm512_and_si512(w, nib), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), nib);
                    if (BITS > 4) {
                        lo = _mm512_or_si512(lo, high_bits(h0, h1, BITS, 2 * c));
                        hi = _mm512_or_si512(hi, high_bits(h0, h1, BITS, 2 * c + 1));
                    }
                    for (int m = 0; m < MM; m++) {
                        const int32_t *qw = (const int32_t *)(q + m * K + g * VG);
                        ia[m] = _mm512_dpbusd_epi32(ia[m], lo, _mm512_set1_epi32(qw[2 * c]));
                        ib[m] = _mm512_dpbusd_epi32(ib[m], hi, _mm512_set1_epi32(qw[2 * c + 1]));
                    }
                }
            }
            scale_set(rec + codes + (SYM ? 32 : 64) * s, ia, ib, dx, sq, g, G, s, S, MM, SYM, OFF, acc);
        }
    }
}

/* row_block with its shape arguments as constants, so each combination compiles on its own. */
static void row_block_any(const uint8_t *rec, int64_t G, int64_t K, const int8_t *q, const float *dx,
                          const float *sq, int mm, int bits, int sets, int sym, __m512 *acc) {
#define RB_ROWS(B, S, Y)                                                                       \
    switch (mm) {                                                                              \
    case 1: row_block(rec, G, K, q, dx, sq, 1, B, S, Y, acc); return;                          \
    case 2: row_block(rec, G, K, q, dx, sq, 2, B, S, Y, acc); return;                          \
    case 3: row_block(rec, G, K, q, dx, sq, 3, B, S, Y, acc); return;                          \
    default: row_block(rec, G, K, q, dx, sq, 4, B, S, Y, acc); return;                         \
    }
#define RB_SYM(B, S) if (sym) { RB_ROWS(B, S, 1) } else { RB_ROWS(B, S, 0) }
#define RB_SETS(B) if (sets == 1) { RB_SYM(B, 1) } else { RB_SYM(B, 2) }
    switch (bits) {
    case 4: RB_SETS(4)
    case 5: RB_SETS(5)
    case 6: RB_SETS(6)
    default: RB_SETS(8)
    }
#undef RB_ROWS
#undef RB_SYM
#undef RB_SETS
}

static inline void store16_f32(float *out, __m512 v, __mmask16 mask) { _mm512_mask_storeu_ps(out, mask, v); }
static inline void store16_bf16(uint16_t *out, __m512 v, __mmask16 mask) {
    float tmp[16];
    _mm512_storeu_ps(tmp, v);
    for (int i = 0; i < 16; i++)
        if (mask >> i & 1) out[i] = bf16_store(tmp[i]);
}

#define DEFINE_MATMUL(NAME, T, QUANTIZE, STORE16)                                              \
void NAME(const T *x, int64_t M, int64_t K, const uint8_t *packed, int64_t bits, int64_t group, \
          int64_t sym, T *out, int64_t N, int64_t ldo) {                                       \
    const int64_t G = K / VG, nblocks = (N + VROWS - 1) / VROWS, sets = VG / group;            \
    const int64_t rec_bytes = record_bytes((int)bits, (int)sets, (int)sym);                    \
    int8_t *q = aligned_alloc(64, (size_t)((M * K + 63) / 64 * 64));                           \
    float *dx = malloc(sizeof(float) * M * G), *sq = malloc(sizeof(float) * M * 2 * G);        \
    QUANTIZE(x, M, K, q, dx, sq);                                                              \
    _Pragma("omp parallel for schedule(static)")                                               \
    for (int64_t b = 0; b < nblocks; b++) {                                                    \
        const uint8_t *rec = packed + b * G * rec_bytes;                                       \
        const int64_t rows = N - b * VROWS < VROWS ? N - b * VROWS : VROWS;                    \
        const __mmask16 mask = (__mmask16)((1u << rows) - 1);                                  \
        for (int64_t m0 = 0; m0 < M; m0 += VM) {                                               \
            const int mm = M - m0 < VM ? (int)(M - m0) : VM;                                   \
            const int8_t *qm = q + m0 * K;                                                     \
            const float *dxm = dx + m0 * G, *sqm = sq + m0 * 2 * G;                            \
            __m512 acc[VM];                                                                    \
            row_block_any(rec, G, K, qm, dxm, sqm, mm, (int)bits, (int)sets, (int)sym, acc);   \
            for (int m = 0; m < mm; m++) STORE16(out + (m0 + m) * ldo + b * VROWS, acc[m], mask); \
        }                                                                                      \
    }                                                                                          \
    free(q);                                                                                   \
    free(dx);                                                                                  \
    free(sq);                                                                                  \
}

DEFINE_MATMUL(vnni_matmul_f32, float, quantize_f32, store16_f32)
DEFINE_MATMUL(vnni_matmul_bf16, uint16_t, quantize_bf16, store16_bf16)

#elif !(defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)) /* AVX2: vnni_gemv_avx2.c */
int vnni_available(void) { return 0; }
void vnni_matmul_f32(const float *x, int64_t M, int64_t K, const uint8_t *packed, int64_t bits, int64_t group,
                     int64_t sym, float *out, int64_t N, int64_t ldo) {
    (void)x; (void)M; (void)K; (void)packed; (void)bits; (void)group; (void)sym; (void)out; (void)N; (void)ldo;
    abort();
}
void vnni_matmul_bf16(const uint16_t *x, int64_t M, int64_t K, const uint8_t *packed, int64_t bits, int64_t group,
                      int64_t sym, uint16_t *out, int64_t N, int64_t ldo) {
    (void)x; (void)M; (void)K; (void)packed; (void)bits; (void)group; (void)sym; (void)out; (void)N; (void)ldo;
    abort();
}
#endif
