/*
<%
setup_pybind11(cfg)
cfg['extra_compile_args'] = ['-std=c++17', '-O3', '-march=native', '-ffp-contract=fast', '-fopenmp',
                             '-fvisibility=hidden']
cfg['extra_link_args'] = ['-fopenmp']
cfg['dependencies'] = ['streamed_matmul.h', 'decode_attention.h']
%>
*/
// Python binding of the decode kernels, built on first import by cppimport (their Python ops in this
// folder, __init__.py, load it). Takes numpy arrays; torch tensors pass theirs via .numpy().
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

#include "decode_attention.h"
#include "streamed_matmul.h"

namespace py = pybind11;

namespace {

void require(bool ok, const std::string& message) {
    if (!ok)
        throw py::value_error(message);
}

std::string shape_of(const py::array& a) {
    std::string s = "(";
    for (py::ssize_t i = 0; i < a.ndim(); ++i)
        s += (i ? ", " : "") + std::to_string(a.shape(i));
    return s + (a.ndim() == 1 ? ",)" : ")");
}

// A C-contiguous float32 array of `shape` (the message is built only on failure: this runs at every call).
void require_floats(const char* name, const py::array& a, std::initializer_list<py::ssize_t> shape) {
    bool ok = a.dtype().is(py::dtype::of<float>()) && (a.flags() & py::array::c_style) &&
              a.ndim() == py::ssize_t(shape.size());
    py::ssize_t i = 0;
    for (auto n : shape)
        ok = ok && a.shape(i++) == n;
    if (ok)
        return;
    std::string wanted = "(";
    i = 0;
    for (auto n : shape)
        wanted += (i++ ? ", " : "") + std::to_string(n);
    throw py::value_error(std::string(name) + " must be a C-contiguous float32 array " + wanted +
                          (shape.size() == 1 ? ",)" : ")") + ", got " + shape_of(a) + " " +
                          std::string(py::str(a.dtype())));
}

// x (..., K) and w (..., K, N) C-contiguous float32 with any leading axes of size 1 on w's; out holds
// the M = x.size / K rows of N.
void streamed_matmul(const py::array& x, const py::array& w, py::array& out, int num_threads) {
    const auto is_floats = [](const py::array& a) {
        return a.dtype().is(py::dtype::of<float>()) && (a.flags() & py::array::c_style) && a.ndim() >= 1;
    };
    const bool shapes = is_floats(x) && is_floats(w) && is_floats(out) && w.ndim() >= 2 &&
                        w.shape(w.ndim() - 2) == x.shape(x.ndim() - 1) &&
                        w.size() == w.shape(w.ndim() - 2) * w.shape(w.ndim() - 1) && out.writeable();
    const int64_t K = shapes ? x.shape(x.ndim() - 1) : 0, N = shapes ? w.shape(w.ndim() - 1) : 0;
    const int64_t M = K ? x.size() / K : 0;
    if (!shapes || out.size() != M * N)
        throw py::value_error("streamed_matmul: x (..., K), w (K, N) and a writeable out of (..., N) must be "
                              "C-contiguous float32 and agree, got x " + shape_of(x) + ", w " + shape_of(w) +
                              ", out " + shape_of(out));
    const auto* xs = static_cast<const float*>(x.data());
    const auto* ws = static_cast<const float*>(w.data());
    auto* ys = static_cast<float*>(out.mutable_data());
    py::gil_scoped_release release;
    gptj_streamed::streamed_matmul(xs, M, K, ws, N, ys, num_threads);
}

void decode_attention(const py::array& qkv, const py::array& positions, const py::array& sin, const py::array& cos,
                      const py::array& k_cache, const py::array& v_cache, int64_t write, const py::array& mask,
                      py::array& z, py::array& k_new, py::array& v_new) {
    require(k_cache.ndim() == 4, "k_cache must be (batch, heads, head_dim, cache_len), got " + shape_of(k_cache));
    const int64_t B = k_cache.shape(0), H = k_cache.shape(1), D = k_cache.shape(2), C = k_cache.shape(3);
    require(sin.ndim() == 2, "sin must be (positions, rotary_dim / 2), got " + shape_of(sin));
    const int64_t P = sin.shape(0), half = sin.shape(1);
    require_floats("k_cache", k_cache, {B, H, D, C});
    require_floats("v_cache", v_cache, {B, H, C, D});
    require_floats("qkv", qkv, {B, 3 * H * D});
    require_floats("sin", sin, {P, half});
    require_floats("cos", cos, {P, half});
    require_floats("mask", mask, {B, C});
    require_floats("z", z, {B, H * D});
    require_floats("k_new", k_new, {B, H, D});
    require_floats("v_new", v_new, {B, H, D});
    require(2 * half <= D, "rotary_dim " + std::to_string(2 * half) + " exceeds head_dim " + std::to_string(D));
    require(write >= 0 && write < C, "write column " + std::to_string(write) + " outside the cache's " +
                                         std::to_string(C) + " columns");
    require(positions.dtype().is(py::dtype::of<int32_t>()) && (positions.flags() & py::array::c_style) &&
                positions.size() == B,
            "positions must be " + std::to_string(B) + " contiguous int32 values, got " + shape_of(positions));
    const auto* p = static_cast<const int32_t*>(positions.data());
    for (int64_t b = 0; b < B; ++b)
        if (p[b] < 0 || p[b] >= P)
            throw py::index_error("position " + std::to_string(p[b]) + " of row " + std::to_string(b) +
                                  " outside the rotary tables' " + std::to_string(P) + " rows");
    auto f = [](const py::array& a) { return static_cast<const float*>(a.data()); };
    auto g = [](py::array& a) { return static_cast<float*>(a.mutable_data()); };
    py::gil_scoped_release release;
    gptj_decode::decode_attention(f(qkv), p, f(sin), f(cos), 2 * half, f(k_cache), f(v_cache), write, f(mask), B, H,
                                  D, C, g(z), g(k_new), g(v_new));
}

}  // namespace

PYBIND11_MODULE(decode_kernels, m) {
    m.doc() = "float32 kernels of a decode step: few-row matmuls streaming the weight, attention over a KV cache.";
    m.def("streamed_matmul", &streamed_matmul, py::arg("x"), py::arg("w"), py::arg("out"),
          py::arg("num_threads") = 1, "Writes x (..., K) @ w (K, N) into out (..., N).");
    m.def("decode_attention", &decode_attention, py::arg("qkv"), py::arg("positions"), py::arg("sin"), py::arg("cos"),
          py::arg("k_cache"), py::arg("v_cache"), py::arg("write"), py::arg("mask"), py::arg("z"), py::arg("k_new"),
          py::arg("v_new"),
          "One decode step's attention (see decode_attention.h): writes z (batch, heads * head_dim) and the rotated "
          "new key and the value (batch, heads, head_dim) into k_new and v_new; the caches are only read.");
}
