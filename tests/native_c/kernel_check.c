/* Checks a kernels library (model/_native/workmem_kernels-<variant>.so) without Python: for a
 * cross-compiled variant run under qemu-user (tests/test_native_cross.py), where no torch
 * for that machine is at hand. Each kernel's output against a plain reference computed here
 * on the same random inputs; prints the worst error per kernel, exits 1 over tolerance.
 *
 *   kernel_check LIB.so
 */
#include <dlfcn.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../model/csrc/bf16.h"

#define TOL_F32 1e-4f
#define TOL_BF16 3e-2f

typedef void (*attn_f32_t)(const float *, int64_t, const float *, const float *, const int64_t *, int64_t,
                           const int64_t *, float *, int64_t, int64_t, int64_t, int64_t, int64_t, float);
typedef void (*attn_bf16_t)(const uint16_t *, int64_t, const uint16_t *, const uint16_t *, const int64_t *, int64_t,
                            const int64_t *, uint16_t *, int64_t, int64_t, int64_t, int64_t, int64_t, float);
typedef void (*norm_f32_t)(const float *, float *, const float *, float *, int64_t, int64_t, float);
typedef void (*silu_f32_t)(const float *, float *, int64_t, int64_t);
typedef void (*rotary_f32_t)(float *, int64_t, int64_t, int64_t, int64_t, const int64_t *, const float *, const float *);

static uint32_t seed = 12345;
static float rnd(void) { /* uniform in [-1, 1) */
    seed = seed * 1664525u + 1013904223u;
    return (float)(seed >> 8) / (float)(1u << 23) - 1.f;
}

static void *sym(void *lib, const char *name) {
    void *p = dlsym(lib, name);
    if (!p) { fprintf(stderr, "missing symbol %s\n", name); exit(2); }
    return p;
}

static int report(const char *name, float err, float tol) {
    printf("%-22s max error %.3g (tolerance %.3g)\n", name, err, tol);
    return err <= tol ? 0 : 1;
}

/* Decode attention, B sequences of lengths lens, H heads over kvH, head size D, blocks of bs
 * tokens laid out in reverse order (a scattered table). Reference: softmax(q.k * scale) v. */
