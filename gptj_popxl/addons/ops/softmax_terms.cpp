/*
<%
setup_pybind11(cfg)
cfg['extra_compile_args'] = ['-std=c++17', '-O3', '-march=native', '-ffp-contract=fast', '-fvisibility=hidden',
                             '-fopenmp', '-Wno-maybe-uninitialized', '-Wno-uninitialized']
cfg['extra_link_args'] = ['-fopenmp']
cfg['dependencies'] = ['../../popxl_cpu/kernels/vector_math.h', '../../popxl_cpu/kernels/parallel_for.h', '.cpu']
%>
*/
// The sharded cross entropy's two passes over the float32 logits (..., classes), on the CPU runtime:
// the softmax denominators, reading the logits once, and the softmax part of their gradient, reading
// them once and writing once. torch's composition (shift, exp, sum; shift, exp, scale) made three to
// five passes over a 50 MB block each way. Built on first use by cppimport (cross_entropy_sharded_loss.py
// loads it); takes contiguous numpy arrays, torch tensors pass theirs via .numpy().
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "../../popxl_cpu/kernels/parallel_for.h"
#include "../../popxl_cpu/kernels/vector_math.h"

namespace py = pybind11;
using Floats = py::array_t<float, py::array::c_style>;

namespace {

// x's rows (its leading axes, the replicas' included, flattened) and their length (the classes), checking
// that each per-row array has one value per row.
struct Rows {
    int64_t count, length;
};

Rows rows_of(const Floats& x, std::initializer_list<const Floats*> per_row, const char* what) {
    if (x.ndim() == 0)
        throw py::value_error(std::string(what) + ": logits need a class axis");
    int64_t rows = 1;
    for (py::ssize_t axis = 0; axis + 1 < x.ndim(); ++axis)
        rows *= x.shape(axis);
    for (const Floats* a : per_row)
        if (a->size() != rows)
            throw py::value_error(std::string(what) + ": " + std::to_string(rows) + " rows of logits, but " +
                                  std::to_string(a->size()) + " values per row");
    return {rows, x.shape(x.ndim() - 1)};
}

// totals[r] = sum_c exp(x[r, c] - shift[r]), for shift[r] >= every x[r, c] (the max over all shards).
void shifted_exp_sums(const Floats& x, const Floats& shift, Floats& totals, int threads) {
    const Rows shape = rows_of(x, {&shift, &totals}, "shifted_exp_sums");
    const int64_t rows = shape.count, n = shape.length;
    const float* in = x.data();
    const float* top = shift.data();
    float* out = totals.mutable_data();
    py::gil_scoped_release released;
    gptj_kernels::parallel_rows(rows, n, threads, [&](int64_t r) {
        const float* v = in + r * n;
        int64_t c = 0;
        float total = 0.0f;
#ifdef __AVX512F__
        // Four sums of sixteen lanes each: shorter chains of additions round less (torch sums pairwise).
        const __m512 t = _mm512_set1_ps(top[r]);
        __m512 sums[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (; c + 64 <= n; c += 64)
            for (int k = 0; k < 4; ++k)
                sums[k] = _mm512_add_ps(
                    sums[k], gptj_kernels::exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(v + c + 16 * k), t)));
        for (; c + 16 <= n; c += 16)
            sums[0] =
                _mm512_add_ps(sums[0], gptj_kernels::exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(v + c), t)));
        total = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(sums[0], sums[1]), _mm512_add_ps(sums[2], sums[3])));
#elif defined(GPTJ_KERNELS_AVX2)
        // Eight sums of eight lanes each, as many partial sums as the sixteen-wide loop's.
        const __m256 t = _mm256_set1_ps(top[r]);
        __m256 sums[8];
        for (__m256& sum : sums)
            sum = _mm256_setzero_ps();
        for (; c + 64 <= n; c += 64)
            for (int k = 0; k < 8; ++k)
                sums[k] = _mm256_add_ps(
                    sums[k], gptj_kernels::exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(v + c + 8 * k), t)));
        for (; c + 8 <= n; c += 8)
            sums[0] = _mm256_add_ps(sums[0], gptj_kernels::exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(v + c), t)));
        for (int k = 1; k < 8; ++k)
            sums[0] = _mm256_add_ps(sums[0], sums[k]);
        total = gptj_kernels::reduce_add(sums[0]);
#endif
        for (; c < n; ++c)
            total += gptj_kernels::exp_nonpositive(v[c] - top[r]);
        out[r] = total;
    });
}

// out[r, c] = exp(x[r, c] - shift[r]) * scale[r]; out may be x.
void scaled_shifted_exp(const Floats& x, const Floats& shift, const Floats& scale, Floats& out, int threads) {
    const Rows shape = rows_of(x, {&shift, &scale}, "scaled_shifted_exp");
    const int64_t rows = shape.count, n = shape.length;
    if (out.size() != x.size())
        throw py::value_error("scaled_shifted_exp: out of " + std::to_string(out.size()) + " elements for logits of " +
                              std::to_string(x.size()));
    const float* in = x.data();
    const float* top = shift.data();
    const float* factor = scale.data();
    float* y = out.mutable_data();
    py::gil_scoped_release released;
    gptj_kernels::parallel_rows(rows, n, threads, [&](int64_t r) {
        const float* v = in + r * n;
        float* w = y + r * n;
        int64_t c = 0;
#ifdef __AVX512F__
        const __m512 t = _mm512_set1_ps(top[r]), f = _mm512_set1_ps(factor[r]);
        for (; c + 16 <= n; c += 16)
            _mm512_storeu_ps(
                w + c, _mm512_mul_ps(gptj_kernels::exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(v + c), t)), f));
#elif defined(GPTJ_KERNELS_AVX2)
        const __m256 t = _mm256_set1_ps(top[r]), f = _mm256_set1_ps(factor[r]);
        for (; c + 8 <= n; c += 8)
            _mm256_storeu_ps(
                w + c, _mm256_mul_ps(gptj_kernels::exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(v + c), t)), f));
#endif
        for (; c < n; ++c)
            w[c] = gptj_kernels::exp_nonpositive(v[c] - top[r]) * factor[r];
    });
}

}  // namespace

PYBIND11_MODULE(softmax_terms, m) {
    m.doc() = "The sharded cross entropy's passes over float32 logits.";
    // noconvert: a converted copy of `out` would take the result and leave the caller's array as it was.
    m.def("shifted_exp_sums", &shifted_exp_sums, py::arg("x").noconvert(), py::arg("shift").noconvert(),
          py::arg("totals").noconvert(), py::arg("threads"));
    m.def("scaled_shifted_exp", &scaled_shifted_exp, py::arg("x").noconvert(), py::arg("shift").noconvert(),
          py::arg("scale").noconvert(), py::arg("out").noconvert(), py::arg("threads"));
}
