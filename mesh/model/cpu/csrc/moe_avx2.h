/* The AVX2 + FMA counterparts of moe_experts.c's AVX-512 micro-kernels and epilogues, for CPUs without
 * AVX-512 (AMD Zen 2 and 3, Intel client cores, ...). Included by moe_experts.c (after moe_job_t) in
 * such builds only; the work split, the packed weight layout and the roundings are the file's own.
 *
 * 16 vector registers of 8 float32 lanes. A micro-kernel call computes up to MR = 6 rows x 32 outputs
 * as two passes over the K input positions, each 6 rows x 16 outputs (12 accumulators, 2 weight
 * vectors, 1 broadcast): first the tile's first 16 outputs (w0), then its second 16 (w1). A tile's
 * weights are re-read from L2 per 6 rows (64 bytes per 12 FMAs). bfloat16 runs only "wide" (there is
 * no VDPBF16PS): each 32-byte half of a packed pair vector is split into its even and odd inputs'
 * float32 weights by a shift and a mask, against float32 copies of the inputs. Sums are float32 in
 * every mode, so results differ from the AVX-512 build's only in summation order. */
#ifndef MESH_MOE_AVX2_H
#define MESH_MOE_AVX2_H

#define WIDE MESH_WIDE
static int wide_bf16(void) { return 1; }

/* One pass: m rows x 16 outputs into c[i * 32 + 0 .. 15]. Inputs are float32 (the model's values, or the
 * wide mode's widened copies): row pointers x (row i's input k at ((float *)x[i])[k]) or, with `panel`,
 * a panel a (input k of row i at a[k * MR + i]). w: the 16 outputs' weights at each input step, steps
 * 128 bytes apart (one half of a packed 32-column tile), float32, or in the wide mode bf16 pairs (64
 * bytes a pair: outputs 0-7 in the first 32, 8-15 in the second). `far`: also prefetch both halves of
 * the step FAR steps ahead into L2 (the first pass of a row-pointer call, whose weights stream from
 * memory: the second pass then finds its half there). */
static inline __attribute__((always_inline)) void pass16(const char *const *x, const float *a, const char *w, int64_t K,
                                                         float *c, const int M, const int wide, const int panel,
                                                         const int far) {
    __m256 acc[MR][2];
#pragma GCC unroll 8
    for (int i = 0; i < M; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
#define IN(i, k) _mm256_broadcast_ss(panel ? a + (k) * MR + (i) : (const float *)x[i] + (k))
    if (wide) {
        for (int64_t p = 0; p < K / 2; p++) {
            const char *wp = w + p * 128;
            _mm_prefetch(wp + PF * 128, _MM_HINT_T0);
            if (far) {
                _mm_prefetch(wp + FAR * 128, _MM_HINT_T1);
                _mm_prefetch(wp + FAR * 128 + 64, _MM_HINT_T1);
            }
            const __m256 e0 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)wp), 16));
            const __m256 e1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)(wp + 32)), 16));
#pragma GCC unroll 8
            for (int i = 0; i < M; i++) {
                const __m256 v = IN(i, 2 * p);
                acc[i][0] = _mm256_fmadd_ps(v, e0, acc[i][0]);
                acc[i][1] = _mm256_fmadd_ps(v, e1, acc[i][1]);
            }
            /* the odd inputs' weights: the upper halves, cleared below by two shifts (no mask register: the
             * 16 are taken by 12 accumulators, 2 weights, 1 broadcast) */
            const __m256 o0 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_srli_epi32(_mm256_loadu_si256((const __m256i *)wp), 16), 16));
            const __m256 o1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_srli_epi32(_mm256_loadu_si256((const __m256i *)(wp + 32)), 16), 16));
#pragma GCC unroll 8
            for (int i = 0; i < M; i++) {
                const __m256 v = IN(i, 2 * p + 1);
                acc[i][0] = _mm256_fmadd_ps(v, o0, acc[i][0]);
                acc[i][1] = _mm256_fmadd_ps(v, o1, acc[i][1]);
            }
        }
    } else {
        for (int64_t k = 0; k < K; k++) {
            const char *wp = w + k * 128;
            _mm_prefetch(wp + PF * 128, _MM_HINT_T0);
            if (far) {
                _mm_prefetch(wp + FAR * 128, _MM_HINT_T1);
                _mm_prefetch(wp + FAR * 128 + 64, _MM_HINT_T1);
            }
            const __m256 b0 = _mm256_loadu_ps((const float *)wp), b1 = _mm256_loadu_ps((const float *)(wp + 32));
#pragma GCC unroll 8
            for (int i = 0; i < M; i++) {
                const __m256 v = IN(i, k);
                acc[i][0] = _mm256_fmadd_ps(v, b0, acc[i][0]);
                acc[i][1] = _mm256_fmadd_ps(v, b1, acc[i][1]);
            }
        }
    }
