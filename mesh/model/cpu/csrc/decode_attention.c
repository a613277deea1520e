/* Decode attention straight over the paged KV pool, for the CPU.
 *
 * One query token per sequence. For every (sequence, KV head) pair the G query heads of that KV group
 * walk the sequence's blocks once: scores for a whole block (float32), an online softmax (running max
 * and sum), and the value rows accumulated in float32. K and V are read once, where they lie in the
 * pool; nothing is gathered into a padded copy and no [B, G, context] score matrix is written.
 *
 * Layouts (all contiguous):
 *   q      [B, Hk * G, D]            model dtype
 *   k, v   [Hk, num_blocks, bs, D]   model dtype (one layer's pool)
 *   table  [B, max_blocks] int64     block ids of each sequence, in order
 *   ctx    [B] int64                 tokens each sequence attends to (including the new one)
 *   out    [B, Hk * G, D]            model dtype
 * bf16 values are the upper halves of float32s; results are rounded to nearest even.
 * Work items are (b, h) pairs, spread over threads (see mesh_decode_attention).
 */
#include <math.h> /* INFINITY */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#define MAX_G 64
#define MAX_D 256
#define MAX_BS 256
#define PREFETCH_AHEAD 1 /* blocks ahead, portable path (2 measured no better; the AVX-512 path paces its prefetches) */

typedef struct {
    const void *q, *k, *v;
    const int64_t *table, *ctx;
    void *out;
    int64_t B, Hk, G, D, N, bs, M;
    float scale;
    int bf16;
} job_t;

/* ---- 16-lane vectors (GCC/Clang vector extensions, lowered to whatever the target has: one AVX-512
 * register, two AVX2 ones, ...). */
typedef float v16f __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));

static inline v16f load16(const void *p, int bf16) {
    v16f f;
    if (bf16) {
        v16h x;
        memcpy(&x, p, sizeof x);
        v16u u = __builtin_convertvector(x, v16u) << 16;
        memcpy(&f, &u, sizeof f);
    } else {
        memcpy(&f, p, sizeof f);
    }
    return f;
}

typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v16i __attribute__((vector_size(64)));

static inline float lane_sum(v16f v) { /* a tree of halves: a few shuffles, not 15 lane extracts */
    v8f a, b;
    memcpy(&a, &v, 32);
    memcpy(&b, (const char *)&v + 32, 32);
    a += b;
    v4f c, d;
    memcpy(&c, &a, 16);
    memcpy(&d, (const char *)&a + 16, 16);
    c += d;
    return (c[0] + c[2]) + (c[1] + c[3]);
}

/* exp(x) for the softmax's x <= 0, on 16 lanes, in vector operations only: x = n ln2 + r with
 * |r| <= ln2 / 2, a degree-6 Taylor polynomial for e^r (relative error < 3e-7), times 2^n built in
 * the exponent bits. Below -87 it returns e^-87 (~1.6e-38): against a running sum of at least 1,
 * nothing. */
