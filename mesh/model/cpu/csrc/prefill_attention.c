/* Causal attention of prefill chunks straight over the paged KV pool, for the CPU (AVX-512, bfloat16
 * with AVX512-BF16; on CPUs without AVX-512, the AVX2 + FMA phases of prefill_avx2.h), flash style:
 * float32 scores of a block of 16 keys at a time, an online softmax per query row, the value rows
 * accumulated in float32. Nothing of size context x context is written.
 *
 * A chunk is `n` new tokens of one sequence whose first `ctx - n` tokens are already cached; its
 * query i sits at position ctx - n + i and sees keys 0 ..= that position. Its K/V (the new tokens'
 * too) are already in the pool, found through the chunk's block table (block_size 16).
 *
 * Two phases on the OpenMP pool:
 *   1. Per (chunk, KV head, key block), the block is rearranged once for the inner loops: keys
 *      transposed so a vector holds one input position (a bf16 pair) of 16 keys (scores of 16 keys
 *      come out of D/2 VDPBF16PS or D FMAs, no horizontal sums), values interleaved into bf16 pairs
 *      of adjacent keys (VDPBF16PS then adds two keys' contributions per instruction). Rows past the
 *      context are zeros.
 *   2. Per (chunk, KV head, block of 16 query positions), every query head of the group walks the key
 *      blocks up to its position. Probabilities are rounded to bf16 before P.V in bfloat16, as the
 *      reference rounds them before its probabilities-times-values matmul. In bfloat16 on a CPU with
 *      AMX, item_amx runs this phase on the tile unit, the rearranged blocks as its operands.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include "avx512_math.h"
#define MESH_PREFILL_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#include "avx2_math.h" /* the AVX2 phases: prefill_avx2.h, included below */
#define MESH_PREFILL_AVX2 1
#endif
#if defined(MESH_PREFILL_AVX512) || defined(MESH_PREFILL_AVX2)
/* a bf16 job on float32 FMAs, blocks rearranged as float32: where mesh_bf16_wide says so (always in the
 * AVX2 build, which has no VDPBF16PS) */
#define WIDE MESH_WIDE
int mesh_bf16_wide(void);
#endif
#include "amx.h"

#define QB 16      /* query positions per work item */
#define PMAX_G 64  /* query heads per KV head */
#define PMAX_D 256 /* head_dim */

#if defined(MESH_PREFILL_AVX512) || defined(MESH_PREFILL_AVX2)
typedef struct {
    const char *q, *k, *v;
    char *out;
    const int64_t *chunks; /* [C, 3]: first row in the step, new tokens n, context ctx */
    const int64_t *tables; /* [C, M] block ids */
    const int64_t *first;  /* [C * Hk] index of the (chunk, head)'s first block in the rearranged copy */
    char *kt, *vp;         /* rearranged blocks, 16 * D elements each */
    int64_t M, Hk, G, D, N;
    float scale;
    int bf16; /* 0 float32; 1 bf16 on VDPBF16PS; WIDE bf16 on float32 FMAs: blocks rearranged as float32 */
} pjob_t;
#endif

#ifdef MESH_PREFILL_AVX512

