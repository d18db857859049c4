/* The orthonormal Walsh-Hadamard transform of int8 KV rows (model/kv_quant.py's row format 2). */
#ifndef WORKMEM_HADAMARD_H
#define WORKMEM_HADAMARD_H
#include <math.h>
#include <stdint.h>

/* x [D] <- H x, H the Sylvester-Hadamard matrix / sqrt(D) (D a power of two): symmetric and its
 * own inverse, so the same call rotates a row into the stored space and back. log2(D) passes of
 * butterflies (a, b) -> (a + b, a - b), as `x @ H` in kv_quant.rotate up to float rounding. */
static inline void hadamard_rotate(float *x, int64_t D) {
    for (int64_t h = 1; h < D; h *= 2)
        for (int64_t i = 0; i < D; i += 2 * h)
            for (int64_t j = i; j < i + h; j++) {
                const float a = x[j], b = x[j + h];
                x[j] = a + b;
                x[j + h] = a - b;
            }
    const float s = 1.f / sqrtf((float)D);
    for (int64_t d = 0; d < D; d++) x[d] *= s;
}
#endif
