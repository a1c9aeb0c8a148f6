// Unit tests of the decode kernels, run by ctest (`make cpp-test`): streamed_matmul.h against a
// double-precision triple loop, over row, column and depth tails, deep weights cut into depth chunks,
// and one to three threads (the same bits on each), with float32
// and float16 weights (the float16 widening against every one of the 65536 bit patterns, the rounding to
// float16 against a textbook reference); and the attention of a decode step and of a prefill
// (decode_attention.h), with float32 and float16 caches, on the streaming team's threads and on
// OpenMP's against the same on one thread (each head is one thread's work, so the results must be
// identical), float16 against float32.
#include <cmath>
#include <cstdio>
#include <random>
#include <type_traits>
#include <vector>

#include "decode_attention.h"
#include "streamed_matmul.h"

namespace {

int failures = 0;

// The float16 nearest to v (round to nearest even), by the textbook method: an independent reference
// for the kernels' widening of float16 weights (which must give back exactly this value).
gptj_streamed::Half to_half(float v) {
    const double a = std::fabs(double(v));
    uint16_t sign = std::signbit(v) ? 0x8000 : 0;
    if (std::isnan(v))
        return sign | 0x7e00;
    if (a >= 65520.0)
        return sign | 0x7c00;
    int exponent = a < std::ldexp(1.0, -14) ? -14 : std::ilogb(a);
    const double scaled = std::nearbyint(std::ldexp(a, 10 - exponent));  // 11 significant bits
    const uint32_t m = uint32_t(scaled);
    if (m == 0)
        return sign;
    if (m >= 2048)
        return sign | uint16_t((exponent + 16) << 10);  // rounded up to the next power of two
    if (m < 1024)
        return sign | uint16_t(m);  // subnormal
    return sign | uint16_t((exponent + 15) << 10 | (m - 1024));
}

// Every float16 bit pattern widens to the float32 it stands for.
void check_half_conversion() {
    for (uint32_t bits = 0; bits < 65536; ++bits) {
        const auto h = gptj_streamed::Half(bits);
        const float v = gptj_streamed::to_float(h);
        const bool nan_ok = ((bits >> 10) & 0x1f) == 0x1f && (bits & 0x3ff) ? std::isnan(v) : !std::isnan(v);
        if (!nan_ok || (!std::isnan(v) && to_half(v) != h)) {
            ++failures;
            std::printf("FAIL float16 0x%04x widened to %g\n", unsigned(bits), v);
            return;
        }
    }
}

// Rounding float32 to float16 (from_float, and the vector store the kernels use for 16 at a time)
// gives the textbook nearest float16: at every float16, at the midpoints between neighbours (ties to
// even) and one float32 step either side of them, beyond the largest float16, and at random floats.
void check_half_rounding() {
    std::vector<float> values;
    for (uint32_t bits = 0; bits < 0x7c00; ++bits) {  // the finite non-negative float16s
        const float v = gptj_streamed::to_float(gptj_streamed::Half(bits));
        const float next = bits + 1 < 0x7c00 ? gptj_streamed::to_float(gptj_streamed::Half(bits + 1)) : 65536.0f;
        const float middle = float((double(v) + double(next)) / 2);  // exact: 12 significant bits
        for (float x : {v, middle, std::nextafter(middle, 0.0f), std::nextafter(middle, INFINITY)}) {
            values.push_back(x);
            values.push_back(-x);
        }
    }
    for (float x : {65519.99f, 65520.0f, 1e6f, 3.4e38f, INFINITY, 1e-9f, 2.98e-8f, 2.99e-8f})
        values.push_back(x);
    std::mt19937 gen(7);
    std::uniform_real_distribution<float> exponent(-30.0f, 17.0f);
    for (int i = 0; i < 100000; ++i)
        values.push_back(std::ldexp(1.0f + float(i % 1000) / 1000.0f, int(exponent(gen))) * (i % 2 ? -1.0f : 1.0f));
    values.resize(values.size() / 16 * 16);
    std::vector<gptj_streamed::Half> stored(values.size());
    gptj_streamed::convert(values.data(), int64_t(values.size()), stored.data());
    for (size_t i = 0; i < values.size(); ++i) {
        const auto expected = to_half(values[i]), scalar = gptj_streamed::from_float<gptj_streamed::Half>(values[i]);
        if (scalar != expected || stored[i] != expected) {
            ++failures;
            std::printf("FAIL float16 of %.9g: 0x%04x by from_float, 0x%04x stored 16 at a time, expected 0x%04x\n",
                        double(values[i]), unsigned(scalar), unsigned(stored[i]), unsigned(expected));
            return;
        }
    }
    const auto nan = gptj_streamed::from_float<gptj_streamed::Half>(NAN);
    if (!std::isnan(gptj_streamed::to_float(nan))) {
        ++failures;
        std::printf("FAIL float16 of NaN is 0x%04x, not a NaN\n", unsigned(nan));
    }
}

void check_same(const char* what, const std::vector<float>& one, const std::vector<float>& many, int threads) {
    for (size_t i = 0; i < one.size(); ++i)
        if (!(one[i] == many[i])) {
            ++failures;
            std::printf("FAIL %s on %d threads: [%zu] = %g, on one thread %g\n", what, threads, i, many[i], one[i]);
            return;
        }
}

// Row m, column n of x (M, K) @ w (K, N), summed in double.
template <typename W>
double exact_product(const std::vector<float>& x, const std::vector<W>& w, int64_t K, int64_t N, int64_t m,
                     int64_t n) {
    double sum = 0;
    for (int64_t k = 0; k < K; ++k)
        sum += double(x[m * K + k]) * double(gptj_streamed::to_float(w[k * N + n]));
    return sum;
}

template <typename W>
void check_product(int64_t M, int64_t K, int64_t N, int threads) {
    std::mt19937 gen(unsigned(M * 1000 + K * 10 + N));
    std::normal_distribution<float> normal;
    std::vector<float> x(M * K), y(M * N, NAN);
    std::vector<W> w(K * N);
    for (auto& v : x)
        v = normal(gen);
    for (auto& v : w) {
        if constexpr (std::is_same_v<W, float>)
            v = normal(gen);
        else
            v = to_half(normal(gen));
    }
    gptj_streamed::streamed_matmul(x.data(), M, K, w.data(), N, y.data(), threads);
    for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) {
            const double expected = exact_product(x, w, K, N, m, n);
            if (!(std::fabs(y[m * N + n] - expected) <= 1e-4 * (1 + std::fabs(expected)))) {
                ++failures;
                std::printf("FAIL M=%lld K=%lld N=%lld threads=%d, %s weights: y[%lld, %lld] = %g, expected %g\n",
                            (long long)M, (long long)K, (long long)N, threads, sizeof(W) == 2 ? "float16" : "float32",
                            (long long)m, (long long)n, y[m * N + n], expected);
                return;
            }
        }
    if (threads > 1) {  // the depth chunks' sums are added in one order whatever the thread count
        std::vector<float> one(M * N, NAN);
        gptj_streamed::streamed_matmul(x.data(), M, K, w.data(), N, one.data(), 1);
        check_same("streamed_matmul", one, y, threads);
    }
}

