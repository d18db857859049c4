/* Fused per-token layer pieces for the CPU (bf16 and float32), replacing ~8-10 small torch
 * ops each. Numerics follow the torch path they replace (transformers' order of roundings):
 *
 * add_rms_norm: residual += x (rounded to T), then out = T(T(r * rsqrt(mean(r^2) + eps)) * w)
 *   with the statistics in float32. x == NULL: residual is the input, left unchanged.
 *   x, residual, out: [n, dim] contiguous; weight [dim].
 * rotary: rotate-half rotary embedding in place on heads [n, heads, head_dim] (token stride
 *   `stride` elements, heads contiguous), in float32: x1' = x1 c - x2 s, x2' = x2 c + x1 s,
 *   with c, s = cos/sin[positions[t]] from float32 tables [max_pos, head_dim / 2].
 * silu_and_mul: out [n, I] = T(T(silu(gate)) * up) for gate_up [n, 2I] = [gate | up].
 * add_bias: out [n, N] (row stride ldo) += bias [N], rounded to T (model/decode_plan.py's bias).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "hadamard.h"

static inline float f32_round(float f) { return f; }

#define DEFINE_OPS(SUFFIX, T, LOAD, STORE, ROUND)                                              \
void add_rms_norm_##SUFFIX(const T *x, T *residual, const T *weight, T *out,                  \
                           int64_t n, int64_t dim, float eps) {                                \
    for (int64_t i = 0; i < n; i++) {                                                          \
        T *r = residual + i * dim;                                                             \
        float row[dim], ss = 0.f;                                                              \
        for (int64_t d = 0; d < dim; d++) {                                                    \
            const float v = x ? ROUND(LOAD(x[i * dim + d]) + LOAD(r[d])) : LOAD(r[d]);         \
            row[d] = v;                                                                        \
            ss += v * v;                                                                       \
        }                                                                                      \
        if (x)                                                                                 \
            for (int64_t d = 0; d < dim; d++) r[d] = STORE(row[d]);                            \
        const float inv = 1.f / sqrtf(ss / (float)dim + eps);                                  \
        for (int64_t d = 0; d < dim; d++)                                                      \
            out[i * dim + d] = STORE(ROUND(row[d] * inv) * LOAD(weight[d]));                   \
    }                                                                                          \
}                                                                                              \
                                                                                               \
void rotary_##SUFFIX(T *x, int64_t stride, int64_t n, int64_t heads, int64_t head_dim,        \
                     const int64_t *positions, const float *cos, const float *sin) {           \
    const int64_t half = head_dim / 2;                                                         \
    for (int64_t t = 0; t < n; t++) {                                                          \
        const float *c = cos + positions[t] * half, *s = sin + positions[t] * half;            \
        for (int64_t h = 0; h < heads; h++) {                                                  \
            T *p = x + t * stride + h * head_dim;                                              \
            for (int64_t d = 0; d < half; d++) {                                               \
                const float x1 = LOAD(p[d]), x2 = LOAD(p[d + half]);                           \
                p[d] = STORE(x1 * c[d] - x2 * s[d]);                                           \
                p[d + half] = STORE(x2 * c[d] + x1 * s[d]);                                    \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
}

/* add_bias: out [n rows, row stride ldo] += bias [N], rounded to T (torch's y + b). */
#define DEFINE_ADD_BIAS(SUFFIX, T, LOAD, STORE)                                                \
void add_bias_##SUFFIX(T *out, const T *bias, int64_t n, int64_t N, int64_t ldo) {             \
    for (int64_t i = 0; i < n; i++)                                                            \
        for (int64_t j = 0; j < N; j++) out[i * ldo + j] = STORE(LOAD(out[i * ldo + j]) + LOAD(bias[j])); \
}

#define DEFINE_SILU(SUFFIX, T, LOAD, STORE, ROUND)                                             \
void silu_and_mul_##SUFFIX(const T *gate_up, T *out, int64_t n, int64_t inter) {               \
    for (int64_t i = 0; i < n; i++) {                                                          \
        const T *g = gate_up + i * 2 * inter, *u = g + inter;                                  \
        T *o = out + i * inter;                                                                \
        for (int64_t d = 0; d < inter; d++) {                                                  \
            const float x = LOAD(g[d]);                                                        \
            o[d] = STORE(ROUND(x / (1.f + expf(-x))) * LOAD(u[d]));                            \
        }                                                                                      \
    }                                                                                          \
}

/* write_kv: this step's K and V rows [n, row] (token strides `k_stride`, `v_stride`
 * elements: views into one fused qkv row) into the pools [slots, row] at `slots[t]`: the
 * KV write of every layer, one call. */
