/* bf16 linear (any batch; written for decode): out[M, N] = x[M, K] @ W^T, bf16 in and out, float32 sums.
 *
 * Packed weight (model/prepack.py `lanes_pack`): rows in blocks of 16 (N padded with zero
 * rows), K in pairs; per row block, per pair p, 64 B: lane r holds (W[r][2p], W[r][2p + 1]).
 * _mm512_dpbf16_ps multiplies one such vector by a broadcast pair of x (exact products,
 * float32 sums), so the 16 lanes are 16 output rows: no horizontal sums, and one weight
 * load serves up to BM rows of x. Row blocks are spread over the threads; a block's
 * weights (K * 32 B) stay in L1/L2 while every tile of BM rows of x passes over them, so
 * each weight byte comes from memory once per call. K even; x, out contiguous.
 * Each tile of x is first laid out pair-major ([pairs][mm] int32 for its mm <= BM rows: the
 * rows' pairs of one column pair side by side), so a step's mm broadcasts read one cache line. Read in place,
 * rows K * 2 bytes apart (4 KiB at K = 2048) fall into the same L1 sets: the tile ran at
 * ~90 GFLOP/s per core at K = 2048 against ~215 at K = 576.
 * Built where the compiler targets AVX512-BF16, or AVX2 + FMA (below; `lanes_gemm_available` says).
 */
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"

#define LROWS 16 /* output rows per block = lanes */
#define BM 16    /* rows of x per pass over a block */
/* Weights are prefetched this many pairs (64 B each) ahead, past the end of a block into
 * the next one a thread takes: without it, on weights that come from memory (a whole
 * model's), 16-32 rows ran slower than oneDNN; with it, faster at every row count. */
#define PREFETCH_PAIRS 32

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>

int lanes_gemm_available(void) { return 1; }

static inline __attribute__((always_inline)) void tile(const uint16_t *wb, const int32_t *xp, int64_t K,
                                                       const int MM, uint16_t *out, int64_t N, __mmask16 mask) {
    __m512 acc[BM];
    for (int m = 0; m < MM; m++) acc[m] = _mm512_setzero_ps();
    const int64_t pairs = K / 2;
    for (int64_t p = 0; p < pairs; p++) {
        _mm_prefetch((const char *)(wb + 32 * (p + PREFETCH_PAIRS)), _MM_HINT_T0);
        const __m512bh w = (__m512bh)_mm512_loadu_si512(wb + 32 * p);
        for (int m = 0; m < MM; m++) {
            const __m512bh xv = (__m512bh)_mm512_set1_epi32(xp[p * MM + m]);
            acc[m] = _mm512_dpbf16_ps(acc[m], w, xv);
        }
    }
    for (int m = 0; m < MM; m++)
        _mm256_mask_storeu_epi16(out + m * N, mask, (__m256i)_mm512_cvtneps_pbh(acc[m]));
}

/* x [M, K] -> per tile of mm = min(BM, M - m0) rows from row m0: [K / 2][mm] int32 pairs at xp + m0 * K / 2. */
static void pack_x(const uint16_t *x, int64_t M, int64_t K, int32_t *xp) {
    const int64_t pairs = K / 2;
    for (int64_t m = 0; m < M; m++) {
        const int64_t m0 = m / BM * BM, mm = M - m0 < BM ? M - m0 : BM;
        const int32_t *row = (const int32_t *)(x + m * K);
        int32_t *dst = xp + m0 * pairs + (m - m0);
        for (int64_t p = 0; p < pairs; p++) dst[p * mm] = row[p];
    }
}

void lanes_gemm_bf16(const uint16_t *x, int64_t M, int64_t K, const uint16_t *packed, uint16_t *out, int64_t N) {
    const int64_t nblocks = (N + LROWS - 1) / LROWS, pairs = K / 2;
    int32_t *xp = malloc(sizeof(int32_t) * (size_t)(M * pairs));
    pack_x(x, M, K, xp);
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nblocks; b++) {
        const uint16_t *wb = packed + b * K * LROWS;
        const int64_t rows = N - b * LROWS < LROWS ? N - b * LROWS : LROWS;
        const __mmask16 mask = (__mmask16)((1u << rows) - 1);
        for (int64_t m0 = 0; m0 < M; m0 += BM) {
            const int64_t mm = M - m0 < BM ? M - m0 : BM;
            const int32_t *xm = xp + m0 * pairs;
            uint16_t *om = out + m0 * N + b * LROWS;
            switch (mm) {
#define CASE(n) case n: tile(wb, xm, K, n, om, N, mask); break;
            CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
            CASE(9) CASE(10) CASE(11) CASE(12) CASE(13) CASE(14) CASE(15)
            default: tile(wb, xm, K, BM, om, N, mask); break;
#undef CASE
            }
        }
    }
    free(xp);
}