// A product's depth chunks: at least DEPTH_CHUNK rows (or all of K), at most DEPTH_CHUNKS of them, and
// the sums of all but the first within PARTIAL_SUMS floats (when any chunking can do that).
void check_chunk_depths() {
    using namespace gptj_streamed;
    for (int64_t M : {1, 4, 64, 256})
        for (int64_t K : {0, 1, 256, 257, 4096, 4100, 16384})
            for (int64_t N : {1, 4096, 50400}) {
                const int64_t depth = chunk_depth(M, K, N), chunks = (K + depth - 1) / depth;
                if (depth < std::min(DEPTH_CHUNK, std::max<int64_t>(K, 1)) || chunks > DEPTH_CHUNKS ||
                    (chunks > 1 && (chunks - 1) * M * N > PARTIAL_SUMS)) {
                    ++failures;
                    std::printf("FAIL chunk_depth(%lld, %lld, %lld) = %lld: %lld chunks\n", (long long)M,
                                (long long)K, (long long)N, (long long)depth, (long long)chunks);
                }
            }
}

// The Fortran sgemm's contract for the products' calls (no transposes): column-major C (m, n) =
// alpha A (m, k) B (k, n) + beta C, leading dimensions lda, ldb, ldc; summed in double.
void reference_sgemm(const char*, const char*, const int* m, const int* n, const int* k, const float* alpha,
                     const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
                     const int* ldc) {
    for (int j = 0; j < *n; ++j)
        for (int i = 0; i < *m; ++i) {
            double sum = 0;
            for (int l = 0; l < *k; ++l)
                sum += double(a[i + l * *lda]) * double(b[l + j * *ldb]);
            float& out = c[i + j * *ldc];
            out = float(*alpha * sum + (*beta == 0.0f ? 0.0 : double(*beta) * out));
        }
}