static inline v16f exp16(v16f x) {
    const v16f lo = (v16f){0} - 87.f;
    v16i below = x < lo; /* all ones where x < -87 */
    v16i xi, loi;
    memcpy(&xi, &x, 64);
    memcpy(&loi, &lo, 64);
    xi = (below & loi) | (~below & xi);
    memcpy(&x, &xi, 64);
    const v16f n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
    const v16f r = (x - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
    v16f p = (v16f){0} + 1.f / 720.f;
    p = p * r + 1.f / 120.f;
    p = p * r + 1.f / 24.f;
    p = p * r + 1.f / 6.f;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    v16i e = (__builtin_convertvector(n, v16i) + 127) << 23;
    v16f scale;
    memcpy(&scale, &e, 64);
    return p * scale;
}

/* The same for one value (the generic path, and the running-max corrections). */
static inline float exp_nonpos(float x) { return exp16((v16f){0} + x)[0]; }

/* Element i of a tensor of the job's dtype, as float32. */
static inline float elem(const void *base, int64_t i, int bf16) {
    return bf16 ? bf(((const uint16_t *)base)[i]) : ((const float *)base)[i];
}

typedef struct {
    float q[MAX_G][MAX_D], acc[MAX_G][MAX_D], m[MAX_G], l[MAX_G];
    float s[MAX_G][MAX_BS], kt[MAX_D][MAX_BS], v[MAX_BS][MAX_D];
} work_t; /* ~450 KB: on the heap, not on a thread's stack */

/* One (sequence, KV head) pair, any block_size and head_dim (the block_size-16 path below is the
 * fast one). Scores of a block as D broadcast-FMAs over the block's tokens (K transposed into kt
 * while converting to float32), the softmax over the block's tokens, and P.V as FMAs over head_dim. */
static void pair_any(const job_t *j, work_t *w, int64_t b, int64_t h) {
    const int64_t G = j->G, D = j->D, bs = j->bs;
    float(*q)[MAX_D] = w->q, (*acc)[MAX_D] = w->acc, (*s)[MAX_BS] = w->s;
    float(*kt)[MAX_BS] = w->kt, (*v)[MAX_D] = w->v;
    float *m = w->m, *l = w->l;
    for (int64_t g = 0; g < G; g++) {
        const int64_t row = (b * j->Hk + h) * G + g;
        for (int64_t d = 0; d < D; d++) {
            q[g][d] = elem(j->q, row * D + d, j->bf16) * j->scale;
            acc[g][d] = 0.f;
        }
        m[g] = -INFINITY;
        l[g] = 0.f;
    }
    const int64_t ctx = j->ctx[b];
    const int64_t nblocks = (ctx + bs - 1) / bs;
    for (int64_t i = 0; i < nblocks; i++) {
        const int64_t blk = j->table[b * j->M + i];
        const int64_t n = (ctx - i * bs) < bs ? (ctx - i * bs) : bs;
        const int64_t row0 = (h * j->N + blk) * bs; /* first row of this block in the [Hk*N*bs, D] view */
        for (int64_t t = 0; t < n; t++)
            for (int64_t d = 0; d < D; d++) {
                kt[d][t] = elem(j->k, (row0 + t) * D + d, j->bf16);
                v[t][d] = elem(j->v, (row0 + t) * D + d, j->bf16);
            }
        for (int64_t g = 0; g < G; g++) {
            float *sg = s[g];
#pragma omp simd
            for (int64_t t = 0; t < n; t++) sg[t] = 0.f;
            for (int64_t d = 0; d < D; d++) {
                const float qd = q[g][d];
                const float *kd = kt[d];
#pragma omp simd
                for (int64_t t = 0; t < n; t++) sg[t] += qd * kd[t];
            }
            float bmax = -INFINITY;
            for (int64_t t = 0; t < n; t++) bmax = sg[t] > bmax ? sg[t] : bmax;
            const float mnew = bmax > m[g] ? bmax : m[g];
            const float corr = exp_nonpos(m[g] - mnew); /* ~0 on the first block (m = -inf) */
            float sum = 0.f;
#pragma omp simd reduction(+ : sum)
            for (int64_t t = 0; t < n; t++) {
                sg[t] = exp_nonpos(sg[t] - mnew);
                sum += sg[t];
            }
            l[g] = l[g] * corr + sum;
            m[g] = mnew;
            float *ag = acc[g];
#pragma omp simd
            for (int64_t d = 0; d < D; d++) ag[d] *= corr;
            for (int64_t t = 0; t < n; t++) {
                const float p = sg[t];
#pragma omp simd
                for (int64_t d = 0; d < D; d++) ag[d] += p * v[t][d];
            }
        }
    }
    for (int64_t g = 0; g < G; g++) {
        const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
        const int64_t row = (b * j->Hk + h) * G + g;
        if (j->bf16) {
            uint16_t *o = (uint16_t *)j->out + row * D;
            for (int64_t d = 0; d < D; d++) o[d] = to_bf(acc[g][d] * inv);
        } else {
            float *o = (float *)j->out + row * D;
            for (int64_t d = 0; d < D; d++) o[d] = acc[g][d] * inv;
        }
    }
}

/* ---- block_size 16, head_dim a multiple of 16: a block's 16 tokens are one vector of scores; each
 * token's K row is D/16 vectors, FMA'd against the G query rows and summed across lanes; P.V
 * accumulates D/16 vectors per query row. */
#define VMAX_D (MAX_D / 16)
typedef struct {
    v16f q[MAX_G][VMAX_D], acc[MAX_G][VMAX_D], kr[VMAX_D];
    float sc[MAX_G][16], m[MAX_G], l[MAX_G];
} work16_t;

static inline __attribute__((always_inline)) void pair_bs16_body(const job_t *j, work16_t *w, int64_t b,
                                                                  int64_t h, const int64_t G, const int64_t C) {
    const int64_t D = C * 16, esz = j->bf16 ? 2 : 4;
    const char *qb = (const char *)j->q, *kb = (const char *)j->k, *vb = (const char *)j->v;
    for (int64_t g = 0; g < G; g++) {
        const int64_t row = (b * j->Hk + h) * G + g;
        for (int64_t c = 0; c < C; c++) {
            w->q[g][c] = load16(qb + (row * D + c * 16) * esz, j->bf16) * j->scale;
            w->acc[g][c] = (v16f){0};
        }
        w->m[g] = -INFINITY;
        w->l[g] = 0.f;
    }
    const int64_t ctx = j->ctx[b];
    const int64_t nblocks = (ctx + 15) / 16;
    for (int64_t i = 0; i < nblocks; i++) {
        const int64_t blk = j->table[b * j->M + i];
        const int64_t n = (ctx - i * 16) < 16 ? (ctx - i * 16) : 16;
        const int64_t row0 = (h * j->N + blk) * 16;
        if (i + PREFETCH_AHEAD < nblocks) {
            /* Blocks lie anywhere in the pool, beyond the hardware prefetcher's reach: ask for the
             * next block's K and V lines while this one computes. */
            const int64_t next = (h * j->N + j->table[b * j->M + i + PREFETCH_AHEAD]) * 16 * D * esz;
            for (int64_t off = 0; off < 16 * D * esz; off += 64) {
                __builtin_prefetch(kb + next + off);
                __builtin_prefetch(vb + next + off);
            }
        }
        for (int64_t t = 0; t < n; t++) {
            for (int64_t c = 0; c < C; c++) w->kr[c] = load16(kb + ((row0 + t) * D + c * 16) * esz, j->bf16);
            for (int64_t g = 0; g < G; g++) {
                v16f a = w->q[g][0] * w->kr[0];
                for (int64_t c = 1; c < C; c++) a += w->q[g][c] * w->kr[c];
                w->sc[g][t] = lane_sum(a);
            }
        }
        for (int64_t g = 0; g < G; g++) {
            float bmax = -INFINITY;
            for (int64_t t = 0; t < n; t++) bmax = w->sc[g][t] > bmax ? w->sc[g][t] : bmax;
            const float mnew = bmax > w->m[g] ? bmax : w->m[g];
            const float corr = exp_nonpos(w->m[g] - mnew);
            v16f x;
            memcpy(&x, w->sc[g], sizeof x);
            v16f p = exp16(x - mnew);
            if (n < 16)
                for (int64_t t = n; t < 16; t++) p[t] = 0.f; /* lanes past the context */
            memcpy(w->sc[g], &p, sizeof p);
            w->l[g] = w->l[g] * corr + lane_sum(p);
            w->m[g] = mnew;
            for (int64_t c = 0; c < C; c++) w->acc[g][c] *= corr;
        }
        for (int64_t t = 0; t < n; t++) {
            for (int64_t c = 0; c < C; c++) w->kr[c] = load16(vb + ((row0 + t) * D + c * 16) * esz, j->bf16);
            for (int64_t g = 0; g < G; g++) {
                const float p = w->sc[g][t];
                for (int64_t c = 0; c < C; c++) w->acc[g][c] += p * w->kr[c];
            }
        }
    }
    for (int64_t g = 0; g < G; g++) {
        const float inv = w->l[g] > 0.f ? 1.f / w->l[g] : 0.f;
        const int64_t row = (b * j->Hk + h) * G + g;
        for (int64_t c = 0; c < C; c++) {
            v16f r = w->acc[g][c] * inv;
            if (j->bf16) {
                uint16_t *o = (uint16_t *)j->out + row * D + c * 16;
                for (int k = 0; k < 16; k++) o[k] = to_bf(r[k]);
            } else {
                memcpy((float *)j->out + row * D + c * 16, &r, sizeof r);
            }
        }
    }
}

/* The shapes of the supported models as compile-time constants (loops unroll, accumulators stay in
 * registers where they fit), and one generic instantiation. */
static void pair_g4_d64(const job_t *j, work16_t *w, int64_t b, int64_t h) { pair_bs16_body(j, w, b, h, 4, 4); }
static void pair_g4_d128(const job_t *j, work16_t *w, int64_t b, int64_t h) { pair_bs16_body(j, w, b, h, 4, 8); }
static void pair_g8_d128(const job_t *j, work16_t *w, int64_t b, int64_t h) { pair_bs16_body(j, w, b, h, 8, 8); }
static void pair_bs16(const job_t *j, work16_t *w, int64_t b, int64_t h) {
    pair_bs16_body(j, w, b, h, j->G, j->D / 16);
}

/* ---- AVX-512 (with AVX512-BF16 for bfloat16): block_size 16, head_dim a multiple of 32. The dot
 * products of one query row with the block's 16 key rows come out as 16 vectors of partial sums,
 * reduced together into one vector of 16 scores (a shuffle tree: ~45 operations where 16 separate
 * lane sums cost ~110). bfloat16 products use VDPBF16PS: exact products of bf16 pairs, accumulated in
 * float32. P.V in bfloat16 rounds the probabilities to bf16 first (as the reference does before its
 * probabilities-times-values matmul) and interleaves value rows t, t+1 into bf16 pairs, so one
 * VDPBF16PS adds two tokens' contributions to 16 output lanes. float32 runs the same structure with
 * FMAs. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include "avx512_math.h"
#define MESH_AVX512 1
#define WIDE MESH_WIDE /* a bf16 job on float32 FMAs (see mesh_bf16_wide in moe_experts.c): the block's keys
                        * widened once into float32 (bf16 pairs split into even and odd elements, the
                        * queries split the same way, so dot products pair up), value rows widened as loaded */
int mesh_bf16_wide(void);

typedef struct {
    __m512i qh[MAX_G][MAX_D / 32]; /* bf16 queries */
    __m512 qf[MAX_G][MAX_D / 16];  /* float32 queries */
} work512_t;

/* Two token vectors of partial sums -> one vector holding, per 128-bit lane, [a0+a2, b0+b2, a1+a3,
 * b1+b3] of that lane's four elements. */
static inline __m512 pair_sums(__m512 a, __m512 b) {
    return _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
}

/* w[0..7] from pair_sums over tokens (0,1), (2,3), ... -> lane t = the full sum of token t. */
static inline __m512 finish_sums(const __m512 w[8]) {
    __m512 x[4];
    for (int j = 0; j < 4; j++) {
        __m512d a = _mm512_castps_pd(w[2 * j]), b = _mm512_castps_pd(w[2 * j + 1]);
        x[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    /* x[j]: 128-bit lane L holds tokens 4j..4j+3 summed over that lane's quarter of the row */
    __m512 z01 = _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], 0x88), _mm512_shuffle_f32x4(x[0], x[1], 0xdd));
    __m512 z23 = _mm512_add_ps(_mm512_shuffle_f32x4(x[2], x[3], 0x88), _mm512_shuffle_f32x4(x[2], x[3], 0xdd));
    return _mm512_add_ps(_mm512_shuffle_f32x4(z01, z23, 0x88), _mm512_shuffle_f32x4(z01, z23, 0xdd));
}