/* Phase 1: one (chunk, head, key block). */
static void rearrange(const pjob_t *j, int64_t c, int64_t h, int64_t kb) {
    const int64_t D = j->D, esz = j->bf16 ? 2 : 4, ctx = j->chunks[c * 3 + 2], rsz = j->bf16 == 1 ? 2 : 4;
    const int64_t valid = ctx - kb * 16 < 16 ? ctx - kb * 16 : 16;
    const int64_t blk = j->tables[c * j->M + kb];
    const char *ks = j->k + (h * j->N + blk) * 16 * D * esz, *vs = j->v + (h * j->N + blk) * 16 * D * esz;
    const int64_t at = (j->first[c * j->Hk + h] + kb) * 16 * D * rsz;
    char *kt = j->kt + at, *vp = j->vp + at;
    if (j->bf16 == WIDE) { /* the float32 layout below, from bf16 (exact) */
        float *o = (float *)kt;
        for (int64_t t = 0; t < 16; t++) {
            const uint16_t *row = (const uint16_t *)(ks + t * D * 2);
            for (int64_t d = 0; d < D; d++) o[d * 16 + t] = t < valid ? bf(row[d]) : 0.f;
        }
        for (int64_t t = 0; t < 16; t++)
            for (int64_t d = 0; d < D; d += 16)
                _mm512_storeu_ps((float *)vp + t * D + d, t < valid ? load16f(vs + (t * D + d) * 2, 1) : _mm512_setzero_ps());
    } else if (j->bf16) {
        /* kt: [D/2][16] int32 pairs; key t's pair p at kt[p][t] */
        uint32_t *o = (uint32_t *)kt;
        for (int64_t t = 0; t < 16; t++) {
            const uint32_t *row = (const uint32_t *)(ks + t * D * 2);
            for (int64_t p = 0; p < D / 2; p++) o[p * 16 + t] = t < valid ? row[p] : 0u;
        }
        /* vp: [8 key pairs][D/32][lo, hi] vectors of (v[2tp][d], v[2tp+1][d]) pairs */
        __m512i *w = (__m512i *)vp;
        for (int64_t tp = 0; tp < 8; tp++) {
            const int64_t t0 = 2 * tp, t1 = t0 + 1;
            for (int64_t cc = 0; cc < D / 32; cc++) {
                __m512i a = t0 < valid ? _mm512_loadu_si512(vs + (t0 * D + cc * 32) * 2) : _mm512_setzero_si512();
                __m512i b = t1 < valid ? _mm512_loadu_si512(vs + (t1 * D + cc * 32) * 2) : _mm512_setzero_si512();
                _mm512_storeu_si512(w + (tp * (D / 32) + cc) * 2, _mm512_unpacklo_epi16(a, b));
                _mm512_storeu_si512(w + (tp * (D / 32) + cc) * 2 + 1, _mm512_unpackhi_epi16(a, b));
            }
        }
    } else {
        float *o = (float *)kt;
        for (int64_t t = 0; t < 16; t++) {
            const float *row = (const float *)(ks + t * D * 4);
            for (int64_t d = 0; d < D; d++) o[d * 16 + t] = t < valid ? row[d] : 0.f;
        }
        for (int64_t t = 0; t < 16; t++) { /* values stay rows; past the context, zeros */
            if (t < valid) memcpy(vp + t * D * 4, vs + t * D * 4, D * 4);
            else memset(vp + t * D * 4, 0, D * 4);
        }
    }
}

/* P.V of one key block for RB rows: probabilities p (float32, zeros past the context) into the
 * accumulators. */
static inline __attribute__((always_inline)) void pv_block(__m512 a[4][PMAX_D / 16], const __m512 *p, const char *vp,
                                                           const int RB, const int64_t C, const int bf16) {
    const int64_t D = C * 16;
    if (bf16 == 1) {
#ifdef __AVX512BF16__
        int32_t pb[4][8]; /* each row's probabilities as bf16 pairs, broadcast from memory below */
        for (int i = 0; i < RB; i++) _mm256_storeu_si256((__m256i *)pb[i], (__m256i)_mm512_cvtneps_pbh(p[i]));
        for (int64_t tp = 0; tp < 8; tp++) {
            __m512bh pp[4];
            for (int i = 0; i < RB; i++) pp[i] = (__m512bh)_mm512_set1_epi32(pb[i][tp]);
            const __m512i *vv = (const __m512i *)vp + tp * (D / 32) * 2;
            for (int64_t cc = 0; cc < D / 32; cc++) {
                __m512bh lo = (__m512bh)_mm512_load_si512(vv + 2 * cc);
                __m512bh hi = (__m512bh)_mm512_load_si512(vv + 2 * cc + 1);
                /* pinned to registers (an empty asm), loaded once for the RB rows: GCC would otherwise
                 * load them again for every row (here and for the keys in rows_body) */
                __asm__("" : "+v"(lo), "+v"(hi));
                for (int i = 0; i < RB; i++) {
                    a[i][2 * cc] = _mm512_dpbf16_ps(a[i][2 * cc], lo, pp[i]);
                    a[i][2 * cc + 1] = _mm512_dpbf16_ps(a[i][2 * cc + 1], hi, pp[i]);
                }
            }
        }
#endif
    } else {
        /* each probability broadcast from memory (a load port) rather than permuted out of its vector
         * (the shuffle port, shared with the FMAs): 2 % faster */
        float pf[4][16] __attribute__((aligned(64))); /* wide bf16: rounded to bf16, as above */
        for (int i = 0; i < RB; i++) _mm512_store_ps(pf[i], bf16 ? round_bf16(p[i]) : p[i]);
        for (int64_t t = 0; t < 16; t++) {
            const char *vr = vp + t * D * 4;
            __m512 pt[4];
            for (int i = 0; i < RB; i++) pt[i] = _mm512_set1_ps(pf[i][t]);
            for (int64_t cc = 0; cc < C; cc++) {
                __m512 vv = _mm512_load_ps((const float *)(vr + cc * 64));
                __asm__("" : "+v"(vv));
                for (int i = 0; i < RB; i++) a[i][cc] = _mm512_fmadd_ps(pt[i], vv, a[i][cc]);
            }
        }
    }
}