#undef IN
#pragma GCC unroll 8
    for (int i = 0; i < M; i++) {
        _mm256_storeu_ps(c + i * 32, acc[i][0]);
        _mm256_storeu_ps(c + i * 32 + 8, acc[i][1]);
    }
}

/* ukernel / ukernel_panel of the AVX-512 build: rows x one packed 32-column tile (w0, w1 = w0 + 64) ->
 * float32 sums c[i * 32 + 0 .. 31]. mode 0 float32, WIDE bf16 weights (units: the panel's float32
 * inputs, as K). */
static inline __attribute__((always_inline)) void ukernel(const char *const *x, const char *w0, const char *w1,
                                                          int64_t K, float *c, const int M, const int mode) {
    pass16(x, NULL, w0, K, c, M, mode == WIDE, 0, 1);
    pass16(x, NULL, w1, K, c + 16, M, mode == WIDE, 0, 0);
}

static inline __attribute__((always_inline)) void ukernel_panel(const char *a, const char *w0, const char *w1,
                                                                int64_t units, float *c, const int M, const int mode) {
    pass16(NULL, (const float *)a, w0, units, c, M, mode == WIDE, 1, 0);
    pass16(NULL, (const float *)a, w1, units, c + 16, M, mode == WIDE, 1, 0);
}

#define UK(M)                                                                                           \
    static void uk_f32_##M(const char *const *x, const char *w0, const char *w1, int64_t K, float *c) {   \
        ukernel(x, w0, w1, K, c, M, 0);                                                                  \
    }                                                                                                    \
    static void uk_wide_##M(const char *const *x, const char *w0, const char *w1, int64_t K, float *c) {  \
        ukernel(x, w0, w1, K, c, M, WIDE);                                                               \
    }                                                                                                    \
    static void ukp_f32_##M(const char *a, const char *w0, const char *w1, int64_t u, float *c) {         \
        ukernel_panel(a, w0, w1, u, c, M, 0);                                                            \
    }                                                                                                    \
    static void ukp_wide_##M(const char *a, const char *w0, const char *w1, int64_t u, float *c) {        \
        ukernel_panel(a, w0, w1, u, c, M, WIDE);                                                         \
    }
UK(1) UK(2) UK(3) UK(4) UK(5) UK(6)
_Static_assert(MR == 6, "the tables below list the AVX2 kernels for 1..6 rows");
typedef void (*uk_fn)(const char *const *, const char *, const char *, int64_t, float *);
typedef void (*ukp_fn)(const char *, const char *, const char *, int64_t, float *);
static const uk_fn UK_F32[MR + 1] = {NULL, uk_f32_1, uk_f32_2, uk_f32_3, uk_f32_4, uk_f32_5, uk_f32_6};
static const uk_fn UK_WIDE[MR + 1] = {NULL, uk_wide_1, uk_wide_2, uk_wide_3, uk_wide_4, uk_wide_5, uk_wide_6};
static const ukp_fn UKP_F32[MR + 1] = {NULL, ukp_f32_1, ukp_f32_2, ukp_f32_3, ukp_f32_4, ukp_f32_5, ukp_f32_6};
static const ukp_fn UKP_WIDE[MR + 1] = {NULL, ukp_wide_1, ukp_wide_2, ukp_wide_3, ukp_wide_4, ukp_wide_5, ukp_wide_6};
/* by the jobs' `bf16` mode; mode 1 (VDPBF16PS) never runs in this build (product_mode says WIDE) */
static const uk_fn *const UK[WIDE + 1] = {UK_F32, NULL, UK_WIDE};
static const ukp_fn *const UKP[WIDE + 1] = {UKP_F32, NULL, UKP_WIDE};

/* m rows (pointers) of `units` 4-byte elements -> panels of MR rows: [chunk][unit][MR]. */
static void pack_rows(const char *const *rows, int64_t m, int64_t units, int32_t *panel) {
    for (int64_t c0 = 0; c0 < m; c0 += MR) {
        int32_t *pc = panel + (c0 / MR) * units * MR;
        const int64_t mm = m - c0 < MR ? m - c0 : MR;
        if (mm == MR && units % 8 == 0) { /* 8 units of MR rows at a time through a small tile */
            for (int64_t p0 = 0; p0 < units; p0 += 8) {
                int32_t t[MR][8] __attribute__((aligned(32)));
                for (int64_t i = 0; i < MR; i++)
                    _mm256_store_si256((__m256i *)t[i], _mm256_loadu_si256((const __m256i *)((const int32_t *)rows[c0 + i] + p0)));
                for (int64_t p = 0; p < 8; p++)
                    for (int64_t i = 0; i < MR; i++) pc[(p0 + p) * MR + i] = t[i][p];
            }
            continue;
        }
        for (int64_t i = 0; i < mm; i++) {
            const int32_t *src = (const int32_t *)rows[c0 + i];
            for (int64_t p = 0; p < units; p++) pc[p * MR + i] = src[p];
        }
    }
}