static inline __m512 dot_bf16(const __m512i *q, const char *krow, const int64_t C2) {
    __m512 a = _mm512_setzero_ps();
    for (int64_t c = 0; c < C2; c++)
        a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(krow + c * 64), (__m512bh)q[c]);
    return a;
}

static inline __m512 dot_f32(const __m512 *q, const char *krow, const int64_t C) {
    __m512 a = _mm512_mul_ps(q[0], _mm512_loadu_ps(krow));
    for (int64_t c = 1; c < C; c++) a = _mm512_fmadd_ps(q[c], _mm512_loadu_ps(krow + c * 64), a);
    return a;
}

/* Lines [from, to) of the next block (near, into L1) and of the one after (far, into L2); NULL: none.
 * All the near lines first: interleaving near and far line by line measured 20-30 % slower from memory. */
static inline __attribute__((always_inline)) void prefetch_ahead(const char *near, const char *far, int64_t from,
                                                                  int64_t to) {
    if (near != NULL)
        for (int64_t q = from; q < to; q++) _mm_prefetch(near + q * 64, _MM_HINT_T0);
    if (far != NULL)
        for (int64_t q = from; q < to; q++) _mm_prefetch(far + q * 64, _MM_HINT_T1);
}

/* The 16 scores of one query row against a block (rows past n are garbage: masked by the caller). */
static inline __m512 block_scores(const work512_t *w, int64_t g, const char *kblk, int64_t rowbytes,
                                  const int bf16, const int64_t C) {
    __m512 s[8];
    for (int i = 0; i < 8; i++) {
        const char *k0 = kblk + (2 * i) * rowbytes, *k1 = k0 + rowbytes;
        __m512 a = bf16 ? dot_bf16(w->qh[g], k0, C / 2) : dot_f32(w->qf[g], k0, C);
        __m512 b = bf16 ? dot_bf16(w->qh[g], k1, C / 2) : dot_f32(w->qf[g], k1, C);
        s[i] = pair_sums(a, b);
    }
    return finish_sums(s);
}

