/* Grouped expert FFNs (and plain linear layers, mesh_linear) for the CPU: rows sorted by expert slot, each slot's rows through
 *     h = silu(x @ gate^T) * (x @ up^T);   y = h @ down^T
 * with exact row counts (no padding to the busiest slot) and the activation fused into the first
 * matmul's epilogue.
 *
 * Weights are packed once, at load time, so that one 64-byte vector holds 16 consecutive output
 * features of one input position (float32) or of two adjacent input positions (bfloat16 pairs, the
 * operand layout of VDPBF16PS):
 *     float32  [S, N/16, K, 16]        bfloat16  [S, N/16, K/2, 16, 2]
 * gate and up are interleaved by 16-feature tiles (gate 0-15, up 0-15, gate 16-31, ...), so one
 * 32-wide output tile holds matching gate and up columns and the epilogue can combine them.
 *
 * A micro-kernel computes up to MR rows x 32 outputs with 2 * MR vector accumulators: per input
 * position (pair) two weight vectors are loaded and each row's input is broadcast against them.
 * Accumulation is float32; the results are rounded to the model dtype exactly where the unfused torch
 * ops round them (the gate/up matmul output, silu's output, the product, the down matmul output), so
 * fusing changes nothing but the matmuls' summation order.
 *
 * Work items are (slot, output tile) pairs, handed out dynamically on torch's OpenMP pool (when built
 * with -fopenmp); the down matmul starts after every gate/up tile is done (its inputs span all of h).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bf16.h"

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include "avx512_math.h"
#define MESH_MOE_AVX512 1
#define MESH_MOE_SIMD 1
#define MR 12 /* rows per micro-kernel call: 24 accumulators of the 32 vector registers */
#elif defined(__AVX2__) && defined(__FMA__)
#include "avx2_math.h" /* the kernels themselves: moe_avx2.h, included below */
#define MESH_MOE_AVX2 1
#define MESH_MOE_SIMD 1
#define MR 6 /* rows per micro-kernel call: 12 accumulators of the 16 vector registers */
#endif
#if defined(__AVX512BF16__) || defined(MESH_MOE_AVX2)
#define MESH_MOE_BF16 1 /* bfloat16 jobs run here (the AVX2 build's wide); the AVX-512 build needs AVX512-BF16 */
#endif
#ifdef _OPENMP
#include <omp.h>
#endif
#include <pthread.h>

#define PF 64 /* bf16 pairs (128 B each) prefetched ahead, 8 KiB. Measured per b64 layer, weights from memory: 16 -> 0.58,
                * 32 -> 0.46 ms with items handed out one at a time; with contiguous per-thread ranges 32 -> 0.33,
                * 64 -> 0.31, 128 -> 0.31 */
#define FAR 256 /* input steps (128 B of weights each) prefetched ahead into L2 as well, 32 KiB, by the row-pointer
                 * micro-kernel (decode sizes, weights streamed from memory): more misses in flight than the L1
                 * prefetches alone allow. Experts at 64 tokens, weights from memory (Xeon): float32 17.7 ->
                 * 20.2 GB/s, bf16 12.7 -> 13.3 (16 KiB ahead: the same); a b64 decode step float32 4 % faster */

/* One expert job (mesh_moe_experts, mesh_moe_local), as the work items see it. */
typedef struct {
    const char *x, *gu, *dn;
    char *h, *out;
    const int64_t *offsets;
    const int64_t *src; /* row r of the sorted order is row src[r] of x; NULL: row r */
    int64_t S, H, I, esz; /* esz: bytes per element of the weights and of out */
    int64_t xsz;          /* bytes per element of x and h: 4 in the wide mode (float32 copies), else esz */
    int bf16;             /* 1 bf16 (VDPBF16PS), WIDE bf16 weights with float32 x and h, 0 float32 */
    char *panels; /* per thread, panel_bytes each, for row-block items and AMX inputs (NULL: none needed) */
    int64_t panel_bytes;
    int amx; /* bf16 products on the tile unit (MESH_AMX builds; the panels are then always there) */
} moe_job_t;

#ifdef MESH_MOE_SIMD
/* Rows per micro-kernel call when n rows are cut into the fewest chunks of at most MR: as equal as
 * possible (16 = 8 + 8, not 12 + 4; 64 = 6 x 11 - 2), so no call runs on a few rows alone. */
static inline int64_t chunk_rows(int64_t n) {
    const int64_t chunks = (n + MR - 1) / MR;
    return chunks ? (n + chunks - 1) / chunks : MR;
}
#endif

/* AMX (Intel's tile matrix unit, Sapphire Rapids and later): where the build targets it, bfloat16
 * products of the expert and linear kernels run as tile products (TDPBF16PS: 16 rows x 16 outputs x 32
 * inputs per instruction, float32 accumulation) instead of VDPBF16PS, which such CPUs issue at half the
 * rate of a float32 FMA (measured on a 2-core Xeon VM: VDPBF16PS 85 GFLOP/s per core, FMA 170, tiles
 * ~1000). The packed bf16 weights are already in the tile unit's B layout: per 32-column tile, 16 input
 * pairs x 64 bytes per half, rows 128 bytes apart. Inputs go through a tile-order panel padded with
 * zero rows to a multiple of 16. The library asks the OS (arch_prctl) for tile state once per
 * process; when refused, or turned off with mesh_set_amx(0), the VDPBF16PS paths run. */
#include "amx.h"
#ifdef MESH_AMX
#include <sys/syscall.h>
#include <unistd.h>
#define AMX_PF 4096 /* weight bytes prefetched ahead (two input steps): experts per b64 layer from memory 1.37 -> 0.85 ms */
static int amx_on = 1;   /* mesh_set_amx */
static int amx_perm = 0; /* 1 granted, -1 refused, 0 not asked yet */

int mesh_amx_ready(void) {
    if (!amx_on) return 0;
    if (amx_perm == 0) /* ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA */
        amx_perm = syscall(SYS_arch_prctl, 0x1023, 18) == 0 ? 1 : -1;
    return amx_perm > 0;
}
static int amx_ready(void) { return mesh_amx_ready(); }

/* c [16 * nb rows][32] float32 = a (16 * nb rows of K bf16 in tile order, see amx_pack) x one packed
 * 32-column bf16 tile w (K/2 pair rows of 128 bytes). nb is 1 or 2: tiles 0-3 accumulate, 4-5 hold
 * inputs, 6-7 weights. */
