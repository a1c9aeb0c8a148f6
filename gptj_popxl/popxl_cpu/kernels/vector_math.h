// Sixteen-wide float32 exp, tanh and tanh-GELU for AVX-512, eight-wide for AVX2, with their scalar counterparts,
// and a softmax row:
// header-only, shared by the runtime's fused kernels and the decode kernels.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
// Processors with AVX2 but no AVX-512 (AMD Zen, many laptops) take the eight-wide functions below; without
// either, the scalar ones.
#define GPTJ_KERNELS_AVX2 1
#endif

namespace gptj_kernels {

constexpr float SQRT_2_OVER_PI = 0.7978845608028654f;
constexpr float GELU_CUBE = 0.044715f;

// GELU, tanh approximation (transformers' gelu_new): 0.5 v (1 + tanh(u)), u = sqrt(2 / pi) (v + 0.044715 v^3),
// with tanh(u) = sign(u) (1 - e) / (1 + e), e = exp(-2 |u|), which neither overflows nor cancels.
inline float tanh_by_exp(float u) {
    const float e = std::exp(-2.0f * std::fabs(u));
    return std::copysign((1.0f - e) / (1.0f + e), u);
}

// exp(v) for v <= 0, 0 below -87 as the sixteen-wide exp_nonpositive below (no subnormals).
inline float exp_nonpositive(float v) { return v < -87.0f ? 0.0f : std::exp(v); }

inline float gelu_tanh(float v) {
    return 0.5f * v * (1.0f + tanh_by_exp(SQRT_2_OVER_PI * (v + GELU_CUBE * v * v * v)));
}

// d gelu_tanh / dv = 0.5 (1 + t) + 0.5 v (1 - t^2) sqrt(2 / pi) (1 + 3 * 0.044715 v^2), t = tanh(u).
inline float gelu_tanh_derivative(float v) {
    const float v2 = v * v;
    const float t = tanh_by_exp(SQRT_2_OVER_PI * (v + GELU_CUBE * v2 * v));
    return 0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * SQRT_2_OVER_PI * (1.0f + 3.0f * GELU_CUBE * v2);
}

#ifdef __AVX512F__
// exp(x) for x <= 0 to about one ulp: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by its degree-7 Taylor
// polynomial, then scaled by 2^n. Below -87 (where exp leaves float32's normal range) the result is 0: a
// subnormal would cost every later arithmetic on it a slow microcode assist (a masked softmax's half of
// its row). A NaN stays NaN.
inline __m512 exp_nonpositive(__m512 x) {
    const __mmask16 normal = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_NLT_UQ);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln2, high bits
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);  // ln2, low bits
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    for (float c : {1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f})
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    return _mm512_maskz_mov_ps(normal, _mm512_scalef_ps(p, n));
}

inline __m512 tanh_by_exp(__m512 u) {
    const __m512 sign = _mm512_set1_ps(-0.0f), one = _mm512_set1_ps(1.0f);
    const __m512 e = exp_nonpositive(_mm512_mul_ps(_mm512_set1_ps(-2.0f), _mm512_andnot_ps(sign, u)));
    const __m512 t = _mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e));
    return _mm512_or_ps(t, _mm512_and_ps(sign, u));  // tanh is odd: u's sign
}

inline __m512 gelu_tanh(__m512 v) {
    const __m512 cube = _mm512_mul_ps(_mm512_mul_ps(v, v), v);
    const __m512 u = _mm512_mul_ps(_mm512_set1_ps(SQRT_2_OVER_PI), _mm512_fmadd_ps(_mm512_set1_ps(GELU_CUBE), cube, v));
    return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), v), _mm512_add_ps(_mm512_set1_ps(1.0f), tanh_by_exp(u)));
}

inline __m512 gelu_tanh_derivative(__m512 v) {
    const __m512 one = _mm512_set1_ps(1.0f), half = _mm512_set1_ps(0.5f), v2 = _mm512_mul_ps(v, v);
    const __m512 u = _mm512_mul_ps(_mm512_set1_ps(SQRT_2_OVER_PI),
                                   _mm512_fmadd_ps(_mm512_set1_ps(GELU_CUBE), _mm512_mul_ps(v2, v), v));
    const __m512 t = tanh_by_exp(u);
    const __m512 du = _mm512_mul_ps(_mm512_set1_ps(SQRT_2_OVER_PI),
                                    _mm512_fmadd_ps(_mm512_set1_ps(3.0f * GELU_CUBE), v2, one));
    return _mm512_fmadd_ps(_mm512_mul_ps(_mm512_mul_ps(half, v), _mm512_fnmadd_ps(t, t, one)), du,
                           _mm512_mul_ps(half, _mm512_add_ps(one, t)));
}
#endif

