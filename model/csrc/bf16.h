/* bfloat16 <-> float32 for the native kernels (bf16 held as uint16_t bits). */
#ifndef WORKMEM_BF16_H
#define WORKMEM_BF16_H
#include <stdint.h>
#include <string.h>

static inline float bf16_load(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t bf16_store(float f) { /* round to nearest even; inputs are finite */
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

static inline float bf16_round(float f) { return bf16_load(bf16_store(f)); }
static inline float f32_load(float f) { return f; }
static inline float f32_store(float f) { return f; }
#endif
