/* Float32 matmul Y = X W^T (+ b) on x86 CPUs with AVX-512 or AVX2, for the weights of a CPU stage (cpu_matmul.py).

   W [N, K] is packed once into panels of 16 output columns, [ceil(N/16)][K][16] (zero columns past N). Every output
   element is one chain of fused multiply-adds over k = 0 .. K-1 in order, starting from 0, then + b. The blocking
   below only changes which elements are computed together, never the order within one: a row's result does not
   depend on the other rows, on how many there are, on the number of threads, or on the CPU's vector width. */
#include <stdint.h>
#include <stdlib.h>

#include "vec16.h"

#define FEW_ROWS 2
#define MANY_ROWS 64
#define GROUP 6 /* panels per thread's share at up to MANY_ROWS rows */
#define MIN(a, b) ((a) < (b) ? (a) : (b))
/* Tiles in registers: up to FEW_ROWS rows, all of them x WIDE_PANELS(rows) panels; up to MANY_ROWS, MID_ROWS rows at a
   time; beyond, TALL_ROWS x TALL_PANELS. AVX2 has half the registers, of half the width (its shapes and K_BLOCK: the
   fastest on the demo's matmuls, AVX2 run on an AVX-512 CPU). */
#if VEC16_REGISTERS == 32
#define K_BLOCK 48 /* middle row counts: a block of k over a group's panels stays in L1 while every row passes */
#define WIDE_PANELS(rows) 6
#define MID_ROWS 4
#define TALL_ROWS 8
#define TALL_PANELS 3
#else
#define K_BLOCK 64
#define WIDE_PANELS(rows) ((rows) == 1 ? 6 : (rows) == 2 ? 3 : 2)
#define MID_ROWS 3
#define TALL_ROWS 6
#define TALL_PANELS 1
#endif

/* Rows [0, MR) x panels [0, NV) over k in [k0, k1): accumulators start at 0 when k0 == 0, else from Y (a stored and
   reloaded float is the same float, so splitting k into blocks keeps the order). X is row-major (ldx), or, when
   ROWS_PACKED, k-major in groups of TALL_ROWS rows. The last panel stores `last_cols` columns. Panel v's next block
   of k is prefetched into L2 where bit v of `prefetch` is set. */
static inline __attribute__((always_inline)) void tile(const int MR, const int NV, const int ROWS_PACKED,
        const float *X, int64_t ldx, const float *P, int64_t K, int64_t k0, int64_t k1, float *Y, int64_t ldy,
        int last_cols, const float *bias, unsigned prefetch) {
    v16 acc[8][6];
    for (int m = 0; m < MR; m++)
        for (int v = 0; v < NV; v++)
            acc[m][v] = k0 == 0 ? v_zero() : v_load_n(Y + m * ldy + v * 16, v == NV - 1 ? last_cols : 16);
    for (int64_t k = k0; k < k1; k++) {
        v16 w[6];
        if (prefetch && k + K_BLOCK < K)
            for (int v = 0; v < NV; v++)
                if (prefetch >> v & 1) _mm_prefetch((const char *)(P + v * K * 16 + (k + K_BLOCK) * 16), _MM_HINT_T1);
        for (int v = 0; v < NV; v++) w[v] = v_load(P + v * K * 16 + k * 16);
        for (int m = 0; m < MR; m++) {
            v16 x = v_set1(ROWS_PACKED ? X[k * TALL_ROWS + m] : X[m * ldx + k]);
            for (int v = 0; v < NV; v++) acc[m][v] = v_fma(x, w[v], acc[m][v]);
        }
    }
    for (int m = 0; m < MR; m++)
        for (int v = 0; v < NV; v++) {
            int cols = v == NV - 1 ? last_cols : 16;
            v16 y = acc[m][v];
            if (bias && k1 == K) y = v_add(y, v_load_n(bias + v * 16, cols));
            v_store_n(Y + m * ldy + v * 16, y, cols);
        }
}

#define TILE(MR, NV, PACKED) tile(MR, NV, PACKED, X, ldx, P, K, k0, k1, Y, ldy, last_cols, bias, prefetch)
#define WIDE(MR) case MR: switch (nv) { \
    case 1: TILE(MR, 1, 0); break; case 2: TILE(MR, MIN(2, WIDE_PANELS(MR)), 0); break; \
    case 3: TILE(MR, MIN(3, WIDE_PANELS(MR)), 0); break; case 4: TILE(MR, MIN(4, WIDE_PANELS(MR)), 0); break; \
    case 5: TILE(MR, MIN(5, WIDE_PANELS(MR)), 0); break; default: TILE(MR, MIN(6, WIDE_PANELS(MR)), 0); } break;
#define TALL(MR) case MR: switch (nv) { \
    case 1: TILE(MR, 1, 1); break; case 2: TILE(MR, MIN(2, TALL_PANELS), 1); break; \
    default: TILE(MR, MIN(3, TALL_PANELS), 1); } break;