static int check_attention(void *lib, int64_t D, int bf16) {
    enum { B = 2, H = 6, KVH = 2, BS = 4, MAXB = 20 };
    const int64_t lens[B] = {37, 70}, row = KVH * D, nblocks = B * MAXB;
    const float scale = 1.f / sqrtf((float)D);
    float *q = malloc(sizeof(float) * B * H * D), *k = malloc(sizeof(float) * nblocks * BS * row);
    float *v = malloc(sizeof(float) * nblocks * BS * row), *ref = malloc(sizeof(float) * B * H * D);
    float *out = malloc(sizeof(float) * B * H * D);
    int64_t tables[B * MAXB];
    for (int64_t i = 0; i < B * MAXB; i++) tables[i] = nblocks - 1 - i;
    for (int64_t i = 0; i < B * H * D; i++) q[i] = bf16 ? bf16_round(rnd()) : rnd();
    for (int64_t i = 0; i < nblocks * BS * row; i++) {
        k[i] = bf16 ? bf16_round(rnd()) : rnd();
        v[i] = bf16 ? bf16_round(rnd()) : rnd();
    }
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++) {
            const int64_t j = h / (H / KVH);
            double m = -1e30, l = 0, o[256] = {0}, s[128];
            for (int64_t t = 0; t < lens[b]; t++) {
                const float *kr = k + (tables[b * MAXB + t / BS] * BS + t % BS) * row + j * D;
                double dot = 0;
                for (int64_t d = 0; d < D; d++) dot += (double)q[(b * H + h) * D + d] * kr[d];
                s[t] = dot * scale;
                m = s[t] > m ? s[t] : m;
            }
            for (int64_t t = 0; t < lens[b]; t++) {
                const double e = exp(s[t] - m);
                const float *vr = v + (tables[b * MAXB + t / BS] * BS + t % BS) * row + j * D;
                l += e;
                for (int64_t d = 0; d < D; d++) o[d] += e * vr[d];
            }
            for (int64_t d = 0; d < D; d++) ref[(b * H + h) * D + d] = (float)(o[d] / l);
        }
    if (bf16) {
        uint16_t *qh = malloc(2 * B * H * D), *kh = malloc(2 * nblocks * BS * row), *vh = malloc(2 * nblocks * BS * row);
        uint16_t *oh = malloc(2 * B * H * D);
        for (int64_t i = 0; i < B * H * D; i++) qh[i] = bf16_store(q[i]);
        for (int64_t i = 0; i < nblocks * BS * row; i++) { kh[i] = bf16_store(k[i]); vh[i] = bf16_store(v[i]); }
        ((attn_bf16_t)sym(lib, "paged_decode_attention_bf16"))(qh, H * D, kh, vh, tables, MAXB, lens, oh, B, H, KVH, D,
                                                               BS, scale);
        for (int64_t i = 0; i < B * H * D; i++) out[i] = bf16_load(oh[i]);
        free(qh); free(kh); free(vh); free(oh);
    } else {
        ((attn_f32_t)sym(lib, "paged_decode_attention_f32"))(q, H * D, k, v, tables, MAXB, lens, out, B, H, KVH, D, BS,
                                                             scale);
    }
    float err = 0.f;
    for (int64_t i = 0; i < B * H * D; i++) err = fmaxf(err, fabsf(out[i] - ref[i]));
    free(q); free(k); free(v); free(ref); free(out);
    char name[64];
    snprintf(name, sizeof name, "attention %s D=%lld", bf16 ? "bf16" : "f32", (long long)D);
    return report(name, err, bf16 ? TOL_BF16 : TOL_F32);
}

/* int8 KV (model/kv_quant.py's rows, format 2: D codes + a bf16 scale of y = H (x - c), H the
 * orthonormal Hadamard matrix, c a centre for K only): write_kv_int8_f32 quantizes every slot
 * (each y within half a step of the reference's, H written out as (-1)^popcount(i & j) / sqrt(D)),
 * then paged_decode_attention_int8_f32 against the float reference over the dequantized pools,
 * which scores H q against the rows and rotates the output back. */
typedef void (*write_int8_f32_t)(const float *, const float *, int64_t, int64_t, int8_t *, int8_t *, const int64_t *,
                                 int64_t, int64_t, int64_t, const float *, int64_t);
typedef void (*attn_int8_f32_t)(const float *, int64_t, const int8_t *, const int8_t *, const int64_t *, int64_t,
                                const int64_t *, float *, int64_t, int64_t, int64_t, int64_t, int64_t, float, int64_t);
