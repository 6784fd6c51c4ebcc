/* Float32 matmul Y = X W^T (+ b) on x86 CPUs with AVX-512, for the weights of a CPU stage (cpu_matmul.py).

   W [N, K] is packed once into panels of 16 output columns, [ceil(N/16)][K][16] (zero columns past N). Every output
   element is one chain of fused multiply-adds over k = 0 .. K-1 in order, starting from 0, then + b. The blocking
   below only changes which elements are computed together, never the order within one: a row's result does not
   depend on the other rows, on how many there are, or on the number of threads. */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#define K_BLOCK 128 /* middle row counts: a block of k over 6 panels (48 KiB) stays in L1 while every row passes */
#define FEW_ROWS 4
#define MANY_ROWS 64

static inline __mmask16 tail_mask(int left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1); }

/* Rows [0, MR) x panels [0, NV) over k in [k0, k1): accumulators start at 0 when k0 == 0, else from Y (a stored and
   reloaded float is the same float, so splitting k into blocks keeps the order). X is row-major (ldx), or, when
   ROWS_PACKED, k-major in groups of 8 rows. The last panel stores `last_cols` columns. */
static inline __attribute__((always_inline)) void tile(const int MR, const int NV, const int ROWS_PACKED,
        const float *X, int64_t ldx, const float *P, int64_t K, int64_t k0, int64_t k1, float *Y, int64_t ldy,
        int last_cols, const float *bias, int prefetch) {
    __m512 acc[8][6];
    for (int m = 0; m < MR; m++)
        for (int v = 0; v < NV; v++) {
            __mmask16 mask = v == NV - 1 ? tail_mask(last_cols) : 0xFFFF;
            acc[m][v] = k0 == 0 ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mask, Y + m * ldy + v * 16);
        }
    for (int64_t k = k0; k < k1; k++) {
        __m512 w[6];
        if (prefetch && k + K_BLOCK < K)  /* the next block of k, while the other rows reuse this one */
            for (int v = 0; v < NV; v++) _mm_prefetch((const char *)(P + v * K * 16 + (k + K_BLOCK) * 16), _MM_HINT_T0);
        for (int v = 0; v < NV; v++) w[v] = _mm512_loadu_ps(P + v * K * 16 + k * 16);  /* 64-byte aligned from torch */
        for (int m = 0; m < MR; m++) {
            __m512 x = _mm512_set1_ps(ROWS_PACKED ? X[k * 8 + m] : X[m * ldx + k]);
            for (int v = 0; v < NV; v++) acc[m][v] = _mm512_fmadd_ps(x, w[v], acc[m][v]);
        }
    }
    for (int m = 0; m < MR; m++)
        for (int v = 0; v < NV; v++) {
            __mmask16 mask = v == NV - 1 ? tail_mask(last_cols) : 0xFFFF;
            __m512 y = acc[m][v];
            if (bias && k1 == K) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, bias + v * 16));
            _mm512_mask_storeu_ps(Y + m * ldy + v * 16, mask, y);
        }
}

#define TILE(MR, NV, PACKED) tile(MR, NV, PACKED, X, ldx, P, K, k0, k1, Y, ldy, last_cols, bias, prefetch)
#define WIDE(MR) case MR: switch (nv) { case 1: TILE(MR, 1, 0); break; case 2: TILE(MR, 2, 0); break; \
    case 3: TILE(MR, 3, 0); break; case 4: TILE(MR, 4, 0); break; case 5: TILE(MR, 5, 0); break; \
    default: TILE(MR, 6, 0); } break;
#define TALL(MR) case MR: switch (nv) { case 1: TILE(MR, 1, 1); break; case 2: TILE(MR, 2, 1); break; \
    default: TILE(MR, 3, 1); } break;