/* Rows [0, mr) x a group's group_nv panels, WIDE_PANELS(mr) at a time (`prefetch`: a bit per panel of the group). */
static void wide_tile(int mr, int group_nv, const float *X, int64_t ldx, const float *P0, int64_t K, int64_t k0,
                      int64_t k1, float *Y0, int64_t ldy, int group_last_cols, const float *b0, unsigned prefetch) {
    for (int v0 = 0; v0 < group_nv; v0 += WIDE_PANELS(mr)) {
        const int nv = MIN(group_nv - v0, WIDE_PANELS(mr));
        const int last_cols = v0 + nv == group_nv ? group_last_cols : 16;
        const float *P = P0 + v0 * K * 16, *bias = b0 ? b0 + v0 * 16 : 0;
        float *Y = Y0 + v0 * 16;
        switch (mr) { WIDE(1) WIDE(2) WIDE(3) WIDE(4) }
        prefetch >>= nv;
    }
}

static void tall_tile(int mr, int nv, const float *X, const float *P, int64_t K, float *Y, int64_t ldy, int last_cols,
                      const float *bias) {
    const int64_t ldx = 0, k0 = 0, k1 = K;
    const unsigned prefetch = 0;
    switch (mr) { TALL(1) TALL(2) TALL(3) TALL(4) TALL(5) TALL(6) TALL(7) TALL(8) }  /* up to TALL_ROWS */
}

/* Y [M, N] (row stride N) = X [M, K] (row stride ldx) W^T (+ b), W packed as above. Returns 0, or 1 without memory. */
int cpu_matmul(const float *X, int64_t ldx, const float *P, const float *bias, float *Y, int64_t M, int64_t N,
               int64_t K, int threads) {
    const int64_t panels = (N + 15) / 16;
    if (M <= MANY_ROWS) {  /* per thread, whole groups of GROUP panels */
        const int64_t groups = (panels + GROUP - 1) / GROUP;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
        for (int64_t g = 0; g < groups; g++) {
            const int nv = (int)MIN(panels - g * GROUP, GROUP);
            const int last_cols = (int)(N - (g * GROUP + nv - 1) * 16);
            const float *P0 = P + g * GROUP * K * 16, *b0 = bias ? bias + g * GROUP * 16 : 0;
            float *Y0 = Y + g * GROUP * 16;
            if (M <= FEW_ROWS) {  /* the weights stream from memory once, in one pass over k */
                wide_tile((int)M, nv, X, ldx, P0, K, 0, K, Y0, N, last_cols, b0, 0);
                continue;
            }
            /* Each block of k is read once, reused by every row. Meanwhile the next block comes into L2, each row tile
               fetching a share of its panels (tile t: panels t, t + tiles, ...), so the weights stream from memory
               while the FMAs run rather than after them (the demo's matmuls at 4-32 rows: 7-17% faster than the first
               row tile fetching the whole next block into L1, with blocks of 128). */
            const int64_t tiles = (M + MID_ROWS - 1) / MID_ROWS;
            for (int64_t k0 = 0; k0 < K; k0 += K_BLOCK) {
                const int64_t k1 = MIN(k0 + K_BLOCK, K);
                for (int64_t m0 = 0, t = 0; m0 < M; m0 += MID_ROWS, t++) {
                    unsigned prefetch = 0;
                    for (int64_t v = t; v < nv; v += tiles) prefetch |= 1u << v;
                    wide_tile((int)MIN(M - m0, MID_ROWS), nv, X + m0 * ldx, ldx, P0, K, k0, k1, Y0 + m0 * N, N,
                              last_cols, b0, prefetch);
                }
            }
        }
        return 0;
    }
    /* Many rows: tiles of TALL_ROWS rows x TALL_PANELS panels over the whole of k (no partial sums through memory),
       the rows laid out k-major in groups of TALL_ROWS (one stream of broadcasts), taken in chunks that stay in L2
       while every panel passes. */
    const int64_t chunk = (MANY_ROWS > (1 << 18) / K ? MANY_ROWS : (1 << 18) / K) / TALL_ROWS * TALL_ROWS;
    float *rows = aligned_alloc(64, (size_t)((chunk * K * 4 + 63) / 64 * 64));
    if (!rows) return 1;
    const int64_t groups = (panels + TALL_PANELS - 1) / TALL_PANELS;
    for (int64_t c0 = 0; c0 < M; c0 += chunk) {
        const int64_t c1 = MIN(c0 + chunk, M);
        for (int64_t m = c0; m < c1; m++)
            for (int64_t k = 0; k < K; k++)
                rows[((m - c0) / TALL_ROWS) * TALL_ROWS * K + k * TALL_ROWS + (m - c0) % TALL_ROWS] = X[m * ldx + k];
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
        for (int64_t g = 0; g < groups; g++) {
            const int nv = (int)MIN(panels - g * TALL_PANELS, TALL_PANELS);
            const int last_cols = (int)(N - (g * TALL_PANELS + nv - 1) * 16);
            for (int64_t m0 = c0; m0 < c1; m0 += TALL_ROWS)
                tall_tile((int)MIN(c1 - m0, TALL_ROWS), nv, rows + (m0 - c0) * K,
                          P + g * TALL_PANELS * K * 16, K, Y + m0 * N + g * TALL_PANELS * 16, N, last_cols,
                          bias ? bias + g * TALL_PANELS * 16 : 0);
        }
    }
    free(rows);
    return 0;
}
