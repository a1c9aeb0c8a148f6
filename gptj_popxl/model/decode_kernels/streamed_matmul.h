// y = x @ w for a few rows of x, reading w from memory once: header-only, no Python or torch.
//
// x (M, K) and y (M, N) float32, w (K, N) float32 or float16 (its bits as uint16_t, widened to float32
// as they are read), all row-major. With few rows the product is bound by reading w (a decode step
// reads every weight once per token), and on some machines BLAS kernels tuned for large M stream it
// at a fraction of the memory bandwidth (on others they are faster: `Products` below lets the caller
// choose by timing). Here w is cut into chunks of consecutive rows (chunk_depth), which the threads
// share out; each walks its chunk row by row in passes of KSTEP rows and adds every row of x's
// contribution while those rows' values are in registers. Within a chunk each y[m, n] sums k in
// increasing order, one multiply-add per term (fused where the processor can), starting from 0;
// the chunks' sums are then added in order. Also here: the conversions between float16 and float32
// that all the kernels use.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
// Processors with AVX2 but no AVX-512 (AMD Zen, many laptops) take eight lanes at a time; without,
// the loops below are scalar. Every lane does what the scalar loop does, so the results are the same.
#define GPTJ_STREAMED_AVX2 1
#endif

#include "work_team.h"

namespace gptj_streamed {

// A float16 value's bits (IEEE binary16).
using Half = uint16_t;

// The float32 value of float16 bits (exact: every float16 is a float32).
inline float to_float(float v) { return v; }
inline float to_float(Half h) {
    const uint32_t sign = uint32_t(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
    uint32_t bits;
    if (exponent == 0x1fu) {
        bits = sign | 0x7f800000u | (mantissa << 13);  // infinity or NaN
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    } else if (mantissa == 0) {
        bits = sign;
    } else {  // subnormal: mantissa * 2^-24, normalised
        int shift = 0;
        uint32_t m = mantissa;
        while (!(m & 0x400u)) {
            m <<= 1;
            ++shift;
        }
        bits = sign | uint32_t(113 - shift) << 23 | ((m & 0x3ffu) << 13);
    }
    float v;
    std::memcpy(&v, &bits, sizeof v);
    return v;
}

// The float16 nearest to v (round to nearest, ties to even; beyond the largest float16, infinity; a
// NaN stays a NaN), and v itself for float32: how a kernel stores a float32 result in a float16 tensor.
template <typename T>
inline T from_float(float v);
template <>
inline float from_float<float>(float v) { return v; }
template <>
inline Half from_float<Half>(float v) {
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof bits);
    const auto sign = Half((bits >> 16) & 0x8000u);
    const uint32_t magnitude = bits & 0x7fffffffu;
    if (magnitude > 0x7f800000u)
        return sign | 0x7e00u | Half((magnitude >> 13) & 0x3ffu);  // quiet NaN, the payload's top bits
    if (magnitude >= 0x477ff000u)  // 65520, halfway from the largest float16 (65504) on: rounds to infinity
        return sign | 0x7c00u;
    if (magnitude < 0x38800000u) {  // below 2^-14: a subnormal float16, a multiple of 2^-24
        float a;
        std::memcpy(&a, &magnitude, sizeof a);
        return sign | Half(std::nearbyint(a * 16777216.0f));  // exact scaling, then rounded (to even by default)
    }
    // A normal float16: rebias the exponent (127 - 15) and drop 13 mantissa bits, rounding to even (a
    // carry out of the mantissa steps the exponent, as it should).
    uint32_t h = (magnitude - 0x38000000u) >> 13;
    const uint32_t dropped = magnitude & 0x1fffu;
    h += dropped > 0x1000u || (dropped == 0x1000u && (h & 1u));
    return sign | Half(h);
}

#ifdef __AVX512F__
// 16 consecutive values as float32, all or the first of them (`tail`, the rest 0).
inline __m512 load16(const float* w) { return _mm512_loadu_ps(w); }
inline __m512 load16(const Half* w) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w))); }
inline __m512 load16(const float* w, __mmask16 tail) { return _mm512_maskz_loadu_ps(tail, w); }
inline __m512 load16(const Half* w, __mmask16 tail) {
    alignas(32) Half part[16] = {};
    const int count = __builtin_popcount(unsigned(tail));
    std::memcpy(part, w, size_t(count) * sizeof(Half));
    return _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(part)));
}
// Stores 16 float32 values as float16 (round to nearest even) or float32.
inline void store16(float* y, __m512 v) { _mm512_storeu_ps(y, v); }
inline void store16(Half* y, __m512 v) {
    const __m256i bits = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), bits);
}
#endif