#ifdef GPTJ_KERNELS_AVX2
// The eight-wide counterparts of the sixteen-wide functions above, by the same arithmetic; 2^n is built in
// the exponent bits, n >= -126 there.
inline __m256 exp_nonpositive(__m256 x) {
    const __m256 normal = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_NLT_UQ);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);  // ln2, high bits
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), r);  // ln2, low bits
    __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
    for (float c : {1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f})
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(normal, _mm256_mul_ps(p, _mm256_castsi256_ps(exponent)));
}

inline __m256 tanh_by_exp(__m256 u) {
    const __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f);
    const __m256 e = exp_nonpositive(_mm256_mul_ps(_mm256_set1_ps(-2.0f), _mm256_andnot_ps(sign, u)));
    const __m256 t = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
    return _mm256_or_ps(t, _mm256_and_ps(sign, u));
}

inline __m256 gelu_tanh(__m256 v) {
    const __m256 cube = _mm256_mul_ps(_mm256_mul_ps(v, v), v);
    const __m256 u = _mm256_mul_ps(_mm256_set1_ps(SQRT_2_OVER_PI), _mm256_fmadd_ps(_mm256_set1_ps(GELU_CUBE), cube, v));
    return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), v), _mm256_add_ps(_mm256_set1_ps(1.0f), tanh_by_exp(u)));
}

inline __m256 gelu_tanh_derivative(__m256 v) {
    const __m256 one = _mm256_set1_ps(1.0f), half = _mm256_set1_ps(0.5f), v2 = _mm256_mul_ps(v, v);
    const __m256 u = _mm256_mul_ps(_mm256_set1_ps(SQRT_2_OVER_PI),
                                   _mm256_fmadd_ps(_mm256_set1_ps(GELU_CUBE), _mm256_mul_ps(v2, v), v));
    const __m256 t = tanh_by_exp(u);
    const __m256 du = _mm256_mul_ps(_mm256_set1_ps(SQRT_2_OVER_PI),
                                    _mm256_fmadd_ps(_mm256_set1_ps(3.0f * GELU_CUBE), v2, one));
    return _mm256_fmadd_ps(_mm256_mul_ps(_mm256_mul_ps(half, v), _mm256_fnmadd_ps(t, t, one)), du,
                           _mm256_mul_ps(half, _mm256_add_ps(one, t)));
}

inline float reduce_add(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline float reduce_max(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
#endif

// x[i] = exp(x[i] - top) for i < n, where top >= every x[i], 0 below -87 as exp_nonpositive; returns their sum.
inline float exp_shifted(float* x, int64_t n, float top) {
    int64_t i = 0;
    float total = 0.0f;
#ifdef __AVX512F__
    __m512 sums = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(x + i), _mm512_set1_ps(top)));
        _mm512_storeu_ps(x + i, e);
        sums = _mm512_add_ps(sums, e);
    }
    total = _mm512_reduce_add_ps(sums);
#elif defined(GPTJ_KERNELS_AVX2)
    __m256 sums = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(x + i), _mm256_set1_ps(top)));
        _mm256_storeu_ps(x + i, e);
        sums = _mm256_add_ps(sums, e);
    }
    total = reduce_add(sums);
#endif
    for (; i < n; ++i) {
        x[i] = exp_nonpositive(x[i] - top);
        total += x[i];
    }
    return total;
}

// y (n) = softmax(x / scale + mask); y may be x.
inline void scaled_masked_softmax(const float* x, const float* mask, float scale, float* y, int64_t n) {
    int64_t i = 0;
    float top = -INFINITY;
#ifdef __AVX512F__
    __m512 tops = _mm512_set1_ps(-INFINITY);
    for (; i + 16 <= n; i += 16) {
        const __m512 v = _mm512_add_ps(_mm512_div_ps(_mm512_loadu_ps(x + i), _mm512_set1_ps(scale)),
                                       _mm512_loadu_ps(mask + i));
        _mm512_storeu_ps(y + i, v);
        tops = _mm512_max_ps(tops, v);
    }
    top = _mm512_reduce_max_ps(tops);
#elif defined(GPTJ_KERNELS_AVX2)
    __m256 tops = _mm256_set1_ps(-INFINITY);
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_add_ps(_mm256_div_ps(_mm256_loadu_ps(x + i), _mm256_set1_ps(scale)),
                                       _mm256_loadu_ps(mask + i));
        _mm256_storeu_ps(y + i, v);
        tops = _mm256_max_ps(tops, v);
    }
    top = reduce_max(tops);
#endif
    for (; i < n; ++i) {
        y[i] = x[i] / scale + mask[i];
        top = std::max(top, y[i]);
    }
    const float inverse = 1.0f / exp_shifted(y, n, top);
    for (i = 0; i < n; ++i)
        y[i] *= inverse;
}

}  // namespace gptj_kernels