/* RB query rows of one position (heads g0 .. g0+RB-1 of the group) over every key block up to that
 * position, two key blocks at a time: each query element is broadcast once for both blocks, the two
 * blocks' scores are independent dependency chains, and the online softmax (maximum, rescale) runs once
 * per 32 keys. Accumulators, running max and sum stay in registers for the whole sweep; each block's
 * keys and values are loaded once for the RB rows. */
static inline __attribute__((always_inline)) void rows_body(const pjob_t *j, int64_t c, int64_t h, int64_t row,
                                                            int64_t pos, int64_t g0, const int RB, const int64_t C,
                                                            const int bf16) {
    const int64_t D = C * 16, esz = bf16 ? 2 : 4, Hq = j->Hk * j->G, bbytes = 16 * D * (bf16 == 1 ? 2 : 4);
    const int64_t base = j->first[c * j->Hk + h] * bbytes;
    const char *qr[4];
    float qw[4][PMAX_D] __attribute__((aligned(64))); /* wide bf16: the query rows as float32 */
    __m512 a[4][PMAX_D / 16], s0[4], s1[4], lv[4]; /* lv: softmax denominators, 16 partial sums each */
    float m[4];
    for (int i = 0; i < RB; i++) {
        qr[i] = j->q + (row * Hq + h * j->G + g0 + i) * D * esz;
        if (bf16 == WIDE) {
            for (int64_t d = 0; d < D; d += 16) _mm512_store_ps(qw[i] + d, load16f(qr[i] + d * 2, 1));
            qr[i] = (const char *)qw[i];
        }
        for (int64_t cc = 0; cc < C; cc++) a[i][cc] = _mm512_setzero_ps();
        m[i] = -INFINITY;
        lv[i] = _mm512_setzero_ps();
    }
    const __m512 scale = _mm512_set1_ps(j->scale), neg_inf = _mm512_set1_ps(-INFINITY);
    const int64_t nkb = pos / 16 + 1;
    const __mmask16 last = (__mmask16)((2u << (pos - (nkb - 1) * 16)) - 1u); /* keys <= pos in the last block */
    for (int64_t kb = 0; kb < nkb; kb += 2) {
        const int two = kb + 1 < nkb;
        const char *kt0 = j->kt + base + kb * bbytes, *kt1 = two ? kt0 + bbytes : kt0;
        const __mmask16 valid0 = two ? (__mmask16)0xffff : last;
        const __mmask16 valid1 = !two ? (__mmask16)0 : kb + 2 < nkb ? (__mmask16)0xffff : last;
        for (int i = 0; i < RB; i++) s0[i] = s1[i] = _mm512_setzero_ps();
        if (bf16 == 1) {
#ifdef __AVX512BF16__ /* (bf16 items are never run without it: mesh_prefill_attention declines) */
            for (int64_t p = 0; p < D / 2; p++) {
                __m512bh k0 = (__m512bh)_mm512_loadu_si512(kt0 + p * 64);
                __m512bh k1 = (__m512bh)_mm512_loadu_si512(kt1 + p * 64);
                __asm__("" : "+v"(k0), "+v"(k1)); /* pinned, as in pv_block */
                for (int i = 0; i < RB; i++) {
                    int32_t pair;
                    memcpy(&pair, qr[i] + p * 4, 4);
                    const __m512bh qv = (__m512bh)_mm512_set1_epi32(pair);
                    s0[i] = _mm512_dpbf16_ps(s0[i], k0, qv);
                    s1[i] = _mm512_dpbf16_ps(s1[i], k1, qv);
                }
            }
#endif
        } else {
            for (int64_t d = 0; d < D; d++) {
                __m512 k0 = _mm512_loadu_ps(kt0 + d * 64), k1 = _mm512_loadu_ps(kt1 + d * 64);
                __asm__("" : "+v"(k0), "+v"(k1));
                for (int i = 0; i < RB; i++) {
                    float q1;
                    memcpy(&q1, qr[i] + d * 4, 4);
                    const __m512 qv = _mm512_set1_ps(q1);
                    s0[i] = _mm512_fmadd_ps(qv, k0, s0[i]);
                    s1[i] = _mm512_fmadd_ps(qv, k1, s1[i]);
                }
            }
        }
        float delta[16] = {0};
        float mnew[4];
        for (int i = 0; i < RB; i++) {
            s0[i] = _mm512_mask_mov_ps(neg_inf, valid0, _mm512_mul_ps(s0[i], scale));
            s1[i] = _mm512_mask_mov_ps(neg_inf, valid1, _mm512_mul_ps(s1[i], scale));
            mnew[i] = max_running(_mm512_reduce_max_ps(_mm512_max_ps(s0[i], s1[i])), m[i]);
            delta[i] = m[i] - mnew[i]; /* -inf on the first blocks: their factor is ~0 */
        }
        const __m512 corr = exp_nonpos16(_mm512_loadu_ps(delta)); /* every row's rescale in one exp */
        float cf[16];
        _mm512_storeu_ps(cf, corr);
        __m512 p0[4], p1[4];
        for (int i = 0; i < RB; i++) {
            const __m512 mv = _mm512_set1_ps(mnew[i]);
            p0[i] = _mm512_maskz_mov_ps(valid0, exp_nonpos16(_mm512_sub_ps(s0[i], mv)));
            p1[i] = _mm512_maskz_mov_ps(valid1, exp_nonpos16(_mm512_sub_ps(s1[i], mv)));
            lv[i] = _mm512_fmadd_ps(lv[i], _mm512_set1_ps(cf[i]), _mm512_add_ps(p0[i], p1[i]));
            m[i] = mnew[i];
            if (cf[i] != 1.f) {
                const __m512 cv = _mm512_set1_ps(cf[i]);
                for (int64_t cc = 0; cc < C; cc++) a[i][cc] = _mm512_mul_ps(a[i][cc], cv);
            }
        }
        const char *vp0 = j->vp + base + kb * bbytes;
        pv_block(a, p0, vp0, RB, C, bf16);
        if (two) pv_block(a, p1, vp0 + bbytes, RB, C, bf16);
    }
    for (int i = 0; i < RB; i++) {
        const float l = _mm512_reduce_add_ps(lv[i]);
        const float inv = l > 0.f ? 1.f / l : 0.f;
        store_acc_row(a[i], inv, j->out + (row * Hq + h * j->G + g0 + i) * D * esz, bf16, C);
    }
}

