/* 16 float32 lanes for distllama's CPU kernels: one AVX-512 register, or two AVX2 registers (lanes 0-7, 8-15).

   Each operation gives the same bits on both (lane by lane, and sums in one fixed order), so a kernel's results do
   not depend on which of the two the CPU has. A kernel's tile shapes do differ: AVX-512 has 32 registers of 16
   lanes, AVX2 16 of 8, so VEC16_REGISTERS counts how many v16 a tile may hold. */
#include <immintrin.h>

#ifdef __AVX512F__
#define VEC16_REGISTERS 32
typedef __m512 v16;

static inline __mmask16 lanes(int n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }  /* n >= 0 */
static inline v16 v_zero(void) { return _mm512_setzero_ps(); }
static inline v16 v_set1(float x) { return _mm512_set1_ps(x); }
static inline v16 v_load(const float *p) { return _mm512_loadu_ps(p); }
static inline v16 v_load_n(const float *p, int n) { return _mm512_maskz_loadu_ps(lanes(n), p); }  /* lanes >= n: 0 */
static inline void v_store_n(float *p, v16 x, int n) { _mm512_mask_storeu_ps(p, lanes(n), x); }
static inline v16 v_keep_n(v16 x, int n) { return _mm512_maskz_mov_ps(lanes(n), x); }
static inline v16 v_add(v16 a, v16 b) { return _mm512_add_ps(a, b); }
static inline v16 v_sub(v16 a, v16 b) { return _mm512_sub_ps(a, b); }
static inline v16 v_mul(v16 a, v16 b) { return _mm512_mul_ps(a, b); }
static inline v16 v_max(v16 a, v16 b) { return _mm512_max_ps(a, b); }
static inline v16 v_fma(v16 a, v16 b, v16 c) { return _mm512_fmadd_ps(a, b, c); }    /* a b + c, one rounding */
static inline v16 v_fnma(v16 a, v16 b, v16 c) { return _mm512_fnmadd_ps(a, b, c); }  /* c - a b, one rounding */
static inline v16 v_round(v16 x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline v16 v_exp2_int(v16 n) {  /* 2^n for whole n in [-126, 127] */
    __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_castsi512_ps(bits);
}
static inline __m256 v_fold(v16 x) {  /* lanes 0-7 + lanes 8-15 */
    return _mm256_add_ps(_mm512_castps512_ps256(x), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
}
#else
#define VEC16_REGISTERS 16
typedef struct { __m256 lo, hi; } v16;

static inline __m256i half_lanes(int n) {  /* lanes < n all ones, the others 0 */
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
static inline v16 v_zero(void) { return (v16){_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline v16 v_set1(float x) { return (v16){_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
static inline v16 v_load(const float *p) { return (v16){_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
static inline v16 v_load_n(const float *p, int n) {
    if (n >= 16) return v_load(p);
    return (v16){_mm256_maskload_ps(p, half_lanes(n)), _mm256_maskload_ps(p + 8, half_lanes(n - 8))};
}
static inline void v_store_n(float *p, v16 x, int n) {
    if (n >= 16) { _mm256_storeu_ps(p, x.lo); _mm256_storeu_ps(p + 8, x.hi); return; }
    _mm256_maskstore_ps(p, half_lanes(n), x.lo);
    _mm256_maskstore_ps(p + 8, half_lanes(n - 8), x.hi);
}
static inline v16 v_keep_n(v16 x, int n) {
    return (v16){_mm256_and_ps(x.lo, _mm256_castsi256_ps(half_lanes(n))),
                 _mm256_and_ps(x.hi, _mm256_castsi256_ps(half_lanes(n - 8)))};
}
#define V16_LANEWISE(name, op) \
    static inline v16 name(v16 a, v16 b) { return (v16){op(a.lo, b.lo), op(a.hi, b.hi)}; }
V16_LANEWISE(v_add, _mm256_add_ps)
V16_LANEWISE(v_sub, _mm256_sub_ps)
V16_LANEWISE(v_mul, _mm256_mul_ps)
V16_LANEWISE(v_max, _mm256_max_ps)
static inline v16 v_fma(v16 a, v16 b, v16 c) {
    return (v16){_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
static inline v16 v_fnma(v16 a, v16 b, v16 c) {
    return (v16){_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)};
}
static inline v16 v_round(v16 x) {
    const int nearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    return (v16){_mm256_round_ps(x.lo, nearest), _mm256_round_ps(x.hi, nearest)};
}
static inline __m256 exp2_int_half(__m256 n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
static inline v16 v_exp2_int(v16 n) { return (v16){exp2_int_half(n.lo), exp2_int_half(n.hi)}; }
static inline __m256 v_fold(v16 x) { return _mm256_add_ps(x.lo, x.hi); }
#endif

/* The sum of the 16 lanes, in one order: lanes i + (i + 8), then those pairwise by halves (as GCC's
   _mm512_reduce_add_ps adds them). */
static inline float v_sum(v16 x) {
    __m256 eight = v_fold(x);
    __m128 four = _mm_add_ps(_mm256_castps256_ps128(eight), _mm256_extractf128_ps(eight, 1));
    __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
    return _mm_cvtss_f32(two) + _mm_cvtss_f32(_mm_shuffle_ps(two, two, 1));
}