#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
/* AVX2 + FMA, same packing: a pair's 64 B are two vectors of 8 rows; each 32-bit lane's
 * bf16 pair widens to two float32 (low half << 16, high half masked), multiplied by x's
 * pair (widened once per call into `xf`) with FMA: exact products, float32 sums, as the
 * AVX512-BF16 dot product. 16 vector registers: 2 accumulators per row of x, BM2 rows. */
#define BM2 4

int lanes_gemm_available(void) { return 1; }

static inline __attribute__((always_inline)) void tile2(const uint16_t *wb, const float *xf, int64_t K, const int MM,
                                                        uint16_t *out, int64_t N, int64_t rows) {
    __m256 lo[BM2], hi[BM2];
    for (int m = 0; m < MM; m++) lo[m] = hi[m] = _mm256_setzero_ps();
    const __m256i odd = _mm256_set1_epi32((int)0xFFFF0000u);
    const int64_t pairs = K / 2;
    for (int64_t p = 0; p < pairs; p++) {
        _mm_prefetch((const char *)(wb + 32 * (p + PREFETCH_PAIRS)), _MM_HINT_T0);
        const __m256i w0 = _mm256_loadu_si256((const __m256i *)(wb + 32 * p));
        const __m256i w1 = _mm256_loadu_si256((const __m256i *)(wb + 32 * p + 16));
        const __m256 e0 = _mm256_castsi256_ps(_mm256_slli_epi32(w0, 16)), o0 = _mm256_castsi256_ps(_mm256_and_si256(w0, odd));
        const __m256 e1 = _mm256_castsi256_ps(_mm256_slli_epi32(w1, 16)), o1 = _mm256_castsi256_ps(_mm256_and_si256(w1, odd));
        for (int m = 0; m < MM; m++) {
            const __m256 xe = _mm256_broadcast_ss(xf + m * K + 2 * p), xo = _mm256_broadcast_ss(xf + m * K + 2 * p + 1);
            lo[m] = _mm256_fmadd_ps(o0, xo, _mm256_fmadd_ps(e0, xe, lo[m]));
            hi[m] = _mm256_fmadd_ps(o1, xo, _mm256_fmadd_ps(e1, xe, hi[m]));
        }
    }
    for (int m = 0; m < MM; m++) {
        float tmp[LROWS];
        _mm256_storeu_ps(tmp, lo[m]);
        _mm256_storeu_ps(tmp + 8, hi[m]);
        for (int64_t r = 0; r < rows; r++) out[m * N + r] = bf16_store(tmp[r]);
    }
}

void lanes_gemm_bf16(const uint16_t *x, int64_t M, int64_t K, const uint16_t *packed, uint16_t *out, int64_t N) {
    const int64_t nblocks = (N + LROWS - 1) / LROWS;
    float *xf = malloc(sizeof(float) * M * K); /* x widened once: [M, K] */
    for (int64_t i = 0; i < M * K; i++) xf[i] = bf16_load(x[i]);
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nblocks; b++) {
        const uint16_t *wb = packed + b * K * LROWS;
        const int64_t rows = N - b * LROWS < LROWS ? N - b * LROWS : LROWS;
        for (int64_t m0 = 0; m0 < M; m0 += BM2) {
            const float *xm = xf + m0 * K;
            uint16_t *om = out + m0 * N + b * LROWS;
            switch (M - m0 < BM2 ? M - m0 : BM2) {
            case 1: tile2(wb, xm, K, 1, om, N, rows); break;
            case 2: tile2(wb, xm, K, 2, om, N, rows); break;
            case 3: tile2(wb, xm, K, 3, om, N, rows); break;
            default: tile2(wb, xm, K, BM2, om, N, rows); break;
            }
        }
    }
    free(xf);
}

#else
int lanes_gemm_available(void) { return 0; }
void lanes_gemm_bf16(const uint16_t *x, int64_t M, int64_t K, const uint16_t *packed, uint16_t *out, int64_t N) {
    (void)x; (void)M; (void)K; (void)packed; (void)out; (void)N;
    abort();
}
#endif