static inline __attribute__((always_inline)) void amx_tile(const char *a, int64_t K, const char *w, float *c,
                                                           const int nb) {
    _tile_zero(0);
    _tile_zero(1);
    if (nb == 2) {
        _tile_zero(2);
        _tile_zero(3);
    }
    for (int64_t k = 0; k < K; k += 32) {
        const char *wk = w + k * 64;
        for (int l = 0; l < 2048; l += 64) _mm_prefetch(wk + AMX_PF + l, _MM_HINT_T0);
        _tile_loadd(6, wk, 128);
        _tile_loadd(7, wk + 64, 128);
        _tile_loadd(4, a + k * 32, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (nb == 2) {
            _tile_loadd(5, a + K * 32 + k * 32, 64);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
    _tile_stored(0, c, 128);
    _tile_stored(1, c + 16, 128);
    if (nb == 2) {
        _tile_stored(2, c + 16 * 32, 128);
        _tile_stored(3, c + 16 * 32 + 16, 128);
    }
}
static void amx_tile1(const char *a, int64_t K, const char *w, float *c) { amx_tile(a, K, w, c, 1); }
static void amx_tile2(const char *a, int64_t K, const char *w, float *c) { amx_tile(a, K, w, c, 2); }

/* m rows (pointers) of K bf16 -> panel in tile order: [m/16 row blocks][K/32][16 rows][32], each
 * tile's 1 KiB contiguous (loaded with a 64-byte stride: rows 2K bytes apart cost 2-3x more per tile
 * product from L1), m rounded up to 16 with zero rows. Row i of the panel starts at amx_row(i, K). */
static inline int64_t amx_row(int64_t i, int64_t K) { return (i / 16) * K * 32 + (i % 16) * 64; }
static void amx_pack(const char *const *rows, int64_t m, int64_t K, char *panel) {
    const int64_t padded = (m + 15) / 16 * 16;
    for (int64_t i = 0; i < padded; i++) {
        char *dst = panel + amx_row(i, K);
        for (int64_t k = 0; k < K; k += 32, dst += 1024) {
            if (i < m) memcpy(dst, rows[i] + k * 2, 64);
            else memset(dst, 0, 64);
        }
    }
}
#else
static int amx_ready(void) { return 0; }
#endif

/* Turns the AMX paths on or off (1/0) for this process; returns whether they will run (the build
 * has them and the OS grants tile state). */
int mesh_set_amx(int on) {
#ifdef MESH_AMX
    amx_on = on;
#else
    (void)on;
#endif
    return amx_ready();
}

#ifdef MESH_MOE_AVX512

/* bfloat16 products off the tile unit, two ways. VDPBF16PS multiplies bf16 pairs straight from the
 * packed weights; but some CPUs issue it at half the rate of a float32 FMA (the Xeons measured here:
 * 85 against 170 GFLOP/s per core), and there the "wide" kernels run instead: each packed weight vector
 * (16 outputs x 2 inputs as bf16 pairs) widened into two float32 vectors by a shift and a mask (exact),
 * the inputs (bf16 values) read as float32 from a widened copy, and float32 FMAs. A product of two
 * bf16 values is exact in float32 and the sums are float32 either way: the results differ from
 * VDPBF16PS's only in summation order. Weights stay bf16 in memory (decode stays memory-bound on
 * them). Which way runs: mesh_set_bf16_wide (-1: measure once which multiplies faster). */
#define WIDE MESH_WIDE /* the micro-kernels' `bf16` argument for that mode */

static inline __attribute__((always_inline)) void widen_pairs(const char *w, __m512 *even, __m512 *odd) {
    split_bf16_pairs(_mm512_loadu_si512(w), even, odd);
}

static int bf16_wide = -1; /* -1: not decided yet; 0: VDPBF16PS; 1: wide */
static int bf16_wide_asked = -1; /* mesh_set_bf16_wide's argument */

#ifdef __AVX512BF16__
static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* Seconds for n rounds of 12 independent VDPBF16PS (dp) or FMA chains: enough chains to cover either's
 * latency, so the time is the issue rate. */
static double chain_time(int dp, int n) {
    __m512 a[12];
    for (int i = 0; i < 12; i++) a[i] = _mm512_set1_ps(1e-3f * i);
    __m512 x = _mm512_set1_ps(1e-6f);
    __asm__ volatile("" : "+v"(x));
    const __m512bh xb = (__m512bh)_mm512_castps_si512(x);
    const double t0 = now_s();
    for (int r = 0; r < n; r++)
        for (int i = 0; i < 12; i++) a[i] = dp ? _mm512_dpbf16_ps(a[i], xb, xb) : _mm512_fmadd_ps(x, x, a[i]);
    const double t = now_s() - t0;
    float sink = 0.f;
    for (int i = 0; i < 12; i++) sink += _mm512_reduce_add_ps(a[i]);
    __asm__ volatile("" : : "x"(sink));
    return t;
}

/* 1 when VDPBF16PS (64 flops each) does less than 3/4 of the float32 FMA's work (32 flops each) per
 * second: the wide kernels then win. Best of 5 alternating runs of ~10-40 us each, after a warm-up (the
 * core's wide-vector clock). Measured: Xeon (no AMX) 0.5 -> wide; AMD Zen 4/5 issue VDPBF16PS at the
 * FMA's rate (2x its flops) -> VDPBF16PS. */
static int probe_wide(void) {
    const int n = 2048;
    chain_time(0, n), chain_time(1, n);
    double dp = 1e9, fma = 1e9;
    for (int r = 0; r < 5; r++) {
        const double a = chain_time(1, n), b = chain_time(0, n);
        dp = a < dp ? a : dp;
        fma = b < fma ? b : fma;
    }
    return 64.0 / dp < 0.75 * (32.0 / fma);
}
#endif

/* Whether bf16 products off the tile unit run wide (1) or on VDPBF16PS (0) in this process. */
static int wide_bf16(void) {
    if (bf16_wide < 0) {
#ifdef __AVX512BF16__
        bf16_wide = bf16_wide_asked >= 0 ? bf16_wide_asked : probe_wide();
#else
        bf16_wide = 1; /* no VDPBF16PS: wide is the only way */
#endif
    }
    return bf16_wide;
}
#elif defined(MESH_MOE_AVX2)
#include "moe_avx2.h" /* AVX2 micro-kernels and epilogues; wide_bf16() there always says wide */
#endif

/* Whether bf16 products off the tile unit run wide in this process (1) or on VDPBF16PS (0): also the
 * attention kernels' choice. */
int mesh_bf16_wide(void) {
#ifdef MESH_MOE_SIMD
    return wide_bf16();
#else
    return 0;
#endif
}

/* -1: decide by measuring (the default), 0: VDPBF16PS, 1: the wide float32 kernels (see above). Returns
 * the mode bf16 products will run in (1 wide, 0 VDPBF16PS; AMX, where it runs, comes first), or -1
 * when this build has no vector kernels. The AVX2 build runs bf16 wide whatever is asked. */
int mesh_set_bf16_wide(int mode) {
#ifdef MESH_MOE_AVX512
    if (mode != bf16_wide_asked) bf16_wide = -1; /* (without AVX512-BF16, wide_bf16 says wide whatever asked) */
    bf16_wide_asked = mode;
    return wide_bf16();
#elif defined(MESH_MOE_AVX2)
    (void)mode;
    return wide_bf16();
#else
    (void)mode;
    return -1;
#endif
}

#ifdef MESH_MOE_AVX512

static inline __attribute__((always_inline)) void ukernel(const char *const *x, const char *w0, const char *w1,
                                                          int64_t K, float *c, const int M, const int bf16) {
    __m512 acc[MR][2];
    for (int i = 0; i < M; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    if (bf16 == WIDE) { /* bf16 weight pairs widened to two float32 vectors, float32 inputs (see WIDE) */
        for (int64_t p = 0; p < K / 2; p++) {
            _mm_prefetch(w0 + (p + PF) * 128, _MM_HINT_T0);
            _mm_prefetch(w1 + (p + PF) * 128, _MM_HINT_T0);
            _mm_prefetch(w0 + (p + FAR) * 128, _MM_HINT_T1);
            _mm_prefetch(w1 + (p + FAR) * 128, _MM_HINT_T1);
            __m512 b0e, b0o, b1e, b1o;
            widen_pairs(w0 + p * 128, &b0e, &b0o);
            widen_pairs(w1 + p * 128, &b1e, &b1o);
            for (int i = 0; i < M; i++) {
                const float *xi = (const float *)x[i] + 2 * p;
                const __m512 ae = _mm512_set1_ps(xi[0]), ao = _mm512_set1_ps(xi[1]);
                acc[i][0] = _mm512_fmadd_ps(ao, b0o, _mm512_fmadd_ps(ae, b0e, acc[i][0]));
                acc[i][1] = _mm512_fmadd_ps(ao, b1o, _mm512_fmadd_ps(ae, b1e, acc[i][1]));
            }
        }
    } else if (bf16) {
#ifdef __AVX512BF16__
        for (int64_t p = 0; p < K / 2; p++) {
            _mm_prefetch(w0 + (p + PF) * 128, _MM_HINT_T0);
            _mm_prefetch(w1 + (p + PF) * 128, _MM_HINT_T0);
            _mm_prefetch(w0 + (p + FAR) * 128, _MM_HINT_T1);
            _mm_prefetch(w1 + (p + FAR) * 128, _MM_HINT_T1);
            const __m512bh b0 = (__m512bh)_mm512_loadu_si512(w0 + p * 128);
            const __m512bh b1 = (__m512bh)_mm512_loadu_si512(w1 + p * 128);
            for (int i = 0; i < M; i++) {
                int32_t pair;
                memcpy(&pair, x[i] + p * 4, 4);
                const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
                acc[i][0] = _mm512_dpbf16_ps(acc[i][0], a, b0);
                acc[i][1] = _mm512_dpbf16_ps(acc[i][1], a, b1);
            }
        }
#endif
    } else {
        for (int64_t k = 0; k < K; k++) {
            _mm_prefetch(w0 + (k + PF) * 128, _MM_HINT_T0);
            _mm_prefetch(w1 + (k + PF) * 128, _MM_HINT_T0);
            _mm_prefetch(w0 + (k + FAR) * 128, _MM_HINT_T1);
            _mm_prefetch(w1 + (k + FAR) * 128, _MM_HINT_T1);
            const __m512 b0 = _mm512_loadu_ps(w0 + k * 128), b1 = _mm512_loadu_ps(w1 + k * 128);
            for (int i = 0; i < M; i++) {
                float xv;
                memcpy(&xv, x[i] + k * 4, 4);
                const __m512 a = _mm512_set1_ps(xv);
                acc[i][0] = _mm512_fmadd_ps(a, b0, acc[i][0]);
                acc[i][1] = _mm512_fmadd_ps(a, b1, acc[i][1]);
            }
        }
    }
    for (int i = 0; i < M; i++) {
        _mm512_storeu_ps(c + i * 32, acc[i][0]);
        _mm512_storeu_ps(c + i * 32 + 16, acc[i][1]);
    }
}

#define UK(M)                                                                                   \
    static void uk_f32_##M(const char *const *x, const char *w0, const char *w1, int64_t K, float *c) {  \
        ukernel(x, w0, w1, K, c, M, 0);                                                         \
    }                                                                                           \
    static void uk_bf16_##M(const char *const *x, const char *w0, const char *w1, int64_t K, float *c) { \
        ukernel(x, w0, w1, K, c, M, 1);                                                         \
    }                                                                                           \
    static void uk_wide_##M(const char *const *x, const char *w0, const char *w1, int64_t K, float *c) { \
        ukernel(x, w0, w1, K, c, M, WIDE);                                                      \
    }
UK(1) UK(2) UK(3) UK(4) UK(5) UK(6) UK(7) UK(8) UK(9) UK(10) UK(11) UK(12)
typedef void (*uk_fn)(const char *const *, const char *, const char *, int64_t, float *);
static const uk_fn UK_F32[MR + 1] = {NULL, uk_f32_1, uk_f32_2, uk_f32_3, uk_f32_4, uk_f32_5, uk_f32_6,
                                     uk_f32_7, uk_f32_8, uk_f32_9, uk_f32_10, uk_f32_11, uk_f32_12};
static const uk_fn UK_BF16[MR + 1] = {NULL, uk_bf16_1, uk_bf16_2, uk_bf16_3, uk_bf16_4, uk_bf16_5, uk_bf16_6,
                                      uk_bf16_7, uk_bf16_8, uk_bf16_9, uk_bf16_10, uk_bf16_11, uk_bf16_12};
static const uk_fn UK_WIDE[MR + 1] = {NULL, uk_wide_1, uk_wide_2, uk_wide_3, uk_wide_4, uk_wide_5, uk_wide_6,
                                      uk_wide_7, uk_wide_8, uk_wide_9, uk_wide_10, uk_wide_11, uk_wide_12};
static const uk_fn *const UK[WIDE + 1] = {UK_F32, UK_BF16, UK_WIDE}; /* by the jobs' `bf16` mode */

/* The same product with the rows' inputs packed into a panel: element (unit p, row i) at a[p * MR + i]
 * (4 bytes: a bf16 pair or a float32), so the broadcasts read one sequential stream instead of M rows
 * spread over memory. Used for experts with many rows (prefill), where a packed block of rows is
 * reused across every output tile. A separate kernel rather than `ukernel` with a row stride: one base
 * register instead of MR row pointers (measured 6-8 % faster at prefill sizes than the shared one). */
static inline __attribute__((always_inline)) void ukernel_panel(const char *a, const char *w0, const char *w1,
                                                                int64_t units, float *c, const int M, const int bf16) {
    __m512 acc[MR][2];
    for (int i = 0; i < M; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    if (bf16 == WIDE) { /* float32 panel (units = inputs), bf16 weight pairs widened */
        for (int64_t p = 0; p < units / 2; p++) {
            _mm_prefetch(w0 + (p + PF) * 128, _MM_HINT_T0);
            _mm_prefetch(w1 + (p + PF) * 128, _MM_HINT_T0);
            __m512 b0e, b0o, b1e, b1o;
            widen_pairs(w0 + p * 128, &b0e, &b0o);
            widen_pairs(w1 + p * 128, &b1e, &b1o);
            const float *ap = (const float *)a + 2 * p * MR;
            for (int i = 0; i < M; i++) {
                const __m512 ae = _mm512_set1_ps(ap[i]), ao = _mm512_set1_ps(ap[MR + i]);
                acc[i][0] = _mm512_fmadd_ps(ao, b0o, _mm512_fmadd_ps(ae, b0e, acc[i][0]));
                acc[i][1] = _mm512_fmadd_ps(ao, b1o, _mm512_fmadd_ps(ae, b1e, acc[i][1]));
            }
        }
    } else if (bf16) {
#ifdef __AVX512BF16__
        for (int64_t p = 0; p < units; p++) {
            _mm_prefetch(w0 + (p + PF) * 128, _MM_HINT_T0);
            _mm_prefetch(w1 + (p + PF) * 128, _MM_HINT_T0);
            const __m512bh b0 = (__m512bh)_mm512_loadu_si512(w0 + p * 128);
            const __m512bh b1 = (__m512bh)_mm512_loadu_si512(w1 + p * 128);
            const int32_t *ap = (const int32_t *)a + p * MR;
            for (int i = 0; i < M; i++) {
                const __m512bh av = (__m512bh)_mm512_set1_epi32(ap[i]);
                acc[i][0] = _mm512_dpbf16_ps(acc[i][0], av, b0);
                acc[i][1] = _mm512_dpbf16_ps(acc[i][1], av, b1);
            }
        }
#endif
    } else {
        for (int64_t k = 0; k < units; k++) {
            _mm_prefetch(w0 + (k + PF) * 128, _MM_HINT_T0);
            _mm_prefetch(w1 + (k + PF) * 128, _MM_HINT_T0);
            const __m512 b0 = _mm512_loadu_ps(w0 + k * 128), b1 = _mm512_loadu_ps(w1 + k * 128);
            const float *ap = (const float *)a + k * MR;
            for (int i = 0; i < M; i++) {
                const __m512 av = _mm512_set1_ps(ap[i]);
                acc[i][0] = _mm512_fmadd_ps(av, b0, acc[i][0]);
                acc[i][1] = _mm512_fmadd_ps(av, b1, acc[i][1]);
            }
        }
    }
    for (int i = 0; i < M; i++) {
        _mm512_storeu_ps(c + i * 32, acc[i][0]);
        _mm512_storeu_ps(c + i * 32 + 16, acc[i][1]);
    }
}

#define UKP(M)                                                                                  \
    static void ukp_f32_##M(const char *a, const char *w0, const char *w1, int64_t u, float *c) {  \
        ukernel_panel(a, w0, w1, u, c, M, 0);                                                   \
    }                                                                                           \
    static void ukp_bf16_##M(const char *a, const char *w0, const char *w1, int64_t u, float *c) { \
        ukernel_panel(a, w0, w1, u, c, M, 1);                                                   \
    }                                                                                           \
    static void ukp_wide_##M(const char *a, const char *w0, const char *w1, int64_t u, float *c) { \
        ukernel_panel(a, w0, w1, u, c, M, WIDE);                                                \
    }
