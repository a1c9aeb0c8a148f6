// GPT-J attention of a decode step over a KV cache, and of a prefill over its own tokens, on raw
// pointers: header-only, no Python or torch.
//
// Per row b and head h: the new query and key (from the fused qkv row [q heads | k heads | v heads])
// are rotated to the row's position (pair i < rotary_dim/2: x[2i] * cos - x[2i+1] * sin,
// x[2i+1] * cos + x[2i] * sin, from the (P, rotary_dim/2) tables); the key and the value are written
// into the cache at column `write`, then the query attends to every column:
//   score[c] = (q . key[c]) / sqrt(D) + mask[b, c],  z = softmax(score) @ value.
// Layouts: qkv (B, 3 H D); k_cache (B, H, D, C), keys transposed; v_cache (B, H, C, D); mask (B, C)
// additive; z (B, H D). The caches (and a prefill's keys and values) are T, float32 or float16
// (gptj_streamed::Half: widened as read, rounded once as written); everything else is float32. A
// prefill (prefill_attention) is the same for S tokens a row, each attending to the row's own tokens.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <exception>
#include <mutex>
#include <vector>

#include "../../popxl_cpu/kernels/vector_math.h"
#include "streamed_matmul.h"
#include "work_team.h"

namespace gptj_decode {

using gptj_kernels::scaled_masked_softmax;

inline void rotate(float* x, const float* sin, const float* cos, int64_t rotary_dim) {
    for (int64_t i = 0; i < rotary_dim / 2; ++i) {
        const float even = x[2 * i], odd = x[2 * i + 1];
        x[2 * i] = even * cos[i] - odd * sin[i];
        x[2 * i + 1] = odd * cos[i] + even * sin[i];
    }
}

// out (D) = softmax(score) @ values with score[c] = (q . key[c]) / sqrt(D) + mask[c]: keys (D, C)
// (transposed, so the scores accumulate with the columns contiguous), values (C, D), score (C) scratch.
template <typename T>
inline void attend(const float* q, const T* keys, const T* values, const float* mask, int64_t D, int64_t C,
                   float* score, float* out) {
    const float scale = std::sqrt(float(D));
    std::fill(score, score + C, 0.0f);
    for (int64_t d = 0; d < D; ++d)
        gptj_streamed::add_scaled(q[d], keys + d * C, C, score);
    scaled_masked_softmax(score, mask, scale, score, C);
    std::fill(out, out + D, 0.0f);
    for (int64_t col = 0; col < C; ++col)
        gptj_streamed::add_scaled(score[col], values + col * D, D, out);
}

// Runs head(i) for every i < n on `products`' threads, in the pool its products use: OpenMP's (torch's,
// shared with MKL) for BLAS, the streaming team otherwise. A pool's threads spin for a while after a
// job; had the heads used the other pool, its spinning threads would hold the cores the next
// product's threads want (a GPT-J 6B float16 decode layer streamed on two threads took 78 ms
// against 30 ms with the heads on the team). A head reads its caches, which the weights streamed
// before it have pushed out of the core's own caches, at one core's bandwidth: hence threads.
// An exception (a scratch allocation failing) must not leave a team job or an OpenMP region: the
// first is kept, the heads not yet started are skipped, and it is rethrown here.
template <typename Head>
inline void for_each_head(int64_t n, const gptj_streamed::Products& products, const Head& head) {
    std::exception_ptr failure;
    std::atomic<bool> failed{false};
    std::mutex first;
    const auto guarded = [&](int64_t i) {
        if (failed.load(std::memory_order_relaxed))
            return;
        try {
            head(i);
        } catch (...) {
            std::lock_guard<std::mutex> lock(first);
            if (!failure)
                failure = std::current_exception();
            failed.store(true);
        }
    };
    const int threads = products.threads;
    if (threads <= 1 || n <= 1) {
        for (int64_t i = 0; i < n; ++i)
            guarded(i);
    } else if (products.blas != nullptr) {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t i = 0; i < n; ++i)
            guarded(i);
    } else {
        gptj_streamed::WorkTeam::share(threads, n, guarded);
    }
    if (failure)
        std::rethrow_exception(failure);
}

