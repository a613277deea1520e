/* The AVX2 + FMA counterpart of prefill_attention.c's AVX-512 phases, for CPUs without AVX-512 (AMD
 * Zen 2 and 3, Intel client cores, ...). Included by prefill_attention.c in such builds only; the
 * work split (phase 1 rearranges, phase 2 walks query blocks) and the arithmetic are the file's own.
 *
 * float32, and bfloat16 as float32 FMAs on widened operands (the "wide" mode: there is no VDPBF16PS):
 * both rearrange a block as float32, keys transposed ([D][16]: one input position of 16 keys per two
 * vectors) and values as rows ([16][D]). With 16 vector registers of 8 lanes, a sweep takes RB2 = 2
 * query rows: their scores for two key blocks (32 keys) are 8 accumulators; the P.V accumulators live
 * in a per-row float32 buffer, taken 32 dimensions at a time into 8 registers, rescaled as they are
 * loaded, and stored back after the 32 (or 16) keys' value rows have been added. */
#ifndef MESH_PREFILL_AVX2_H
#define MESH_PREFILL_AVX2_H

#define RB2 2 /* query rows per sweep */

/* Phase 1: one (chunk, head, key block), as float32 (bf16 widened exactly); rows past the context zeros. */
static void rearrange(const pjob_t *j, int64_t c, int64_t h, int64_t kb) {
    const int64_t D = j->D, esz = j->bf16 ? 2 : 4, ctx = j->chunks[c * 3 + 2];
    const int64_t valid = ctx - kb * 16 < 16 ? ctx - kb * 16 : 16;
    const int64_t blk = j->tables[c * j->M + kb];
    const char *ks = j->k + (h * j->N + blk) * 16 * D * esz, *vs = j->v + (h * j->N + blk) * 16 * D * esz;
    const int64_t at = (j->first[c * j->Hk + h] + kb) * 16 * D * 4;
    float *kt = (float *)(j->kt + at), *vp = (float *)(j->vp + at);
    for (int64_t t = 0; t < 16; t++)
        for (int64_t d = 0; d < D; d++)
            kt[d * 16 + t] = t >= valid ? 0.f : j->bf16 ? bf(((const uint16_t *)ks)[t * D + d]) : ((const float *)ks)[t * D + d];
    for (int64_t t = 0; t < 16; t++)
        for (int64_t d = 0; d < D; d += 8)
            _mm256_storeu_ps(vp + t * D + d, t < valid ? load8f(vs + (t * D + d) * esz, j->bf16) : _mm256_setzero_ps());
}

/* Lanes of keys half * 8 .. half * 8 + 7 of a block that are among its first n (n clamped to 0 .. 16):
 * all-ones lanes, else zeros. */
static inline __m256 first_keys8(int64_t n, int half) {
    n = n < 0 ? 0 : n > 16 ? 16 : n;
    const __m256i idx = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(8 * half));
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), idx));
}

/* RB query rows of one position (heads g0 .. g0+RB-1 of the group) over every key block up to that
 * position, two key blocks at a time (rows_body of the AVX-512 build, 8 lanes at a time). */
