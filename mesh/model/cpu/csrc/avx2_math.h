/* Small AVX2 + FMA helpers (8 float32 lanes) shared by the native kernels on CPUs without AVX-512
 * (AMD Zen 2 and 3, Intel client cores, ...): the 8-lane counterparts of avx512_math.h's. Included
 * only where __AVX2__ and __FMA__ are defined and __AVX512F__ is not. */
#ifndef MESH_AVX2_MATH_H
#define MESH_AVX2_MATH_H
#include <immintrin.h>
#include <stdint.h>

/* The kernels' `bf16` argument for a bfloat16 job whose products run as float32 FMAs on operands
 * widened from bf16: without AVX-512 the only way bf16 runs (there is no VDPBF16PS); 0 is float32. */
#define MESH_WIDE 2

/* 8 bf16 pairs (16 values, as a 32-byte vector) -> the 8 even-indexed values and the 8 odd-indexed ones
 * as float32, exactly: a shift and a mask. */
static inline void split_bf16_pairs8(__m256i v, __m256 *even, __m256 *odd) {
    *even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    *odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u)));
}

/* float32 -> bf16 (round to nearest even; NaN stays a quiet NaN, as bf16.h's to_bf) -> float32: what
 * storing a bf16 tensor does to a value. */
static inline __m256 round_bf16_8(__m256 v) {
    const __m256i u = _mm256_castps_si256(v), hi = _mm256_set1_epi32((int)0xffff0000u);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_and_si256(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd)), hi);
    const __m256i nan = _mm256_or_si256(_mm256_and_si256(u, hi), _mm256_set1_epi32(0x400000));
    return _mm256_blendv_ps(_mm256_castsi256_ps(rounded), _mm256_castsi256_ps(nan), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}

/* 8 values at p (bf16 or float32) as float32. */
static inline __m256 load8f(const char *p, const int bf16) {
    return bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16))
                : _mm256_loadu_ps((const float *)p);
}

/* 8 float32 values -> dst as float32, or rounded to bf16 (any nonzero `bf16`). */
static inline void store8(char *dst, __m256 v, const int bf16) {
    if (bf16) {
        const __m256i b = _mm256_srli_epi32(_mm256_castps_si256(round_bf16_8(v)), 16);
        _mm_storeu_si128((__m128i *)dst, _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
    } else {
        _mm256_storeu_ps((float *)dst, v);
    }
}

/* The largest of 8 lanes, and their sum. */
static inline float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* The attention kernels' P.V step: for rows i < RB (1 or 2), acc_i [D] = acc_i * cf[i] + sum over the nt
 * value rows t at v ([nt][D] float32) of p_i[t] * v_t. Rows acc_stride floats apart from acc, their
 * probabilities p_stride apart from p. 32 dimensions at a time in 8 registers; each value vector is
 * loaded once for the rows (pinned to a register by an empty asm: otherwise GCC folds a load into every
 * row's FMA). */
static inline __attribute__((always_inline)) void pv_accumulate(float *acc, int64_t acc_stride, const float *p,
                                                                int64_t p_stride, const float *cf, const float *v,
                                                                int64_t nt, int64_t D, const int RB) {
    for (int64_t d0 = 0; d0 < D; d0 += 32) {
        __m256 a[2][4];
        for (int i = 0; i < RB; i++) {
            const __m256 c = _mm256_set1_ps(cf[i]);
            for (int u = 0; u < 4; u++) a[i][u] = _mm256_mul_ps(_mm256_load_ps(acc + i * acc_stride + d0 + 8 * u), c);
        }
        for (int64_t t = 0; t < nt; t++) {
            const float *vr = v + t * D + d0;
            __m256 v0 = _mm256_loadu_ps(vr), v1 = _mm256_loadu_ps(vr + 8), v2 = _mm256_loadu_ps(vr + 16),
                   v3 = _mm256_loadu_ps(vr + 24);
            if (RB > 1) __asm__("" : "+x"(v0), "+x"(v1), "+x"(v2), "+x"(v3));
            for (int i = 0; i < RB; i++) {
                const __m256 pt = _mm256_broadcast_ss(p + i * p_stride + t);
                a[i][0] = _mm256_fmadd_ps(pt, v0, a[i][0]);
                a[i][1] = _mm256_fmadd_ps(pt, v1, a[i][1]);
                a[i][2] = _mm256_fmadd_ps(pt, v2, a[i][2]);
                a[i][3] = _mm256_fmadd_ps(pt, v3, a[i][3]);
            }
        }
        for (int i = 0; i < RB; i++)
            for (int u = 0; u < 4; u++) _mm256_store_ps(acc + i * acc_stride + d0 + 8 * u, a[i][u]);
    }
}

/* exp(x) for x <= 0 on 8 lanes: exp_nonpos16's arithmetic (the same polynomial, and 2^n built in the
 * exponent field, which for n >= -126 is scalef's exact result). */
static inline __m256 exp_nonpos8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f),
                                      _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x));
    __m256 p = _mm256_set1_ps(1.f / 720.f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}

#endif