#ifdef GPTJ_STREAMED_AVX2
// 8 consecutive values as float32, and their stores as float16 (round to nearest even) or float32.
inline __m256 load8(const float* w) { return _mm256_loadu_ps(w); }
inline __m256 load8(const Half* w) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))); }
inline void store8(float* y, __m256 v) { _mm256_storeu_ps(y, v); }
inline void store8(Half* y, __m256 v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#endif

// y[i] = x[i] as To, for i < n, between float32 and float16 either way: widened exactly, or rounded
// once (from_float).
template <typename From, typename To>
inline void convert(const From* x, int64_t n, To* y) {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16)
        store16(y + i, load16(x + i));
#elif defined(GPTJ_STREAMED_AVX2)
    for (; i + 8 <= n; i += 8)
        store8(y + i, load8(x + i));
#endif
    for (; i < n; ++i)
        y[i] = from_float<To>(to_float(x[i]));
}

// y[i] += a * x[i] for i < n, x float32 or float16 (widened as read).
template <typename T>
inline void add_scaled(float a, const T* __restrict x, int64_t n, float* __restrict y) {
    int64_t i = 0;
#if defined(__AVX512F__)
    const __m512 scale = _mm512_set1_ps(a);
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(y + i, _mm512_fmadd_ps(scale, load16(x + i), _mm512_loadu_ps(y + i)));
#elif defined(GPTJ_STREAMED_AVX2)
    const __m256 scale = _mm256_set1_ps(a);
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(scale, load8(x + i), _mm256_loadu_ps(y + i)));
#endif
    for (; i < n; ++i)
        y[i] += a * to_float(x[i]);  // fused where the processor can (-ffp-contract=fast), as the vector loop
}

// Rows of w per pass for a tile of R rows of x. Up to 4 rows, the pass's R * S values of x are
// broadcast into registers once and serve every column (R * S + S of the 32 vector registers);
// beyond, each multiply-add broadcasts its x from memory and a pass takes 16 rows. Measured on a
// 2-core Ice Lake VM, both sides depth-split (below): four rows of x over the benchmark model's
// weights, 3.0-3.5 ms with registers against 3.6-4.2 ms from memory.
template <int R>
constexpr int64_t KSTEP = R <= 2 ? 8 : R <= 4 ? 4 : 16;
// Tiles of up to 8 rows read w once for a prefill of 5 to 8 rows (GPT-J 6B float16, 8 rows on two
// threads: 27 -> 22 ms for a (4096, 16384) weight against 4-row tiles).
constexpr int MAX_TILE_ROWS = 8;
static_assert(MAX_TILE_ROWS == 8, "rows() has a case for each tile size up to MAX_TILE_ROWS");
// Depth (rows of w) per chunk of a product: at least DEPTH_CHUNK, and enough that a product has at
// most DEPTH_CHUNKS chunks, whose sums after the first's (M * N floats each) fit PARTIAL_SUMS floats.
// Each chunk's sums are formed apart, by whichever thread takes it, and then added in chunk order; the
// chunks depend on M, K and N only, so the result does not depend on the thread count. A chunk is
// contiguous memory read front to back, which the hardware prefetchers stream at full speed;
// splitting the columns among threads instead had each read a narrow strip of every row of w: on a
// 2-core VM, the benchmark model's 17 products for one row of x took 4.5 ms that way against 2.5 ms
// (MKL: 2.8), and a GPT-J 6B float16 layer's four 32-37 ms against 16-18 ms.
constexpr int64_t DEPTH_CHUNK = 256;
constexpr int64_t DEPTH_CHUNKS = 16;
constexpr int64_t PARTIAL_SUMS = int64_t(1) << 22;  // 16 MB

// The rows of w per depth chunk of a product (M, K) @ (K, N), as above.
inline int64_t chunk_depth(int64_t M, int64_t K, int64_t N) {
    const int64_t most = std::min(DEPTH_CHUNKS, 1 + PARTIAL_SUMS / std::max<int64_t>(1, M * N));
    return std::max({DEPTH_CHUNK, (K + most - 1) / most, int64_t(1)});
}

// A float buffer of at least `size` values, this thread's own, kept between calls (grown, never
// shrunk or cleared).
inline float* thread_scratch(int64_t size) {
    thread_local std::vector<float> buffer;
    if (buffer.size() < size_t(size))
        buffer.resize(size_t(size));
    return buffer.data();
}