/* One work item: query positions qb*16 .. of chunk c, KV head h, all G heads of the group. */
static inline __attribute__((always_inline)) void item_body(const pjob_t *j, int64_t c, int64_t h, int64_t qb,
                                                            const int RB, const int64_t C, const int bf16) {
    const int64_t start = j->chunks[c * 3], n = j->chunks[c * 3 + 1], ctx = j->chunks[c * 3 + 2];
    const int64_t q0 = qb * QB, qn = n - q0 < QB ? n - q0 : QB;
    for (int64_t qi = 0; qi < qn; qi++) {
        const int64_t row = start + q0 + qi, pos = ctx - n + q0 + qi;
        int64_t g = 0;
        for (; g + RB <= j->G; g += RB) rows_body(j, c, h, row, pos, g, RB, C, bf16);
        for (; g < j->G; g++) rows_body(j, c, h, row, pos, g, 1, C, bf16);
    }
}

#if defined(MESH_AMX) && defined(__AVX512BF16__)
/* bfloat16 on the tile unit (where the build targets AMX and the OS grants it): one work item's 16 query
 * positions of one head at a time, 32 keys (two rearranged blocks) per step. The rearranged blocks
 * already are the tile unit's B operands: kt [D/2 pairs][16 keys] for S = Q.K^T (one 1 KiB tile per
 * 32 dimensions), and vp's pair rows, 8 per block and consecutive across a (chunk, head)'s blocks, for
 * P.V (16 key pairs x 16 dimensions per tile, rows (D/32) * 128 bytes apart, the dimensions in the
 * VPUNPCK order that store_acc_row undoes). Scores go through a 16 x 32 float32 buffer for the online
 * softmax (scaled, causally masked, row maxima and rescales as in rows_body); probabilities are
 * rounded to bf16 into the P tile; the P.V tiles are added to float32 accumulators in memory. */