UKP(1) UKP(2) UKP(3) UKP(4) UKP(5) UKP(6) UKP(7) UKP(8) UKP(9) UKP(10) UKP(11) UKP(12)
typedef void (*ukp_fn)(const char *, const char *, const char *, int64_t, float *);
static const ukp_fn UKP_F32[MR + 1] = {NULL, ukp_f32_1, ukp_f32_2, ukp_f32_3, ukp_f32_4, ukp_f32_5, ukp_f32_6,
                                       ukp_f32_7, ukp_f32_8, ukp_f32_9, ukp_f32_10, ukp_f32_11, ukp_f32_12};
static const ukp_fn UKP_BF16[MR + 1] = {NULL, ukp_bf16_1, ukp_bf16_2, ukp_bf16_3, ukp_bf16_4, ukp_bf16_5,
                                        ukp_bf16_6, ukp_bf16_7, ukp_bf16_8, ukp_bf16_9, ukp_bf16_10, ukp_bf16_11,
                                        ukp_bf16_12};
static const ukp_fn UKP_WIDE[MR + 1] = {NULL, ukp_wide_1, ukp_wide_2, ukp_wide_3, ukp_wide_4, ukp_wide_5,
                                        ukp_wide_6, ukp_wide_7, ukp_wide_8, ukp_wide_9, ukp_wide_10, ukp_wide_11,
                                        ukp_wide_12};
