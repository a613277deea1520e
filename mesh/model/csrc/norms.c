/* RMSNorm in one pass per row (and, for attention's q/k heads, the rotary embedding after it), rounding where the torch spelling in mesh/model/layers.py rounds:
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

#include "bf16.h"

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

/* q/k heads: the optional per-head RMSNorm, then the rotary embedding, as mesh/model/decoder.py spells
 * them in torch (layers.rms_norm, then layers.rotate: x * cos + rotate_half(x) * sin, each product and
 * the sum rounded to the model dtype).
 *   x        [T, B, D] with element strides (sT, sB, 1): the q and k heads of the fused projection
 *   w        [B, D] per-head norm weights, or NULL (no q/k norm: Qwen2-MoE, Mixtral)
 *   cos, sin [T, D] contiguous, the model dtype
 *   out      [T, B, D] contiguous */
#define ROPE_MAX_D 1024
/* float32: no FMA contraction, so each product rounds on its own as in torch */
__attribute__((optimize("fp-contract=off"))) void mesh_qk_norm_rope(const void *x, int64_t T, int64_t B, int64_t sT, int64_t sB, const void *w, const void *cos,
                       const void *sin, void *out, int64_t D, float eps, int bf16) {
    const int64_t half = D / 2;
    for (int64_t r = 0; r < T * B; r++) {
        const int64_t t = r / B, b = r % B, xo = t * sT + b * sB;
        float v[ROPE_MAX_D];
        if (bf16) {
            const uint16_t *xr = (const uint16_t *)x + xo, *c = (const uint16_t *)cos + t * D,
                           *s = (const uint16_t *)sin + t * D;
            uint16_t n[ROPE_MAX_D];
            if (w != NULL) row_bf16(xr, (const uint16_t *)w + b * D, n, D, eps);
            else memcpy(n, xr, D * 2);
#pragma omp simd
            for (int64_t d = 0; d < D; d++) v[d] = bf(n[d]);
            uint16_t *o = (uint16_t *)out + r * D;
#pragma omp simd
            for (int64_t d = 0; d < half; d++) {
                o[d] = to_bf(round_bf(v[d] * bf(c[d])) + round_bf(-v[d + half] * bf(s[d])));
                o[d + half] = to_bf(round_bf(v[d + half] * bf(c[d + half])) + round_bf(v[d] * bf(s[d + half])));
            }
        } else {
            const float *xr = (const float *)x + xo, *c = (const float *)cos + t * D, *s = (const float *)sin + t * D;
            if (w != NULL) row_f32(xr, (const float *)w + b * D, v, D, eps);
            else memcpy(v, xr, D * 4);
            float *o = (float *)out + r * D;
#pragma omp simd
            for (int64_t d = 0; d < half; d++) {
                const float a = v[d] * c[d], bb = -v[d + half] * s[d];
                const float a2 = v[d + half] * c[d + half], b2 = v[d] * s[d + half];
                o[d] = a + bb;
                o[d + half] = a2 + b2;
            }
        }
    }
}

/* Row-wise argmax of x [rows, n] float32 -> idx [rows], as torch.argmax: the first maximal index, and
 * NaN counts as larger than any number (the first NaN wins). One pass per row, vectorised. */
void mesh_argmax_rows(const float *x, int64_t rows, int64_t n, int64_t *idx) {
    for (int64_t r = 0; r < rows; r++) {
        const float *v = x + r * n;
        float best = -INFINITY;
        int nan = 0;
#pragma omp simd reduction(max : best) reduction(| : nan)
        for (int64_t i = 0; i < n; i++) {
            best = v[i] > best ? v[i] : best;
            nan |= v[i] != v[i];
        }
        int64_t at = 0;
        if (nan) {
            while (v[at] == v[at]) at++;
        } else {
            while (at < n - 1 && v[at] != best) at++; /* n >= 1; all -inf: index 0 */
        }
        idx[r] = at;
    }
}

/* h_out = h + delta (rounded to the dtype, as torch's add) and x = RMSNorm(h_out) * w in one pass:
 * the residual add before each norm of a decoder layer. h, delta, h_out, x: [rows, D] contiguous. */
void mesh_add_rms_norm(const void *h, const void *delta, const void *w, void *h_out, void *x, int64_t rows,
                       int64_t D, float eps, int bf16, int nthreads) {
    if (rows * D < (1 << 18)) nthreads = 1;
    (void)nthreads;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t r = 0; r < rows; r++) {
        if (bf16) {
            const uint16_t *a = (const uint16_t *)h + r * D, *b = (const uint16_t *)delta + r * D;
            uint16_t *s = (uint16_t *)h_out + r * D;
#pragma omp simd
            for (int64_t d = 0; d < D; d++) s[d] = to_bf(bf(a[d]) + bf(b[d]));
            row_bf16(s, (const uint16_t *)w, (uint16_t *)x + r * D, D, eps);
        } else {
            const float *a = (const float *)h + r * D, *b = (const float *)delta + r * D;
            float *s = (float *)h_out + r * D;
#pragma omp simd
            for (int64_t d = 0; d < D; d++) s[d] = a[d] + b[d];
            row_f32(s, (const float *)w, (float *)x + r * D, D, eps);
        }
    }
}

/* New tokens' K and V into their pool slots: k_new, v_new [T, Hk, D] with row strides sk, sv (elements;
 * the heads of a row contiguous), caches [Hk, slots, D]. Returns 0, or -5 for a slot outside
 * [0, slots) (checked first: nothing is written then). */
int mesh_kv_write(void *k_cache, void *v_cache, int64_t slots, const int64_t *slot, const void *k_new, int64_t sk,
                  const void *v_new, int64_t sv, int64_t T, int64_t Hk, int64_t D, int64_t esz) {
    for (int64_t t = 0; t < T; t++)
        if (slot[t] < 0 || slot[t] >= slots) return -5;
    const size_t row = (size_t)(D * esz);
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < Hk; h++) {
            memcpy((char *)k_cache + (h * slots + slot[t]) * row, (const char *)k_new + (t * sk + h * D) * esz, row);
            memcpy((char *)v_cache + (h * slots + slot[t]) * row, (const char *)v_new + (t * sv + h * D) * esz, row);
        }
    return 0;
}