/* RB query heads (g0 .. g0+RB-1) of one (sequence, KV head) pair over its blocks, with their
 * accumulators, running maxima and sums in registers; a block's value rows are loaded once for the RB
 * rows (its keys once per row, from L1 after the first). */
static inline __attribute__((always_inline)) void group512(const job_t *j, const work512_t *w, int64_t b, int64_t h,
                                                           int64_t g0, const int RB, const int64_t G, const int64_t C,
                                                           const int bf16) {
    const int64_t D = C * 16, esz = bf16 ? 2 : 4, rowbytes = D * esz;
    const char *kb = (const char *)j->k, *vb = (const char *)j->v;
    float kw[16 * MAX_D] __attribute__((aligned(64))); /* WIDE: the block's keys as float32 pairs-split */
    __m512 a[4][MAX_D / 16];
    float m[4], l[4];
    for (int r = 0; r < RB; r++) {
        for (int64_t c = 0; c < C; c++) a[r][c] = _mm512_setzero_ps();
        m[r] = -INFINITY;
        l[r] = 0.f;
    }
    const __m512 scale = _mm512_set1_ps(j->scale), neg_inf = _mm512_set1_ps(-INFINITY);
    const int64_t ctx = j->ctx[b];
    const int64_t nblocks = (ctx + 15) / 16;
    for (int64_t i = 0; i < nblocks; i++) {
        const int64_t n = (ctx - i * 16) < 16 ? (ctx - i * 16) : 16;
        const __mmask16 valid = (__mmask16)((1u << n) - 1u);
        const int64_t off = (h * j->N + j->table[b * j->M + i]) * 16 * rowbytes;
        /* the next block's K and V lines into L1 and the one after into L2, asked for a few at a time
         * while this block computes (a burst of 64 requests would overflow the core's miss buffers).
         * The L2 requests two blocks ahead keep more misses in flight: fp32 from memory (scattered
         * blocks, Xeon) 16 -> 18-19.7 GB/s, bf16 11-13 -> 13-14.8 */
        const char *nk = NULL, *nv = NULL, *fk = NULL, *fv = NULL;
        if (g0 == 0 && i + 1 < nblocks) {
            const int64_t next = (h * j->N + j->table[b * j->M + i + 1]) * 16 * rowbytes;
            nk = kb + next;
            nv = vb + next;
        }
        if (g0 == 0 && i + 2 < nblocks) {
            const int64_t far = (h * j->N + j->table[b * j->M + i + 2]) * 16 * rowbytes;
            fk = kb + far;
            fv = vb + far;
        }
        const int64_t lines = 16 * rowbytes / 64, per_row = (lines + RB - 1) / RB;
        const char *kblk = kb + off;
        int64_t krow = rowbytes;
        if (bf16 == WIDE) {
            for (int t = 0; t < 16; t++)
                for (int64_t c = 0; c < C / 2; c++) {
                    __m512 e, o;
                    split_bf16_pairs(_mm512_loadu_si512(kblk + t * rowbytes + c * 64), &e, &o);
                    _mm512_store_ps(kw + t * D + 32 * c, e);
                    _mm512_store_ps(kw + t * D + 32 * c + 16, o);
                }
            kblk = (const char *)kw;
            krow = D * 4;
        }
        __m512 p[4];
        float delta[16] = {0}, mnew[4];
        for (int r = 0; r < RB; r++) {
            prefetch_ahead(nk, fk, r * per_row, (r + 1) * per_row < lines ? (r + 1) * per_row : lines);
            p[r] = _mm512_mask_mov_ps(neg_inf, valid, _mm512_mul_ps(block_scores(w, g0 + r, kblk, krow, bf16 == 1, C), scale));
            mnew[r] = max_running(_mm512_reduce_max_ps(p[r]), m[r]);
            delta[r] = m[r] - mnew[r]; /* -inf on the first block: its factor is ~0 */
        }
        float cf[16];
        _mm512_storeu_ps(cf, (__m512)exp16((v16f)_mm512_loadu_ps(delta))); /* every row's rescale, one exp */
        for (int r = 0; r < RB; r++) {
            p[r] = _mm512_maskz_mov_ps(valid, (__m512)exp16((v16f)_mm512_sub_ps(p[r], _mm512_set1_ps(mnew[r]))));
            l[r] = l[r] * cf[r] + _mm512_reduce_add_ps(p[r]);
            m[r] = mnew[r];
            if (cf[r] != 1.f)
                for (int64_t c = 0; c < C; c++) a[r][c] = _mm512_mul_ps(a[r][c], _mm512_set1_ps(cf[r]));
        }
        const char *vblk = vb + off;
        if (bf16 == WIDE) { /* probabilities rounded to bf16 (as below), value rows widened as loaded */
            float pf[4][16] __attribute__((aligned(64)));
            for (int r = 0; r < RB; r++) _mm512_store_ps(pf[r], round_bf16(p[r]));
            for (int64_t t = 0; t < n; t++) {
                prefetch_ahead(nv, fv, t * (lines / 16), (t + 1) * (lines / 16));
                const char *vr = vblk + t * rowbytes;
                __m512 pt[4];
                for (int r = 0; r < RB; r++) pt[r] = _mm512_set1_ps(pf[r][t]);
                for (int64_t c = 0; c < C; c++) {
                    /* pinned to a register (an empty asm): GCC would fold the load into each row's FMA,
                     * RB loads of the same line where one does (the same below) */
                    __m512 vv = load16f(vr + c * 32, 1);
                    __asm__("" : "+v"(vv));
                    for (int r = 0; r < RB; r++) a[r][c] = _mm512_fmadd_ps(pt[r], vv, a[r][c]);
                }
            }
        } else if (bf16) {
            __m512i pb[4];
            for (int r = 0; r < RB; r++) pb[r] = _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(p[r]));
            for (int64_t t = 0; t < n; t += 2) {
                prefetch_ahead(nv, fv, t / 2 * (lines / 8), (t / 2 + 1) * (lines / 8));
                const char *v0 = vblk + t * rowbytes, *v1 = v0 + rowbytes;
                const __m512i sel = _mm512_set1_epi32((int)(t / 2));
                __m512bh pp[4];
                for (int r = 0; r < RB; r++) pp[r] = (__m512bh)_mm512_permutexvar_epi32(sel, pb[r]);
                for (int64_t c = 0; c < C / 2; c++) {
                    __m512i x0 = _mm512_loadu_si512(v0 + c * 64);
                    __m512i x1 = t + 1 < n ? _mm512_loadu_si512(v1 + c * 64) : _mm512_setzero_si512();
                    __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(x0, x1), hi = (__m512bh)_mm512_unpackhi_epi16(x0, x1);
                    for (int r = 0; r < RB; r++) {
                        a[r][2 * c] = _mm512_dpbf16_ps(a[r][2 * c], lo, pp[r]);
                        a[r][2 * c + 1] = _mm512_dpbf16_ps(a[r][2 * c + 1], hi, pp[r]);
                    }
                }
            }
        } else {
            for (int64_t t = 0; t < n; t++) {
                prefetch_ahead(nv, fv, t * (lines / 16), (t + 1) * (lines / 16));
                const char *vr = vblk + t * rowbytes;
                const __m512i sel = _mm512_set1_epi32((int)t);
                __m512 pt[4];
                for (int r = 0; r < RB; r++) pt[r] = _mm512_permutexvar_ps(sel, p[r]);
                for (int64_t c = 0; c < C; c++) {
                    __m512 vv = _mm512_loadu_ps(vr + c * 64);
                    __asm__("" : "+v"(vv));
                    for (int r = 0; r < RB; r++) a[r][c] = _mm512_fmadd_ps(pt[r], vv, a[r][c]);
                }
            }
        }
    }
    for (int r = 0; r < RB; r++) {
        const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
        store_acc_row(a[r], inv, (char *)j->out + ((b * j->Hk + h) * G + g0 + r) * rowbytes, bf16, C);
    }
}