static const ukp_fn *const UKP[WIDE + 1] = {UKP_F32, UKP_BF16, UKP_WIDE};

/* m rows (pointers) of `units` 4-byte elements -> panels of MR rows: [chunk][unit][MR]. */
static void pack_rows(const char *const *rows, int64_t m, int64_t units, int32_t *panel) {
    for (int64_t c0 = 0; c0 < m; c0 += MR) {
        int32_t *pc = panel + (c0 / MR) * units * MR;
        const int64_t mm = m - c0 < MR ? m - c0 : MR;
        if (mm == MR && units % 16 == 0) {
            /* 16 units of MR rows at a time: one vector load per row into a small tile, then the panel
             * written in order (4-5 % faster expert prefill in fp32 than the strided scalar copy) */
            for (int64_t p0 = 0; p0 < units; p0 += 16) {
                int32_t t[MR][16] __attribute__((aligned(64)));
                for (int64_t i = 0; i < MR; i++)
                    _mm512_store_si512(t[i], _mm512_loadu_si512((const int32_t *)rows[c0 + i] + p0));
                for (int64_t p = 0; p < 16; p++)
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

/* silu(g) = g * sigmoid(g), with the exponential taken of -|g| so it never overflows. */
static inline __m512 silu16(__m512 g) {
    const __m512 e = exp_nonpos16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
    const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_add_ps(_mm512_set1_ps(1.f), e));
    const __mmask16 neg = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
    return _mm512_mul_ps(g, _mm512_mask_mul_ps(inv, neg, inv, e)); /* g<0: e/(1+e) */
}

/* m rows of gate/up sums (row i: gate at c + 32i, up at c + 32i + 16) -> h rows r .. r + m, columns
 * 16j .. 16j + 15: silu(gate) * up, rounded as torch rounds (bf16: the matmul outputs, silu's output,
 * the product). */
static inline void gate_up_store(const moe_job_t *jb, const float *c, int64_t m, int64_t r, int64_t j) {
    for (int64_t i = 0; i < m; i++) {
        const __m512 g = _mm512_loadu_ps(c + i * 32), u = _mm512_loadu_ps(c + i * 32 + 16);
        const __m512 y = jb->bf16 ? _mm512_mul_ps(round_bf16(silu16(round_bf16(g))), round_bf16(u))
                                  : _mm512_mul_ps(silu16(g), u);
        char *o = jb->h + ((r + i) * jb->I + 16 * j) * jb->xsz;
        if (jb->bf16 == WIDE) _mm512_storeu_ps((float *)o, round_bf16(y)); /* the bf16 value, as float32 */
        else store16(o, y, jb->bf16);
    }
}

/* m rows of down sums (row i at c + 32i) -> output rows r .. r + m, columns 32j .. 32j + 31. */
static inline void down_store(const moe_job_t *jb, const float *c, int64_t m, int64_t r, int64_t j) {
    for (int64_t i = 0; i < m; i++) {
        char *o = jb->out + ((r + i) * jb->H + 32 * j) * jb->esz;
        store16(o, _mm512_loadu_ps(c + i * 32), jb->bf16);
        store16(o + 16 * jb->esz, _mm512_loadu_ps(c + i * 32 + 16), jb->bf16);
    }
}

#endif

#ifdef MESH_MOE_SIMD
/* gate/up tile j (h columns 16j..16j+15) of slot s: rows in chunks of MR, silu(gate) * up. */
static void gate_up_item(const moe_job_t *jb, int64_t s, int64_t j) {
    const int64_t r0 = jb->offsets[s], r1 = jb->offsets[s + 1], H = jb->H, I = jb->I, esz = jb->esz;
    const int64_t tile = H * 16 * esz; /* bytes of one 16-feature tile */
    const char *w0 = jb->gu + (s * (2 * I / 16) + 2 * j) * tile, *w1 = w0 + 64;
    const uk_fn *uk = UK[jb->bf16];
    float c[MR * 32];
    const int64_t step = chunk_rows(r1 - r0);
    for (int64_t r = r0; r < r1; r += step) {
        const int m = (int)(r1 - r < step ? r1 - r : step);
        const char *xr[MR];
        for (int i = 0; i < m; i++) xr[i] = jb->x + (jb->src ? jb->src[r + i] : r + i) * H * jb->xsz;
        uk[m](xr, w0, w1, H, c);
        gate_up_store(jb, c, m, r, j);
    }
}

/* down tile j (output columns 32j..32j+31) of slot s. */
static void down_item(const moe_job_t *jb, int64_t s, int64_t j) {
    const int64_t r0 = jb->offsets[s], r1 = jb->offsets[s + 1], H = jb->H, I = jb->I, esz = jb->esz;
    const int64_t tile = I * 16 * esz;
    const char *w0 = jb->dn + (s * (H / 16) + 2 * j) * tile, *w1 = w0 + 64;
    const uk_fn *uk = UK[jb->bf16];
    float c[MR * 32];
    const int64_t step = chunk_rows(r1 - r0);
    for (int64_t r = r0; r < r1; r += step) {
        const int m = (int)(r1 - r < step ? r1 - r : step);
        const char *xr[MR];
        for (int i = 0; i < m; i++) xr[i] = jb->h + (r + i) * I * jb->xsz;
        uk[m](xr, w0, w1, I, c);
        down_store(jb, c, m, r, j);
    }
}

/* Rows per block when a busy slot is cut into row blocks (see run_experts). On the tile unit a block's
 * cost is streaming the expert's weights, so blocks are bigger: Qwen3-Coder-30B's experts (2048 ->
 * 768 -> 2048) with 128 rows each, 48-row blocks 60.4 ms per 32 experts, 128-row blocks 53.3. */
#define RB 48 /* 4 AVX-512 chunks, 8 AVX2 ones */
_Static_assert(RB % MR == 0, "pack_rows fills whole MR-row chunks: the panel holds RB rows");
#define RB_AMX 128
_Static_assert(RB_AMX % 16 == 0, "amx_pack pads a block to whole 16-row tiles: the panel holds RB_AMX rows");

#ifdef MESH_AMX
/* Gate/up tile j (silu(gate) * up into h, rounded where gate_up_item rounds) or, with down, down tile j
 * (output columns 32j .. 32j + 31) of slot s for its rows r0 .. r0 + m, read from a panel of its x
 * (or h) rows made by amx_pack_rows, 32 rows per tile product. */
static void amx_rows(const moe_job_t *jb, int64_t s, int64_t j, const char *panel, int64_t r0, int64_t m, int down) {
    const int64_t H = jb->H, I = jb->I, K = down ? I : H;
    const char *w = down ? jb->dn + (s * (H / 16) + 2 * j) * (I * 32) : jb->gu + (s * (2 * I / 16) + 2 * j) * (H * 32);
    float c[32 * 32];
    for (int64_t c0 = 0; c0 < m; c0 += 32) {
        const int64_t n = m - c0 < 32 ? m - c0 : 32;
        (n > 16 ? amx_tile2 : amx_tile1)(panel + amx_row(c0, K), K, w, c);
        if (down) down_store(jb, c, n, r0 + c0, j);
        else gate_up_store(jb, c, n, r0 + c0, j);
    }
}

/* The panel of slot s's x rows r0 .. r0 + m (gate/up inputs) or, with h_rows, of its h rows. */
static void amx_pack_rows(const moe_job_t *jb, int64_t r0, int64_t m, int h_rows, char *panel) {
    const char *rows[RB_AMX];
    for (int64_t i = 0; i < m; i++)
        rows[i] = h_rows ? jb->h + (r0 + i) * jb->I * 2 : jb->x + (jb->src ? jb->src[r0 + i] : r0 + i) * jb->H * 2;
    amx_pack(rows, m, h_rows ? jb->I : jb->H, panel);
}

/* block_item on the tile unit: both matmuls for rows r0 .. r1 (at most RB_AMX) of slot s. */
static void amx_block_item(const moe_job_t *jb, int64_t s, int64_t r0, int64_t r1, char *panel) {
    amx_pack_rows(jb, r0, r1 - r0, 0, panel);
    for (int64_t j = 0; j < jb->I / 16; j++) amx_rows(jb, s, j, panel, r0, r1 - r0, 0);
    amx_pack_rows(jb, r0, r1 - r0, 1, panel);
    for (int64_t j = 0; j < jb->H / 32; j++) amx_rows(jb, s, j, panel, r0, r1 - r0, 1);
}
#endif

/* Both matmuls for rows r0 .. r1 (at most RB) of slot s, from packed panels: the block's inputs are
 * packed once and reused across all 2I/32 gate/up tiles, then its h rows (computed here, so no
 * barrier) are packed and reused across all H/32 down tiles. `panel`: RB * max(H, I) elements. */
static void block_item(const moe_job_t *jb, int64_t s, int64_t r0, int64_t r1, int32_t *panel) {
    const int64_t H = jb->H, I = jb->I, esz = jb->esz, xsz = jb->xsz, m = r1 - r0;
    const ukp_fn *uk = UKP[jb->bf16];
    const char *rows[RB];
    float c[MR * 32];
    for (int64_t i = 0; i < m; i++) rows[i] = jb->x + (jb->src ? jb->src[r0 + i] : r0 + i) * H * xsz;
    int64_t units = xsz == 2 ? H / 2 : H; /* 4-byte units: bf16 pairs or float32 values */
    pack_rows(rows, m, units, panel);
    for (int64_t j = 0; j < I / 16; j++) {
        const char *w0 = jb->gu + (s * (2 * I / 16) + 2 * j) * (H * 16 * esz), *w1 = w0 + 64;
        for (int64_t c0 = 0; c0 < m; c0 += MR) {
            const int n = (int)(m - c0 < MR ? m - c0 : MR);
            uk[n]((const char *)(panel + (c0 / MR) * units * MR), w0, w1, units, c);
            gate_up_store(jb, c, n, r0 + c0, j);
        }
    }
    for (int64_t i = 0; i < m; i++) rows[i] = jb->h + (r0 + i) * I * xsz;
    units = xsz == 2 ? I / 2 : I;
    pack_rows(rows, m, units, panel);
    for (int64_t j = 0; j < H / 32; j++) {
        const char *w0 = jb->dn + (s * (H / 16) + 2 * j) * (I * 16 * esz), *w1 = w0 + 64;
        for (int64_t c0 = 0; c0 < m; c0 += MR) {
            const int n = (int)(m - c0 < MR ? m - c0 : MR);
            uk[n]((const char *)(panel + (c0 / MR) * units * MR), w0, w1, units, c);
            down_store(jb, c, n, r0 + c0, j);
        }
    }
}

/* Cost of each tile item of slot s: its rows plus a weight-streaming share; 0 when the slot has no rows
 * or went by row block (skip_from rows or more). */
static inline int64_t item_cost(const int64_t *off, int64_t s, int64_t skip_from) {
    const int64_t n = off[s + 1] - off[s];
    return n > 0 && n < skip_from ? n + 8 : 0;
}

/* The first item with work whose cost-so-far (the costs of the items before it) is at least `want`;
 * S * tiles when none is. O(S). */
static int64_t item_at(const int64_t *off, int64_t S, int64_t tiles, int64_t skip_from, int64_t want) {
    int64_t acc = 0;
    for (int64_t s = 0; s < S; s++) {
        const int64_t c = item_cost(off, s, skip_from);
        if (c == 0) continue;
        const int64_t j = want <= acc ? 0 : (want - acc + c - 1) / c;
        if (j < tiles) return s * tiles + j;
        acc += c * tiles;
    }
    return S * tiles;
}

/* This thread's share [*lo, *hi) of the tile items it = s * tiles + j of slots not cut into row blocks,
 * as one contiguous range: consecutive items read consecutive packed weights, so each thread's
 * weights arrive as one long stream (the hardware prefetcher and the micro-kernel's prefetches run
 * ahead across item boundaries), where items handed out one at a time interleave two threads' reads
 * and start every item cold. Ranges are balanced by rows (plus a per-item weight-streaming cost). */
static void tile_span(const int64_t *off, int64_t S, int64_t tiles, int64_t skip_from, int nth, int tid,
                      int64_t *lo, int64_t *hi) {
    int64_t total = 0;
    for (int64_t s = 0; s < S; s++) total += item_cost(off, s, skip_from) * tiles;
    *lo = item_at(off, S, tiles, skip_from, total * tid / nth);
    *hi = tid + 1 == nth ? S * tiles : item_at(off, S, tiles, skip_from, total * (tid + 1) / nth);
}

/* One phase of the tile items, this thread's range of them: gate/up (tiles = I/16) or down (tiles =
 * H/32) of every slot not cut into row blocks. On the tile unit the panel holds the rows of the slot
 * being worked on, packed when the slot changes. */
static void tile_phase(const moe_job_t *jb, int down, int64_t tiles, int64_t skip_from, int nth, int tid,
                       char *panel) {
    const int64_t *off = jb->offsets;
    int64_t lo, hi;
#ifdef MESH_AMX
    int64_t packed = -1;
#endif
    tile_span(off, jb->S, tiles, skip_from, nth, tid, &lo, &hi);
    for (int64_t it = lo; it < hi; it++) {
        const int64_t s = it / tiles, j = it % tiles;
        if (!item_cost(off, s, skip_from)) continue;
#ifdef MESH_AMX
        if (jb->amx) {
            const int64_t r0 = off[s], m = off[s + 1] - off[s];
            if (packed != s) amx_pack_rows(jb, r0, m, down, panel), packed = s;
            amx_rows(jb, s, j, panel, r0, m, down);
            continue;
        }
#endif
        (down ? down_item : gate_up_item)(jb, s, j);
    }
    (void)panel;
}

/* Both matmuls over every slot with rows. Called inside a parallel region. A slot with at least RB rows
 * (RB_AMX on the tile unit; prefill) is cut into row blocks, each a work item that runs both matmuls
 * from packed panels (block_item), handed out dynamically. Slots with fewer rows (decode) go by output
 * tile, each thread a contiguous balanced range (tile_span): gate/up tiles, then, after the barrier
 * (down's inputs span all of h), down tiles; their rows are read where they lie. */
static void run_experts(const moe_job_t *jb) {
    const int64_t S = jb->S, t1 = jb->I / 16, t2 = jb->H / 32;
    const int64_t *off = jb->offsets;
    const int64_t rb = jb->amx ? RB_AMX : RB;
    int64_t blocks = 0; /* row-block items, slot by slot */
    if (jb->panels != NULL)
        for (int64_t s = 0; s < S; s++)
            if (off[s + 1] - off[s] >= rb) blocks += (off[s + 1] - off[s] + rb - 1) / rb;
    const int64_t skip_from = blocks ? rb : INT64_MAX; /* slots this big went by row block */
#ifdef _OPENMP
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
#else
    const int tid = 0, nth = 1;
#endif
    int32_t *panel = jb->panels != NULL ? (int32_t *)(jb->panels + tid * jb->panel_bytes) : NULL;
#ifdef MESH_AMX
    if (jb->amx) amx_begin();
#endif
    if (blocks) {
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < blocks; it++) {
            int64_t s = 0, b = it;
            for (;; s++) {
                const int64_t n = off[s + 1] - off[s];
                if (n < rb) continue;
                const int64_t nb = (n + rb - 1) / rb;
                if (b < nb) break;
                b -= nb;
            }
            const int64_t r0 = off[s] + b * rb, r1 = r0 + rb < off[s + 1] ? r0 + rb : off[s + 1];
#ifdef MESH_AMX
            if (jb->amx) {
                amx_block_item(jb, s, r0, r1, (char *)panel);
                continue;
            }
#endif
            block_item(jb, s, r0, r1, panel);
        }
    }
    tile_phase(jb, 0, t1, skip_from, nth, tid, (char *)panel);
#pragma omp barrier
    tile_phase(jb, 1, t2, skip_from, nth, tid, (char *)panel);
#ifdef MESH_AMX
    if (jb->amx) _tile_release();
#endif
#pragma omp barrier /* the caller's combine reads every slot's rows */
}

/* The per-thread panels run_experts needs when some slot has RB rows or more (always on the tile unit:
 * its inputs go through them); NULL when none does (or out of memory: every slot then goes by tile,
 * slower, same results). Free with free(). */
static char *alloc_panels(const int64_t *off, int64_t S, int64_t H, int64_t I, int64_t esz, int nthreads,
                          int64_t *panel_bytes, int amx) {
    int busy = amx;
    const int64_t rb = amx ? RB_AMX : RB;
    for (int64_t s = 0; s < S && !busy; s++) busy = off[s + 1] - off[s] >= rb;
    *panel_bytes = ((int64_t)rb * (H > I ? H : I) * esz + 63) / 64 * 64;
    return busy ? (char *)aligned_alloc(64, (size_t)(*panel_bytes * nthreads)) : NULL;
}

static int supported(int64_t H, int64_t I, int bf16) {
#ifdef MESH_MOE_BF16
    (void)bf16;
#else
    if (bf16) return 0;
#endif
    return H % 32 == 0 && I % 16 == 0;
}

/* Whether this call's bf16 products go to the tile unit: both matmuls' inputs a multiple of 32 wide. */
static int use_amx(int64_t H, int64_t I, int bf16) { return bf16 && H % 32 == 0 && I % 32 == 0 && amx_ready(); }

/* Per-thread buffers kept across calls, grown as needed and freed when their thread exits: the wide
 * mode's float32 copies of x and h (at most the largest step's rows: bounded by the engine's token budget). */
typedef struct {
    void *p[2];
    size_t n[2];
} kept_t;
static pthread_key_t kept_key;
static pthread_once_t kept_once = PTHREAD_ONCE_INIT;
static void kept_free(void *v) {
    kept_t *k = (kept_t *)v;
    free(k->p[0]), free(k->p[1]), free(k);
}
static void make_kept_key(void) { pthread_key_create(&kept_key, kept_free); }

static float *kept_buffer(int which, int64_t floats) {
    pthread_once(&kept_once, make_kept_key);
    kept_t *k = (kept_t *)pthread_getspecific(kept_key);
    if (k == NULL) {
        if ((k = (kept_t *)calloc(1, sizeof *k)) == NULL) return NULL;
        pthread_setspecific(kept_key, k);
    }
    const size_t bytes = ((size_t)(floats > 0 ? floats : 1) * 4 + 63) / 64 * 64;
    if (k->n[which] < bytes) {
        free(k->p[which]);
        k->p[which] = aligned_alloc(64, bytes);
        k->n[which] = k->p[which] != NULL ? bytes : 0;
    }
    return (float *)k->p[which];
}

/* How a call's products run: 0 float32, 1 bf16 on VDPBF16PS or the tile unit, WIDE bf16 widened. */
static int product_mode(int bf16, int amx) { return bf16 && !amx && wide_bf16() ? WIDE : bf16; }

/* rows x n bf16 values -> float32 (exact), the rows shared out over the enclosing parallel region's
 * threads (an orphaned `omp for`, its barrier included). */
static void widen_rows(const uint16_t *src, float *dst, int64_t rows, int64_t n) {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *s = src + r * n;
        float *d = dst + r * n;
#ifdef MESH_MOE_AVX512
        int64_t i = 0;
        for (; i + 16 <= n; i += 16) _mm512_storeu_ps(d + i, load16f((const char *)(s + i), 1));
        for (; i < n; i++) d[i] = bf(s[i]);
#else
        widen_row(s, d, n);
#endif
    }
}
#endif

/* x [N, H] rows sorted by slot, offsets [S + 1] (slot s owns rows offsets[s] .. offsets[s+1]),
 * gu packed [S, 2I/16, ...], dn packed [S, H/16, ...], h [N, I] scratch (unused in the wide bf16 mode), out [N, H].
 * Returns 0, or -1 when this build or these sizes are not supported (the caller runs torch ops):
 * needs AVX-512 (and AVX512-BF16 for bfloat16) or AVX2 + FMA, H a multiple of 32, I a multiple of 16. */
int mesh_moe_experts(const void *x, const int64_t *offsets, const void *gu, const void *dn, void *h, void *out,
                     int64_t S, int64_t H, int64_t I, int bf16, int nthreads) {
#ifdef MESH_MOE_SIMD
    if (!supported(H, I, bf16) || S < 0) return -1;
    for (int64_t s = 0; s < S; s++)
        if (offsets[s + 1] < offsets[s]) return -2;
    if (nthreads < 1) nthreads = 1;
    int64_t panel_bytes;
    const int amx = use_amx(H, I, bf16), mode = product_mode(bf16, amx);
    const int64_t N = offsets[S], esz = bf16 ? 2 : 4, xsz = mode == WIDE ? 4 : esz;
    float *xf = NULL, *hf = NULL;
    if (mode == WIDE && ((xf = kept_buffer(0, N * H)) == NULL || (hf = kept_buffer(1, N * I)) == NULL)) return -4;
    char *panels = alloc_panels(offsets, S, H, I, xsz, nthreads, &panel_bytes, amx);
    const moe_job_t jb = {xf ? (const char *)xf : (const char *)x, (const char *)gu, (const char *)dn,
                          hf ? (char *)hf : (char *)h, (char *)out, offsets, NULL, S, H, I, esz, xsz, mode,
                          panels, panel_bytes, amx && panels};
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        if (xf != NULL) widen_rows((const uint16_t *)x, xf, N, H);
        run_experts(&jb);
    }
    free(panels);
    return 0;
#else
    (void)x; (void)offsets; (void)gu; (void)dn; (void)h; (void)out; (void)S; (void)H; (void)I; (void)bf16;
    (void)nthreads;
    return -1;
#endif
}

