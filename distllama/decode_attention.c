/* Decode attention on x86 CPUs with AVX-512 or AVX2: each row's query heads against its own cached keys only.

   For every (row, kv head) block: scores = q K^T * scale over the row's `length` keys, softmax, then scores V. A block
   reads each key and value once for all the query heads of its kv head (GQA), and prefetches the next block's keys
   and values while it computes, so that reading the cache overlaps the arithmetic (SDPA's CPU kernel read it at
   about half the memory bandwidth here). Every block is computed on its own, in one fixed order: a row's result does
   not depend on the other rows, on how many there are, on the number of threads, or on the CPU's vector width. */
#include <stdint.h>
#include <stdlib.h>

#include "vec16.h"

#define MAX_GROUP 64
/* The output tile in registers: OUT_ROWS query heads x OUT_CHUNKS chunks of 16 columns */
#if VEC16_REGISTERS == 32
#define OUT_ROWS 4
#define OUT_CHUNKS 4
#else  /* AVX2: the fastest of 4 x 1, 3 x 2, 2 x 2, 2 x 3, 1 x 3 and 1 x 4 on the demo's shapes */
#define OUT_ROWS 4
#define OUT_CHUNKS 1
#endif

/* e^x for x <= 0, 16 lanes: Cephes' expf (range reduction by ln 2, degree-5 polynomial), within 2 ulp. */
static inline v16 exp_nonpositive(v16 x) {
    x = v_max(x, v_set1(-87.0f));
    v16 n = v_round(v_mul(x, v_set1(1.44269504088896341f)));
    v16 r = v_fnma(n, v_set1(0.693359375f), x);
    r = v_fnma(n, v_set1(-2.12194440e-4f), r);
    v16 p = v_set1(1.9875691500E-4f);
    p = v_fma(p, r, v_set1(1.3981999507E-3f));
    p = v_fma(p, r, v_set1(8.3334519073E-3f));
    p = v_fma(p, r, v_set1(4.1665795894E-2f));
    p = v_fma(p, r, v_set1(1.6666665459E-1f));
    p = v_fma(p, r, v_set1(5.0000001201E-1f));
    v16 y = v_add(v_fma(v_mul(p, r), r, r), v_set1(1.0f));
    return v_mul(y, v_exp2_int(n));
}

static void block(const float *Q, const float *K, const float *V, int64_t len, const float *next_K,
                  const float *next_V, int64_t next_len, int group, int hd, float scale, float *scores, float *O) {
    float top[MAX_GROUP], total[MAX_GROUP];
    for (int r = 0; r < group; r++) top[r] = -3.0e38f;
    for (int64_t j = 0; j < len; j++) {
        const float *k = K + j * hd;
        if (j < next_len)
            for (int d = 0; d < hd; d += 16) {
                _mm_prefetch((const char *)(next_K + j * hd + d), _MM_HINT_T0);
                _mm_prefetch((const char *)(next_V + j * hd + d), _MM_HINT_T0);
            }
        for (int r = 0; r < group; r++) {
            v16 acc = v_zero();
            for (int d = 0; d < hd; d += 16)
                acc = v_fma(v_load_n(Q + r * hd + d, hd - d), v_load_n(k + d, hd - d), acc);
            float s = v_sum(acc) * scale;
            scores[r * len + j] = s;
            top[r] = s > top[r] ? s : top[r];
        }
    }
    for (int r = 0; r < group; r++) {
        float *s = scores + r * len;
        v16 acc = v_zero();
        for (int64_t j = 0; j < len; j += 16) {
            int n = (int)(len - j < 16 ? len - j : 16);
            v16 p = v_keep_n(exp_nonpositive(v_sub(v_load_n(s + j, n), v_set1(top[r]))), n);
            v_store_n(s + j, p, n);
            acc = v_add(acc, p);
        }
        total[r] = v_sum(acc);
    }
    for (int r0 = 0; r0 < group; r0 += OUT_ROWS) {
        int rows = group - r0 < OUT_ROWS ? group - r0 : OUT_ROWS;
        for (int d0 = 0; d0 < hd; d0 += 16 * OUT_CHUNKS) {
            int chunks = (hd - d0 + 15) / 16 < OUT_CHUNKS ? (hd - d0 + 15) / 16 : OUT_CHUNKS;
            v16 o[OUT_ROWS][OUT_CHUNKS];
            for (int r = 0; r < OUT_ROWS; r++)
                for (int c = 0; c < OUT_CHUNKS; c++) o[r][c] = v_zero();
            for (int64_t j = 0; j < len; j++) {
                const float *v = V + j * hd + d0;
                for (int r = 0; r < rows; r++) {
                    v16 p = v_set1(scores[(r0 + r) * len + j]);
                    for (int c = 0; c < chunks; c++)
                        o[r][c] = v_fma(p, v_load_n(v + 16 * c, hd - d0 - 16 * c), o[r][c]);
                }
            }
            for (int r = 0; r < rows; r++) {
                v16 inverse = v_set1(len > 0 ? 1.0f / total[r0 + r] : 0.0f);
                for (int c = 0; c < chunks; c++)
                    v_store_n(O + (r0 + r) * hd + d0 + 16 * c, v_mul(o[r][c], inverse), hd - d0 - 16 * c);
            }
        }
    }
}

/* q: row i's query heads of kv head h at q + i * q_row + h * group * hd (rows of hd floats); keys, values: slot i's
   kv head h at + i * slot_stride + h * head_stride, one key of hd floats per position; lengths [n]: keys each row
   reads; out [n, kv_heads, group, hd]. Returns 0, or -1 when a work buffer could not be allocated. */
int decode_attention(const float *q, int64_t q_row, const float *keys, const float *values, int64_t slot_stride,
                     int64_t head_stride, const int64_t *lengths, float *out, int n, int kv_heads, int group, int hd,
                     float scale, int threads) {
    if (group > MAX_GROUP) return -1;
    int64_t longest = 1;
    for (int i = 0; i < n; i++) longest = lengths[i] > longest ? lengths[i] : longest;
    int blocks = n * kv_heads, failed = 0;
    #pragma omp parallel num_threads(threads) reduction(|:failed)
    {
        float *scores = malloc(sizeof(float) * group * longest);
        failed = scores == NULL;
        #pragma omp for schedule(static)
        for (int b = 0; b < blocks; b++) {
            if (failed) continue;
            int i = b / kv_heads, h = b % kv_heads, later = b + 1 < blocks ? b + 1 : b;
            int i2 = later / kv_heads, h2 = later % kv_heads;
            block(q + i * q_row + (int64_t)h * group * hd, keys + i * slot_stride + h * head_stride,
                  values + i * slot_stride + h * head_stride, lengths[i],
                  keys + i2 * slot_stride + h2 * head_stride, values + i2 * slot_stride + h2 * head_stride,
                  later == b ? 0 : lengths[i2], group, hd, scale, scores, out + (int64_t)b * group * hd);
        }
        free(scores);
    }
    return failed ? -1 : 0;
}
