/* vnni_gemv.c's matmul for AVX2 (+ FMA, F16C) builds without AVX512-VNNI (the avx2
 * and avx2vnni variants):
 * the same packed weights, the same int8 activations (per 32 columns: dx = max|x| / 127,
 * q = round(x / dx)) and the same sums, sum_k w x ~= sum_g dx_g * sum_s (d_gs * sum_k c q +
 * m_gs * sum_k q); layout and semantics in vnni_gemv.c's header. Integer dot products are
 * exact, so the variants differ only in the order of float32 additions (measured: within 3e-7
 * of the AVX-512 kernel's output, relative to its largest value).
 *
 * A record's 64-byte chunk is two vectors of 8 rows; vpdpbusd is AVX-VNNI's (VEX-encoded, the
 * avx2vnni variant: -mavxvnni) or emulated by vpmaddubsw (u8 x s8 -> int16 sums of 2 products),
 * whose int16 outputs are added up as far as they cannot saturate (pairs16) before one vpmaddwd
 * widens them to int32. 8-bit codes (0..255) x 127 would not fit int16: they are made signed
 * (c - 128) with the sign moved onto q (vpsignb), and the -128 * sum q they leave is returned
 * through the minimum: m' = m + 128 d (not with AVX-VNNI).
 * Tiles: 16 rows x 32 columns x up to CM = 4 rows of x per pass, the loops unrolled with the
 * layout as constants so the accumulators stay in registers. On a 2-core Zen 3, 1B shapes, 4-bit,
 * against the earlier 2-row form that widened every product: 128 rows of x 1.9x faster, one row
 * ~2x from L3 (from DRAM one row is bandwidth-bound).
 * Other builds (x86-64 baseline, armv8-a) have no such matmul (`vnni_available` 0, from
 * vnni_gemv.c): plain C loops took ~1.2 ms for 3072 x 576, where torch's int4 kernel, which
 * then serves, takes ~70 us.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#if !(defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__F16C__)) \
    && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

#define CG 32      /* columns per activation group and record */
#define CROWS 16   /* output rows per block */
#define CM 4       /* rows of x per pass over a block's weights */
/* Rows of x per pass over all row blocks: the chunk's int8 rows (chunk x K bytes) stay in each
 * core's L2 while every weight block reads them (measured, 1B down projection 2048 x 8192 at
 * 1750 rows: 1.5x the time per row of 256 rows without chunks). */
#define M_CHUNK_BYTES (256 * 1024)
#define CODE_SHIFT 128 /* 8-bit codes are stored + 128 (model/quant.py VNNI_CODE_OFFSET) */
/* Where x has at most CM rows (decode of up to 4 streams) the matmul makes one pass over its
 * weights, streaming them from DRAM, and the hardware prefetcher alone left it at ~30 GB/s on a
 * 2-core Zen 3. Then each 64-byte chunk read also prefetches the same chunk of the record 2
 * ahead in the row block. Measured in whole decode steps, builds in turn on a noisy machine:
 * 1B Q8_0 one stream 39.5-48.1 -> 32.6-40.3 ms (12 pairs), four streams 52.2 / 53.2 -> 49.2 /
 * 50.5; 1B Q4_K_M one stream 28.8 / 33.6 -> 27.0 / 27.3; 4 and 8 records ahead were no better
 * than 2. Wider x reuses each block from cache (compute-bound): no prefetch there. */
#define PREFETCH_RECORDS 2

int vnni_available(void) { return 1; }

static inline __m256 load8_f32(const float *x) { return _mm256_loadu_ps(x); }
static inline __m256 load8_bf16(const uint16_t *x) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)x)), 16));
}