/* The whole routed-expert half of a MoE layer for the in-process dispatcher, from the router's
 * choices to the combined output, without gathered copies of the inputs:
 *   hidden [T, H], ids [T, K] int64 (slots), weights [T, K] (float32 when weights_f32, else the model
 *   dtype) -> out [T, H] (model dtype) = sum_k weights[t, k] * expert_{ids[t, k]}(hidden[t]),
 * the sum accumulated in float32 and rounded once (as the torch combine does). The rows each slot
 * computed are added to counts [S] (the caller's load counters). Scratch: h [T*K, I] and y [T*K, H] in the model dtype
 * (h unused in the wide bf16 mode, which keeps float32 copies of x and h per thread instead).
 * Returns 0; -1 unsupported (nothing written); -2 an id outside [0, S); -4 out of memory. */
int mesh_moe_local(const void *hidden, int64_t T, const int64_t *ids, const void *weights, int weights_f32,
                   int64_t K, const void *gu, const void *dn, int64_t S, int64_t H, int64_t I, int bf16,
                   void *h, void *y, void *out, int64_t *counts, int nthreads) {
#ifdef MESH_MOE_SIMD
    if (!supported(H, I, bf16) || S < 1 || K < 1 || K > 64) return -1;
    const int64_t N = T * K, esz = bf16 ? 2 : 4;
    for (int64_t i = 0; i < N; i++)
        if (ids[i] < 0 || ids[i] >= S) return -2;
    int64_t *off = (int64_t *)malloc((size_t)(S + 1) * sizeof(int64_t));
    int64_t *cur = (int64_t *)calloc((size_t)S, sizeof(int64_t));
    int64_t *src = (int64_t *)malloc((size_t)(N > 0 ? N : 1) * sizeof(int64_t));
    int64_t *pos = (int64_t *)malloc((size_t)(N > 0 ? N : 1) * sizeof(int64_t));
    if (!off || !cur || !src || !pos) {
        free(off), free(cur), free(src), free(pos);
        return -4;
    }
    /* a stable counting sort by slot: (token, k) pairs keep their order within a slot */
    for (int64_t i = 0; i < N; i++) cur[ids[i]]++;
    off[0] = 0;
    for (int64_t s = 0; s < S; s++) {
        off[s + 1] = off[s] + cur[s];
        counts[s] += cur[s];
        cur[s] = off[s];
    }
    for (int64_t i = 0; i < N; i++) {
        const int64_t r = cur[ids[i]]++;
        src[r] = i / K;
        pos[i] = r;
    }
    if (nthreads < 1) nthreads = 1;
    int64_t panel_bytes;
    const int amx = use_amx(H, I, bf16), mode = product_mode(bf16, amx);
    const int64_t xsz = mode == WIDE ? 4 : esz;
    float *xf = NULL, *hf = NULL;
    if (mode == WIDE && ((xf = kept_buffer(0, T * H)) == NULL || (hf = kept_buffer(1, N * I)) == NULL)) {
        free(off), free(cur), free(src), free(pos);
        return -4;
    }
    char *panels = alloc_panels(off, S, H, I, xsz, nthreads, &panel_bytes, amx);
    const moe_job_t jb = {xf ? (const char *)xf : (const char *)hidden, (const char *)gu, (const char *)dn,
                          hf ? (char *)hf : (char *)h, (char *)y, off, src, S, H, I, esz, xsz, mode, panels,
                          panel_bytes, amx && panels};
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        if (xf != NULL) widen_rows((const uint16_t *)hidden, xf, T, H);
        run_experts(&jb);
        /* combine: per token, the K weighted expert rows summed in float32, rounded once */
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            float wk[64];
            const char *rows[64];
            for (int64_t k = 0; k < K; k++) {
                const int64_t i = t * K + k;
                if (weights_f32 || !bf16) {
                    wk[k] = ((const float *)weights)[i];
                } else {
                    const uint32_t u = (uint32_t)((const uint16_t *)weights)[i] << 16;
                    memcpy(&wk[k], &u, 4);
                }
                rows[k] = (const char *)y + pos[i] * H * esz;
            }
            char *o = (char *)out + t * H * esz;
#ifdef MESH_MOE_AVX512
            for (int64_t d = 0; d < H; d += 16) {
                __m512 a = _mm512_setzero_ps();
                for (int64_t k = 0; k < K; k++) {
                    a = _mm512_fmadd_ps(_mm512_set1_ps(wk[k]), load16f(rows[k] + d * esz, bf16), a);
                }
                store16(o + d * esz, a, bf16);
            }
#else
            combine_row(o, rows, wk, K, H, esz, bf16);
#endif
        }
    }
    free(off), free(cur), free(src), free(pos), free(panels);
    return 0;