/* The first n of 16 keys (n clamped to 0 .. 16). */
static inline __mmask16 first_keys(int64_t n) {
    return n >= 16 ? (__mmask16)0xffff : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1u);
}

/* s [16][32] float32 = the 16 query rows of q (tile order: rows D * 2 bytes apart) against the keys
 * of the rearranged blocks k0 and, with two, the next one (else zeros). */
static inline void amx_scores(const uint16_t *q, const char *k0, int two, int64_t D, float *s) {
    const int64_t bbytes = 16 * D * 2;
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t dc = 0; dc < D / 32; dc++) {
        _tile_loadd(4, q + dc * 32, D * 2);
        _tile_loadd(6, k0 + dc * 1024, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (two) {
            _tile_loadd(7, k0 + bbytes + dc * 1024, 64);
            _tile_dpbf16ps(1, 4, 7);
        }
    }
    _tile_stored(0, s, 128);
    _tile_stored(1, s + 16, 128);
}

/* The online-softmax step for 16 rows over 32 keys, as rows_body takes it: scores s scaled and masked
 * (row i sees `see[i]` of the 32 keys), running maxima m and sums l updated, probabilities rounded to
 * bf16 into p [16][32], each row's rescale of its accumulators into cf. */
static inline void amx_softmax(const float *s, const int64_t *see, float scale, float *m, float *l, uint16_t *p,
                               float *cf) {
    const __m512 sc = _mm512_set1_ps(scale), neg_inf = _mm512_set1_ps(-INFINITY);
    __m512 s0[16], s1[16];
    __mmask16 v0[16], v1[16];
    float delta[16];
    for (int i = 0; i < 16; i++) {
        v0[i] = first_keys(see[i]);
        v1[i] = first_keys(see[i] - 16);
        s0[i] = _mm512_mask_mov_ps(neg_inf, v0[i], _mm512_mul_ps(_mm512_load_ps(s + i * 32), sc));
        s1[i] = _mm512_mask_mov_ps(neg_inf, v1[i], _mm512_mul_ps(_mm512_load_ps(s + i * 32 + 16), sc));
        const float mx = _mm512_reduce_max_ps(_mm512_max_ps(s0[i], s1[i]));
        const float mnew = mx > m[i] ? mx : m[i];
        delta[i] = m[i] - mnew; /* -inf on the first blocks: their factor is ~0 */
        m[i] = mnew;
    }
    _mm512_storeu_ps(cf, exp_nonpos16(_mm512_loadu_ps(delta)));
    for (int i = 0; i < 16; i++) {
        const __m512 mv = _mm512_set1_ps(m[i]);
        const __m512 e0 = _mm512_maskz_mov_ps(v0[i], exp_nonpos16(_mm512_sub_ps(s0[i], mv)));
        const __m512 e1 = _mm512_maskz_mov_ps(v1[i], exp_nonpos16(_mm512_sub_ps(s1[i], mv)));
        l[i] = l[i] * cf[i] + _mm512_reduce_add_ps(_mm512_add_ps(e0, e1));
        _mm256_store_si256((__m256i *)(p + i * 32), (__m256i)_mm512_cvtneps_pbh(e0));
        _mm256_store_si256((__m256i *)(p + i * 32 + 16), (__m256i)_mm512_cvtneps_pbh(e1));
    }
}

