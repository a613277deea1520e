/* Small AVX-512 helpers shared by the native kernels (included only where __AVX512F__ and
 * __AVX512BW__ are defined). */
#ifndef MESH_AVX512_MATH_H
#define MESH_AVX512_MATH_H
#include <immintrin.h>
#include <stdint.h>

/* The kernels' `bf16` argument for a bfloat16 job whose products run as float32 FMAs on operands
 * widened from bf16 (see mesh_bf16_wide in moe_experts.c); 1 is VDPBF16PS, 0 float32. */
#define MESH_WIDE 2

/* 16 bf16 pairs (32 values, as a 64-byte vector) -> the 16 even-indexed values and the 16 odd-indexed
 * ones as float32, exactly: a shift and a mask. */
static inline void split_bf16_pairs(__m512i v, __m512 *even, __m512 *odd) {
    *even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    *odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xffff0000u)));
}

/* float32 -> bf16 (round to nearest even) -> float32: what storing a bf16 tensor does to a value. */
static inline __m512 round_bf16(__m512 v) {
#ifdef __AVX512BF16__
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
#else
    __m512i u = _mm512_castps_si512(v);
    u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xffff0000u)));
#endif
}

/* 16 values at p (bf16 or float32) as float32. */
static inline __m512 load16f(const char *p, const int bf16) {
    return bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16))
                : _mm512_loadu_ps(p);
}

static inline void store16(char *dst, __m512 v, const int bf16) {
#ifdef __AVX512BF16__ /* the rounding round_bf16 does, stored as it comes out (one instruction, not five) */
    if (bf16) _mm256_storeu_si256((__m256i *)dst, (__m256i)_mm512_cvtneps_pbh(v));
#else
    if (bf16) _mm256_storeu_si256((__m256i *)dst, _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(round_bf16(v)), 16)));
#endif
    else _mm512_storeu_ps((float *)dst, v);
}

/* exp(x) for x <= 0 on 16 lanes (|rel. error| < 3e-7; e^-87 below -87). */
static inline __m512 exp_nonpos16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f),
                                      _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x));
    __m512 p = _mm512_set1_ps(1.f / 720.f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}

/* One attention output row from its float32 accumulators (C vectors of 16), times `inv`, rounded to
 * the output dtype. bf16 P.V accumulators, built from value rows interleaved into pairs by
 * VPUNPCK{L,H}WD (which work within 128-bit lanes), hold the c-th 32 values of a row out of order:
 * accumulator 2c lane 4k+i holds d = 32c + 8k + i, accumulator 2c+1 holds d = 32c + 8k + 4 + i.
 * These indices put them back in order. float32 and MESH_WIDE accumulators are in order. */
static inline void store_acc_row(const __m512 *acc, float inv, void *out, const int bf16, const int64_t C) {
    if (bf16 != 1) {
        for (int64_t c = 0; c < C; c++) store16((char *)out + c * 16 * (bf16 ? 2 : 4), _mm512_mul_ps(acc[c], _mm512_set1_ps(inv)), bf16);
        return;
    }
#ifdef __AVX512BF16__ /* bf16 kernels run only where the CPU has it */
    const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int64_t c = 0; c < C / 2; c++) {
        __m512 lo = acc[2 * c], hi = acc[2 * c + 1];
        __m512 a = _mm512_mul_ps(_mm512_permutex2var_ps(lo, first, hi), _mm512_set1_ps(inv));
        __m512 b = _mm512_mul_ps(_mm512_permutex2var_ps(lo, second, hi), _mm512_set1_ps(inv));
        uint16_t *o = (uint16_t *)out + c * 32;
        _mm256_storeu_si256((__m256i *)o, (__m256i)_mm512_cvtneps_pbh(a));
        _mm256_storeu_si256((__m256i *)(o + 16), (__m256i)_mm512_cvtneps_pbh(b));
    }
#endif
}

#endif
