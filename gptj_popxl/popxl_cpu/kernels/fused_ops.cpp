/*
<%
setup_pybind11(cfg)
cfg['extra_compile_args'] = ['-std=c++17', '-O3', '-march=native', '-ffp-contract=fast', '-fvisibility=hidden',
                             '-fopenmp', '-Wno-maybe-uninitialized']
cfg['extra_link_args'] = ['-fopenmp']
cfg['dependencies'] = ['vector_math.h', 'parallel_for.h', '.cpu']
%>
*/
// The runtime's fused kernels, float32, each one pass over memory: tanh-GELU and its gradient, the
// attention's softmax(x / scale + mask) and Adam's updater. Built on first use by cppimport (kernels/__init__.py loads it).
// Takes contiguous numpy arrays; torch tensors pass theirs via .numpy().
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

#include "parallel_for.h"
#include "vector_math.h"

namespace py = pybind11;
using Floats = py::array_t<float, py::array::c_style>;

namespace {

// Sixteen-element blocks a thread takes at least.
constexpr int64_t GRAIN_BLOCKS = gptj_kernels::GRAIN_VALUES / 16;

// out[i] = f(in[i], i) for every i, on up to `threads` threads; f takes sixteen at a time where AVX-512 is
// there. Threads split at whole blocks, so only the array's last few elements take the scalar path and the
// result is the same for any thread count.
template <typename F>
void map(const float* in, float* out, int64_t n, int threads, const F& f) {
    py::gil_scoped_release released;
    gptj_kernels::parallel_for((n + 15) / 16, GRAIN_BLOCKS, threads, [&](int64_t first, int64_t last) {
        int64_t i = 16 * first;
        const int64_t end = std::min(n, 16 * last);
#if defined(__AVX512F__)
        for (; i + 16 <= end; i += 16)
            _mm512_storeu_ps(out + i, f(_mm512_loadu_ps(in + i), i));
#elif defined(GPTJ_KERNELS_AVX2)
        for (; i + 8 <= end; i += 8)
            _mm256_storeu_ps(out + i, f(_mm256_loadu_ps(in + i), i));
#endif
        for (; i < end; ++i)
            out[i] = f(in[i], i);
    });
}

void require_same_size(const Floats& a, const Floats& b, const char* what) {
    if (a.size() != b.size())
        throw py::value_error(std::string(what) + ": arrays of " + std::to_string(a.size()) + " and " +
                              std::to_string(b.size()) + " elements");
}

struct Gelu {
    template <typename V>
    V operator()(V v, int64_t) const { return gptj_kernels::gelu_tanh(v); }
};

// dy[i] * gelu_tanh'(x[i]).
struct GeluGrad {
    const float* dy;
    float operator()(float v, int64_t i) const { return dy[i] * gptj_kernels::gelu_tanh_derivative(v); }
#if defined(__AVX512F__)
    __m512 operator()(__m512 v, int64_t i) const {
        return _mm512_mul_ps(_mm512_loadu_ps(dy + i), gptj_kernels::gelu_tanh_derivative(v));
    }
#elif defined(GPTJ_KERNELS_AVX2)
    __m256 operator()(__m256 v, int64_t i) const {
        return _mm256_mul_ps(_mm256_loadu_ps(dy + i), gptj_kernels::gelu_tanh_derivative(v));
    }
#endif
};

// out = gelu_tanh(x).
void gelu_tanh(const Floats& x, Floats& out, int threads) {
    require_same_size(x, out, "gelu_tanh");
    map(x.data(), out.mutable_data(), x.size(), threads, Gelu{});
}

// out = dy * gelu_tanh'(x).
void gelu_tanh_grad(const Floats& dy, const Floats& x, Floats& out, int threads) {
    require_same_size(x, out, "gelu_tanh_grad");
    require_same_size(dy, out, "gelu_tanh_grad");
    map(x.data(), out.mutable_data(), x.size(), threads, GeluGrad{dy.data()});
}

// Adam's updater m[i] / bc1 / (sqrt(v[i] / bc2) + eps) (+ wd * w[i] with a weight), each step a correctly
// rounded float32 operation (the weight decay term a fused multiply-add, as torch's addcmul_ is here).
struct AdamUpdater {
    const float *v, *w;
    float bc1, bc2, eps, wd;
    float operator()(float m, int64_t i) const {
        const float x = (m / bc1) / (std::sqrt(v[i] / bc2) + eps);
        return w ? x + wd * w[i] : x;
    }
#if defined(__AVX512F__)
    __m512 operator()(__m512 m, int64_t i) const {
        const __m512 vc = _mm512_div_ps(_mm512_loadu_ps(v + i), _mm512_set1_ps(bc2));
        const __m512 x = _mm512_div_ps(_mm512_div_ps(m, _mm512_set1_ps(bc1)),
                                       _mm512_add_ps(_mm512_sqrt_ps(vc), _mm512_set1_ps(eps)));
        return w ? _mm512_add_ps(x, _mm512_mul_ps(_mm512_set1_ps(wd), _mm512_loadu_ps(w + i))) : x;
    }
#elif defined(GPTJ_KERNELS_AVX2)
    __m256 operator()(__m256 m, int64_t i) const {
        const __m256 vc = _mm256_div_ps(_mm256_loadu_ps(v + i), _mm256_set1_ps(bc2));
        const __m256 x = _mm256_div_ps(_mm256_div_ps(m, _mm256_set1_ps(bc1)),
                                       _mm256_add_ps(_mm256_sqrt_ps(vc), _mm256_set1_ps(eps)));
        return w ? _mm256_add_ps(x, _mm256_mul_ps(_mm256_set1_ps(wd), _mm256_loadu_ps(w + i))) : x;
    }
#endif
};

// out = Adam's updater of the moments m, v (and the weight w, with weight decay wd; None without).
void adam_updater(const Floats& m, const Floats& v, const std::optional<Floats>& w, float bc1, float bc2, float eps,
                  float wd, Floats& out, int threads) {
    require_same_size(m, out, "adam_updater");
    require_same_size(v, out, "adam_updater");
    if (w)
        require_same_size(*w, out, "adam_updater");
    map(m.data(), out.mutable_data(), m.size(), threads, AdamUpdater{v.data(), w ? w->data() : nullptr, bc1, bc2,
                                                                      eps, wd});
}

// out[r] = softmax(x[r] / scale + mask[row(r)]) for each row r of the last axis' length n: x and out
// (rows, n), mask (mask_rows, n). The mask's rows go in blocks of `inner`, each block serving `repeat`
// consecutive blocks of x's rows, and the whole mask repeats: row(r) = (r / (inner * repeat) * inner +
// r % inner) % mask_rows. The attention's (queries, keys) mask under the batch and head axes is
// inner = mask_rows, repeat = 1; a (batch, 1, queries, keys) mask, the same for every head, is inner =
// queries, repeat = heads.
void scaled_masked_softmax(const Floats& x, const Floats& mask, float scale, int64_t inner, int64_t repeat,
                           Floats& out, int threads) {
    require_same_size(x, out, "scaled_masked_softmax");
    if (x.size() == 0)
        return;
    const int64_t n = mask.ndim() ? mask.shape(mask.ndim() - 1) : 0;
    if (n == 0 || mask.size() == 0 || x.ndim() == 0 || x.shape(x.ndim() - 1) != n || mask.size() % n ||
        x.size() % mask.size())
        throw py::value_error("scaled_masked_softmax: mask of " + std::to_string(mask.size()) +
                              " elements, rows of " + std::to_string(n) + ", does not tile x of " +
                              std::to_string(x.size()) + " elements");
    const int64_t rows = x.size() / n, mask_rows = mask.size() / n;
    if (inner < 1 || repeat < 1 || mask_rows % inner)
        throw py::value_error("scaled_masked_softmax: blocks of " + std::to_string(inner) + " rows repeated " +
                              std::to_string(repeat) + " times do not divide a mask of " +
                              std::to_string(mask_rows) + " rows");
    const float* in = x.data();
    const float* m = mask.data();
    float* y = out.mutable_data();
    py::gil_scoped_release released;
    gptj_kernels::parallel_rows(rows, n, threads, [&](int64_t r) {
        const int64_t row = (r / (inner * repeat) * inner + r % inner) % mask_rows;
        gptj_kernels::scaled_masked_softmax(in + r * n, m + row * n, scale, y + r * n, n);
    });
}

}  // namespace

PYBIND11_MODULE(fused_ops, m) {
    m.doc() = "The CPU runtime's fused kernels (float32).";
    // noconvert: a converted copy of `out` would take the result and leave the caller's array as it was.
    m.def("gelu_tanh", &gelu_tanh, py::arg("x").noconvert(), py::arg("out").noconvert(), py::arg("threads"));
    m.def("gelu_tanh_grad", &gelu_tanh_grad, py::arg("dy").noconvert(), py::arg("x").noconvert(),
          py::arg("out").noconvert(), py::arg("threads"));
    m.def("adam_updater", &adam_updater, py::arg("m").noconvert(), py::arg("v").noconvert(),
          py::arg("w").noconvert(), py::arg("bc1"), py::arg("bc2"), py::arg("eps"), py::arg("wd"),
          py::arg("out").noconvert(), py::arg("threads"));
    m.def("scaled_masked_softmax", &scaled_masked_softmax, py::arg("x").noconvert(), py::arg("mask").noconvert(),
          py::arg("scale"), py::arg("inner"), py::arg("repeat"), py::arg("out").noconvert(), py::arg("threads"));
}