static double hadamard_entry(int64_t i, int64_t j, int64_t D) {
    return (__builtin_popcountll((unsigned long long)(i & j)) & 1 ? -1.0 : 1.0) / sqrt((double)D);
}
static void hadamard_ref(const double *x, double *y, int64_t D) {
    for (int64_t i = 0; i < D; i++) {
        y[i] = 0;
        for (int64_t j = 0; j < D; j++) y[i] += hadamard_entry(i, j, D) * x[j];
    }
}
static int check_int8_kv(void *lib, int64_t D) {
    enum { B = 2, H = 6, KVH = 2, BS = 4, MAXB = 20 };
    const int64_t lens[B] = {37, 70}, nslots = B * MAXB * BS, row = KVH * D, w = D + 2;
    const float scale = 1.f / sqrtf((float)D);
    float *x = malloc(sizeof(float) * nslots * row * 2), *dq = malloc(sizeof(float) * nslots * row * 2);
    float *q = malloc(sizeof(float) * B * H * D), *out = malloc(sizeof(float) * B * H * D), center[KVH * 128];
    int8_t *cache = malloc(nslots * KVH * w * 2);
    int64_t *slots = malloc(sizeof(int64_t) * nslots), tables[B * MAXB];
    for (int64_t i = 0; i < nslots; i++) slots[i] = nslots - 1 - i;
    for (int64_t i = 0; i < B * MAXB; i++) tables[i] = i;
    for (int64_t i = 0; i < nslots * row * 2; i++) x[i] = rnd() * (1 + (i / D) % 5);
    for (int64_t i = 0; i < B * H * D; i++) q[i] = rnd();
    for (int64_t i = 0; i < KVH * D; i++) center[i] = 2.f * rnd();
    ((write_int8_f32_t)sym(lib, "write_kv_int8_f32"))(x, x + nslots * row, row, row, cache, cache + nslots * KVH * w,
                                                      slots, nslots, KVH, D, center, 1);
    float werr = 0.f; /* |dequantized - y| in units of the row's step (max|y| / 127) */
    for (int64_t kv = 0; kv < 2; kv++)
        for (int64_t t = 0; t < nslots; t++)
            for (int64_t j = 0; j < KVH; j++) {
                const float *xr = x + kv * nslots * row + t * row + j * D;
                const int8_t *r = cache + kv * nslots * KVH * w + (slots[t] * KVH + j) * w;
                double xc[128], y[128], amax = 0;
                for (int64_t d = 0; d < D; d++) xc[d] = xr[d] - (kv == 0 ? center[j * D + d] : 0.f);
                hadamard_ref(xc, y, D);
                uint16_t sb;
                memcpy(&sb, r + D, 2);
                for (int64_t d = 0; d < D; d++) amax = fmax(amax, fabs(y[d]));
                for (int64_t d = 0; d < D; d++) {
                    const float got = r[d] * bf16_load(sb);
                    dq[kv * nslots * row + slots[t] * row + j * D + d] = got;
                    werr = fmaxf(werr, (float)(fabs(got - y[d]) / (amax / 127.0)));
                }
            }
    ((attn_int8_f32_t)sym(lib, "paged_decode_attention_int8_f32"))(q, H * D, cache, cache + nslots * KVH * w, tables,
                                                                   MAXB, lens, out, B, H, KVH, D, BS, scale, 1);
    float err = 0.f;
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++) {
            const int64_t j = h / (H / KVH);
            double m = -1e30, l = 0, o[128] = {0}, s[128], qd[128], qr[128], res[128];
            for (int64_t d = 0; d < D; d++) qd[d] = q[(b * H + h) * D + d];
            hadamard_ref(qd, qr, D);
            for (int64_t t = 0; t < lens[b]; t++) {
                const float *kr = dq + (tables[b * MAXB + t / BS] * BS + t % BS) * row + j * D;
                double dot = 0;
                for (int64_t d = 0; d < D; d++) dot += qr[d] * kr[d];
                s[t] = dot * scale;
                m = s[t] > m ? s[t] : m;
            }
            for (int64_t t = 0; t < lens[b]; t++) {
                const double e = exp(s[t] - m);
                const float *vr = dq + nslots * row + (tables[b * MAXB + t / BS] * BS + t % BS) * row + j * D;
                l += e;
                for (int64_t d = 0; d < D; d++) o[d] += e * vr[d];
            }
            for (int64_t d = 0; d < D; d++) o[d] /= l;
            hadamard_ref(o, res, D);
            for (int64_t d = 0; d < D; d++) err = fmaxf(err, fabsf(out[(b * H + h) * D + d] - (float)res[d]));
        }
    free(x); free(dq); free(q); free(out); free(cache); free(slots);
    char name[64];
    snprintf(name, sizeof name, "int8 KV write D=%lld", (long long)D);
    int bad = report(name, werr, 0.51f);
    snprintf(name, sizeof name, "attention int8 D=%lld", (long long)D);
    return bad | report(name, err, TOL_F32);
}