static inline int32_t hsum8(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

/* One group of 32 floats v[4][8] -> 32 int8 codes at q (round to nearest even, as lrintf),
 * returns dx; sq[h] = dx * sum(q) over half h. */
static inline float quantize_group(const __m256 *v, int8_t *q, float *sq) {
    const __m256 sign = _mm256_set1_ps(-0.f);
    const __m256 m8 = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                    _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    const float mx = _mm_cvtss_f32(_mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1)));
    const float dx = mx / 127.f, inv = mx > 0.f ? 127.f / mx : 0.f;
    __m256i i[4];
    for (int j = 0; j < 4; j++) i[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], _mm256_set1_ps(inv)));
    /* packs work per 128-bit lane: dwords come out as i0 i1 i2 i3 (columns 0..3 of each) then
     * the same for columns 4..7; the permutation puts each vector's 8 bytes back in order */
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
    _mm256_storeu_si256((__m256i *)q, _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    sq[0] = dx * (float)hsum8(_mm256_add_epi32(i[0], i[1]));
    sq[1] = dx * (float)hsum8(_mm256_add_epi32(i[2], i[3]));
    return dx;
}

/* x [M, K] -> int8 q [M, K], per 32 columns dx and sq[2] (quantize_group); threads share
 * the rows when there are enough of them to pay for it. */
#define DEFINE_QUANTIZE(NAME, T, LOAD8)                                                        \
static void NAME(const T *x, int64_t M, int64_t K, int8_t *q, float *dx, float *sq) {          \
    const int64_t G = K / CG;                                                                  \
    _Pragma("omp parallel for schedule(static) if (M * K >= 65536)")                           \
    for (int64_t i = 0; i < M * G; i++) {                                                      \
        const __m256 v[4] = {LOAD8(x + i * CG), LOAD8(x + i * CG + 8), LOAD8(x + i * CG + 16), \
                             LOAD8(x + i * CG + 24)};                                          \
        dx[i] = quantize_group(v, q + i * CG, sq + 2 * i);                                     \
    }                                                                                          \
}
DEFINE_QUANTIZE(quantize_f32, float, load8_f32)
DEFINE_QUANTIZE(quantize_bf16, uint16_t, load8_bf16)

/* With AVX-VNNI, vpdpbusd sums u8 x s8 products straight into int32, so 8-bit codes are used as
 * they are (as vnni_gemv.c; ~10% faster on Q8_0 than the signed form) and its outputs differ from
 * avx2's by float rounding only (measured: 2e-7 relative to the largest). Without it, vpmaddubsw
 * gives int16 sums of 2 products (saturating, which no record reaches: see pairs16) and vpmaddwd
 * widens them; on 4/5/6-bit weights both give identical integers. */
#ifdef __AVXVNNI__
#define SIGNED8 0
#else
#define SIGNED8 1
#endif

static inline int64_t code_bytes(int bits) { return bits == 8 ? 512 : 256 + 64 * (bits - 4); }

/* Bits 4.. of nibble vector v's codes from the high planes' halves h0, h1 (as vnni_gemv.c). */
static inline __m256i high_bits(__m256i h0, __m256i h1, int bits, int v) {
    const __m256i h = bits == 5 || v < 4 ? h0 : h1;
    const int shift = bits == 5 ? 4 - v : 4 - 2 * (v % 4);
    const __m256i moved = shift >= 0 ? _mm256_slli_epi16(h, shift) : _mm256_srli_epi16(h, -shift);
    return _mm256_and_si256(moved, _mm256_set1_epi8((char)(bits == 5 ? 0x10 : 0x30)));
}

/* Chunk c, half hh of a 4/5/6-bit record -> its two vectors of unsigned codes: u[0] = nibble
 * vector 2c, u[1] = 2c + 1 (byte j of a lane: columns 8c + j, 8c + 4 + j), high bits added. */
