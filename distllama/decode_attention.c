/* Decode attention on x86 CPUs with AVX-512: each row's query heads against its own cached keys only.

   For every (row, kv head) block: scores = q K^T * scale over the row's `length` keys, softmax, then scores V. A block
   reads each key and value once for all the query heads of its kv head (GQA), and prefetches the next block's keys
   and values while it computes, so that reading the cache overlaps the arithmetic (SDPA's CPU kernel read it at
   about half the memory bandwidth here). Every block is computed on its own, in one fixed order: a row's result does
   not depend on the other rows, on how many there are, or on the number of threads. */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#define MAX_GROUP 64

static inline __mmask16 tail_mask(int left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1); }

/* e^x for x <= 0, 16 lanes: Cephes' expf (range reduction by ln 2, degree-5 polynomial), within 2 ulp. */
static inline __m512 exp_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500E-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
    __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
    __m512i scale = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(y, _mm512_castsi512_ps(scale));
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
            __m512 acc = _mm512_setzero_ps();
            for (int d = 0; d < hd; d += 16) {
                __mmask16 m = tail_mask(hd - d);
                acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, Q + r * hd + d), _mm512_maskz_loadu_ps(m, k + d), acc);
            }
            float s = _mm512_reduce_add_ps(acc) * scale;
            scores[r * len + j] = s;
            top[r] = s > top[r] ? s : top[r];
        }
    }
    for (int r = 0; r < group; r++) {
        float *s = scores + r * len;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t j = 0; j < len; j += 16) {
            __mmask16 m = tail_mask((int)(len - j < 16 ? len - j : 16));
            __m512 p = _mm512_maskz_mov_ps(m, exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j),
                                                                            _mm512_set1_ps(top[r]))));
            _mm512_mask_storeu_ps(s + j, m, p);
            acc = _mm512_add_ps(acc, p);
        }
        total[r] = _mm512_reduce_add_ps(acc);
    }
    for (int r0 = 0; r0 < group; r0 += 4) {  /* 4 query heads x 64 columns of output in registers */
        int rows = group - r0 < 4 ? group - r0 : 4;
        for (int d0 = 0; d0 < hd; d0 += 64) {
            int chunks = (hd - d0 + 15) / 16 < 4 ? (hd - d0 + 15) / 16 : 4;
            __m512 o[4][4];
            for (int r = 0; r < 4; r++)
                for (int c = 0; c < 4; c++) o[r][c] = _mm512_setzero_ps();
            for (int64_t j = 0; j < len; j++) {
                const float *v = V + j * hd + d0;
                for (int r = 0; r < rows; r++) {
                    __m512 p = _mm512_set1_ps(scores[(r0 + r) * len + j]);
                    for (int c = 0; c < chunks; c++)
                        o[r][c] = _mm512_fmadd_ps(p, _mm512_maskz_loadu_ps(tail_mask(hd - d0 - 16 * c), v + 16 * c),
                                                  o[r][c]);
                }
            }
            for (int r = 0; r < rows; r++) {
                __m512 inverse = _mm512_set1_ps(len > 0 ? 1.0f / total[r0 + r] : 0.0f);
                for (int c = 0; c < chunks; c++)
                    _mm512_mask_storeu_ps(O + (r0 + r) * hd + d0 + 16 * c, tail_mask(hd - d0 - 16 * c),
                                          _mm512_mul_ps(o[r][c], inverse));
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