/* acc [16][D] = acc * cf (per row) + P [16][32 keys] . V, V the value pairs of two rearranged blocks at
 * v (16 pair rows, (D/32) * 128 bytes apart): up to four 16-dimension output tiles per pass, output
 * tile o = 2 cc + half from vp column block cc's lo (0) or hi (1) half. */
static inline void amx_pv(const uint16_t *p, const char *v, const float *cf, int64_t D, float *acc) {
    float t[16 * 64] __attribute__((aligned(64)));
    _tile_loadd(5, p, 64);
    for (int64_t o0 = 0; o0 < D / 16; o0 += 4) {
        const int64_t no = D / 16 - o0 < 4 ? D / 16 - o0 : 4;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
#define PV_TILE(k)                                                                                  \
    if ((k) < no) {                                                                                 \
        const int64_t o = o0 + (k);                                                                 \
        _tile_loadd(6, v + (o / 2) * 128 + (o % 2) * 64, D / 32 * 128);                              \
        _tile_dpbf16ps(k, 5, 6);                                                                     \
    }
        PV_TILE(0) PV_TILE(1) PV_TILE(2) PV_TILE(3)
#undef PV_TILE
        _tile_stored(0, t, 256);
        _tile_stored(1, t + 16, 256);
        _tile_stored(2, t + 32, 256);
        _tile_stored(3, t + 48, 256);
        for (int i = 0; i < 16; i++) {
            const __m512 cv = _mm512_set1_ps(cf[i]);
            for (int64_t k = 0; k < no; k++) {
                float *a = acc + i * D + (o0 + k) * 16;
                _mm512_store_ps(a, _mm512_fmadd_ps(_mm512_load_ps(a), cv, _mm512_load_ps(t + i * 64 + k * 16)));
            }
        }
    }
}

static void item_amx(const pjob_t *j, int64_t c, int64_t h, int64_t qb) {
    const int64_t D = j->D, Hq = j->Hk * j->G, bbytes = 16 * D * 2;
    const int64_t start = j->chunks[c * 3], n = j->chunks[c * 3 + 1], ctx = j->chunks[c * 3 + 2];
    const int64_t q0 = qb * QB, qn = n - q0 < QB ? n - q0 : QB, p0 = ctx - n + q0;
    const int64_t nkb = (p0 + qn - 1) / 16 + 1;
    const char *kt = j->kt + j->first[c * j->Hk + h] * bbytes, *vp = j->vp + j->first[c * j->Hk + h] * bbytes;
    uint16_t qbuf[16 * PMAX_D] __attribute__((aligned(64)));
    float obuf[16 * PMAX_D] __attribute__((aligned(64)));
    float sbuf[16 * 32] __attribute__((aligned(64)));
    uint16_t pbuf[16 * 32] __attribute__((aligned(64)));
    char vlast[2 * 16 * PMAX_D * 2] __attribute__((aligned(64))); /* an odd last block, then zeros */
    for (int64_t g = 0; g < j->G; g++) {
        for (int64_t i = 0; i < 16; i++) { /* rows past the chunk: zero queries, never stored */
            if (i < qn) memcpy(qbuf + i * D, j->q + ((start + q0 + i) * Hq + h * j->G + g) * D * 2, (size_t)D * 2);
            else memset(qbuf + i * D, 0, (size_t)D * 2);
        }
        memset(obuf, 0, sizeof(float) * 16 * (size_t)D);
        float m[16], l[16], cf[16];
        for (int i = 0; i < 16; i++) m[i] = -INFINITY, l[i] = 0.f;
        for (int64_t kb = 0; kb < nkb; kb += 2) {
            const int two = kb + 1 < nkb;
            /* keys from kb*16 on that row i sees: those <= its position (rows past the chunk: row 0's);
             * at most 16 when this is the last block (kb is the last query's block then) */
            int64_t see[16];
            for (int i = 0; i < 16; i++) see[i] = (i < qn ? p0 + i : p0) - kb * 16 + 1;
            amx_scores(qbuf, kt + kb * bbytes, two, D, sbuf);
            amx_softmax(sbuf, see, j->scale, m, l, pbuf, cf);
            const char *v0 = vp + kb * bbytes;
            if (!two) { /* the tile reads two blocks' value pairs: past the last, zeros (not another head's) */
                memcpy(vlast, v0, (size_t)bbytes);
                memset(vlast + bbytes, 0, (size_t)bbytes);
                v0 = vlast;
            }
            amx_pv(pbuf, v0, cf, D, obuf);
        }
        for (int64_t i = 0; i < qn; i++) {
            const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
            store_acc_row((const __m512 *)(obuf + i * D), inv, j->out + ((start + q0 + i) * Hq + h * j->G + g) * D * 2, 1,
                          D / 16);
        }
    }
}
#endif

