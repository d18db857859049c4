/* bf16 linear (any batch; written for decode): out[M, N] = x[M, K] @ W^T, bf16 in and out, float32 sums.
 *
 * Packed weight (model/prepack.py `lanes_pack`): rows in blocks of 16 (N padded with zero
 * rows), K in pairs; per row block, per pair p, 64 B: lane r holds (W[r][2p], W[r][2p + 1]).
 * _mm512_dpbf16_ps multiplies one such vector by a broadcast pair of x (exact products,
 * float32 sums), so the 16 lanes are 16 output rows: no horizontal sums, and one weight
 * load serves up to BM rows of x. Row blocks are spread over the threads; a block's
 * weights (K * 32 B) stay in L1/L2 while every tile of BM rows of x passes over them, so
 * each weight byte comes from memory once per call. K even; x, out contiguous.
 * Built only where the compiler targets AVX512-BF16 (`lanes_gemm_available` says).
 */
#include <stdint.h>
#include <stdlib.h>

#define LROWS 16 /* output rows per block = lanes */
#define BM 16    /* rows of x per pass over a block */
/* Weights are prefetched this many pairs (64 B each) ahead, past the end of a block into
 * the next one a thread takes: without it, on weights that come from memory (a whole
 * model's), 16-32 rows ran slower than oneDNN; with it, faster at every row count. */
#define PREFETCH_PAIRS 32

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>

int lanes_gemm_available(void) { return 1; }

static inline __attribute__((always_inline)) void tile(const uint16_t *wb, const uint16_t *x, int64_t K,
                                                       const int MM, uint16_t *out, int64_t N, __mmask16 mask) {
    __m512 acc[BM];
    for (int m = 0; m < MM; m++) acc[m] = _mm512_setzero_ps();
    const int64_t pairs = K / 2;
    for (int64_t p = 0; p < pairs; p++) {
        _mm_prefetch((const char *)(wb + 32 * (p + PREFETCH_PAIRS)), _MM_HINT_T0);
        const __m512bh w = (__m512bh)_mm512_loadu_si512(wb + 32 * p);
        for (int m = 0; m < MM; m++) {
            const __m512bh xv = (__m512bh)_mm512_set1_epi32(*(const int32_t *)(x + m * K + 2 * p));
            acc[m] = _mm512_dpbf16_ps(acc[m], w, xv);
        }
    }
    for (int m = 0; m < MM; m++)
        _mm256_mask_storeu_epi16(out + m * N, mask, (__m256i)_mm512_cvtneps_pbh(acc[m]));
}

void lanes_gemm_bf16(const uint16_t *x, int64_t M, int64_t K, const uint16_t *packed, uint16_t *out, int64_t N) {
    const int64_t nblocks = (N + LROWS - 1) / LROWS;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nblocks; b++) {
        const uint16_t *wb = packed + b * K * LROWS;
        const int64_t rows = N - b * LROWS < LROWS ? N - b * LROWS : LROWS;
        const __mmask16 mask = (__mmask16)((1u << rows) - 1);
        for (int64_t m0 = 0; m0 < M; m0 += BM) {
            const int64_t mm = M - m0 < BM ? M - m0 : BM;
            const uint16_t *xm = x + m0 * K;
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
}

#else
int lanes_gemm_available(void) { return 0; }
void lanes_gemm_bf16(const uint16_t *x, int64_t M, int64_t K, const uint16_t *packed, uint16_t *out, int64_t N) {
    (void)x; (void)M; (void)K; (void)packed; (void)out; (void)N;
    abort();
}
#endif
