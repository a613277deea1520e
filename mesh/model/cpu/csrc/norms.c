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

/* Explicit AVX-512 paths for the per-token ops of a decode step (rows of 64-512 values): compilers
 * vectorise the portable loops below poorly around the scalar bf16 conversions (measured 3-10x slower
 * on a Zen 4). Same rounding points; sums of squares may add in another order. */
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include "avx512_math.h"
#define NORMS_AVX512 1
#endif

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

#ifdef NORMS_AVX512
static inline float hsum512(__m512 v) { return _mm512_reduce_add_ps(v); }

/* One row of the residual add + RMSNorm, D a multiple of 16: s = h + delta (rounded to the dtype),
 * x = w * RMSNorm(s) with the portable path's rounding points. */
static void add_norm_row512(const char *a, const char *b, const char *w, char *s, char *x, int64_t D, float eps,
                            int bf16) {
    const int64_t es = bf16 ? 2 : 4;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t d = 0;
    for (; d + 32 <= D; d += 32) {
        __m512 v0 = _mm512_add_ps(load16f(a + d * es, bf16), load16f(b + d * es, bf16));
        __m512 v1 = _mm512_add_ps(load16f(a + (d + 16) * es, bf16), load16f(b + (d + 16) * es, bf16));
        if (bf16) v0 = round_bf16(v0), v1 = round_bf16(v1);
        store16(s + d * es, v0, bf16);
        store16(s + (d + 16) * es, v1, bf16);
        acc0 = _mm512_fmadd_ps(v0, v0, acc0);
        acc1 = _mm512_fmadd_ps(v1, v1, acc1);
    }
    for (; d < D; d += 16) {
        __m512 v0 = _mm512_add_ps(load16f(a + d * es, bf16), load16f(b + d * es, bf16));
        if (bf16) v0 = round_bf16(v0);
        store16(s + d * es, v0, bf16);
        acc0 = _mm512_fmadd_ps(v0, v0, acc0);
    }
    const __m512 inv = _mm512_set1_ps(1.f / sqrtf(hsum512(_mm512_add_ps(acc0, acc1)) / (float)D + eps));
    for (d = 0; d < D; d += 16) {
        __m512 y = _mm512_mul_ps(load16f(s + d * es, bf16), inv);
        if (bf16) y = round_bf16(y);
        store16(x + d * es, _mm512_mul_ps(load16f(w + d * es, bf16), y), bf16);
    }
}

/* argmax of one row as torch.argmax: the maximum over four accumulators, then the first lane equal to
 * it (or the first NaN, if any). */
static int64_t argmax_row512(const float *v, int64_t n) {
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    __m512 m0 = ninf, m1 = ninf, m2 = ninf, m3 = ninf;
    __mmask16 nan = 0;
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        const __m512 x0 = _mm512_loadu_ps(v + i), x1 = _mm512_loadu_ps(v + i + 16);
        const __m512 x2 = _mm512_loadu_ps(v + i + 32), x3 = _mm512_loadu_ps(v + i + 48);
        m0 = _mm512_max_ps(m0, x0), m1 = _mm512_max_ps(m1, x1), m2 = _mm512_max_ps(m2, x2), m3 = _mm512_max_ps(m3, x3);
        nan |= _mm512_cmp_ps_mask(x0, x1, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(x2, x3, _CMP_UNORD_Q);
    }
    for (; i < n; i += 16) {
        const __mmask16 live = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
        const __m512 x0 = _mm512_mask_loadu_ps(ninf, live, v + i);
        m0 = _mm512_max_ps(m0, x0);
        nan |= _mm512_cmp_ps_mask(x0, x0, _CMP_UNORD_Q);
    }
    const __m512 best = _mm512_set1_ps(_mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3))));
    for (i = 0; i < n; i += 16) {
        const __mmask16 live = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
        const __m512 x0 = _mm512_mask_loadu_ps(ninf, live, v + i);
        const __mmask16 hit = nan ? _mm512_mask_cmp_ps_mask(live, x0, x0, _CMP_UNORD_Q)
                                  : _mm512_mask_cmp_ps_mask(live, x0, best, _CMP_EQ_OQ);
        if (hit) return i + __builtin_ctz(hit);
    }
    return 0;
}
#endif