static void item_bf16_d64(const pjob_t *j, int64_t c, int64_t h, int64_t qb) { item_body(j, c, h, qb, 4, 4, 1); }
static void item_bf16_d128(const pjob_t *j, int64_t c, int64_t h, int64_t qb) { item_body(j, c, h, qb, 2, 8, 1); }
static void item_bf16(const pjob_t *j, int64_t c, int64_t h, int64_t qb) { item_body(j, c, h, qb, 1, j->D / 16, 1); }
static void item_wide_d64(const pjob_t *j, int64_t c, int64_t h, int64_t qb) { item_body(j, c, h, qb, 4, 4, WIDE); }
static void item_wide_d128(const pjob_t *j, int64_t c, int64_t h, int64_t qb) { item_body(j, c, h, qb, 2, 8, WIDE); }
static void item_wide(const pjob_t *j, int64_t c, int64_t h, int64_t qb) { item_body(j, c, h, qb, 1, j->D / 16, WIDE); }
static void item_f32_d64(const pjob_t *j, int64_t c, int64_t h, int64_t qb) { item_body(j, c, h, qb, 4, 4, 0); }
static void item_f32_d128(const pjob_t *j, int64_t c, int64_t h, int64_t qb) { item_body(j, c, h, qb, 2, 8, 0); }
static void item_f32(const pjob_t *j, int64_t c, int64_t h, int64_t qb) { item_body(j, c, h, qb, 1, j->D / 16, 0); }
#elif defined(MESH_PREFILL_AVX2)
#include "prefill_avx2.h"
#endif

/* q [T, Hk*G, D] (the step's queries), k, v [Hk, N, 16, D] (one layer's pool), chunks [C, 3] (first row,
 * new tokens n, context ctx), tables [C, M] block ids, out [T, Hk*G, D]: the chunks' rows are written.
 * Returns 0; -1 when this build, dtype or shape is not supported (nothing written: the caller runs
 * torch ops); -4 out of memory; -5 a chunk, context or block id outside its table, the pool or the
 * step's T rows (checked before any work). */