static void wide_tile(int mr, int nv, const float *X, int64_t ldx, const float *P, int64_t K, int64_t k0, int64_t k1,
                      float *Y, int64_t ldy, int last_cols, const float *bias, int prefetch) {
    switch (mr) { WIDE(1) WIDE(2) WIDE(3) WIDE(4) }
}

static void tall_tile(int mr, int nv, const float *X, const float *P, int64_t K, float *Y, int64_t ldy, int last_cols,
                      const float *bias) {
    const int64_t ldx = 0, k0 = 0, k1 = K;
    const int prefetch = 0;
    switch (mr) { TALL(1) TALL(2) TALL(3) TALL(4) TALL(5) TALL(6) TALL(7) TALL(8) }
}

/* Y [M, N] (row stride N) = X [M, K] (row stride ldx) W^T (+ b), W packed as above. Returns 0, or 1 without memory. */
int cpu_matmul(const float *X, int64_t ldx, const float *P, const float *bias, float *Y, int64_t M, int64_t N,
               int64_t K, int threads) {
    const int64_t panels = (N + 15) / 16;
    if (M <= MANY_ROWS) {  /* per thread, whole groups of 6 panels */
        const int64_t groups = (panels + 5) / 6;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
        for (int64_t g = 0; g < groups; g++) {
            const int nv = (int)(panels - g * 6 < 6 ? panels - g * 6 : 6);
            const int last_cols = (int)(N - (g * 6 + nv - 1) * 16);
            const float *P0 = P + g * 6 * K * 16, *b0 = bias ? bias + g * 6 * 16 : 0;
            float *Y0 = Y + g * 6 * 16;
            if (M <= FEW_ROWS) {  /* the weights stream from memory once, in one pass over k */
                wide_tile((int)M, nv, X, ldx, P0, K, 0, K, Y0, N, last_cols, b0, 0);
                continue;
            }
            for (int64_t k0 = 0; k0 < K; k0 += K_BLOCK) {  /* each block of k is read once, reused by every row */
                const int64_t k1 = k0 + K_BLOCK < K ? k0 + K_BLOCK : K;
                for (int64_t m0 = 0; m0 < M; m0 += 4)
                    wide_tile((int)(M - m0 < 4 ? M - m0 : 4), nv, X + m0 * ldx, ldx, P0, K, k0, k1, Y0 + m0 * N, N,
                              last_cols, b0, m0 == 0);
            }
        }
        return 0;
    }
    /* Many rows: tiles of 8 rows x 3 panels over the whole of k (no partial sums through memory), the rows laid out
       k-major in groups of 8 (one stream of broadcasts), taken in chunks that stay in L2 while every panel passes. */
    const int64_t chunk = (MANY_ROWS > (1 << 18) / K ? MANY_ROWS : (1 << 18) / K) / 8 * 8;
    float *rows = aligned_alloc(64, (size_t)((chunk * K * 4 + 63) / 64 * 64));
    if (!rows) return 1;
    const int64_t groups = (panels + 2) / 3;
    for (int64_t c0 = 0; c0 < M; c0 += chunk) {
        const int64_t c1 = c0 + chunk < M ? c0 + chunk : M;
        for (int64_t m = c0; m < c1; m++)
            for (int64_t k = 0; k < K; k++) rows[((m - c0) / 8) * 8 * K + k * 8 + (m - c0) % 8] = X[m * ldx + k];
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
        for (int64_t g = 0; g < groups; g++) {
            const int nv = (int)(panels - g * 3 < 3 ? panels - g * 3 : 3);
            const int last_cols = (int)(N - (g * 3 + nv - 1) * 16);
            for (int64_t m0 = c0; m0 < c1; m0 += 8)
                tall_tile((int)(c1 - m0 < 8 ? c1 - m0 : 8), nv, rows + (m0 - c0) * K, P + g * 3 * K * 16, K,
                          Y + m0 * N + g * 3 * 16, N, last_cols, bias ? bias + g * 3 * 16 : 0);
        }
    }
    free(rows);
    return 0;
}
