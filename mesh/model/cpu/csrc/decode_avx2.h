/* The AVX2 + FMA decode attention path (block_size 16, head_dim a multiple of 32, float32 and
 * bfloat16), for CPUs without AVX-512 (AMD Zen 2 and 3, Intel client cores, ...): included by
 * decode_attention.c in such builds only. The portable block_size-16 path's 16-lane vectors become
 * pairs of registers there, with a lane sum per (head, token) and accumulators spilled to memory (its
 * decode attention in a 64-request run of bench workload (b) on a Zen 3: 13.3 s; this path's: 2.65 s);
 * here the work is tiled to the 16 registers:
 *   - a bf16 block's K and V rows are widened once into float32 rows (exact);
 *   - scores: 2 tokens x up to 4 query heads of partial-sum vectors per pass over head_dim (8
 *     accumulators, each K row and query row loaded once per tile), then 8 tokens' partial sums reduced
 *     into one vector of 8 scores by a tree of horizontal adds;
 *   - the online softmax per head on two 8-lane vectors (probabilities rounded to bf16 in bfloat16,
 *     as the reference rounds them before its probabilities-times-values matmul);
 *   - P.V: 2 heads x 32 dimensions of accumulators (8 registers) over the block's value rows, the
 *     running rescale applied as they are loaded.
 * The next block's K and V lines are prefetched while one computes (blocks lie anywhere in the pool). */
#ifndef MESH_DECODE_AVX2_H
#define MESH_DECODE_AVX2_H

typedef struct {
    float q[MAX_G][MAX_D] __attribute__((aligned(32)));   /* queries times the scale, float32 */
    float acc[MAX_G][MAX_D] __attribute__((aligned(32))); /* P.V sums */
    float kf[16 * MAX_D] __attribute__((aligned(32)));    /* a bf16 block's keys and values widened, */
    float vf[16 * MAX_D] __attribute__((aligned(32)));    /* rows D floats apart as in the pool */
    float ps[MAX_G][16][8] __attribute__((aligned(32)));  /* per (head, token) partial dot products */
    float p[MAX_G][16] __attribute__((aligned(32)));      /* probabilities of the block's tokens */
    float m[MAX_G], l[MAX_G], corr[MAX_G];
} work2_t;

/* 8 vectors -> one vector of their 8 lane sums (lane i: the sum of v[i]). */
static inline __m256 sum8x8(const float (*v)[8]) {
    const __m256 h01 = _mm256_hadd_ps(_mm256_load_ps(v[0]), _mm256_load_ps(v[1]));
    const __m256 h23 = _mm256_hadd_ps(_mm256_load_ps(v[2]), _mm256_load_ps(v[3]));
    const __m256 h45 = _mm256_hadd_ps(_mm256_load_ps(v[4]), _mm256_load_ps(v[5]));
    const __m256 h67 = _mm256_hadd_ps(_mm256_load_ps(v[6]), _mm256_load_ps(v[7]));
    const __m256 a = _mm256_hadd_ps(h01, h23), b = _mm256_hadd_ps(h45, h67); /* [0..3 | 0..3], [4..7 | 4..7] */
    return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

/* Partial dot products of query rows g0 .. g0+GN-1 with key rows t0 .. t0+NT-1 (rows D floats apart
 * from k) -> w->ps. */
static inline __attribute__((always_inline)) void qk_tile(work2_t *w, const float *k, int64_t D, int64_t g0,
                                                          int64_t t0, const int GN, const int NT) {
    __m256 a[4][2];
    for (int i = 0; i < GN; i++)
        for (int u = 0; u < NT; u++) a[i][u] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) {
        __m256 kv[2];
        for (int u = 0; u < NT; u++) {
            kv[u] = _mm256_loadu_ps(k + (t0 + u) * D + d);
            __asm__("" : "+x"(kv[u])); /* a register, loaded once: not a memory operand of each head's FMA */
        }
        for (int i = 0; i < GN; i++) {
            const __m256 qv = _mm256_load_ps(w->q[g0 + i] + d);
            for (int u = 0; u < NT; u++) a[i][u] = _mm256_fmadd_ps(qv, kv[u], a[i][u]);
        }
    }
    for (int i = 0; i < GN; i++)
        for (int u = 0; u < NT; u++) _mm256_store_ps(w->ps[g0 + i][t0 + u], a[i][u]);
}

static inline __attribute__((always_inline)) void qk_heads(work2_t *w, const float *k, int64_t D, int64_t g0,
                                                           int64_t n, const int GN) {
    int64_t t = 0;
    for (; t + 2 <= n; t += 2) qk_tile(w, k, D, g0, t, GN, 2);
    if (t < n) qk_tile(w, k, D, g0, t, GN, 1);
}