static inline __attribute__((always_inline)) void pair512_body(const job_t *j, work512_t *w, int64_t b, int64_t h,
                                                               const int64_t G, const int64_t C, const int bf16) {
    const int64_t rowbytes = C * 16 * (bf16 ? 2 : 4);
    for (int64_t g = 0; g < G; g++) {
        const char *qrow = (const char *)j->q + ((b * j->Hk + h) * G + g) * rowbytes;
        if (bf16 == WIDE) /* split like the keys: even elements of each 32, then odd ones */
            for (int64_t c = 0; c < C / 2; c++) split_bf16_pairs(_mm512_loadu_si512(qrow + c * 64), &w->qf[g][2 * c], &w->qf[g][2 * c + 1]);
        else if (bf16)
            for (int64_t c = 0; c < C / 2; c++) w->qh[g][c] = _mm512_loadu_si512(qrow + c * 64);
        else
            for (int64_t c = 0; c < C; c++) w->qf[g][c] = _mm512_loadu_ps(qrow + c * 64);
    }
    /* rows per group: 4 where their accumulators fit the registers (head_dim <= 64), else 2 */
    int64_t g = 0;
    if (C <= 4)
        for (; g + 4 <= G; g += 4) group512(j, w, b, h, g, 4, G, C, bf16);
    else
        for (; g + 2 <= G; g += 2) group512(j, w, b, h, g, 2, G, C, bf16);
    for (; g < G; g++) group512(j, w, b, h, g, 1, G, C, bf16);
}