static inline __attribute__((always_inline)) void unpack_chunk(const uint8_t *rec, int c, int hh, const int BITS,
                                                               __m256i *u) {
    const __m256i nib = _mm256_set1_epi8(0x0F);
    const __m256i w = _mm256_loadu_si256((const __m256i *)(rec + 64 * c + 32 * hh));
    u[0] = _mm256_and_si256(w, nib);
    u[1] = _mm256_and_si256(_mm256_srli_epi16(w, 4), nib);
    if (BITS > 4) {
        const __m256i p0 = _mm256_loadu_si256((const __m256i *)(rec + 256 + 32 * hh));
        const __m256i p1 = BITS == 6 ? _mm256_loadu_si256((const __m256i *)(rec + 320 + 32 * hh)) : p0;
        u[0] = _mm256_or_si256(u[0], high_bits(p0, p1, BITS, 2 * c));
        u[1] = _mm256_or_si256(u[1], high_bits(p0, p1, BITS, 2 * c + 1));
    }
}

/* Codes tile: a row block's 4/5/6-bit records (G of rec_bytes) unpacked once into bytes, so that
 * the passes over x (4 rows each) that follow read ready codes instead of each unpacking them
 * again. tile [2 halves][G][8 vectors][32] (16 x K bytes: 9 KB at K = 576, 128 KB at 8192). */
#define TILE_VECTOR(G, hh, g, v) ((((int64_t)(hh) * (G) + (g)) * 8 + (v)) * 32)
static inline __attribute__((always_inline)) void unpack_tile_t(const uint8_t *rec0, int64_t G, int64_t rec_bytes,
                                                                const int BITS, uint8_t *tile) {
    for (int hh = 0; hh < 2; hh++)
        for (int64_t g = 0; g < G; g++)
            for (int c = 0; c < 4; c++) {
                __m256i u[2];
                unpack_chunk(rec0 + g * rec_bytes, c, hh, BITS, u);
                _mm256_storeu_si256((__m256i *)(tile + TILE_VECTOR(G, hh, g, 2 * c)), u[0]);
                _mm256_storeu_si256((__m256i *)(tile + TILE_VECTOR(G, hh, g, 2 * c + 1)), u[1]);
            }
}
static void unpack_tile(const uint8_t *rec0, int64_t G, int64_t rec_bytes, int bits, uint8_t *tile) {
    if (bits == 4) unpack_tile_t(rec0, G, rec_bytes, 4, tile);
    else if (bits == 5) unpack_tile_t(rec0, G, rec_bytes, 5, tile);
    else unpack_tile_t(rec0, G, rec_bytes, 6, tile);
}

/* Sums of 2 products u8 x s8 that one int16 lane of vpmaddubsw's output can add up before it is
 * widened to int32: |q| <= 127 and codes <= 15 (4 bits), 31 (5), 63 (6), |c - 128| <= 128 (8,
 * SIGNED8) give |pair| <= 3810, 7874, 16002, 32512, so 8, 4, 2, 1 of them stay under 32767. */
static inline int pairs16(int bits) { return bits == 4 ? 8 : bits == 5 ? 4 : bits == 6 ? 2 : 1; }

/* acc [MM][16] = this row block's sums over all K for MM rows of x. MM, S, BITS and HN are
 * compile-time constants at every call (block_rows dispatches), so the loops unroll and the
 * accumulators stay in registers. HN: the block's halves (rows 8h .. 8h + 7, one vector per row
 * of x) taken together in one pass over K, 2 or 1. Each half's weight bytes are its own, so with
 * HN = 1 nothing is unpacked twice, only q is broadcast twice; its MM float + int32 + int16 sums
 * (12 at MM = 4) fit the 16 ymm registers beside the weights, where HN = 2 spills (block_rows
 * says which each width takes). Per 32-column group g and scale set s: chunk by chunk, each weight
 * vector unpacked once serves the MM rows of x; int32 sums ia[m][h] of codes x q, then
 * acc += dx * (d * ia + m * sum q). fetch: the call makes one pass (PREFETCH_RECORDS). */
