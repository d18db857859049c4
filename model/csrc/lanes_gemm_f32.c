/* bf16 weights x float32 activations: out[M, N] (row stride ldo) = x[M, K] @ W^T, float32 in,
 * out and sums. A bf16 checkpoint in a float32 model (every CPU without bf16 arithmetic) keeps
 * its weights at 2 bytes, so a decode step reads half the bytes a float32 copy would.
 *
 * Weights in lanes_gemm.c's packing (model/prepack.py `lanes_pack`): rows in blocks of 16 (N
 * padded with zero rows), K in pairs; per row block, per pair p, 64 B: lane r holds
 * (W[r][2p], W[r][2p + 1]). Each 32-bit lane's pair widens to two float32 in registers (low
 * half << 16, high half masked): exact, so every product is the float32 model's. Two vectors
 * of 8 rows per pair, FMA with x's pair broadcast: 2 accumulators per row of x, MR rows per
 * pass over a block (AVX2's 16 registers: 2 MR accumulators + 4 widened weights + 2 broadcasts).
 * Row blocks are spread over the threads; a block's weights (K * 32 B) stay in L2 while every
 * tile of MR rows of x passes over them. Each tile of x is first laid out pair-major
 * ([pairs][mm][2] floats): a step's broadcasts read 8 * mm contiguous bytes, not mm rows
 * K * 4 B apart in the same L1 sets. Built where the compiler targets AVX2 + FMA (the avx512,
 * avx2vnni and avx2 variants); `lanes_gemm_f32_available` says.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LROWS 16 /* output rows per block, as lanes_gemm.c */
#define MR 4     /* rows of x per pass over a block */
#define PREFETCH_PAIRS 32 /* weights prefetched this many pairs (64 B each) ahead */

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

int lanes_gemm_f32_available(void) { return 1; }

static inline __attribute__((always_inline)) void tile(const uint16_t *wb, const float *xp, int64_t K, const int MM,
                                                       float *out, int64_t ldo, int64_t rows) {
    __m256 lo[MR], hi[MR];
    for (int m = 0; m < MM; m++) lo[m] = hi[m] = _mm256_setzero_ps();
    const __m256i odd = _mm256_set1_epi32((int)0xFFFF0000u);
    const int64_t pairs = K / 2;
    for (int64_t p = 0; p < pairs; p++) {
        _mm_prefetch((const char *)(wb + 32 * (p + PREFETCH_PAIRS)), _MM_HINT_T0);
        const __m256i w0 = _mm256_loadu_si256((const __m256i *)(wb + 32 * p));
        const __m256i w1 = _mm256_loadu_si256((const __m256i *)(wb + 32 * p + 16));
        const __m256 e0 = _mm256_castsi256_ps(_mm256_slli_epi32(w0, 16));
        const __m256 o0 = _mm256_castsi256_ps(_mm256_and_si256(w0, odd));
        const __m256 e1 = _mm256_castsi256_ps(_mm256_slli_epi32(w1, 16));
        const __m256 o1 = _mm256_castsi256_ps(_mm256_and_si256(w1, odd));
        const float *xq = xp + 2 * MM * p;
        for (int m = 0; m < MM; m++) {
            const __m256 xe = _mm256_broadcast_ss(xq + 2 * m), xo = _mm256_broadcast_ss(xq + 2 * m + 1);
            lo[m] = _mm256_fmadd_ps(o0, xo, _mm256_fmadd_ps(e0, xe, lo[m]));
            hi[m] = _mm256_fmadd_ps(o1, xo, _mm256_fmadd_ps(e1, xe, hi[m]));
        }
    }
    for (int m = 0; m < MM; m++) {
        if (rows == LROWS) {
            _mm256_storeu_ps(out + m * ldo, lo[m]);
            _mm256_storeu_ps(out + m * ldo + 8, hi[m]);
        } else {
            float tmp[LROWS];
            _mm256_storeu_ps(tmp, lo[m]);
            _mm256_storeu_ps(tmp + 8, hi[m]);
            memcpy(out + m * ldo, tmp, sizeof(float) * (size_t)rows);
        }
    }
}

/* x [M, K] -> per tile of mm = min(MR, M - m0) rows from row m0: [K / 2][mm][2] at xp + m0 * K. */
static void pack_x(const float *x, int64_t M, int64_t K, float *xp) {
    const int64_t pairs = K / 2;
    for (int64_t m = 0; m < M; m++) {
        const int64_t m0 = m / MR * MR, mm = M - m0 < MR ? M - m0 : MR;
        const float *row = x + m * K;
        float *dst = xp + m0 * K + 2 * (m - m0);
        for (int64_t p = 0; p < pairs; p++) {
            dst[p * 2 * mm] = row[2 * p];
            dst[p * 2 * mm + 1] = row[2 * p + 1];
        }
    }
}

void lanes_gemm_f32(const float *x, int64_t M, int64_t K, const uint16_t *packed, float *out, int64_t N,
                    int64_t ldo) {
    const int64_t nblocks = (N + LROWS - 1) / LROWS;
    float *xp = M == 1 ? NULL : malloc(sizeof(float) * (size_t)(M * K));
    if (xp) pack_x(x, M, K, xp);
    const float *xs = xp ? xp : x; /* one row is its own pair-major layout */
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nblocks; b++) {
        const uint16_t *wb = packed + b * K * LROWS;
        const int64_t rows = N - b * LROWS < LROWS ? N - b * LROWS : LROWS;
        for (int64_t m0 = 0; m0 < M; m0 += MR) {
            const float *xm = xs + m0 * K;
            float *om = out + m0 * ldo + b * LROWS;
            switch (M - m0 < MR ? M - m0 : MR) {
            case 1: tile(wb, xm, K, 1, om, ldo, rows); break;
            case 2: tile(wb, xm, K, 2, om, ldo, rows); break;
            case 3: tile(wb, xm, K, 3, om, ldo, rows); break;
            default: tile(wb, xm, K, MR, om, ldo, rows); break;
            }
        }
    }
    free(xp);
}

#else
int lanes_gemm_f32_available(void) { return 0; }
void lanes_gemm_f32(const float *x, int64_t M, int64_t K, const uint16_t *packed, float *out, int64_t N,
                    int64_t ldo) {
    (void)x; (void)M; (void)K; (void)packed; (void)out; (void)N; (void)ldo;
    abort();
}
#endif