/* silu(g) = g * sigmoid(g), with the exponential taken of -|g| so it never overflows (silu16's arithmetic). */
static inline __m256 silu8(__m256 g) {
    const __m256 mag = _mm256_andnot_ps(_mm256_set1_ps(-0.f), g);
    const __m256 e = exp_nonpos8(_mm256_sub_ps(_mm256_setzero_ps(), mag));
    const __m256 inv = _mm256_div_ps(_mm256_set1_ps(1.f), _mm256_add_ps(_mm256_set1_ps(1.f), e));
    const __m256 neg = _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_LT_OQ);
    return _mm256_mul_ps(g, _mm256_blendv_ps(inv, _mm256_mul_ps(inv, e), neg)); /* g<0: e/(1+e) */
}

/* m rows of gate/up sums (row i: gate at c + 32i, up at c + 32i + 16) -> h rows r .. r + m, columns
 * 16j .. 16j + 15: silu(gate) * up, rounded as torch rounds (bf16: the matmul outputs, silu's output,
 * the product; the wide mode keeps the bf16 value as float32). */
static inline void gate_up_store(const moe_job_t *jb, const float *c, int64_t m, int64_t r, int64_t j) {
    for (int64_t i = 0; i < m; i++)
        for (int q = 0; q < 2; q++) {
            const __m256 g = _mm256_loadu_ps(c + i * 32 + 8 * q), u = _mm256_loadu_ps(c + i * 32 + 16 + 8 * q);
            const __m256 y = jb->bf16 ? _mm256_mul_ps(round_bf16_8(silu8(round_bf16_8(g))), round_bf16_8(u))
                                      : _mm256_mul_ps(silu8(g), u);
            char *o = jb->h + ((r + i) * jb->I + 16 * j + 8 * q) * jb->xsz;
            if (jb->bf16 == WIDE) _mm256_storeu_ps((float *)o, round_bf16_8(y));
            else store8(o, y, jb->bf16);
        }
}

/* m rows of down sums (row i at c + 32i) -> output rows r .. r + m, columns 32j .. 32j + 31. */
static inline void down_store(const moe_job_t *jb, const float *c, int64_t m, int64_t r, int64_t j) {
    for (int64_t i = 0; i < m; i++) {
        char *o = jb->out + ((r + i) * jb->H + 32 * j) * jb->esz;
        for (int q = 0; q < 4; q++) store8(o + 8 * q * jb->esz, _mm256_loadu_ps(c + i * 32 + 8 * q), jb->bf16);
    }
}

/* Rows r .. r + m of a linear layer's output tile j (columns 32j .. 32j + 31) from float32 sums c
 * (row i at c + 32 i): bias added in float32, rounded once (out_f32: the rounded values as float32). */
static void linear_store(const float *c, int m, int64_t r, int64_t j, const void *bias, void *out, int64_t N,
                         int bf16, int out_f32) {
    const int64_t esz = bf16 ? 2 : 4;
    const int pieces = 32 * j + 16 < N ? 4 : 2; /* 8-column pieces: the last tile pair may end in padding rows */
    __m256 b[4];
    for (int q = 0; q < 4; q++)
        b[q] = bias != NULL && q < pieces ? load8f((const char *)bias + (32 * j + 8 * q) * esz, bf16) : _mm256_setzero_ps();
    for (int i = 0; i < m; i++)
        for (int q = 0; q < pieces; q++) {
            const __m256 y = _mm256_add_ps(_mm256_loadu_ps(c + i * 32 + 8 * q), b[q]);
            if (out_f32) _mm256_storeu_ps((float *)out + (r + i) * N + 32 * j + 8 * q, bf16 ? round_bf16_8(y) : y);
            else store8((char *)out + ((r + i) * N + 32 * j + 8 * q) * esz, y, bf16);
        }
}

/* One row of n bf16 values -> float32 (exact). */
static inline void widen_row(const uint16_t *s, float *d, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(d + i, load8f((const char *)(s + i), 1));
    for (; i < n; i++) d[i] = bf(s[i]);
}

/* One token's combine: o [H] = sum_k wk[k] * rows[k] [H], accumulated in float32 and rounded once. */
static inline void combine_row(char *o, const char *const *rows, const float *wk, int64_t K, int64_t H, int64_t esz,
                               int bf16) {
    for (int64_t d = 0; d < H; d += 8) {
        __m256 a = _mm256_setzero_ps();
        for (int64_t k = 0; k < K; k++) a = _mm256_fmadd_ps(_mm256_set1_ps(wk[k]), load8f(rows[k] + d * esz, bf16), a);
        store8(o + d * esz, a, bf16);
    }
}

#endif
