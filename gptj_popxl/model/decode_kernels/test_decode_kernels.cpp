// Unit test of streamed_matmul.h against a double-precision triple loop, over row, column and depth
// tails and one or two threads; run by ctest (`make cpp-test`).
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "streamed_matmul.h"

namespace {

int failures = 0;

void check_product(int64_t M, int64_t K, int64_t N, int threads) {
    std::mt19937 gen(unsigned(M * 1000 + K * 10 + N));
    std::normal_distribution<float> normal;
    std::vector<float> x(M * K), w(K * N), y(M * N, NAN);
    for (auto& v : x)
        v = normal(gen);
    for (auto& v : w)
        v = normal(gen);
    gptj_streamed::streamed_matmul(x.data(), M, K, w.data(), N, y.data(), threads);
    for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) {
            double expected = 0;
            for (int64_t k = 0; k < K; ++k)
                expected += double(x[m * K + k]) * double(w[k * N + n]);
            if (!(std::fabs(y[m * N + n] - expected) <= 1e-4 * (1 + std::fabs(expected)))) {
                ++failures;
                std::printf("FAIL M=%lld K=%lld N=%lld threads=%d: y[%lld, %lld] = %g, expected %g\n", (long long)M,
                            (long long)K, (long long)N, threads, (long long)m, (long long)n, y[m * N + n], expected);
                return;
            }
        }
}

}  // namespace

int main() {
    for (int threads : {1, 2, 3})
        for (int64_t M : {1, 2, 3, 4, 5, 9})
            for (int64_t K : {1, 7, 8, 37})
                for (int64_t N : {1, 15, 16, 17, 600})
                    check_product(M, K, N, threads);
    std::printf("%s\n", failures ? "FAILED" : "ok");
    return failures ? 1 : 0;
}