#else
    (void)hidden; (void)T; (void)ids; (void)weights; (void)weights_f32; (void)K; (void)gu; (void)dn; (void)S;
    (void)H; (void)I; (void)bf16; (void)h; (void)y; (void)out; (void)counts; (void)nthreads;
    return -1;
#endif
}

#ifdef MESH_MOE_SIMD
/* Item `it` of a linear layer's (32-column tile, row chunk) items in blocked order: blocks of up to tg
 * tiles x rc chunks (the last ones smaller), blocks tile-major, items tile-major inside a block, so a
 * block's weights and inputs stay in L2 while it runs. -> its tile *j and chunk *ch. */
static inline void blocked_item(int64_t it, int64_t tiles, int64_t chunks, int64_t tg, int64_t rc, int64_t *j,
                                int64_t *ch) {
    const int64_t t0 = it / (tg * chunks) * tg, nt = tiles - t0 < tg ? tiles - t0 : tg;
    int64_t rem = it - t0 * chunks;
    const int64_t c0 = rem / (nt * rc) * rc, nc = chunks - c0 < rc ? chunks - c0 : rc;
    rem -= c0 * nt;
    *j = t0 + rem / nc;
    *ch = c0 + rem % nc;
}

#ifdef MESH_MOE_AVX512 /* (the AVX2 build's is moe_avx2.h's) */
/* Rows r .. r + m of a linear layer's output tile j (columns 32j .. 32j + 31) from float32 sums c
 * (row i at c + 32 i): bias added in float32, rounded once. */
