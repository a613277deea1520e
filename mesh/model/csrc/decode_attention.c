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
 * Work items (b, h) are dealt round-robin to `nthreads` threads.
 */
#include <math.h> /* INFINITY */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_G 64
#define MAX_D 256
#define MAX_BS 256
#define PREFETCH_AHEAD 1 /* blocks ahead (2 measured no better) */

typedef struct {
    const void *q, *k, *v;
    const int64_t *table, *ctx;
    void *out;
    int64_t B, Hk, G, D, N, bs, M;
    float scale;
    int bf16, nthreads, tid;
} job_t;

static inline float bf16_to_f32(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

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
    return bf16 ? bf16_to_f32(((const uint16_t *)base)[i]) : ((const float *)base)[i];
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
            for (int64_t d = 0; d < D; d++) o[d] = f32_to_bf16(acc[g][d] * inv);
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
                for (int k = 0; k < 16; k++) o[k] = f32_to_bf16(r[k]);
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

/* Workspaces: threads started for one call allocate theirs and free it; the calling thread (the
 * engine's, which calls once per layer per step) keeps its own across calls, freed when it exits. */
static pthread_key_t kept_key[2];
static pthread_once_t kept_once = PTHREAD_ONCE_INIT;
static void make_keys(void) {
    pthread_key_create(&kept_key[0], free);
    pthread_key_create(&kept_key[1], free);
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

static void *run_job(job_t *j, int kept) {
    const int64_t items = j->B * j->Hk;
    if (j->bs == 16 && j->D % 16 == 0) {
        work16_t *w = (work16_t *)workspace(sizeof(work16_t), kept, 0);
        if (w == NULL) return (void *)1;
        void (*pair)(const job_t *, work16_t *, int64_t, int64_t) = pair_bs16;
        if (j->G == 4 && j->D == 64) pair = pair_g4_d64;
        else if (j->G == 4 && j->D == 128) pair = pair_g4_d128;
        else if (j->G == 8 && j->D == 128) pair = pair_g8_d128;
        for (int64_t it = j->tid; it < items; it += j->nthreads) pair(j, w, it / j->Hk, it % j->Hk);
        if (!kept) free(w);
    } else {
        work_t *w = (work_t *)workspace(sizeof(work_t), kept, 1);
        if (w == NULL) return (void *)1;
        for (int64_t it = j->tid; it < items; it += j->nthreads) pair_any(j, w, it / j->Hk, it % j->Hk);
        if (!kept) free(w);
    }
    return NULL;
}

static void *run(void *arg) { return run_job((job_t *)arg, 0); }

/* Below this many (block, KV head) pairs a call runs on the calling thread alone: starting threads
 * costs more than it saves (a single sequence decoding, a few short ones). */
#define MIN_BLOCKS_PER_THREAD 128

/* Returns 0 on success, -1..-3 when a size is out of the kernel's limits, -4 when out of memory, -5
 * when a context length or a block id lies outside the block table or the pool (checked before any
 * work: the kernel never reads out of bounds). */
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
    if (nthreads < 1) nthreads = 1;
    if (nthreads > 64) nthreads = 64;
    if (nthreads > B * Hk) nthreads = (int)(B * Hk > 0 ? B * Hk : 1);
    if (blocks / MIN_BLOCKS_PER_THREAD + 1 < nthreads) nthreads = (int)(blocks / MIN_BLOCKS_PER_THREAD + 1);
    job_t jobs[64];
    pthread_t threads[64];
    for (int t = 0; t < nthreads; t++) {
        jobs[t] = (job_t){q, k, v, table, ctx, out, B, Hk, G, D, N, bs, M, scale, bf16, nthreads, t};
    }
    int started = 0;
    for (int t = 1; t < nthreads; t++) {
        if (pthread_create(&threads[t], NULL, run, &jobs[t]) != 0) break;
        started = t;
    }
    /* Items of threads that could not start are done here, after this thread's own. */
    int failed = run_job(&jobs[0], 1) != NULL;
    for (int t = started + 1; t < nthreads; t++) failed |= run_job(&jobs[t], 1) != NULL;
    for (int t = 1; t <= started; t++) {
        void *r = NULL;
        pthread_join(threads[t], &r);
        failed |= r != NULL;
    }
    return failed ? -4 : 0;
}