// Partial sums y[r, n] (r < R, n in [n0, n1)) plus rows [k0, k0 + S) of w times x's columns k0...
template <int R, int S, typename W>
inline void add_rows(const float* __restrict x, int64_t K, const W* __restrict wk, int64_t N, float* __restrict y,
                     int64_t n0, int64_t n1) {
#ifdef __AVX512F__
    constexpr bool held = R * S <= 16;  // x's values in registers for the whole pass
    __m512 xv[held ? R : 1][held ? S : 1];
    if constexpr (held) {
        for (int r = 0; r < R; ++r)
            for (int j = 0; j < S; ++j)
                xv[r][j] = _mm512_set1_ps(x[r * K + j]);
    }
    const auto x_at = [&](int r, int j) {
        if constexpr (held)
            return xv[r][j];
        else
            return _mm512_set1_ps(x[r * K + j]);
    };
    int64_t n = n0;
    for (; n + 16 <= n1; n += 16) {
        __m512 wv[S];
        for (int j = 0; j < S; ++j)
            wv[j] = load16(wk + j * N + n);
        for (int r = 0; r < R; ++r) {
            __m512 acc = _mm512_loadu_ps(y + r * N + n);
            for (int j = 0; j < S; ++j)
                acc = _mm512_fmadd_ps(x_at(r, j), wv[j], acc);
            _mm512_storeu_ps(y + r * N + n, acc);
        }
    }
    if (n < n1) {
        const __mmask16 tail = __mmask16((1u << (n1 - n)) - 1u);
        __m512 wv[S];
        for (int j = 0; j < S; ++j)
            wv[j] = load16(wk + j * N + n, tail);
        for (int r = 0; r < R; ++r) {
            __m512 acc = _mm512_maskz_loadu_ps(tail, y + r * N + n);
            for (int j = 0; j < S; ++j)
                acc = _mm512_fmadd_ps(x_at(r, j), wv[j], acc);
            _mm512_mask_storeu_ps(y + r * N + n, tail, acc);
        }
    }
#else
    int64_t n = n0;
#ifdef GPTJ_STREAMED_AVX2
    for (; n + 8 <= n1; n += 8) {
        __m256 wv[S];
        for (int j = 0; j < S; ++j)
            wv[j] = load8(wk + j * N + n);
        for (int r = 0; r < R; ++r) {
            __m256 acc = _mm256_loadu_ps(y + r * N + n);
            for (int j = 0; j < S; ++j)
                acc = _mm256_fmadd_ps(_mm256_set1_ps(x[r * K + j]), wv[j], acc);
            _mm256_storeu_ps(y + r * N + n, acc);
        }
    }
#endif
    for (; n < n1; ++n) {
        float wv[S];  // each weight widened once for all R rows of x
        for (int j = 0; j < S; ++j)
            wv[j] = to_float(wk[j * N + n]);
        for (int r = 0; r < R; ++r) {
            float acc = y[r * N + n];
            for (int j = 0; j < S; ++j)
                acc += x[r * K + j] * wv[j];  // fused where the processor can (-ffp-contract=fast)
            y[r * N + n] = acc;
        }
    }
#endif
}

// y[r, n] = the sum over k in [k0, k1) of x[r, k] w[k, n], in increasing k, for r < R, n in [n0, n1).
template <int R, typename W>
void tile(const float* __restrict x, int64_t K, const W* __restrict w, int64_t N, float* __restrict y, int64_t k0,
          int64_t k1, int64_t n0, int64_t n1) {
    constexpr int64_t S = KSTEP<R>;
    for (int r = 0; r < R; ++r)
        std::fill(y + r * N + n0, y + r * N + n1, 0.0f);
    int64_t k = k0;
    for (; k + S <= k1; k += S)
        add_rows<R, S>(x + k, K, w + k * N, N, y, n0, n1);
    for (; k < k1; ++k)
        add_rows<R, 1>(x + k, K, w + k * N, N, y, n0, n1);
}

// `tile` for rows [0, M) of x, in tiles of at most MAX_TILE_ROWS rows.
template <typename W>
void rows(const float* x, int64_t M, int64_t K, const W* w, int64_t N, float* y, int64_t k0, int64_t k1, int64_t n0,
          int64_t n1) {
    for (int64_t m = 0; m < M; m += MAX_TILE_ROWS) {
        const float* xm = x + m * K;
        float* ym = y + m * N;
        switch (std::min<int64_t>(M - m, MAX_TILE_ROWS)) {
            case 1: tile<1>(xm, K, w, N, ym, k0, k1, n0, n1); break;
            case 2: tile<2>(xm, K, w, N, ym, k0, k1, n0, n1); break;
            case 3: tile<3>(xm, K, w, N, ym, k0, k1, n0, n1); break;
            case 4: tile<4>(xm, K, w, N, ym, k0, k1, n0, n1); break;
            case 5: tile<5>(xm, K, w, N, ym, k0, k1, n0, n1); break;
            case 6: tile<6>(xm, K, w, N, ym, k0, k1, n0, n1); break;
            case 7: tile<7>(xm, K, w, N, ym, k0, k1, n0, n1); break;
            case 8: tile<8>(xm, K, w, N, ym, k0, k1, n0, n1); break;
        }
    }
}