static void pair_avx2(const job_t *j, work2_t *w, int64_t b, int64_t h) {
    const int64_t G = j->G, D = j->D, esz = j->bf16 ? 2 : 4;
    const char *qb = (const char *)j->q, *kb = (const char *)j->k, *vb = (const char *)j->v;
    const __m256 scale = _mm256_set1_ps(j->scale);
    for (int64_t g = 0; g < G; g++) {
        const char *qr = qb + ((b * j->Hk + h) * G + g) * D * esz;
        for (int64_t d = 0; d < D; d += 8) {
            _mm256_store_ps(w->q[g] + d, _mm256_mul_ps(load8f(qr + d * esz, j->bf16), scale));
            _mm256_store_ps(w->acc[g] + d, _mm256_setzero_ps());
        }
        w->m[g] = -INFINITY;
        w->l[g] = 0.f;
    }
    const int64_t ctx = j->ctx[b], nblocks = (ctx + 15) / 16, bbytes = 16 * D * esz;
    for (int64_t i = 0; i < nblocks; i++) {
        const int64_t n = ctx - i * 16 < 16 ? ctx - i * 16 : 16;
        const int64_t at = (h * j->N + j->table[b * j->M + i]) * bbytes;
        if (i + 1 < nblocks) { /* the next block's K and V lines, while this one computes */
            const int64_t next = (h * j->N + j->table[b * j->M + i + 1]) * bbytes;
            for (int64_t off = 0; off < bbytes; off += 64) {
                _mm_prefetch(kb + next + off, _MM_HINT_T0);
                _mm_prefetch(vb + next + off, _MM_HINT_T0);
            }
        }
        const float *k = (const float *)(kb + at), *v = (const float *)(vb + at);
        if (j->bf16) { /* widen the block's n rows once: every head reads them */
            for (int64_t t = 0; t < n; t++)
                for (int64_t d = 0; d < D; d += 8) {
                    _mm256_store_ps(w->kf + t * D + d, load8f(kb + at + (t * D + d) * 2, 1));
                    _mm256_store_ps(w->vf + t * D + d, load8f(vb + at + (t * D + d) * 2, 1));
                }
            k = w->kf, v = w->vf;
        }
        int64_t g = 0;
        for (; g + 4 <= G; g += 4) qk_heads(w, k, D, g, n, 4);
        for (; g < G; g++) qk_heads(w, k, D, g, n, 1);
        const __m256 lanes = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), neg_inf = _mm256_set1_ps(-INFINITY);
        const __m256 valid0 = _mm256_cmp_ps(lanes, _mm256_set1_ps((float)n), _CMP_LT_OQ);
        const __m256 valid1 = _mm256_cmp_ps(_mm256_add_ps(lanes, _mm256_set1_ps(8.f)), _mm256_set1_ps((float)n), _CMP_LT_OQ);
        for (int64_t gg = 0; gg < G; gg++) {
            const __m256 s0 = _mm256_blendv_ps(neg_inf, sum8x8((const float(*)[8])w->ps[gg]), valid0);
            const __m256 s1 = n > 8 ? _mm256_blendv_ps(neg_inf, sum8x8((const float(*)[8])w->ps[gg] + 8), valid1) : neg_inf;
            const float mnew = max_running(hmax8(_mm256_max_ps(s0, s1)), w->m[gg]);
            const __m256 mv = _mm256_set1_ps(mnew);
            const __m256 p0 = _mm256_and_ps(valid0, exp_nonpos8(_mm256_sub_ps(s0, mv)));
            const __m256 p1 = _mm256_and_ps(valid1, exp_nonpos8(_mm256_sub_ps(s1, mv)));
            const float corr = _mm256_cvtss_f32(exp_nonpos8(_mm256_set1_ps(w->m[gg] - mnew))); /* ~0 on the first block */
            w->l[gg] = w->l[gg] * corr + hsum8(_mm256_add_ps(p0, p1));
            w->m[gg] = mnew;
            w->corr[gg] = corr;
            _mm256_store_ps(w->p[gg], j->bf16 ? round_bf16_8(p0) : p0);
            _mm256_store_ps(w->p[gg] + 8, j->bf16 ? round_bf16_8(p1) : p1);
        }
        /* P.V: acc = acc * corr + P . V, two heads at a time */
        for (g = 0; g + 2 <= G; g += 2) pv_accumulate(w->acc[g], MAX_D, w->p[g], 16, w->corr + g, v, n, D, 2);
        for (; g < G; g++) pv_accumulate(w->acc[g], MAX_D, w->p[g], 16, w->corr + g, v, n, D, 1);
    }
    for (int64_t g = 0; g < G; g++) {
        const __m256 inv = _mm256_set1_ps(w->l[g] > 0.f ? 1.f / w->l[g] : 0.f);
        char *o = (char *)j->out + ((b * j->Hk + h) * G + g) * D * esz;
        for (int64_t d = 0; d < D; d += 8) store8(o + d * esz, _mm256_mul_ps(_mm256_load_ps(w->acc[g] + d), inv), j->bf16);
    }
}

#endif
