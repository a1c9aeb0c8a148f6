// Unit tests of the decode kernels, run by ctest (`make cpp-test`): streamed_matmul.h against a
// double-precision triple loop, over row, column and depth tails and one to three threads, with float32
// and float16 weights (the float16 conversion against every one of the 65536 bit patterns); and the
// attention of a decode step and of a prefill (decode_attention.h) on OpenMP threads against the
// same on one thread (each head is one thread's work, so the results must be identical).
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
            double expected = 0;
            for (int64_t k = 0; k < K; ++k)
                expected += double(x[m * K + k]) * double(gptj_streamed::to_float(w[k * N + n]));
            if (!(std::fabs(y[m * N + n] - expected) <= 1e-4 * (1 + std::fabs(expected)))) {
                ++failures;
                std::printf("FAIL M=%lld K=%lld N=%lld threads=%d, %s weights: y[%lld, %lld] = %g, expected %g\n",
                            (long long)M, (long long)K, (long long)N, threads, sizeof(W) == 2 ? "float16" : "float32",
                            (long long)m, (long long)n, y[m * N + n], expected);
                return;
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

void check_same(const char* what, const std::vector<float>& one, const std::vector<float>& many, int threads) {
    for (size_t i = 0; i < one.size(); ++i)
        if (!(one[i] == many[i])) {
            ++failures;
            std::printf("FAIL %s on %d threads: [%zu] = %g, on one thread %g\n", what, threads, i, many[i], one[i]);
            return;
        }
}

void check_attention_threads(int threads) {
    const int64_t B = 3, H = 5, D = 8, C = 7, S = 4, P = 16, rotary_dim = 4, write = 2;
    const auto sin = normals(P * rotary_dim / 2, 1), cos = normals(P * rotary_dim / 2, 2);
    const std::vector<int32_t> positions = {3, 0, 15}, prefill_positions = {0, 1, 2, 3, 5, 6, 7, 8, 0, 0, 1, 2};
    std::vector<float> mask(B * C, 0.0f), prefill_mask(B * S * S, 0.0f);
    mask[1 * C + 0] = prefill_mask[2 * S * S + 1] = -3.4e38f;
    const auto qkv = normals(B * 3 * H * D, 3), prefill_qkv = normals(B * S * 3 * H * D, 4);
    std::vector<float> runs[2][5];
    for (int run = 0; run < 2; ++run) {
        auto& [k_cache, v_cache, z, k, v] = runs[run];
        k_cache = normals(B * H * D * C, 5);
        v_cache = normals(B * H * C * D, 6);
        z.assign(B * H * D + B * S * H * D, NAN);  // the decode step's, then the prefill's
        k.assign(B * H * S * D, NAN);
        v.assign(B * H * S * D, NAN);
        const int n = run ? threads : 1;
        gptj_decode::decode_attention(qkv.data(), positions.data(), sin.data(), cos.data(), rotary_dim, k_cache.data(),
                                      v_cache.data(), write, mask.data(), B, H, D, C, z.data(), n);
        gptj_decode::prefill_attention(prefill_qkv.data(), prefill_positions.data(), sin.data(), cos.data(),
                                       rotary_dim, prefill_mask.data(), B, S, H, D, k.data(), v.data(), z.data() + B * H * D,
                                       gptj_streamed::Products{}, n);
    }
    const char* what[] = {"decode key cache", "decode value cache", "attention outputs", "prefill keys",
                          "prefill values"};
    for (int i = 0; i < 5; ++i)
        check_same(what[i], runs[0][i], runs[1][i], threads);
}

}  // namespace

int main() {
    check_half_conversion();
    for (int threads : {2, 3})
        check_attention_threads(threads);
    for (int threads : {1, 2, 3})
        for (int64_t M : {1, 2, 3, 4, 5, 9})
            for (int64_t K : {1, 7, 8, 37})
                for (int64_t N : {1, 15, 16, 17, 600}) {
                    check_product<float>(M, K, N, threads);
                    check_product<gptj_streamed::Half>(M, K, N, threads);
                }
    std::printf("%s\n", failures ? "FAILED" : "ok");
    return failures ? 1 : 0;
}