// Products by "BLAS" with float16 weights, widened a block of rows at a time (blocks of 1, 3 and
// all rows of w), against the double-precision product of the widened weights.
void check_widened_blas_products() {
    const int64_t M = 3, K = 10, N = 7;
    std::mt19937 gen(11);
    std::normal_distribution<float> normal;
    std::vector<float> x(M * K);
    std::vector<gptj_streamed::Half> w(K * N);
    for (auto& v : x)
        v = normal(gen);
    for (auto& v : w)
        v = to_half(normal(gen));
    for (int64_t widened : {int64_t(1), 3 * N, K * N}) {
        gptj_streamed::Products products;
        products.blas = reference_sgemm;
        products.widened = widened;
        std::vector<float> y(M * N, NAN);
        products(x.data(), M, K, w.data(), N, y.data());
        for (int64_t m = 0; m < M; ++m)
            for (int64_t n = 0; n < N; ++n) {
                const double expected = exact_product(x, w, K, N, m, n);
                if (!(std::fabs(y[m * N + n] - expected) <= 1e-5 * (1 + std::fabs(expected)))) {
                    ++failures;
                    std::printf("FAIL widened blocks of %lld values: y[%lld, %lld] = %g, expected %g\n",
                                (long long)widened, (long long)m, (long long)n, y[m * N + n], expected);
                    return;
                }
            }
    }
}

std::vector<float> normals(int64_t n, unsigned seed) {
    std::mt19937 gen(seed);
    std::normal_distribution<float> normal;
    std::vector<float> v(n);
    for (auto& x : v)
        x = normal(gen);
    return v;
}

template <typename T>
std::vector<T> as(const std::vector<float>& v) {
    std::vector<T> out(v.size());
    gptj_streamed::convert(v.data(), int64_t(v.size()), out.data());
    return out;
}

template <typename T>
std::vector<float> widened(const std::vector<T>& v) {
    std::vector<float> out(v.size());
    gptj_streamed::convert(v.data(), int64_t(v.size()), out.data());
    return out;
}

const char* const ATTENTION_RESULTS[] = {"decode key cache", "decode value cache", "attention outputs",
                                         "prefill keys", "prefill values"};

