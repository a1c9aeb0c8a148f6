// One GPT-J decoder layer for one new token per row over a KV cache (and for a prefill's tokens):
// header-only, no Python or torch.
//
//   h = layer_norm(x);  qkv = h @ w_qkv;  a = gelu_tanh(h @ w_in + b_in)
//   z = decode_attention(qkv, ...)  (decode_attention.h: writes the new key and value into the cache)
//   x_next = (z @ w_out + (a @ w_fc_out + b_fc_out)) + x      (transformers' order of the sums)
//
// x, x_next (B, E); ln_weight, ln_bias (E); w_qkv (E, 3 H D), per row [q heads | k heads | v heads];
// w_in (E, I); w_out (H D, E); w_fc_out (I, E). The products are formed as `products` says (BLAS, or
// streaming each weight once: streamed_matmul.h); the caches are as decode_attention.h's.
//
// The model's tensors (x, the weights, the caches, the outputs, the embedding) are all of one type T:
// float32, or float16 (gptj_streamed::Half), which is widened as read; the arithmetic is float32
// throughout and a float16 result is rounded once, as it is stored. The rotary tables and the mask
// are float32.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "decode_attention.h"
#include "streamed_matmul.h"

namespace gptj_decode {

using gptj_streamed::to_float;

template <typename T>
struct LayerWeights {
    const T* ln_weight;
    const T* ln_bias;
    const T* w_qkv;
    const T* w_in;
    const T* b_in;
    const T* w_out;
    const T* w_fc_out;
    const T* b_fc_out;
};

// Row-wise (x - mean) / sqrt(biased variance + eps) * weight + bias.
template <typename T>
inline void layer_norm(const float* x, int64_t rows, int64_t n, const T* weight, const T* bias, float eps,
                       float* out) {
    for (int64_t r = 0; r < rows; ++r) {
        const float* xr = x + r * n;
        float mean = 0.0f, var = 0.0f;
        for (int64_t i = 0; i < n; ++i)
            mean += xr[i];
        mean /= float(n);
        for (int64_t i = 0; i < n; ++i)
            var += (xr[i] - mean) * (xr[i] - mean);
        const float inv = 1.0f / std::sqrt(var / float(n) + eps);
        for (int64_t i = 0; i < n; ++i)
            out[r * n + i] = (xr[i] - mean) * inv * to_float(weight[i]) + to_float(bias[i]);
    }
}

// a[i] = gelu_tanh(a[i] + bias[i]) (vector_math.h: transformers' gelu_new) for i < n, sixteen at a time where
// AVX-512 is there, eight where AVX2 is.
template <typename T>
inline void add_bias_gelu(float* a, const T* bias, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(a + i, gptj_kernels::gelu_tanh(
                                    _mm512_add_ps(_mm512_loadu_ps(a + i), gptj_streamed::load16(bias + i))));
#elif defined(GPTJ_STREAMED_AVX2)
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(a + i, gptj_kernels::gelu_tanh(
                                    _mm256_add_ps(_mm256_loadu_ps(a + i), gptj_streamed::load8(bias + i))));
#endif
    for (; i < n; ++i)
        a[i] = gptj_kernels::gelu_tanh(a[i] + to_float(bias[i]));
}

// The layer around its attention for `rows` rows: attention(qkv, z) fills z (rows, H D) from qkv
// (rows, 3 H D).
template <typename T, typename Attention>
inline void layer_rows(const T* x_in, int64_t rows, int64_t E, int64_t HD, int64_t I, float eps,
                       const LayerWeights<T>& w, const gptj_streamed::Products& products, const Attention& attention,
                       T* x_next) {
    // Scratch kept by the thread: fresh vectors of a 64-row prefill (1.3 MB) were zero-filled and
    // faulted in page by page at every call.
    thread_local std::vector<float> scratch;
    scratch.resize(std::max<size_t>(scratch.size(), size_t(rows * (4 * E + 4 * HD + I))));
    float* h = scratch.data();
    float* qkv = h + rows * E;
    float* a = qkv + rows * 3 * HD;
    float* z = a + rows * I;
    float* attn = z + rows * HD;
    float* mlp = attn + rows * E;
    float* x = mlp + rows * E;
    gptj_streamed::convert(x_in, rows * E, x);
    layer_norm(x, rows, E, w.ln_weight, w.ln_bias, eps, h);
    products(h, rows, E, w.w_qkv, 3 * HD, qkv);
    products(h, rows, E, w.w_in, I, a);
    for (int64_t r = 0; r < rows; ++r)
        add_bias_gelu(a + r * I, w.b_in, I);
    attention(static_cast<const float*>(qkv), z);
    products(z, rows, HD, w.w_out, E, attn);
    products(a, rows, I, w.w_fc_out, E, mlp);
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t i = 0; i < E; ++i)
            mlp[r * E + i] = (attn[r * E + i] + (mlp[r * E + i] + to_float(w.b_fc_out[i]))) + x[r * E + i];
    gptj_streamed::convert(mlp, rows * E, x_next);
}