static inline __attribute__((always_inline)) void rows2(const pjob_t *j, int64_t c, int64_t h, int64_t row, int64_t pos,
                                                        int64_t g0, const int RB) {
    const int64_t D = j->D, esz = j->bf16 ? 2 : 4, Hq = j->Hk * j->G, bbytes = 16 * D * 4;
    const int64_t base = j->first[c * j->Hk + h] * bbytes;
    float qw[RB2][PMAX_D] __attribute__((aligned(32)));   /* the query rows as float32 */
    float acc[RB2][PMAX_D] __attribute__((aligned(32)));  /* P.V sums */
    float p[RB2][32] __attribute__((aligned(32)));        /* probabilities of the step's 32 keys */
    __m256 lv[RB2][2]; /* softmax denominators, 16 partial sums each (as the AVX-512 build's lanes) */
    float m[RB2], cf[RB2];
    for (int i = 0; i < RB; i++) {
        const char *qr = j->q + (row * Hq + h * j->G + g0 + i) * D * esz;
        for (int64_t d = 0; d < D; d += 8) {
            _mm256_store_ps(qw[i] + d, load8f(qr + d * esz, j->bf16));
            _mm256_store_ps(acc[i] + d, _mm256_setzero_ps());
        }
        m[i] = -INFINITY;
        lv[i][0] = lv[i][1] = _mm256_setzero_ps();
    }
    const __m256 scale = _mm256_set1_ps(j->scale), neg_inf = _mm256_set1_ps(-INFINITY);
    const int64_t nkb = pos / 16 + 1, last = pos - (nkb - 1) * 16 + 1; /* keys <= pos in the last block */
    for (int64_t kb = 0; kb < nkb; kb += 2) {
        const int two = kb + 1 < nkb;
        const float *kt0 = (const float *)(j->kt + base + kb * bbytes), *kt1 = two ? kt0 + 16 * D : kt0;
        __m256 s[RB2][4];
        for (int i = 0; i < RB; i++) s[i][0] = s[i][1] = s[i][2] = s[i][3] = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d++) {
            __m256 k0 = _mm256_loadu_ps(kt0 + d * 16), k1 = _mm256_loadu_ps(kt0 + d * 16 + 8);
            __m256 k2 = _mm256_loadu_ps(kt1 + d * 16), k3 = _mm256_loadu_ps(kt1 + d * 16 + 8);
            if (RB > 1) /* registers, loaded once for the rows: not a memory operand of each row's FMA */
                __asm__("" : "+x"(k0), "+x"(k1), "+x"(k2), "+x"(k3));
            for (int i = 0; i < RB; i++) {
                const __m256 qv = _mm256_broadcast_ss(qw[i] + d);
                s[i][0] = _mm256_fmadd_ps(qv, k0, s[i][0]);
                s[i][1] = _mm256_fmadd_ps(qv, k1, s[i][1]);
                s[i][2] = _mm256_fmadd_ps(qv, k2, s[i][2]);
                s[i][3] = _mm256_fmadd_ps(qv, k3, s[i][3]);
            }
        }
        /* keys each 8-lane quarter may see: block kb all (or `last` when it is the last), block kb+1 likewise */
        const int64_t see0 = two ? 16 : last, see1 = !two ? 0 : kb + 2 < nkb ? 16 : last;
        const __m256 valid[4] = {first_keys8(see0, 0), first_keys8(see0, 1), first_keys8(see1, 0), first_keys8(see1, 1)};
        float delta[8] = {0};
        for (int i = 0; i < RB; i++) {
            __m256 mx = neg_inf;
            for (int u = 0; u < 4; u++) {
                s[i][u] = _mm256_blendv_ps(neg_inf, _mm256_mul_ps(s[i][u], scale), valid[u]);
                mx = _mm256_max_ps(mx, s[i][u]);
            }
            const float mnew = max_running(hmax8(mx), m[i]);
            delta[i] = m[i] - mnew; /* -inf on the first blocks: their factor is ~0 */
            m[i] = mnew;
        }
        _mm256_storeu_ps(delta, exp_nonpos8(_mm256_loadu_ps(delta))); /* every row's rescale in one exp */
        for (int i = 0; i < RB; i++) {
            cf[i] = delta[i];
            const __m256 mv = _mm256_set1_ps(m[i]), cv = _mm256_set1_ps(cf[i]);
            __m256 e[4];
            for (int u = 0; u < 4; u++) {
                e[u] = _mm256_and_ps(valid[u], exp_nonpos8(_mm256_sub_ps(s[i][u], mv)));
                _mm256_store_ps(p[i] + 8 * u, j->bf16 ? round_bf16_8(e[u]) : e[u]); /* bf16: rounded before P.V */
            }
            lv[i][0] = _mm256_fmadd_ps(lv[i][0], cv, _mm256_add_ps(e[0], e[2]));
            lv[i][1] = _mm256_fmadd_ps(lv[i][1], cv, _mm256_add_ps(e[1], e[3]));
        }
        pv_accumulate(acc[0], PMAX_D, p[0], 32, cf, (const float *)(j->vp + base + kb * bbytes), two ? 32 : 16, D, RB);
    }
    for (int i = 0; i < RB; i++) {
        const float l = hsum8(_mm256_add_ps(lv[i][0], lv[i][1]));
        const __m256 inv = _mm256_set1_ps(l > 0.f ? 1.f / l : 0.f);
        char *o = j->out + (row * Hq + h * j->G + g0 + i) * D * esz;
        for (int64_t d = 0; d < D; d += 8) store8(o + d * esz, _mm256_mul_ps(_mm256_load_ps(acc[i] + d), inv), j->bf16);
    }
}

/* One work item: query positions qb*16 .. of chunk c, KV head h, all G heads of the group. */
static void item_avx2(const pjob_t *j, int64_t c, int64_t h, int64_t qb) {
    const int64_t start = j->chunks[c * 3], n = j->chunks[c * 3 + 1], ctx = j->chunks[c * 3 + 2];
    const int64_t q0 = qb * QB, qn = n - q0 < QB ? n - q0 : QB;
    for (int64_t qi = 0; qi < qn; qi++) {
        const int64_t row = start + q0 + qi, pos = ctx - n + q0 + qi;
        int64_t g = 0;
        for (; g + RB2 <= j->G; g += RB2) rows2(j, c, h, row, pos, g, RB2);
        for (; g < j->G; g++) rows2(j, c, h, row, pos, g, 1);
    }
}

#endif