static inline __attribute__((always_inline)) void block_rows_t(
        const uint8_t *rec0, int64_t G, int64_t K, const int8_t *q, const float *dx, const float *sq,
        const int MM, const int S, const int BITS, const int sym, const int HN, const int fetch, const int TILED,
        const uint8_t *tile, float *acc) {
    const int64_t codes = code_bytes(BITS), set_bytes = sym ? 32 : 64;
    const int chunks = BITS == 8 ? 8 : 4, per_set = chunks / S;
    const float off = (float)(1 << (BITS - 1));
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    const __m256i ones = _mm256_set1_epi16(1);
    for (int h0 = 0; h0 < 2; h0 += HN) {
        __m256 a[CM][2];
        for (int m = 0; m < MM; m++)
            for (int h = 0; h < HN; h++) a[m][h] = _mm256_setzero_ps();
        const uint8_t *rec = rec0;
        for (int64_t g = 0; g < G; g++, rec += codes + set_bytes * S) {
            for (int s = 0; s < S; s++) {
                const uint8_t *dm = rec + codes + set_bytes * s; /* d[16] (, m[16]) float16 */
                __m256i ia[CM][2], i16[CM][2];
                for (int m = 0; m < MM; m++)
                    for (int h = 0; h < HN; h++) ia[m][h] = i16[m][h] = _mm256_setzero_si256();
#ifndef __AVXVNNI__
                int n16 = 0; /* maddubs outputs summed in i16 since the last widening */
#endif
                for (int c = s * per_set; c < (s + 1) * per_set; c++) {
                    if (fetch) /* a single pass streams the weights: fetch ahead (PREFETCH_RECORDS) */
                        __builtin_prefetch(rec + 64 * c + PREFETCH_RECORDS * (codes + set_bytes * S));
                    __m256i u[2][2], ws[2]; /* [half][v]: unsigned codes of nibble vectors 2c, 2c + 1, or 8-bit chunk c */
                    for (int h = 0; h < HN; h++) {
                        const int hh = h0 + h;
                        if (TILED) { /* codes unpacked before the passes (unpack_tile) */
                            u[h][0] = _mm256_loadu_si256((const __m256i *)(tile + TILE_VECTOR(G, hh, g, 2 * c)));
                            u[h][1] = _mm256_loadu_si256((const __m256i *)(tile + TILE_VECTOR(G, hh, g, 2 * c + 1)));
                        } else if (BITS < 8) {
                            unpack_chunk(rec, c, hh, BITS, u[h]);
                        } else if (SIGNED8) { /* code - 128: its magnitude here, its sign moved onto q below */
                            const __m256i w = _mm256_loadu_si256((const __m256i *)(rec + 64 * c + 32 * hh));
                            ws[h] = _mm256_xor_si256(w, flip);
                            u[h][0] = _mm256_abs_epi8(ws[h]);
                        } else {
                            u[h][0] = _mm256_loadu_si256((const __m256i *)(rec + 64 * c + 32 * hh));
                        }
                    }
                    for (int m = 0; m < MM; m++) {
                        const int32_t *qw = (const int32_t *)(q + m * K + g * CG);
                        for (int v = 0; v < (BITS < 8 ? 2 : 1); v++) { /* 4 columns of q per lane: word (c, v) */
                            const __m256i qv = _mm256_set1_epi32(qw[BITS < 8 ? 2 * c + v : c]);
                            for (int h = 0; h < HN; h++) {
#ifdef __AVXVNNI__
                                ia[m][h] = _mm256_dpbusd_avx_epi32(ia[m][h], u[h][v], qv);
#else
                                const __m256i s8 = BITS == 8 ? _mm256_sign_epi8(qv, ws[h]) : qv;
                                i16[m][h] = _mm256_add_epi16(i16[m][h], _mm256_maddubs_epi16(u[h][v], s8));
#endif
                            }
                        }
                    }
#ifndef __AVXVNNI__
                    n16 += BITS < 8 ? 2 : 1;
                    if (n16 == pairs16(BITS) || c == (s + 1) * per_set - 1) {
                        for (int m = 0; m < MM; m++)
                            for (int h = 0; h < HN; h++) {
                                ia[m][h] = _mm256_add_epi32(ia[m][h], _mm256_madd_epi16(i16[m][h], ones));
                                i16[m][h] = _mm256_setzero_si256();
                            }
                        n16 = 0;
                    }
#endif
                }
                for (int h = 0; h < HN; h++) {
                    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dm + 16 * (h0 + h))));
                    __m256 mn = sym ? _mm256_mul_ps(d, _mm256_set1_ps(-off))
                                    : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dm + 32 + 16 * (h0 + h))));
                    if (BITS == 8 && SIGNED8) mn = _mm256_fmadd_ps(d, _mm256_set1_ps((float)CODE_SHIFT), mn);
                    for (int m = 0; m < MM; m++) {
                        const float *sqg = sq + m * 2 * G + 2 * g;
                        const float sum_q = S == 1 ? sqg[0] + sqg[1] : sqg[s];
                        const __m256 ints = _mm256_cvtepi32_ps(ia[m][h]);
                        a[m][h] = _mm256_fmadd_ps(ints, _mm256_mul_ps(d, _mm256_set1_ps(dx[m * G + g])), a[m][h]);
                        a[m][h] = _mm256_fmadd_ps(mn, _mm256_set1_ps(sum_q), a[m][h]);
                    }
                }
            }
        }
        for (int m = 0; m < MM; m++)
            for (int h = 0; h < HN; h++) _mm256_storeu_ps(acc + m * CROWS + 8 * (h0 + h), a[m][h]);
    }
}