#define DEFINE_WRITE_KV(SUFFIX, T)                                                             \
void write_kv_##SUFFIX(const T *k, const T *v, int64_t k_stride, int64_t v_stride, T *k_cache, \
                       T *v_cache, const int64_t *slots, int64_t n, int64_t row) {             \
    for (int64_t t = 0; t < n; t++) {                                                          \
        memcpy(k_cache + slots[t] * row, k + t * k_stride, sizeof(T) * row);                   \
        memcpy(v_cache + slots[t] * row, v + t * v_stride, sizeof(T) * row);                   \
    }                                                                                          \
}

/* write_kv_int8: the same rows quantized into int8 pools (model/kv_quant.py's row format 2):
 * each (token, kv head) of D values x becomes y = H (x - c) (rotated; else x - c; c = center
 * [kvH, D] float32 for K, none for V or where center is NULL), then D codes and a bf16 scale,
 * D + 2 bytes. scale = bf16(max|y| / 127); q = rint(y * (1 / scale)) clamped to [-127, 127];
 * a zero row: all 0. D <= 1024. */
#define DEFINE_WRITE_KV_INT8(SUFFIX, T, LOAD)                                                  \
static void quantize_row_##SUFFIX(const T *x, const float *center, int64_t rotated, int8_t *out, int64_t D) { \
    float y[1024], amax = 0.f;                                                                 \
    for (int64_t d = 0; d < D; d++) y[d] = LOAD(x[d]) - (center ? center[d] : 0.f);            \
    if (rotated) hadamard_rotate(y, D);                                                        \
    for (int64_t d = 0; d < D; d++) { const float a = fabsf(y[d]); amax = a > amax ? a : amax; } \
    const uint16_t sb = bf16_store(amax / 127.f);                                              \
    const float s = bf16_load(sb), inv = s > 0.f ? 1.f / s : 0.f;                              \
    for (int64_t d = 0; d < D; d++) {                                                          \
        float q = rintf(y[d] * inv);                                                           \
        q = q > 127.f ? 127.f : (q < -127.f ? -127.f : q);                                     \
        out[d] = (int8_t)q;                                                                    \
    }                                                                                          \
    memcpy(out + D, &sb, 2);                                                                   \
}                                                                                              \
void write_kv_int8_##SUFFIX(const T *k, const T *v, int64_t k_stride, int64_t v_stride,        \
                            int8_t *k_cache, int8_t *v_cache, const int64_t *slots, int64_t n, \
                            int64_t kvH, int64_t D, const float *center, int64_t rotated) {    \
    const int64_t row = kvH * (D + 2);                                                         \
    for (int64_t t = 0; t < n; t++)                                                            \
        for (int64_t j = 0; j < kvH; j++) {                                                    \
            quantize_row_##SUFFIX(k + t * k_stride + j * D, center ? center + j * D : NULL, rotated, \
                                  k_cache + slots[t] * row + j * (D + 2), D);                  \
            quantize_row_##SUFFIX(v + t * v_stride + j * D, NULL, rotated, v_cache + slots[t] * row + j * (D + 2), D); \
        }                                                                                      \
}

DEFINE_OPS(bf16, uint16_t, bf16_load, bf16_store, bf16_round)
DEFINE_WRITE_KV(bf16, uint16_t)
DEFINE_WRITE_KV_INT8(bf16, uint16_t, bf16_load)
DEFINE_WRITE_KV_INT8(f32, float, f32_load)
DEFINE_WRITE_KV(f32, float)
DEFINE_SILU(bf16, uint16_t, bf16_load, bf16_store, bf16_round)
DEFINE_SILU(f32, float, f32_load, f32_store, f32_round)
DEFINE_ADD_BIAS(bf16, uint16_t, bf16_load, bf16_store)
DEFINE_ADD_BIAS(f32, float, f32_load, f32_store)
DEFINE_OPS(f32, float, f32_load, f32_store, f32_round)

/* write_kv_bf16kv_f32: float32 K and V rows (as write_kv) into bf16 pools, rounded to nearest
 * even as torch's .to(torch.bfloat16) rounds finite values. */
void write_kv_bf16kv_f32(const float *k, const float *v, int64_t k_stride, int64_t v_stride, uint16_t *k_cache,
                         uint16_t *v_cache, const int64_t *slots, int64_t n, int64_t row) {
    for (int64_t t = 0; t < n; t++)
        for (int64_t d = 0; d < row; d++) {
            k_cache[slots[t] * row + d] = bf16_store(k[t * k_stride + d]);
            v_cache[slots[t] * row + d] = bf16_store(v[t * v_stride + d]);
        }
}