static void linear_store(const float *c, int m, int64_t r, int64_t j, const void *bias, void *out, int64_t N,
                         int bf16, int out_f32) {
    const int64_t esz = bf16 ? 2 : 4;
    const int second = 32 * j + 16 < N; /* the last tile pair may end in padding rows */
    __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
    if (bias != NULL) {
        const char *bp = (const char *)bias + 32 * j * esz;
        b0 = load16f(bp, bf16);
        if (second) b1 = load16f(bp + 16 * esz, bf16);
    }
    for (int i = 0; i < m; i++) {
        const __m512 y0 = _mm512_add_ps(_mm512_loadu_ps(c + i * 32), b0);
        const __m512 y1 = _mm512_add_ps(_mm512_loadu_ps(c + i * 32 + 16), b1);
        if (out_f32) { /* float32 holding the dtype's values: what .float() of the rounded output gives */
            float *o = (float *)out + (r + i) * N + 32 * j;
            _mm512_storeu_ps(o, bf16 ? round_bf16(y0) : y0);
            if (second) _mm512_storeu_ps(o + 16, bf16 ? round_bf16(y1) : y1);
            continue;
        }
        char *o = (char *)out + ((r + i) * N + 32 * j) * esz;
        store16(o, y0, bf16);
        if (second) store16(o + 16 * esz, y1, bf16);
    }
}
#endif
#endif

/* A linear layer y = x @ W^T (+ bias) with W packed like one expert's matrix ([Np/16, K, 16] float32
 * or [Np/16, K/2, 16, 2] bf16, Np = N rounded up to 32 with zero rows): x [M, K] contiguous, bias [N]
 * or NULL -> out [M, N], the bias added in float32 and the result rounded once to the dtype, as
 * torch's addmm does (out_f32: stored as float32 after that rounding, what .float() of the output holds).
 * Items are (32-column tile, row chunk), tile-major so a tile's weights stay in cache while
 * the row chunks pass, within row blocks of ~256 KiB of x that stay in L2 while every tile passes
 * (fp32 1700 x 512 -> 768: 291 -> 339 GFLOP/s against rows streamed from L3 for each tile); each
 * thread takes one contiguous range of them, so its weights come as one stream (b64 lm_head
 * 8192 x 512: 0.65 -> 0.56 ms against items handed out four at a time). Row chunks
 * are 32 rows on the tile unit (bf16, K a multiple of 32, AMX granted: x first copied, in parallel, to
 * a tile-order panel padded with zero rows to a multiple of 16), else balanced chunks of at most MR.
 * Returns 0, or -1 when unsupported (N a multiple of 16 and K even needed), -4 out of memory. */