/* Per mode, the supported models' shapes as compile-time constants (G x head_dim 4 x 64, 4 x 128,
 * 8 x 128) and one generic instantiation. */
#define P512_SET(name, mode)                                                                                     \
    static void p512_##name##_g4_d64(const job_t *j, work512_t *w, int64_t b, int64_t h) {                       \
        pair512_body(j, w, b, h, 4, 4, mode);                                                                    \
    }                                                                                                            \
    static void p512_##name##_g4_d128(const job_t *j, work512_t *w, int64_t b, int64_t h) {                      \
        pair512_body(j, w, b, h, 4, 8, mode);                                                                    \
    }                                                                                                            \
    static void p512_##name##_g8_d128(const job_t *j, work512_t *w, int64_t b, int64_t h) {                      \
        pair512_body(j, w, b, h, 8, 8, mode);                                                                    \
    }                                                                                                            \
    static void p512_##name(const job_t *j, work512_t *w, int64_t b, int64_t h) {                                \
        pair512_body(j, w, b, h, j->G, j->D / 16, mode);                                                         \
    }
P512_SET(f32, 0)
P512_SET(bf16, 1)
P512_SET(wide, WIDE)

typedef void (*pair512_fn)(const job_t *, work512_t *, int64_t, int64_t);
static pair512_fn pick512(const job_t *j) {
    static const pair512_fn fns[WIDE + 1][4] = {
        {p512_f32_g4_d64, p512_f32_g4_d128, p512_f32_g8_d128, p512_f32},
        {p512_bf16_g4_d64, p512_bf16_g4_d128, p512_bf16_g8_d128, p512_bf16},
        {p512_wide_g4_d64, p512_wide_g4_d128, p512_wide_g8_d128, p512_wide}};
    if (j->bs != 16 || j->D % (j->bf16 ? 32 : 16)) return NULL;
    const int mode = j->bf16 ? (mesh_bf16_wide() ? WIDE : 1) : 0;
    const int shape = j->G == 4 && j->D == 64 ? 0 : j->G == 4 && j->D == 128 ? 1 : j->G == 8 && j->D == 128 ? 2 : 3;
    return fns[mode][shape];
}
#elif defined(__AVX2__) && defined(__FMA__)
#include "avx2_math.h"
#define MESH_DECODE_AVX2 1
#include "decode_avx2.h"
#endif

