/* RMSNorm in one pass per row, rounding where the torch spelling in mesh/model/layers.py rounds:
 *     weight * F.rms_norm(x.float(), eps).to(x.dtype)
 * i.e. normalise in float32, round to the model dtype, multiply by the weight (in float32) and round
 * again. Plain C: the compiler vectorises the loops for whatever the target has.
 *
 *   x     [A, B, D] with element strides (sA, sB, 1): views such as the q/k heads of a fused qkv
 *         projection need no copy
 *   w     [D] (per_b = 0) or [B, D] (per_b = 1: per-head weights, the q/k norms)
 *   out   [A, B, D] contiguous
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float bf(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t to_bf(float f) { /* round to nearest even; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float round_bf(float f) { return bf(to_bf(f)); }

static void row_f32(const float *x, const float *w, float *o, int64_t D, float eps) {
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t d = 0; d < D; d++) ss += x[d] * x[d];
    const float inv = 1.f / sqrtf(ss / (float)D + eps);
#pragma omp simd
    for (int64_t d = 0; d < D; d++) o[d] = w[d] * (x[d] * inv);
}

static void row_bf16(const uint16_t *x, const uint16_t *w, uint16_t *o, int64_t D, float eps) {
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t d = 0; d < D; d++) {
        const float v = bf(x[d]);
        ss += v * v;
    }
    const float inv = 1.f / sqrtf(ss / (float)D + eps);
#pragma omp simd
    for (int64_t d = 0; d < D; d++) o[d] = to_bf(bf(w[d]) * round_bf(bf(x[d]) * inv));
}

void mesh_rms_norm(const void *x, int64_t A, int64_t B, int64_t sA, int64_t sB, const void *w, int per_b,
                   void *out, int64_t D, float eps, int bf16, int nthreads) {
    if (A * B * D < (1 << 18)) nthreads = 1; /* a decode step's rows: a thread hand-off costs more */
    (void)nthreads;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t r = 0; r < A * B; r++) {
        const int64_t a = r / B, b = r % B, xo = a * sA + b * sB, wo = per_b ? b * D : 0;
        if (bf16)
            row_bf16((const uint16_t *)x + xo, (const uint16_t *)w + wo, (uint16_t *)out + r * D, D, eps);
        else
            row_f32((const float *)x + xo, (const float *)w + wo, (float *)out + r * D, D, eps);
    }
}
