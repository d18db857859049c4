/* A decode step's whole chain of kernels in one call (model/decode_plan.py builds the chain).
 *
 * The Python path calls ~10 kernels per layer, each through a torch module and ctypes (tens of
 * microseconds of glue per call on a small model, more than the kernels' own work). A plan is the
 * same calls, in the same order, on the same buffers: `ops` [n] each name a kernel of this library
 * (`fn`), its kind and its fixed arguments; the step's own arguments (rows B, positions, KV slots,
 * block tables, context lengths) are filled in here by kind. Numerically it is the Python path.
 */
#define _POSIX_C_SOURCE 199309L /* clock_gettime under -std=c11 */
#include <stddef.h>
#include <stdint.h>
#include <time.h>

enum {
    PLAN_NORM = 0,           /* add_rms_norm(x, residual, weight, out, B, dim, eps) */
    PLAN_MATMUL = 1,         /* vnni_matmul(x, B, K, packed, bits, group, sym, out, N, ldo) */
    PLAN_ROTARY = 2,         /* rotary(x, stride, B, heads, head_dim, positions, cos, sin) */
    PLAN_WRITE_KV = 3,       /* write_kv(k, v, k_stride, v_stride, kc, vc, slots, B, row) */
    PLAN_WRITE_KV_INT8 = 4,  /* write_kv_int8(k, v, k_stride, v_stride, kc, vc, slots, B, kvH, D, centre, rotated) */
    PLAN_ATTENTION = 5,      /* paged_decode_attention(q, q_stride, kc, vc, tables, max_blocks, lens, out, B, H, kvH, D, bs, scale) */
    PLAN_ATTENTION_INT8 = 6, /* paged_decode_attention_int8(..., scale, rotated) */
    PLAN_SILU_MUL = 7,       /* silu_and_mul(gate_up, out, B, intermediate) */
    PLAN_ADD_BIAS = 8,       /* add_bias(out, bias, B, N, ldo): out += bias, row by row */
    PLAN_HEAD_NORM = 9,      /* add_rms_norm(NULL, x + t * stride, weight, same, heads, head_dim, eps) per row t:
                              * RMSNorm of each of a row's `heads` contiguous heads, in place (q/k norms) */
    PLAN_LANES_F32 = 10,     /* lanes_gemm_f32(x, B, K, packed, out, N, ldo): bf16 weights, float32 x */
};

/* One call. Pointer arguments are held as int64 (addresses), in the order of the kind's comment
 * above with the step's arguments left out; f: eps or the softmax scale. Mirrors
 * model/decode_plan.py's PlanOp (ctypes) field for field. */
typedef struct {
    int64_t kind;
    void *fn;
    int64_t a[10];
    float f;
} PlanOp;

typedef void (*norm_fn)(const void *, void *, const void *, void *, int64_t, int64_t, float);
typedef void (*matmul_fn)(const void *, int64_t, int64_t, const void *, int64_t, int64_t, int64_t, void *, int64_t,
                          int64_t);
typedef void (*rotary_fn)(void *, int64_t, int64_t, int64_t, int64_t, const int64_t *, const float *, const float *);
typedef void (*write_kv_fn)(const void *, const void *, int64_t, int64_t, void *, void *, const int64_t *, int64_t,
                            int64_t);
typedef void (*write_kv_int8_fn)(const void *, const void *, int64_t, int64_t, void *, void *, const int64_t *,
                                 int64_t, int64_t, int64_t, const float *, int64_t);
typedef void (*attention_fn)(const void *, int64_t, const void *, const void *, const int64_t *, int64_t,
                             const int64_t *, void *, int64_t, int64_t, int64_t, int64_t, int64_t, float);
typedef void (*attention_int8_fn)(const void *, int64_t, const void *, const void *, const int64_t *, int64_t,
                                  const int64_t *, void *, int64_t, int64_t, int64_t, int64_t, int64_t, float, int64_t);
typedef void (*silu_fn)(const void *, void *, int64_t, int64_t);
typedef void (*bias_fn)(void *, const void *, int64_t, int64_t, int64_t);
typedef void (*lanes_fn)(const void *, int64_t, int64_t, const void *, void *, int64_t, int64_t);