/* Which pair routine (and workspace) a job runs. */
typedef struct {
    int kind; /* 0: block_size-16 vector path, 1: generic, 2: AVX-512, 3: AVX2 */
    void (*p16)(const job_t *, work16_t *, int64_t, int64_t);
    void (*pany)(const job_t *, work_t *, int64_t, int64_t);
#ifdef MESH_AVX512
    pair512_fn p512;
#endif
    size_t size;
} plan_t;

static plan_t plan_for(const job_t *j) {
    plan_t p = {0};
#ifdef MESH_AVX512
    p.p512 = pick512(j);
    if (p.p512 != NULL) {
        p.kind = 2;
        p.size = sizeof(work512_t);
        return p;
    }
#endif
#ifdef MESH_DECODE_AVX2
    if (j->bs == 16 && j->D % 32 == 0) {
        p.kind = 3;
        p.size = sizeof(work2_t);
        return p;
    }
#endif
    if (j->bs == 16 && j->D % 16 == 0) {
        p.kind = 0;
        p.size = sizeof(work16_t);
        p.p16 = pair_bs16;
        if (j->G == 4 && j->D == 64) p.p16 = pair_g4_d64;
        else if (j->G == 4 && j->D == 128) p.p16 = pair_g4_d128;
        else if (j->G == 8 && j->D == 128) p.p16 = pair_g8_d128;
        return p;
    }
    p.kind = 1;
    p.size = sizeof(work_t);
    p.pany = pair_any;
    return p;
}

static void do_item(const plan_t *p, const job_t *j, void *w, int64_t it) {
    const int64_t b = it / j->Hk, h = it % j->Hk;
#ifdef MESH_AVX512
    if (p->kind == 2) {
        p->p512(j, (work512_t *)w, b, h);
        return;
    }
#endif
#ifdef MESH_DECODE_AVX2
    if (p->kind == 3) {
        pair_avx2(j, (work2_t *)w, b, h);
        return;
    }
#endif
    if (p->kind == 0) p->p16(j, (work16_t *)w, b, h);
    else p->pany(j, (work_t *)w, b, h);
}

