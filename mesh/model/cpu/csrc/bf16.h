/* Scalar bfloat16 <-> float32 and the softmax's running maximum, shared by the native kernels (portable
 * C). bf16 values are the upper halves of float32s; rounding is to nearest even and NaN stays NaN, as
 * torch's conversion does. */
#ifndef MESH_BF16_H
#define MESH_BF16_H
#include <stdint.h>
#include <string.h>

static inline float bf(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t to_bf(float f) { /* branch-free, so loops over it vectorise */
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16, nan = (u >> 16) | 0x40u;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

static inline float round_bf(float f) { return bf(to_bf(f)); }

/* The larger of a softmax's new block maximum x and its running maximum m (never NaN): m when x is NaN,
 * as fmaxf(x, m) gives, but inline (GCC calls libm's fmaxf through the PLT without -ffast-math: 1.4 %
 * of a prefill attention call's time on Zen 4). */
static inline float max_running(float x, float m) { return x > m ? x : m; }

#endif