template <typename T>
inline void decode_layer(const T* x, int64_t B, int64_t E, int64_t H, int64_t D, int64_t I, float eps,
                         const LayerWeights<T>& w, const int32_t* positions, const float* sin, const float* cos,
                         int64_t rotary_dim, T* k_cache, T* v_cache, int64_t C, int64_t write,
                         const float* mask, const gptj_streamed::Products& products, T* x_next) {
    layer_rows(x, B, E, H * D, I, eps, w, products, [&](const float* qkv, float* z) {
        decode_attention(qkv, positions, sin, cos, rotary_dim, k_cache, v_cache, write, mask, B, H, D, C, z, products);
    }, x_next);
}

// One GPT-J decoder layer over the S tokens of each of B rows (a prefill): x, x_next (B, S, E);
// positions (B, S); mask (B, S, S) additive; writes the rows' rotated keys and values k, v (B, H, S, D).
template <typename T>
inline void prefill_layer(const T* x, int64_t B, int64_t S, int64_t E, int64_t H, int64_t D, int64_t I, float eps,
                          const LayerWeights<T>& w, const int32_t* positions, const float* sin, const float* cos,
                          int64_t rotary_dim, const float* mask, const gptj_streamed::Products& products, T* k,
                          T* v, T* x_next) {
    layer_rows(x, B * S, E, H * D, I, eps, w, products, [&](const float* qkv, float* z) {
        prefill_attention(qkv, positions, sin, cos, rotary_dim, mask, B, S, H, D, k, v, z, products);
    }, x_next);
}

// The greedy next token of each row: the first largest of layer_norm(x) @ w + bias (as torch.argmax,
// a NaN counts as largest). x (B, E); ln_weight, ln_bias (E); w (E, V); bias (V); tokens (B).
template <typename T>
inline void greedy_head(const T* x, int64_t B, int64_t E, int64_t V, float eps, const T* ln_weight, const T* ln_bias,
                        const T* w, const T* bias, const gptj_streamed::Products& products, int32_t* tokens) {
    std::vector<float> wide(B * E), h(B * E), logits(B * V);
    gptj_streamed::convert(x, B * E, wide.data());
    layer_norm(wide.data(), B, E, ln_weight, ln_bias, eps, h.data());
    products(h.data(), B, E, w, V, logits.data());
    for (int64_t r = 0; r < B; ++r) {
        int64_t best = 0;
        float top = logits[r * V] + to_float(bias[0]);
        for (int64_t v = 1; v < V && !std::isnan(top); ++v) {
            const float value = logits[r * V + v] + to_float(bias[v]);
            if (value > top || std::isnan(value)) {
                top = value;
                best = v;
            }
        }
        tokens[r] = int32_t(best);
    }
}

// A whole greedy decode step for one new token per row: each row's token (B) looked up in `embedding`
// (V, E) (clamped into range, as the graph's gather), every layer of `layers` in turn over its caches
// (decode_layer), then greedy_head, whose tokens go to `next` (B).
template <typename T>
inline void greedy_decode_step(const int32_t* tokens, const T* embedding, int64_t V, int64_t B, int64_t E, int64_t H,
                               int64_t D, int64_t I, float eps, const std::vector<LayerWeights<T>>& layers,
                               const int32_t* positions, const float* sin, const float* cos, int64_t rotary_dim,
                               const std::vector<T*>& k_caches, const std::vector<T*>& v_caches, int64_t C,
                               int64_t write, const float* mask, const T* ln_f_weight, const T* ln_f_bias,
                               const T* lm_weight, const T* lm_bias, int64_t vocab,
                               const gptj_streamed::Products& products, int32_t* next) {
    std::vector<T> x(B * E), x_next(B * E);
    for (int64_t b = 0; b < B; ++b) {
        const int64_t row = std::min<int64_t>(std::max<int64_t>(tokens[b], 0), V - 1);
        std::copy(embedding + row * E, embedding + (row + 1) * E, x.data() + b * E);
    }
    for (size_t l = 0; l < layers.size(); ++l) {
        decode_layer(x.data(), B, E, H, D, I, eps, layers[l], positions, sin, cos, rotary_dim, k_caches[l],
                     v_caches[l], C, write, mask, products, x_next.data());
        x.swap(x_next);
    }
    greedy_head(x.data(), B, E, vocab, eps, ln_f_weight, ln_f_bias, lm_weight, lm_bias, products, next);
}

}  // namespace gptj_decode