#define P(i) ((void *)(intptr_t)o->a[i])

/* Runs op o for a step of B decode rows; 0, or -1 for an op of unknown kind. */
static int run_op(const PlanOp *o, int64_t B, const int64_t *positions, const int64_t *slots, const int64_t *tables,
                  int64_t max_blocks, const int64_t *context_lens) {
    switch (o->kind) {
    case PLAN_NORM:
        ((norm_fn)o->fn)(P(0), P(1), P(2), P(3), B, o->a[4], o->f);
        break;
    case PLAN_MATMUL:
        ((matmul_fn)o->fn)(P(0), B, o->a[1], P(2), o->a[3], o->a[4], o->a[5], P(6), o->a[7], o->a[8]);
        break;
    case PLAN_ROTARY:
        ((rotary_fn)o->fn)(P(0), o->a[1], B, o->a[2], o->a[3], positions, P(4), P(5));
        break;
    case PLAN_WRITE_KV:
        ((write_kv_fn)o->fn)(P(0), P(1), o->a[2], o->a[3], P(4), P(5), slots, B, o->a[6]);
        break;
    case PLAN_WRITE_KV_INT8:
        ((write_kv_int8_fn)o->fn)(P(0), P(1), o->a[2], o->a[3], P(4), P(5), slots, B, o->a[6], o->a[7], P(8),
                                  o->a[9]);
        break;
    case PLAN_ATTENTION:
        ((attention_fn)o->fn)(P(0), o->a[1], P(2), P(3), tables, max_blocks, context_lens, P(4), B, o->a[5],
                              o->a[6], o->a[7], o->a[8], o->f);
        break;
    case PLAN_ATTENTION_INT8:
        ((attention_int8_fn)o->fn)(P(0), o->a[1], P(2), P(3), tables, max_blocks, context_lens, P(4), B,
                                   o->a[5], o->a[6], o->a[7], o->a[8], o->f, o->a[9]);
        break;
    case PLAN_SILU_MUL:
        ((silu_fn)o->fn)(P(0), P(1), B, o->a[2]);
        break;
    case PLAN_ADD_BIAS:
        ((bias_fn)o->fn)(P(0), P(1), B, o->a[2], o->a[3]);
        break;
    case PLAN_HEAD_NORM: /* a[0] x, a[1] row stride (bytes), a[2] heads, a[3] head_dim, a[4] weight */
        for (int64_t t = 0; t < B; t++) {
            void *row = (char *)P(0) + t * o->a[1];
            ((norm_fn)o->fn)(NULL, row, P(4), row, o->a[2], o->a[3], o->f);
        }
        break;
    case PLAN_LANES_F32:
        ((lanes_fn)o->fn)(P(0), B, o->a[1], P(2), P(3), o->a[4], o->a[5]);
        break;
    default:
        return -1;
    }
    return 0;
}

/* Runs ops [n] for a step of B decode rows. Returns the index of an op of unknown kind, or -1. */
int64_t run_decode_plan(const PlanOp *ops, int64_t n, int64_t B, const int64_t *positions, const int64_t *slots,
                        const int64_t *tables, int64_t max_blocks, const int64_t *context_lens) {
    for (int64_t i = 0; i < n; i++)
        if (run_op(ops + i, B, positions, slots, tables, max_blocks, context_lens)) return i;
    return -1;
}

static double seconds_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* run_decode_plan, also adding each op's wall time to seconds [n] (the step profiler's split of
 * the plan, loadtest/step_profile.py): a clock read per op, ~20-50 ns, against ops of 1-500 us. */
int64_t run_decode_plan_timed(const PlanOp *ops, int64_t n, int64_t B, const int64_t *positions,
                              const int64_t *slots, const int64_t *tables, int64_t max_blocks,
                              const int64_t *context_lens, double *seconds) {
    double t = seconds_now();
    for (int64_t i = 0; i < n; i++) {
        if (run_op(ops + i, B, positions, slots, tables, max_blocks, context_lens)) return i;
        const double now = seconds_now();
        seconds[i] += now - t;
        t = now;
    }
    return -1;
}