// y = x @ w on this thread and up to num_threads - 1 helpers (work_team.h), by depth chunks (see
// chunk_depth). Where a product has fewer chunks than threads (a shallow w), each chunk is also cut
// into column ranges of whole 16-float groups, which changes no sum.
template <typename W>
void streamed_matmul(const float* x, int64_t M, int64_t K, const W* w, int64_t N, float* y, int num_threads) {
    const int64_t depth = chunk_depth(M, K, N);
    const int64_t chunks = std::max<int64_t>(1, (K + depth - 1) / depth), lines = (N + 15) / 16;
    const int64_t parts = std::max<int64_t>(1, std::min(lines, (num_threads + chunks - 1) / chunks));
    // The sums of the chunks after the first; helpers write them through this pointer (a thread's
    // scratch is its own).
    float* const partial = thread_scratch((chunks - 1) * M * N);
    const auto job = [&](int64_t i) {
        const int64_t chunk = i / parts, part = i % parts;
        rows(x, M, K, w, N, chunk == 0 ? y : partial + (chunk - 1) * M * N, chunk * depth,
             std::min(K, (chunk + 1) * depth), std::min(N, 16 * (lines * part / parts)),
             std::min(N, 16 * (lines * (part + 1) / parts)));
    };
    if (num_threads <= 1 || chunks * parts <= 1) {
        for (int64_t i = 0; i < chunks * parts; ++i)
            job(i);
    } else {
        WorkTeam::share(num_threads, chunks * parts, job);
    }
    for (int64_t chunk = 1; chunk < chunks; ++chunk) {
        const float* sums = partial + (chunk - 1) * M * N;
        for (int64_t i = 0; i < M * N; ++i)
            y[i] += sums[i];
    }
}

// A BLAS sgemm by its Fortran interface (column-major, every argument by pointer, 32-bit sizes), the
// `sgemm_` that MKL and OpenBLAS export.
using FortranSgemm = void (*)(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                              const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                              const float* beta, float* c, const int* ldc);

// How a kernel forms its products y = x @ w: by `blas` when it is set, otherwise streamed on
// `threads` threads. Which is faster depends on the machine (its caches and memory bandwidth), so
// the caller chooses by measurement. sgemm takes no float16, so float16 weights go to it widened,
// a block of rows at a time (a prefill's many rows are compute-bound, where sgemm beats streaming).
struct Products {
    FortranSgemm blas = nullptr;
    int threads = 1;
    // float32 values a widened block of float16 weights may hold (16 MB): GPT-J 6B's widest weight,
    // (16384, 4096), goes in blocks of 1024 rows.
    int64_t widened = int64_t(1) << 22;

    void operator()(const float* x, int64_t M, int64_t K, const float* w, int64_t N, float* y) const {
        if (blas == nullptr || M == 0 || N == 0) {
            streamed_matmul(x, M, K, w, N, y, threads);
            return;
        }
        sgemm(x, M, K, K, w, N, y, false);
    }

    void operator()(const float* x, int64_t M, int64_t K, const Half* w, int64_t N, float* y) const {
        if (blas == nullptr || M == 0 || N == 0 || K == 0) {
            streamed_matmul(x, M, K, w, N, y, threads);
            return;
        }
        thread_local std::vector<float> wide;
        const int64_t rows = std::max<int64_t>(1, std::min(K, widened / N));
        wide.resize(size_t(rows * N));
        for (int64_t k = 0; k < K; k += rows) {
            const int64_t block = std::min(rows, K - k);
            convert(w + k * N, block * N, wide.data());
            sgemm(x + k, M, block, K, wide.data(), N, y, k > 0);
        }
    }

  private:
    // y (M, N) = x (M, K, rows ldx apart) @ w (K, N), plus y's own values when `accumulate`, by blas.
    void sgemm(const float* x, int64_t M, int64_t K, int64_t ldx, const float* w, int64_t N, float* y,
               bool accumulate) const {
        constexpr int64_t largest = std::numeric_limits<int>::max();
        if (M > largest || ldx > largest || N > largest)
            throw std::length_error("a product's sides exceed the BLAS interface's 32-bit sizes");
        // Row-major y = x @ w is, read column-major, y^T = w^T x^T: no transposes, no copies.
        const int m = int(N), n = int(M), k = int(K), ldb = int(std::max<int64_t>(ldx, 1));
        const float one = 1.0f, beta = accumulate ? 1.0f : 0.0f;
        blas("N", "N", &m, &n, &k, &one, w, &m, x, &ldb, &beta, y, &m);
    }
};

}  // namespace gptj_streamed