// The attention of a decode step and of a prefill with caches of T, on one thread and on `threads` of
// the streaming team or, with `blas` (the reference sgemm), of OpenMP (each head is one thread's
// work, so the results must be identical); returns the one-thread run's caches, outputs, keys and
// values (widened) for check_half_attention.
template <typename T>
std::vector<std::vector<float>> attention_runs(int threads, bool blas = false) {
    const int64_t B = 3, H = 5, D = 8, C = 7, S = 4, P = 16, rotary_dim = 4, write = 2;
    const auto sin = normals(P * rotary_dim / 2, 1), cos = normals(P * rotary_dim / 2, 2);
    const std::vector<int32_t> positions = {3, 0, 15}, prefill_positions = {0, 1, 2, 3, 5, 6, 7, 8, 0, 0, 1, 2};
    std::vector<float> mask(B * C, 0.0f), prefill_mask(B * S * S, 0.0f);
    mask[1 * C + 0] = prefill_mask[2 * S * S + 1] = -3.4e38f;
    const auto qkv = normals(B * 3 * H * D, 3), prefill_qkv = normals(B * S * 3 * H * D, 4);
    std::vector<std::vector<float>> runs[2];
    for (int run = 0; run < 2; ++run) {
        auto k_cache = as<T>(normals(B * H * D * C, 5)), v_cache = as<T>(normals(B * H * C * D, 6));
        std::vector<float> z(B * H * D + B * S * H * D, NAN);  // the decode step's, then the prefill's
        std::vector<T> k(B * H * S * D), v(B * H * S * D);
        gptj_streamed::Products products;
        products.blas = blas ? reference_sgemm : nullptr;
        products.threads = run ? threads : 1;
        gptj_decode::decode_attention(qkv.data(), positions.data(), sin.data(), cos.data(), rotary_dim, k_cache.data(),
                                      v_cache.data(), write, mask.data(), B, H, D, C, z.data(), products);
        gptj_decode::prefill_attention(prefill_qkv.data(), prefill_positions.data(), sin.data(), cos.data(),
                                       rotary_dim, prefill_mask.data(), B, S, H, D, k.data(), v.data(),
                                       z.data() + B * H * D, products);
        runs[run] = {widened(k_cache), widened(v_cache), z, widened(k), widened(v)};
    }
    for (int i = 0; i < 5; ++i)
        check_same(ATTENTION_RESULTS[i], runs[0][i], runs[1][i], threads);
    return runs[0];
}

// With float16 caches the attention stores what the float32 one stores, rounded once to float16,
// and its outputs stay within float16's rounding of the float32 ones.
void check_half_attention() {
    const auto wide = attention_runs<float>(1), half = attention_runs<gptj_streamed::Half>(1);
    for (int i = 0; i < 5; ++i)
        for (size_t j = 0; j < wide[i].size(); ++j) {
            const float rounded = gptj_streamed::to_float(gptj_streamed::from_float<gptj_streamed::Half>(wide[i][j]));
            const bool ok = i == 2 ? std::fabs(half[i][j] - wide[i][j]) <= 4e-3f * (1.0f + std::fabs(wide[i][j]))
                                   : half[i][j] == rounded;
            if (!ok) {
                ++failures;
                std::printf("FAIL %s with float16 caches: [%zu] = %g, float32 caches give %g\n",
                            ATTENTION_RESULTS[i], j, half[i][j], wide[i][j]);
                return;
            }
        }
}

void check_attention_threads(int threads) {
    for (bool blas : {false, true}) {
        attention_runs<float>(threads, blas);
        attention_runs<gptj_streamed::Half>(threads, blas);
    }
}

}  // namespace

int main() {
    check_half_conversion();
    check_half_rounding();
    check_half_attention();
    check_widened_blas_products();
    for (int threads : {2, 3})
        check_attention_threads(threads);
    for (int threads : {1, 2, 3})
        for (int64_t M : {1, 2, 3, 4, 5, 6, 7, 8, 9, 17})
            for (int64_t K : {1, 7, 8, 37})
                for (int64_t N : {1, 15, 16, 17, 600}) {
                    check_product<float>(M, K, N, threads);
                    check_product<gptj_streamed::Half>(M, K, N, threads);
                }
    for (int64_t M : {0, 2})  // empty sides
        for (int64_t K : {0, 300})
            for (int64_t N : {0, 17}) {
                check_product<float>(M, K, N, 2);
                check_product<gptj_streamed::Half>(M, K, N, 2);
            }
    check_chunk_depths();
    // Deep weights, in several depth chunks (the last shorter), up to the most a product is cut into.
    for (int threads : {1, 2, 3})
        for (int64_t M : {1, 4, 9})
            for (int64_t K : {300, 513, 4100})
                for (int64_t N : {1, 40}) {
                    check_product<float>(M, K, N, threads);
                    check_product<gptj_streamed::Half>(M, K, N, threads);
                }
    std::printf("%s\n", failures ? "FAILED" : "ok");
    return failures ? 1 : 0;
}