template <typename T>
inline void decode_attention(const float* qkv, const int32_t* positions, const float* sin, const float* cos,
                             int64_t rotary_dim, T* k_cache, T* v_cache, int64_t write, const float* mask,
                             int64_t B, int64_t H, int64_t D, int64_t C, float* z,
                             const gptj_streamed::Products& products) {
    const int64_t half = rotary_dim / 2;
    for_each_head(B * H, products, [&](int64_t bh) {
        thread_local std::vector<float> scratch;
        scratch.resize(std::max<size_t>(scratch.size(), size_t(2 * D + C)));
        float* q = scratch.data();
        float* k = q + D;
        float* score = k + D;
        const int64_t b = bh / H, h = bh % H;
        const float* row = qkv + b * 3 * H * D;
        const float* s = sin + int64_t(positions[b]) * half;
        const float* c = cos + int64_t(positions[b]) * half;
        std::copy(row + h * D, row + (h + 1) * D, q);
        std::copy(row + (H + h) * D, row + (H + h + 1) * D, k);
        rotate(q, s, c, rotary_dim);
        rotate(k, s, c, rotary_dim);
        T* keys = k_cache + bh * D * C;
        T* values = v_cache + bh * C * D;
        for (int64_t d = 0; d < D; ++d)
            keys[d * C + write] = gptj_streamed::from_float<T>(k[d]);
        gptj_streamed::convert(row + (2 * H + h) * D, D, values + write * D);
        attend(q, keys, values, mask + b * C, D, C, score, z + bh * D);
    });
}

// The attention of a prefill: S tokens per row b, each at its position (positions (B, S)), attending
// to the row's own S tokens under mask (B, S, S) additive. qkv (B, S, 3 H D); writes the rotated keys
// and the values, k and v (B, H, S, D), and z (B, S, H D). The tokens attend to their keys and values
// before these are stored (rounded, for float16). A head's scores and its output are two products
// (`products`' BLAS on the head's thread, or streamed): at 4 x 16 tokens half the time of attending
// query by query.
template <typename T>
inline void prefill_attention(const float* qkv, const int32_t* positions, const float* sin, const float* cos,
                              int64_t rotary_dim, const float* mask, int64_t B, int64_t S, int64_t H, int64_t D,
                              T* k, T* v, float* z, const gptj_streamed::Products& products) {
    const int64_t half = rotary_dim / 2;
    const float scale = std::sqrt(float(D));
    gptj_streamed::Products one_thread = products;  // the heads are the threads' work
    one_thread.threads = 1;
    for_each_head(B * H, products, [&](int64_t bh) {
        // Kept by the thread: fresh memory (344 KB for 64 tokens of a 256-feature head) would be
        // faulted in page by page at every call.
        thread_local std::vector<float> scratch;
        scratch.resize(std::max<size_t>(scratch.size(), size_t(S * (5 * D + S))));
        float* q = scratch.data();
        float* keys = q + S * D;
        float* zt = keys + S * D;
        float* k_rows = zt + S * D;  // the head's rotated keys and its values, (S, D) each
        float* v_rows = k_rows + S * D;
        float* scores = v_rows + S * D;
        const int64_t b = bh / H, h = bh % H;
        for (int64_t t = 0; t < S; ++t) {
            const float* row = qkv + (b * S + t) * 3 * H * D;
            const float* s = sin + int64_t(positions[b * S + t]) * half;
            const float* c = cos + int64_t(positions[b * S + t]) * half;
            std::copy(row + h * D, row + (h + 1) * D, q + t * D);
            std::copy(row + (H + h) * D, row + (H + h + 1) * D, k_rows + t * D);
            std::copy(row + (2 * H + h) * D, row + (2 * H + h + 1) * D, v_rows + t * D);
            rotate(q + t * D, s, c, rotary_dim);
            rotate(k_rows + t * D, s, c, rotary_dim);
            for (int64_t d = 0; d < D; ++d)
                keys[d * S + t] = k_rows[t * D + d];
        }
        gptj_streamed::convert(k_rows, S * D, k + bh * S * D);
        gptj_streamed::convert(v_rows, S * D, v + bh * S * D);
        one_thread(q, S, D, keys, S, scores);
        for (int64_t t = 0; t < S; ++t)
            scaled_masked_softmax(scores + t * S, mask + (b * S + t) * S, scale, scores + t * S, S);
        one_thread(scores, S, S, v_rows, D, zt);
        for (int64_t t = 0; t < S; ++t)
            std::copy(zt + t * D, zt + (t + 1) * D, z + ((b * S + t) * H + h) * D);
    });
}

}  // namespace gptj_decode
