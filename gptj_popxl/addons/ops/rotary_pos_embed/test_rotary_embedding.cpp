// Unit test of rotary_embedding.h against direct double-precision formulas; run by ctest (`make cpp-test`).
#include <cmath>
#include <cstdio>
#include <random>
#include <stdexcept>
#include <vector>

#include "rotary_embedding.h"

using gptj_rotary::half;

namespace {

int failures = 0;

#define CHECK(cond, ...)                                        \
    do {                                                        \
        if (!(cond)) {                                          \
            ++failures;                                         \
            std::printf("FAIL %s:%d: ", __FILE__, __LINE__);    \
            std::printf(__VA_ARGS__);                           \
            std::printf("\n");                                  \
        }                                                       \
    } while (0)

// binary16 value from its fields, by definition.
double half_value(uint16_t bits) {
    const int sign = bits >> 15, exponent = (bits >> 10) & 0x1f, mantissa = bits & 0x3ff;
    double magnitude = exponent == 0 ? std::ldexp(mantissa, -24)
                       : exponent == 31 ? (mantissa ? NAN : INFINITY)
                                        : std::ldexp(1.0 + mantissa / 1024.0, exponent - 15);
    return sign ? -magnitude : magnitude;
}

// Nearest binary16 value (ties to even) by scaling to the half's step at that magnitude.
double round_to_half(float f) {
    const double a = std::fabs(double(f));
    if (a >= 65520.0)
        return std::copysign(INFINITY, f);
    const int exponent = a < std::ldexp(1.0, -14) ? -14 : std::ilogb(a);
    const double step = std::ldexp(1.0, exponent - 10);
    return std::copysign(std::nearbyint(a / step) * step, f);
}

void test_half_conversions() {
    for (uint32_t bits = 0; bits < 0x10000; ++bits) {
        const double want = half_value(uint16_t(bits));
        const float got = gptj_rotary::half_to_float(half{uint16_t(bits)});
        if (std::isnan(want)) {
            CHECK(std::isnan(got), "half 0x%04x should be NaN", bits);
            CHECK(std::isnan(gptj_rotary::half_to_float(gptj_rotary::float_to_half(got))), "NaN round trip");
            continue;
        }
        CHECK(double(got) == want && std::signbit(got) == std::signbit(want), "half 0x%04x -> %g, want %g", bits,
              got, want);
        CHECK(gptj_rotary::float_to_half(got).bits == bits, "round trip of 0x%04x", bits);
    }
    std::mt19937 gen(7);
    std::uniform_real_distribution<float> mantissa(1.0f, 2.0f);
    std::uniform_int_distribution<int> exponent(-30, 17);
    std::vector<float> values = {65504.0f, 65519.99f, 65520.0f, 1e9f, 0x1p-14f, 0x1p-24f, 0x1p-25f, 0x1.8p-25f,
                                 0x1.002p0f, 0x1.006p0f, 0x1.001p0f, 0x1.003p0f, 0.0f, -0.0f, 1e-40f, INFINITY};
    for (int i = 0; i < 200000; ++i)
        values.push_back(std::ldexp(mantissa(gen), exponent(gen)) * (i % 2 ? -1.0f : 1.0f));
    for (float f : values) {
        const float got = gptj_rotary::half_to_float(gptj_rotary::float_to_half(f));
        CHECK(double(got) == round_to_half(f), "float %a -> half %a, want %a", f, got, round_to_half(f));
    }
}

struct Case {
    int64_t B, S, H, D, rotary_dim, positions;
};

// out[2i] = x[2i] cos - x[2i+1] sin, out[2i+1] = x[2i+1] cos + x[2i] sin with angle = pos * theta_i, in double.
std::vector<double> reference(const std::vector<double>& x, const std::vector<int32_t>& pos, const Case& c,
                              bool inverse) {
    std::vector<double> out(x);
    for (int64_t t = 0; t < c.B * c.S; ++t)
        for (int64_t h = 0; h < c.H; ++h)
            for (int64_t i = 0; i < c.rotary_dim / 2; ++i) {
                const double angle = (inverse ? -1 : 1) * pos[t] * std::pow(10000.0, -2.0 * i / c.rotary_dim);
                const int64_t k = (t * c.H + h) * c.D + 2 * i;
                out[k] = x[k] * std::cos(angle) - x[k + 1] * std::sin(angle);
                out[k + 1] = x[k + 1] * std::cos(angle) + x[k] * std::sin(angle);
            }
    return out;
}

template <typename T>
void test_rotation(const Case& c, double tolerance) {
    std::mt19937 gen(11);
    std::normal_distribution<float> normal;
    std::uniform_int_distribution<int32_t> position(0, int32_t(c.positions - 1));
    const int64_t n = c.B * c.S * c.H * c.D, half_rd = c.rotary_dim / 2;
    std::vector<T> x(n);
    std::vector<double> xd(n);
    for (int64_t k = 0; k < n; ++k) {
        x[k] = gptj_rotary::store<T>(normal(gen));
        xd[k] = gptj_rotary::load(x[k]);
    }
    std::vector<int32_t> pos(c.B * c.S);
    for (auto& p : pos)
        p = position(gen);
    std::vector<float> sin(c.positions * half_rd), cos(c.positions * half_rd);
    for (int64_t p = 0; p < c.positions; ++p)
        for (int64_t i = 0; i < half_rd; ++i) {
            const double angle = p * std::pow(10000.0, -2.0 * i / c.rotary_dim);
            sin[p * half_rd + i] = float(std::sin(angle));
            cos[p * half_rd + i] = float(std::cos(angle));
        }
    for (bool inverse : {false, true}) {
        const std::vector<double> want = reference(xd, pos, c, inverse);
        std::vector<T> one(n), many(n);
        gptj_rotary::rotary_forward(x.data(), sin.data(), cos.data(), pos.data(), one.data(), c.B, c.S, c.H, c.D,
                                    c.rotary_dim, c.positions, inverse, 1);
        gptj_rotary::rotary_forward(x.data(), sin.data(), cos.data(), pos.data(), many.data(), c.B, c.S, c.H, c.D,
                                    c.rotary_dim, c.positions, inverse, 3, 1024);
        double worst = 0;
        bool same = true;
        for (int64_t k = 0; k < n; ++k) {
            const double got = gptj_rotary::load(one[k]);
            worst = std::max(worst, std::fabs(got - want[k]) / std::max(1.0, std::fabs(want[k])));
            same = same && std::memcmp(&one[k], &many[k], sizeof(T)) == 0;
        }
        CHECK(worst <= tolerance, "rotary_dim %lld of %lld, inverse %d: error %g > %g", (long long)c.rotary_dim,
              (long long)c.D, int(inverse), worst, tolerance);
        CHECK(same, "threaded result differs from single-threaded (inverse %d)", int(inverse));
    }
}

void test_errors() {
    std::vector<float> x(2 * 4), out(2 * 4), table(3 * 2);
    std::vector<int32_t> pos = {0, 3};
    bool raised = false;
    try {
        gptj_rotary::rotary_forward(x.data(), table.data(), table.data(), pos.data(), out.data(), 1, 2, 1, 4, 4, 3,
                                    false);
    } catch (const std::out_of_range&) {
        raised = true;
    }
    CHECK(raised, "position 3 of a 3-row table should raise std::out_of_range");
    raised = false;
    pos = {0, 1};
    try {
        gptj_rotary::rotary_forward(x.data(), table.data(), table.data(), pos.data(), out.data(), 1, 2, 1, 4, 3, 3,
                                    false);
    } catch (const std::invalid_argument&) {
        raised = true;
    }
    CHECK(raised, "odd rotary_dim should raise std::invalid_argument");
}

}  // namespace

int main() {
    test_half_conversions();
    test_rotation<float>({2, 40, 4, 256, 64, 600}, 1e-6);
    test_rotation<float>({1, 7, 3, 16, 16, 50}, 1e-6);
    // float16 stores round to 11 significant bits.
    test_rotation<half>({2, 40, 4, 256, 64, 600}, 1e-3);
    test_errors();
    if (failures)
        std::printf("%d failures\n", failures);
    else
        std::printf("all rotary kernel tests passed\n");
    return failures ? 1 : 0;
}