/* Workspaces, one per thread and routine kind, kept across calls (the engine's thread and OpenMP's
 * pool threads live as long as the process) and freed when their thread exits; threads started for
 * one call (the pthread build) allocate theirs and free it. */
static pthread_key_t kept_key[4];
static pthread_once_t kept_once = PTHREAD_ONCE_INIT;
static void make_keys(void) {
    for (int i = 0; i < 4; i++) pthread_key_create(&kept_key[i], free);
}

static void *workspace(size_t size, int kept, int which) {
    void *w = NULL;
    if (kept) {
        pthread_once(&kept_once, make_keys);
        w = pthread_getspecific(kept_key[which]);
        if (w != NULL) return w;
    }
    w = aligned_alloc(64, (size + 63) / 64 * 64);
    if (kept && w != NULL) pthread_setspecific(kept_key[which], w);
    return w;
}

/* Below this many (block, KV head) pairs per thread a call runs on the calling thread alone: handing
 * work out costs more than it saves (a single sequence decoding, a few short ones). */
#define MIN_BLOCKS_PER_THREAD 64

#ifndef _OPENMP
typedef struct {
    const job_t *j;
    const plan_t *p;
    int nthreads, tid, kept;
} slice_t;

static void *run_slice(void *arg) { /* items tid, tid + nthreads, ... */
    const slice_t *s = (const slice_t *)arg;
    void *w = workspace(s->p->size, s->kept, s->p->kind);
    if (w == NULL) return (void *)1;
    for (int64_t it = s->tid; it < s->j->B * s->j->Hk; it += s->nthreads) do_item(s->p, s->j, w, it);
    if (!s->kept) free(w);
    return NULL;
}
#endif

/* Returns 0 on success, -1..-3 when a size is out of the kernel's limits, -4 when out of memory, -5
 * when a context length or a block id lies outside the block table or the pool (checked before any
 * work: the kernel never reads out of bounds).
 *
 * Built with OpenMP (when torch runs on the same GNU OpenMP runtime, so this shares torch's thread
 * pool instead of competing with it), work items go out dynamically, one (sequence, KV head) pair at
 * a time, to `nthreads` threads; otherwise to `nthreads` pthreads round-robin. */
int mesh_decode_attention(const void *q, const void *k, const void *v, const int64_t *table,
                          const int64_t *ctx, void *out, int64_t B, int64_t Hk, int64_t G, int64_t D,
                          int64_t N, int64_t bs, int64_t M, float scale, int bf16, int nthreads) {
    if (G < 1 || G > MAX_G) return -1;
    if (D < 1 || D > MAX_D) return -2;
    if (bs < 1 || bs > MAX_BS) return -3;
    int64_t blocks = 0;
    for (int64_t b = 0; b < B; b++) {
        if (ctx[b] < 1 || ctx[b] > M * bs) return -5;
        const int64_t nb = (ctx[b] + bs - 1) / bs;
        for (int64_t i = 0; i < nb; i++)
            if (table[b * M + i] < 0 || table[b * M + i] >= N) return -5;
        blocks += nb * Hk;
    }
    const int64_t items = B * Hk;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > 64) nthreads = 64;
    if (nthreads > items) nthreads = (int)(items > 0 ? items : 1);
    if (blocks / MIN_BLOCKS_PER_THREAD + 1 < nthreads) nthreads = (int)(blocks / MIN_BLOCKS_PER_THREAD + 1);
    const job_t job = {q, k, v, table, ctx, out, B, Hk, G, D, N, bs, M, scale, bf16};
    const plan_t plan = plan_for(&job);
    int failed = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads) if (nthreads > 1) reduction(| : failed)
    {
        void *w = workspace(plan.size, 1, plan.kind);
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++) {
            if (w == NULL) failed = 1;
            else do_item(&plan, &job, w, it);
        }
    }
#else
    slice_t slices[64];
    pthread_t threads[64];
    for (int t = 0; t < nthreads; t++) slices[t] = (slice_t){&job, &plan, nthreads, t, t == 0};
    int started = 0;
    for (int t = 1; t < nthreads; t++) {
        if (pthread_create(&threads[t], NULL, run_slice, &slices[t]) != 0) break;
        started = t;
    }
    /* Items of threads that could not start are done here, after this thread's own. */
    failed = run_slice(&slices[0]) != NULL;
    for (int t = started + 1; t < nthreads; t++) {
        slices[t].kept = 1;
        failed |= run_slice(&slices[t]) != NULL;
    }
    for (int t = 1; t <= started; t++) {
        void *r = NULL;
        pthread_join(threads[t], &r);
        failed |= r != NULL;
    }
#endif
    return failed ? -4 : 0;
}