int mesh_prefill_attention(const void *q, const void *k, const void *v, const int64_t *chunks, const int64_t *tables,
                           void *out, int64_t T, int64_t C, int64_t M, int64_t Hk, int64_t G, int64_t D, int64_t N,
                           int64_t bs, float scale, int bf16, int nthreads) {
#if defined(MESH_PREFILL_AVX512) || defined(MESH_PREFILL_AVX2)
#if defined(MESH_PREFILL_AVX512) && !defined(__AVX512BF16__)
    if (bf16) return -1;
#endif
    if (bs != 16 || G < 1 || G > PMAX_G || D < 32 || D > PMAX_D || D % 32) return -1;
    int64_t blocks = 0, items = 0;
    int64_t *first = (int64_t *)malloc((size_t)(C * Hk > 0 ? C * Hk : 1) * sizeof(int64_t));
    if (first == NULL) return -4;
    for (int64_t c = 0; c < C; c++) {
        const int64_t start = chunks[c * 3], n = chunks[c * 3 + 1], ctx = chunks[c * 3 + 2];
        const int64_t nb = (ctx + 15) / 16;
        if (n < 1 || ctx < n || start < 0 || start + n > T || nb > M) {
            free(first);
            return -5;
        }
        for (int64_t i = 0; i < nb; i++)
            if (tables[c * M + i] < 0 || tables[c * M + i] >= N) {
                free(first);
                return -5;
            }
        for (int64_t h = 0; h < Hk; h++) first[c * Hk + h] = blocks + h * nb;
        blocks += nb * Hk;
        items += (n + QB - 1) / QB * Hk;
    }
#ifdef MESH_AMX
    const int amx = bf16 && mesh_amx_ready();
#else
    const int amx = 0;
#endif
    const int mode = bf16 && !amx && mesh_bf16_wide() ? WIDE : bf16;
    const size_t block_bytes = (size_t)16 * D * (mode == 1 ? 2 : 4); /* rearranged blocks */
    char *kt = (char *)aligned_alloc(64, (size_t)blocks * block_bytes + 64);
    char *vp = (char *)aligned_alloc(64, (size_t)blocks * block_bytes + 64);
    /* work items, the longest first (a query block's cost grows with its position) */
    int64_t *order = (int64_t *)malloc((size_t)(items > 0 ? items : 1) * 3 * sizeof(int64_t));
    if (kt == NULL || vp == NULL || order == NULL) {
        free(first), free(kt), free(vp), free(order);
        return -4;
    }
    int64_t it = 0;
    for (int64_t c = 0; c < C; c++)
        for (int64_t qb = (chunks[c * 3 + 1] + QB - 1) / QB - 1; qb >= 0; qb--)
            for (int64_t h = 0; h < Hk; h++) {
                order[it * 3] = c, order[it * 3 + 1] = h, order[it * 3 + 2] = qb;
                it++;
            }
    const pjob_t j = {(const char *)q, (const char *)k, (const char *)v, (char *)out, chunks, tables, first, kt, vp,
                      M, Hk, G, D, N, scale, mode};
#ifdef MESH_PREFILL_AVX512
    static void (*const by_mode[WIDE + 1][3])(const pjob_t *, int64_t, int64_t, int64_t) = {
        {item_f32_d64, item_f32_d128, item_f32}, {item_bf16_d64, item_bf16_d128, item_bf16},
        {item_wide_d64, item_wide_d128, item_wide}}; /* by mode, then head_dim 64, 128, other */
    void (*item)(const pjob_t *, int64_t, int64_t, int64_t) = by_mode[mode][D == 64 ? 0 : D == 128 ? 1 : 2];
#else
    void (*item)(const pjob_t *, int64_t, int64_t, int64_t) = item_avx2;
#endif
#ifdef MESH_AMX
    if (amx) item = item_amx;
#endif
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
#pragma omp for schedule(dynamic, 4)
        for (int64_t b = 0; b < blocks; b++) {
            /* block b -> (chunk, head, key block) */
            int64_t c = 0;
            while (c + 1 < C && first[(c + 1) * Hk] <= b) c++;
            const int64_t nb = (chunks[c * 3 + 2] + 15) / 16, off = b - first[c * Hk];
            rearrange(&j, c, off / nb, off % nb);
        }
#ifdef MESH_AMX
        if (amx) amx_begin();
#endif
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < items; i++) item(&j, order[i * 3], order[i * 3 + 1], order[i * 3 + 2]);
#ifdef MESH_AMX
        if (amx) _tile_release();
#endif
    }
    (void)amx;
    free(first), free(kt), free(vp), free(order);
    return 0;
#else
    (void)q; (void)k; (void)v; (void)chunks; (void)tables; (void)out; (void)T; (void)C; (void)M; (void)Hk; (void)G;
    (void)D; (void)N; (void)bs; (void)scale; (void)bf16; (void)nthreads;
    return -1;
#endif
}