/* Halves per pass (block_rows_t's HN): one for 5-bit codes at MM > 2 rows of x (measured on a
 * 2-core Zen 3, interleaved with the two-halves form, identical outputs: 1.1-1.4x at 16-256 rows
 * of the 1B and SmolLM2 shapes), two otherwise (one half was slower at 4, 6 and 8 bits, by up to a
 * third at 4 bits on 2048 x 8192, and at one row, where two halves do not spill and give twice the independent sums). */
#define HALVES(B, M) ((B) == 5 && (M) > 2 ? 1 : 2)

/* When the passes read unpacked codes (unpack_tile), measured on a 2-core Zen 3, one process
 * alternating the builds, 3072 x 576, medians: 5-bit 1.37x at 16 rows of x, 1.58x at 256; 6-bit
 * 1.15x / 1.30x; 4-bit, whose unpack is three operations, only gains at 64 rows and more (1.10x;
 * 0.8-0.94x at 8-16). 8-bit codes were slower tiled (0.72-0.84x at 8-256 rows, stored as
 * |code - 128| and code - 128: twice the bytes for two saved operations). Halves per pass: one
 * below TILE_WIDE_ROWS rows (5-bit at 16 rows: 1.37x against 1.26x with two), two from there on. */
#define TILE_WIDE_ROWS 64
static inline int tiled_call(int64_t bits, int64_t M) {
    return M > CM && (bits == 5 || bits == 6 || (bits == 4 && M >= TILE_WIDE_ROWS));
}

/* block_rows_t with MM (1 .. CM), S (1, 2), bits (4, 5, 6, 8), and for codes from unpack_tile
 * (tile not NULL) its halves per pass, as constants. */