void mesh_rms_norm(const void *x, int64_t A, int64_t B, int64_t sA, int64_t sB, const void *w, int per_b,
                   void *out, int64_t D, float eps, int bf16, int nthreads) {
    if (A * B * D < (1 << 14)) nthreads = 1; /* a few rows: a thread hand-off costs more than it saves */
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

#define ROPE_MAX_D 1024
#ifdef NORMS_AVX512
/* One head (D a multiple of 32: each half a whole number of vectors): xr -> o, as head_row below. */
__attribute__((optimize("fp-contract=off"))) static void head_row512(const char *xr, const char *wr, const char *c,
                                                                    const char *s, char *o, int64_t D, float eps,
                                                                    int bf16) {
    const int64_t es = bf16 ? 2 : 4, half = D / 2;
    float v[ROPE_MAX_D] __attribute__((aligned(64)));
    if (wr != NULL) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 16) {
            const __m512 xv = load16f(xr + d * es, bf16);
            acc = _mm512_fmadd_ps(xv, xv, acc);
        }
        const __m512 inv = _mm512_set1_ps(1.f / sqrtf(_mm512_reduce_add_ps(acc) / (float)D + eps));
        for (int64_t d = 0; d < D; d += 16) {
            __m512 y = _mm512_mul_ps(load16f(xr + d * es, bf16), inv);
            if (bf16) y = round_bf16(y);
            y = _mm512_mul_ps(load16f(wr + d * es, bf16), y);
            if (bf16) y = round_bf16(y);
            _mm512_store_ps(v + d, y);
        }
    } else {
        for (int64_t d = 0; d < D; d += 16) _mm512_store_ps(v + d, load16f(xr + d * es, bf16));
    }
    for (int64_t d = 0; d < half; d += 16) {
        const __m512 x1 = _mm512_load_ps(v + d), x2 = _mm512_load_ps(v + d + half);
        __m512 a1 = _mm512_mul_ps(x1, load16f(c + d * es, bf16));
        __m512 b1 = _mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), x2), load16f(s + d * es, bf16));
        __m512 a2 = _mm512_mul_ps(x2, load16f(c + (d + half) * es, bf16));
        __m512 b2 = _mm512_mul_ps(x1, load16f(s + (d + half) * es, bf16));
        if (bf16) a1 = round_bf16(a1), b1 = round_bf16(b1), a2 = round_bf16(a2), b2 = round_bf16(b2);
        store16(o + d * es, _mm512_add_ps(a1, b1), bf16);
        store16(o + (d + half) * es, _mm512_add_ps(a2, b2), bf16);
    }
}
#endif

/* One q or k head through the optional RMSNorm (weight row wr, or NULL) and the rotary embedding at
 * its token's cos/sin rows c, s: xr -> o (D elements each; float32: no FMA contraction, so each
 * product rounds on its own as in torch). */
__attribute__((optimize("fp-contract=off"))) static void head_row(const void *xr_, const void *wr, const void *c_,
                                                                 const void *s_, void *o_, int64_t D, float eps,
                                                                 int bf16) {
#ifdef NORMS_AVX512
    if (D % 32 == 0) {
        head_row512((const char *)xr_, (const char *)wr, (const char *)c_, (const char *)s_, (char *)o_, D, eps, bf16);
        return;
    }
#endif
    const int64_t half = D / 2;
    float v[ROPE_MAX_D];
    if (bf16) {
        const uint16_t *xr = (const uint16_t *)xr_, *c = (const uint16_t *)c_, *s = (const uint16_t *)s_;
        uint16_t n[ROPE_MAX_D];
        if (wr != NULL) row_bf16(xr, (const uint16_t *)wr, n, D, eps);
        else memcpy(n, xr, D * 2);
#pragma omp simd
        for (int64_t d = 0; d < D; d++) v[d] = bf(n[d]);
        uint16_t *o = (uint16_t *)o_;
#pragma omp simd
        for (int64_t d = 0; d < half; d++) {
            o[d] = to_bf(round_bf(v[d] * bf(c[d])) + round_bf(-v[d + half] * bf(s[d])));
            o[d + half] = to_bf(round_bf(v[d + half] * bf(c[d + half])) + round_bf(v[d] * bf(s[d + half])));
        }
    } else {
        const float *xr = (const float *)xr_, *c = (const float *)c_, *s = (const float *)s_;
        if (wr != NULL) row_f32(xr, (const float *)wr, v, D, eps);
        else memcpy(v, xr, D * 4);
        float *o = (float *)o_;
#pragma omp simd
        for (int64_t d = 0; d < half; d++) {
            const float a = v[d] * c[d], bb = -v[d + half] * s[d];
            const float a2 = v[d + half] * c[d + half], b2 = v[d] * s[d + half];
            o[d] = a + bb;
            o[d + half] = a2 + b2;
        }
    }
}

