// GPT-J rotary position embedding on raw pointers: header-only, no Python or torch needed.
//
// For x of shape (B, S, H, D) and per-token positions p of shape (B, S), pair i < rotary_dim/2 of
// every head is rotated by the angle at row p of the (max_positions, rotary_dim/2) sin/cos tables:
//   out[2i]   = x[2i]   * cos - x[2i+1] * sin
//   out[2i+1] = x[2i+1] * cos + x[2i]   * sin
// and features rotary_dim..D-1 pass through. `inverse` rotates by -angle (the gradient).
// float16 values are `gptj_rotary::half` (IEEE binary16 bits); arithmetic is float32.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "../../../popxl_cpu/kernels/parallel_for.h"

namespace gptj_rotary {

struct half {
    uint16_t bits;
};

template <typename To, typename From>
inline To bit_cast(From v) {
    static_assert(sizeof(To) == sizeof(From), "bit_cast needs equal sizes");
    To out;
    std::memcpy(&out, &v, sizeof(To));
    return out;
}

// Branch-free conversions (selects, not jumps) so the row loop still vectorises.
inline float half_to_float(half h) {
    const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16;
    const uint32_t exponent = h.bits & 0x7c00u;
    const uint32_t magnitude = uint32_t(h.bits & 0x7fffu) << 13;
    // Subnormals as integer * 2^-24 avoid float subnormal intermediates (safe under DAZ).
    const uint32_t subnormal = bit_cast<uint32_t>(float(h.bits & 0x3ffu) * 0x1p-24f);
    const uint32_t normal = magnitude + (112u << 23);  // rebias exponent: 127 - 15
    const uint32_t inf_nan = magnitude | 0x7f800000u;
    const uint32_t bits = exponent == 0 ? subnormal : (exponent == 0x7c00u ? inf_nan : normal);
    return bit_cast<float>(bits | sign);
}

// Round to nearest, ties to even, as numpy and torch do.
inline half float_to_half(float f) {
    const uint32_t u = bit_cast<uint32_t>(f);
    const uint32_t sign = (u >> 16) & 0x8000u;
    const uint32_t a = u & 0x7fffffffu;
    // Normal halves: rebias, then add just under half a unit plus the kept lsb so the carry rounds to even.
    const uint32_t normal = (a - (112u << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
    // Below 2^-14: adding 0.5 makes the FPU round to a multiple of 2^-24, the half subnormal step.
    const uint32_t subnormal = bit_cast<uint32_t>(bit_cast<float>(a) + 0.5f) - 0x3f000000u;
    uint32_t h = a < 0x38800000u ? subnormal : normal;
    h = a >= 0x477ff000u ? 0x7c00u : h;  // 65520 and above round to infinity
    h = a > 0x7f800000u ? 0x7e00u : h;   // NaN stays a (quiet) NaN
    return half{uint16_t(h | sign)};
}

inline float load(float v) { return v; }
inline float load(half v) { return half_to_float(v); }

template <typename T>
inline T store(float v);
template <>
inline float store<float>(float v) { return v; }
template <>
inline half store<half>(float v) { return float_to_half(v); }

using gptj_kernels::parallel_for;

// One token's angles widened to the pair layout: out[j] = x[j] * c[j] + x[j ^ 1] * s[j] for j < rotary_dim,
// with c[2i] = c[2i+1] = cos_i, s[2i] = -sin_i, s[2i+1] = sin_i (signs swapped for Inverse). Built once per
// token and reused by all its heads, so the row loop is plain multiply-adds the compiler vectorises.
template <bool Inverse>
inline void pair_tables(const float* sin_row, const float* cos_row, int64_t half_rd, float* c, float* s) {
    for (int64_t i = 0; i < half_rd; ++i) {
        const float si = Inverse ? -sin_row[i] : sin_row[i];
        c[2 * i] = c[2 * i + 1] = cos_row[i];
        s[2 * i] = -si;
        s[2 * i + 1] = si;
    }
}

template <typename T, bool Inverse>
void rotate_rows(const T* __restrict__ x, const float* __restrict__ sin, const float* __restrict__ cos,
                 const int32_t* __restrict__ pos, T* __restrict__ out, int64_t begin, int64_t end, int64_t H,
                 int64_t D, int64_t half_rd) {
    const int64_t rd = 2 * half_rd;
    std::vector<float> tables(2 * rd);
    float* __restrict__ c = tables.data();
    float* __restrict__ s = c + rd;
    int64_t token = -1;
    for (int64_t row = begin; row < end; ++row) {
        if (row / H != token) {
            token = row / H;
            const int64_t p = pos[token];
            pair_tables<Inverse>(sin + p * half_rd, cos + p * half_rd, half_rd, c, s);
        }
        const T* __restrict__ xr = x + row * D;
        T* __restrict__ yr = out + row * D;
        for (int64_t j = 0; j < rd; j += 2) {
            const float x0 = load(xr[j]);
            const float x1 = load(xr[j + 1]);
            yr[j] = store<T>(x0 * c[j] + x1 * s[j]);
            yr[j + 1] = store<T>(x1 * c[j + 1] + x0 * s[j + 1]);
        }
        std::copy(xr + rd, xr + D, yr + rd);
    }
}

// Checks shapes and that every position indexes a table row; throws std::invalid_argument / std::out_of_range.
inline void check_arguments(const int32_t* pos, int64_t B, int64_t S, int64_t H, int64_t D, int64_t rotary_dim,
                            int64_t max_positions) {
    if (B < 0 || S < 0 || H < 0 || D < 0)
        throw std::invalid_argument("x shape (" + std::to_string(B) + ", " + std::to_string(S) + ", " +
                                    std::to_string(H) + ", " + std::to_string(D) + ") has a negative size");
    if (rotary_dim < 0 || rotary_dim % 2 != 0 || rotary_dim > D)
        throw std::invalid_argument("rotary_dim " + std::to_string(rotary_dim) +
                                    " must be even and at most head_dim " + std::to_string(D));
    for (int64_t t = 0; t < B * S; ++t) {
        if (pos[t] < 0 || pos[t] >= max_positions)
            throw std::out_of_range("positions[" + std::to_string(t / S) + ", " + std::to_string(t % S) +
                                    "] = " + std::to_string(pos[t]) + " is outside the sin/cos tables' " +
                                    std::to_string(max_positions) + " rows");
    }
}

// x, out: (B, S, H, D) contiguous; sin, cos: (max_positions, rotary_dim / 2); pos: (B, S).
// Uses up to num_threads threads, each given at least min_values_per_thread values: below the default
// (measured with a warm pool) a second thread saves less than it costs to hand it work.
template <typename T>
void rotary_forward(const T* x, const float* sin, const float* cos, const int32_t* pos, T* out, int64_t B,
                    int64_t S, int64_t H, int64_t D, int64_t rotary_dim, int64_t max_positions, bool inverse,
                    int num_threads = 1, int64_t min_values_per_thread = int64_t(1) << 16) {
    check_arguments(pos, B, S, H, D, rotary_dim, max_positions);
    const int64_t half_rd = rotary_dim / 2;
    const int64_t grain = std::max<int64_t>(1, min_values_per_thread / std::max<int64_t>(D, 1));
    auto run = [&](int64_t begin, int64_t end) {
        if (inverse)
            rotate_rows<T, true>(x, sin, cos, pos, out, begin, end, H, D, half_rd);
        else
            rotate_rows<T, false>(x, sin, cos, pos, out, begin, end, H, D, half_rd);
    };
    parallel_for(B * S * H, grain, num_threads, run);
}

}  // namespace gptj_rotary