static void block_rows(const uint8_t *rec, int64_t G, int64_t K, const int8_t *q, const float *dx, const float *sq,
                       int MM, int S, int bits, int sym, int fetch, const uint8_t *tile, int tile_halves, float *acc) {
#define ROWS_CASE(B, SS, M)                                                                                   \
    if (bits == B && S == SS && MM == M) {                                                                    \
        if (B < 8 && tile && tile_halves == 1) block_rows_t(rec, G, K, q, dx, sq, M, SS, B, sym, 1, 0, 1, tile, acc); \
        else if (B < 8 && tile) block_rows_t(rec, G, K, q, dx, sq, M, SS, B, sym, 2, 0, 1, tile, acc);       \
        else block_rows_t(rec, G, K, q, dx, sq, M, SS, B, sym, HALVES(B, M), fetch, 0, NULL, acc);            \
        return;                                                                                               \
    }
#define ROWS_CASES_M(B, SS) ROWS_CASE(B, SS, 1) ROWS_CASE(B, SS, 2) ROWS_CASE(B, SS, 3) ROWS_CASE(B, SS, 4)
#define ROWS_CASES(B) ROWS_CASES_M(B, 1) ROWS_CASES_M(B, 2)
    ROWS_CASES(4) ROWS_CASES(5) ROWS_CASES(6) ROWS_CASES(8)
#undef ROWS_CASES
#undef ROWS_CASES_M
#undef ROWS_CASE
    abort(); /* unreachable: vnni_pack makes no other layout */
}

/* Where x has more rows than one pass takes (tiled_call), each row block's 4/5/6-bit codes are
 * unpacked once per chunk of x into the thread's tile (unpack_tile) for all of its passes. */
#define DEFINE_MATMUL(NAME, T, QUANTIZE, STORE)                                                \
void NAME(const T *x, int64_t M, int64_t K, const uint8_t *packed, int64_t bits, int64_t group, \
          int64_t sym, T *out, int64_t N, int64_t ldo) {                                       \
    const int64_t G = K / CG, nblocks = (N + CROWS - 1) / CROWS, sets = CG / group;            \
    const int64_t rec_bytes = code_bytes((int)bits) + (sym ? 32 : 64) * sets;                  \
    int8_t *q = malloc((size_t)(M * K));                                                       \
    float *dx = malloc(sizeof(float) * M * G), *sq = malloc(sizeof(float) * M * 2 * G);        \
    QUANTIZE(x, M, K, q, dx, sq);                                                              \
    const int64_t chunk = M_CHUNK_BYTES / K / CM * CM > CM ? M_CHUNK_BYTES / K / CM * CM : CM; \
    const int tiled = tiled_call(bits, M), tile_halves = M >= TILE_WIDE_ROWS ? 2 : 1;           \
    _Pragma("omp parallel")                                                                    \
    {                                                                                          \
    uint8_t *tile = tiled ? malloc((size_t)(2 * G * 8 * 32)) : NULL;                           \
    for (int64_t c0 = 0; c0 < M; c0 += chunk) { /* every thread; the row blocks shared */     \
        const int64_t c1 = M - c0 < chunk ? M : c0 + chunk;                                    \
        _Pragma("omp for schedule(static)")                                                    \
        for (int64_t b = 0; b < nblocks; b++) {                                                \
            const int64_t rows = N - b * CROWS < CROWS ? N - b * CROWS : CROWS;                \
            const uint8_t *rec = packed + b * G * rec_bytes;                                   \
            if (tiled) unpack_tile(rec, G, rec_bytes, (int)bits, tile);                        \
            for (int64_t m0 = c0; m0 < c1; m0 += CM) {                                         \
                const int mm = c1 - m0 < CM ? (int)(c1 - m0) : CM;                             \
                float acc[CM * CROWS];                                                         \
                block_rows(rec, G, K, q + m0 * K, dx + m0 * G, sq + m0 * 2 * G, mm, (int)sets, (int)bits, \
                           (int)sym, M <= CM, tile, tile_halves, acc);                        \
                for (int m = 0; m < mm; m++)                                                   \
                    for (int64_t r = 0; r < rows; r++)                                         \
                        out[(m0 + m) * ldo + b * CROWS + r] = STORE(acc[m * CROWS + r]);       \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
    free(tile);                                                                                \
    }                                                                                          \
    free(q);                                                                                   \
    free(dx);                                                                                  \
    free(sq);                                                                                  \
}

DEFINE_MATMUL(vnni_matmul_f32, float, quantize_f32, f32_store)
DEFINE_MATMUL(vnni_matmul_bf16, uint16_t, quantize_bf16, bf16_store)

#endif