/* The attention inputs of a step from the fused projection, in one pass: x [T, Hq + 2 Hk, D] (row
 * stride sT elements, heads contiguous) -> q heads normed and rotated into q_out [T, Hq, D]; k heads
 * normed and rotated, and v heads as they are, straight into their pool slots (caches [Hk, slots, D]).
 * w: [Hq + Hk, D] per-head norm weights or NULL. Tokens split over threads (their slots are distinct).
 * Returns 0, or -5 for a slot outside [0, slots) (checked first: nothing is written then). */
int mesh_qkv_rope_write(const void *x, int64_t T, int64_t Hq, int64_t Hk, int64_t sT, const void *w, const void *cos,
                        const void *sin, void *q_out, void *k_cache, void *v_cache, int64_t slots, const int64_t *slot,
                        int64_t D, float eps, int bf16, int nthreads) {
    for (int64_t t = 0; t < T; t++)
        if (slot[t] < 0 || slot[t] >= slots) return -5;
    const int64_t es = bf16 ? 2 : 4;
    if (T * (Hq + 2 * Hk) * D < (1 << 14)) nthreads = 1; /* a few tokens: a hand-off costs more */
    (void)nthreads;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t t = 0; t < T; t++) {
        const char *xr = (const char *)x + t * sT * es, *c = (const char *)cos + t * D * es,
                   *s = (const char *)sin + t * D * es;
        for (int64_t b = 0; b < Hq + Hk; b++) {
            char *o = b < Hq ? (char *)q_out + (t * Hq + b) * D * es
                             : (char *)k_cache + ((b - Hq) * slots + slot[t]) * D * es;
            head_row(xr + b * D * es, w ? (const char *)w + b * D * es : NULL, c, s, o, D, eps, bf16);
        }
        for (int64_t h = 0; h < Hk; h++)
            memcpy((char *)v_cache + (h * slots + slot[t]) * D * es, xr + (Hq + Hk + h) * D * es, (size_t)(D * es));
    }
    return 0;
}

/* Row-wise argmax of x [rows, n] float32 -> idx [rows], as torch.argmax: the first maximal index, and
 * NaN counts as larger than any number (the first NaN wins). One pass per row, vectorised. */
void mesh_argmax_rows(const float *x, int64_t rows, int64_t n, int64_t *idx) {
    for (int64_t r = 0; r < rows; r++) {
        const float *v = x + r * n;
#ifdef NORMS_AVX512
        idx[r] = argmax_row512(v, n);
        continue;
#endif
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
    if (rows * D < (1 << 14)) nthreads = 1; /* measured: from 16k values (32 x 512) two threads win */
    (void)nthreads;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t r = 0; r < rows; r++) {
#ifdef NORMS_AVX512
        if (D % 16 == 0) {
            const int64_t es = bf16 ? 2 : 4;
            add_norm_row512((const char *)h + r * D * es, (const char *)delta + r * D * es, (const char *)w,
                            (char *)h_out + r * D * es, (char *)x + r * D * es, D, eps, bf16);
            continue;
        }
#endif
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