static int check_layer_ops(void *lib) {
    enum { N = 3, DIM = 96, HEADS = 2, HD = 16, POS = 8 };
    float x[N * DIM], res[N * DIM], w[DIM], out[N * DIM], ref[N * DIM], err = 0.f;
    for (int i = 0; i < N * DIM; i++) { x[i] = rnd(); res[i] = rnd(); }
    for (int i = 0; i < DIM; i++) w[i] = rnd();
    for (int i = 0; i < N; i++) { /* reference: r += x; r * rsqrt(mean(r^2) + eps) * w */
        double ss = 0;
        for (int d = 0; d < DIM; d++) ss += (double)(x[i * DIM + d] + res[i * DIM + d]) * (x[i * DIM + d] + res[i * DIM + d]);
        const double inv = 1.0 / sqrt(ss / DIM + 1e-5);
        for (int d = 0; d < DIM; d++) ref[i * DIM + d] = (float)((x[i * DIM + d] + res[i * DIM + d]) * inv * w[d]);
    }
    ((norm_f32_t)sym(lib, "add_rms_norm_f32"))(x, res, w, out, N, DIM, 1e-5f);
    for (int i = 0; i < N * DIM; i++) err = fmaxf(err, fabsf(out[i] - ref[i]));
    int bad = report("add_rms_norm f32", err, TOL_F32);

    float gu[N * 2 * DIM], so[N * DIM];
    for (int i = 0; i < N * 2 * DIM; i++) gu[i] = 4.f * rnd();
    ((silu_f32_t)sym(lib, "silu_and_mul_f32"))(gu, so, N, DIM);
    err = 0.f;
    for (int i = 0; i < N; i++)
        for (int d = 0; d < DIM; d++) {
            const float g = gu[i * 2 * DIM + d], u = gu[i * 2 * DIM + DIM + d];
            err = fmaxf(err, fabsf(so[i * DIM + d] - g / (1.f + expf(-g)) * u));
        }
    bad |= report("silu_and_mul f32", err, TOL_F32);

    float r[N * HEADS * HD], r0[N * HEADS * HD], cs[POS * HD / 2], sn[POS * HD / 2];
    const int64_t pos[N] = {0, 5, 7};
    for (int i = 0; i < N * HEADS * HD; i++) r[i] = r0[i] = rnd();
    for (int p = 0; p < POS; p++)
        for (int d = 0; d < HD / 2; d++) { cs[p * HD / 2 + d] = cosf(p * (d + 1) * 0.3f); sn[p * HD / 2 + d] = sinf(p * (d + 1) * 0.3f); }
    ((rotary_f32_t)sym(lib, "rotary_f32"))(r, HEADS * HD, N, HEADS, HD, pos, cs, sn);
    err = 0.f;
    for (int t = 0; t < N; t++)
        for (int h = 0; h < HEADS; h++)
            for (int d = 0; d < HD / 2; d++) {
                const float *p0 = r0 + (t * HEADS + h) * HD, *p = r + (t * HEADS + h) * HD;
                const float c = cs[pos[t] * HD / 2 + d], s = sn[pos[t] * HD / 2 + d];
                err = fmaxf(err, fabsf(p[d] - (p0[d] * c - p0[d + HD / 2] * s)));
                err = fmaxf(err, fabsf(p[d + HD / 2] - (p0[d + HD / 2] * c + p0[d] * s)));
            }
    return bad | report("rotary f32", err, TOL_F32);
}

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: %s LIB.so\n", argv[0]); return 2; }
    void *lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!lib) { fprintf(stderr, "%s\n", dlerror()); return 2; }
    int bad = check_layer_ops(lib);
    for (int bf16 = 0; bf16 < 2; bf16++)
        for (int64_t D = 16; D <= 128; D *= 2) bad |= check_attention(lib, D, bf16);
    for (int64_t D = 16; D <= 128; D *= 2) bad |= check_int8_kv(lib, D);
    printf(bad ? "kernel_check: FAILED\n" : "kernel_check: OK\n");
    return bad;
}