int mesh_linear(const void *x, const void *w, const void *bias, void *out, int64_t M, int64_t K, int64_t N, int bf16,
                int nthreads, int out_f32) {
#ifdef MESH_MOE_SIMD
#ifndef MESH_MOE_BF16
    if (bf16) return -1;
#endif
    if (N % 16 || K % 2 || M < 0) return -1;
    const int64_t esz = bf16 ? 2 : 4, tile = K * 16 * esz, tiles = (N + 31) / 32;
    if (nthreads < 1) nthreads = 1;
#ifdef MESH_AMX
    if (bf16 && K % 32 == 0 && amx_ready()) {
        const int64_t blocks = (M + 15) / 16, chunks = (M + 31) / 32;
        char *panel = (char *)aligned_alloc(64, (size_t)(blocks * 16 * K * 2 + 64));
        if (panel == NULL) return -4;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && tiles * chunks > 1)
        {
#pragma omp for schedule(static)
            for (int64_t b = 0; b < blocks; b++) {
                const char *rows[16];
                const int64_t m = M - 16 * b < 16 ? M - 16 * b : 16;
                for (int64_t i = 0; i < m; i++) rows[i] = (const char *)x + (16 * b + i) * K * 2;
                amx_pack(rows, m, K, panel + b * 16 * K * 2);
            }
            amx_begin();
            float c[32 * 32];
#ifdef _OPENMP
            const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
#else
            const int tid = 0, nth = 1;
#endif
            /* items (tile j, 32-row chunk) in L2-sized blocks of up to tg tiles x tg chunks (~512 KiB of
             * weights and of inputs each); each thread one contiguous range of that order. Without the
             * blocks every tile would stream all of x again: at 2048 x 2048 -> 5120, 743 GFLOP/s
             * against oneDNN's 1910. */
            const int64_t tg = 8192 / K > 1 ? 8192 / K : 1, total = tiles * chunks;
            for (int64_t it = total * tid / nth; it < total * (tid + 1) / nth; it++) {
                int64_t j, ch;
                blocked_item(it, tiles, chunks, tg, tg, &j, &ch);
                const int64_t r = ch * 32;
                const int m = (int)(M - r < 32 ? M - r : 32);
                (m > 16 ? amx_tile2 : amx_tile1)(panel + amx_row(r, K), K, (const char *)w + 2 * j * tile, c);
                linear_store(c, m, r, j, bias, out, N, bf16, out_f32);
            }
            _tile_release();
        }
        free(panel);
        return 0;
    }
#endif
    const int mode = product_mode(bf16, 0), wide = mode == WIDE;
    const int64_t chunks = (M + MR - 1) / MR, step = chunk_rows(M), xsz = wide ? 4 : esz;
    const int64_t bc = (256 << 10) / (K * xsz * step) > 1 ? (256 << 10) / (K * xsz * step) : 1;
    const uk_fn *uk = UK[mode];
    float *xf = wide ? kept_buffer(0, M * K) : NULL; /* the wide mode's float32 copy of x */
    if (wide && xf == NULL) return -4;
    const char *xs = wide ? (const char *)xf : (const char *)x;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && tiles * chunks > 1)
    {
        if (wide) widen_rows((const uint16_t *)x, xf, M, K);
#pragma omp for schedule(static)
        for (int64_t it = 0; it < tiles * chunks; it++) {
            int64_t j, ch;
            blocked_item(it, tiles, chunks, tiles, bc, &j, &ch); /* row blocks of ~256 KiB of x, every tile */
            const int64_t r = ch * step;
            const int m = (int)(M - r < step ? M - r : step);
            const char *xr[MR];
            for (int i = 0; i < m; i++) xr[i] = xs + (r + i) * K * xsz;
            float c[MR * 32];
            const char *w0 = (const char *)w + 2 * j * tile;
            uk[m](xr, w0, w0 + 64, K, c);
            linear_store(c, m, r, j, bias, out, N, bf16, out_f32);
        }
    }
    return 0;
#else
    (void)x; (void)w; (void)bias; (void)out; (void)M; (void)K; (void)N; (void)bf16; (void)nthreads; (void)out_f32;
    return -1;
#endif
}

/* The router's weights for experts already chosen: logits [T, E] (float32, or bf16 when logits_bf16)
 * and ids [T, K] (torch.topk over the logits: the softmax is monotonic, so these are the K most
 * probable, ties ordered as torch orders them) -> weights [T, K] = the softmax probabilities of those
 * experts (exponentials of x - max times the reciprocal of their sum, in float32, as torch's softmax),
 * divided by their sum when `normalize`, stored as float32 or rounded to bf16 (weights_bf16).
 * Returns 0, or -2 for an id outside [0, E). Portable C. */
int mesh_route_weights(const void *logits, int logits_bf16, int64_t T, int64_t E, const int64_t *ids, int64_t K,
                       int normalize, void *weights, int weights_bf16) {
    if (K < 1 || K > 64) return -1;
    for (int64_t i = 0; i < T * K; i++)
        if (ids[i] < 0 || ids[i] >= E) return -2;
    for (int64_t t = 0; t < T; t++) {
        const uint16_t *xb = (const uint16_t *)logits + t * E;
        const float *xf = (const float *)logits + t * E;
        float m = -INFINITY, sum = 0.f, p[64], s = 0.f;
        for (int64_t e = 0; e < E; e++) {
            const float v = logits_bf16 ? bf(xb[e]) : xf[e];
            m = v > m ? v : m;
        }
#ifdef MESH_MOE_AVX512
        if (E % 16 == 0) { /* the denominator 16 experts at a time */
            __m512 acc = _mm512_setzero_ps();
            for (int64_t e = 0; e < E; e += 16)
                acc = _mm512_add_ps(acc, exp_nonpos16(_mm512_sub_ps(load16f((const char *)logits + (t * E + e) * (logits_bf16 ? 2 : 4), logits_bf16),
                                                                   _mm512_set1_ps(m))));
            sum = _mm512_reduce_add_ps(acc);
        } else
#elif defined(MESH_MOE_AVX2)
        if (E % 16 == 0) { /* the same 16 lanes as two halves */
            __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
            for (int64_t e = 0; e < E; e += 8)
                acc[(e / 8) % 2] = _mm256_add_ps(acc[(e / 8) % 2], exp_nonpos8(_mm256_sub_ps(
                    load8f((const char *)logits + (t * E + e) * (logits_bf16 ? 2 : 4), logits_bf16), _mm256_set1_ps(m))));
            const __m256 a = _mm256_add_ps(acc[0], acc[1]);
            const __m128 q = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
            const __m128 d = _mm_add_ps(q, _mm_movehl_ps(q, q));
            sum = _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)));
        } else
#endif
            for (int64_t e = 0; e < E; e++) sum += expf((logits_bf16 ? bf(xb[e]) : xf[e]) - m);
        const float inv = 1.f / sum;
        for (int64_t j = 0; j < K; j++) {
            const int64_t e = ids[t * K + j];
            s += p[j] = expf((logits_bf16 ? bf(xb[e]) : xf[e]) - m) * inv;
        }
        for (int64_t j = 0; j < K; j++) {
            const float w = normalize ? p[j] / s : p[j];
            if (weights_bf16) ((uint16_t *)weights)[t * K + j] = to_bf(w);
            else ((float *)weights)[t * K + j] = w;
        }
    }
    return 0;
}
