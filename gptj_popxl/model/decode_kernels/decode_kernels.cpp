/*
<%
setup_pybind11(cfg)
cfg['extra_compile_args'] = ['-std=c++17', '-O3', '-march=native', '-ffp-contract=fast', '-pthread',
                             '-fvisibility=hidden', '-Wno-maybe-uninitialized']
cfg['extra_link_args'] = ['-pthread']
cfg['dependencies'] = ['work_team.h', 'streamed_matmul.h', 'decode_attention.h', 'decode_layer.h']
%>
*/
// Python binding of the decode kernels, built on first import by cppimport (their Python ops in this
// folder, __init__.py, load it). Takes numpy arrays; torch tensors pass theirs via .numpy().
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "decode_layer.h"
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

// Size of axis `i` counted from the end (-1: the last), 0 when `a` has fewer axes.
py::ssize_t dim(const py::array& a, int i) { return a.ndim() + i >= 0 ? a.shape(a.ndim() + i) : 0; }

// A C-contiguous float32 array of `shape`, after any leading axes of size 1 (the runtime's replica axis);
// the message is built only on failure: this runs at every call.
void require_floats(const char* name, const py::array& a, std::initializer_list<py::ssize_t> shape) {
    const py::ssize_t extra = a.ndim() - py::ssize_t(shape.size());
    bool ok = a.dtype().is(py::dtype::of<float>()) && (a.flags() & py::array::c_style) && extra >= 0;
    for (py::ssize_t i = 0; ok && i < extra; ++i)
        ok = a.shape(i) == 1;
    py::ssize_t i = extra;
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

// The products of a kernel: by the sgemm at address `blas` (its Fortran interface), or streamed on
// num_threads threads when that is 0.
gptj_streamed::Products products(int num_threads, uintptr_t blas) {
    return {reinterpret_cast<gptj_streamed::FortranSgemm>(blas), num_threads};
}

// x (..., K) and w (..., K, N) C-contiguous float32 with any leading axes of size 1 on w's; out holds
// the M = x.size / K rows of N.
void matmul(const py::array& x, const py::array& w, py::array& out, int num_threads, uintptr_t blas) {
    const auto is_floats = [](const py::array& a) {
        return a.dtype().is(py::dtype::of<float>()) && (a.flags() & py::array::c_style) && a.ndim() >= 1;
    };
    const bool shapes = is_floats(x) && is_floats(w) && is_floats(out) && w.ndim() >= 2 &&
                        w.shape(w.ndim() - 2) == x.shape(x.ndim() - 1) &&
                        w.size() == w.shape(w.ndim() - 2) * w.shape(w.ndim() - 1) && out.writeable();
    const int64_t K = shapes ? x.shape(x.ndim() - 1) : 0, N = shapes ? w.shape(w.ndim() - 1) : 0;
    const int64_t M = K ? x.size() / K : 0;
    if (!shapes || out.size() != M * N)
        throw py::value_error("matmul: x (..., K), w (K, N) and a writeable out of (..., N) must be "
                              "C-contiguous float32 and agree, got x " + shape_of(x) + ", w " + shape_of(w) +
                              ", out " + shape_of(out));
    const auto* xs = static_cast<const float*>(x.data());
    const auto* ws = static_cast<const float*>(w.data());
    auto* ys = static_cast<float*>(out.mutable_data());
    py::gil_scoped_release release;
    products(num_threads, blas)(xs, M, K, ws, N, ys);
}

void decode_layer(const py::array& x, const py::array& ln_weight, const py::array& ln_bias, const py::array& w_qkv,
                  const py::array& w_in, const py::array& b_in, const py::array& w_out, const py::array& w_fc_out,
                  const py::array& b_fc_out, const py::array& positions, const py::array& sin, const py::array& cos,
                  py::array& k_cache, py::array& v_cache, int64_t write, const py::array& mask, float eps,
                  py::array& x_next, int num_threads, uintptr_t blas) {
    const int64_t B = dim(k_cache, -4), H = dim(k_cache, -3), D = dim(k_cache, -2), C = dim(k_cache, -1);
    const int64_t E = dim(x, -1), I = dim(w_in, -1), P = dim(sin, -2), half = dim(sin, -1);
    require_floats("x", x, {B, E});
    require_floats("ln_weight", ln_weight, {E});
    require_floats("ln_bias", ln_bias, {E});
    require_floats("w_qkv", w_qkv, {E, 3 * H * D});
    require_floats("w_in", w_in, {E, I});
    require_floats("b_in", b_in, {I});
    require_floats("w_out", w_out, {H * D, E});
    require_floats("w_fc_out", w_fc_out, {I, E});
    require_floats("b_fc_out", b_fc_out, {E});
    require_floats("k_cache", k_cache, {B, H, D, C});
    require_floats("v_cache", v_cache, {B, H, C, D});
    require_floats("sin", sin, {P, half});
    require_floats("cos", cos, {P, half});
    require_floats("mask", mask, {B, C});
    require_floats("x_next", x_next, {B, E});
    require(k_cache.writeable() && v_cache.writeable() && x_next.writeable(),
            "k_cache, v_cache and x_next must be writeable");
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
    const gptj_decode::LayerWeights weights{f(ln_weight), f(ln_bias), f(w_qkv),    f(w_in),
                                            f(b_in),      f(w_out),   f(w_fc_out), f(b_fc_out)};
    py::gil_scoped_release release;
    gptj_decode::decode_layer(f(x), B, E, H, D, I, eps, weights, p, f(sin), f(cos), 2 * half, g(k_cache), g(v_cache), C,
                              write, f(mask), products(num_threads, blas), g(x_next));
}

void greedy_head(const py::array& x, const py::array& ln_weight, const py::array& ln_bias, const py::array& w,
                 const py::array& bias, float eps, py::array& tokens, int num_threads, uintptr_t blas) {
    const int64_t E = dim(w, -2), V = dim(w, -1), B = E ? x.size() / E : 0;
    require_floats("x", x, {B, E});
    require_floats("ln_weight", ln_weight, {E});
    require_floats("ln_bias", ln_bias, {E});
    require_floats("w", w, {E, V});
    require_floats("bias", bias, {V});
    require(V > 0 && tokens.dtype().is(py::dtype::of<int32_t>()) && (tokens.flags() & py::array::c_style) &&
                tokens.size() == B && tokens.writeable(),
            "tokens must be " + std::to_string(B) + " writeable contiguous int32 values for " + std::to_string(V) +
                " logits per row, got " + shape_of(tokens));
    auto f = [](const py::array& a) { return static_cast<const float*>(a.data()); };
    auto* out = static_cast<int32_t*>(tokens.mutable_data());
    py::gil_scoped_release release;
    gptj_decode::greedy_head(f(x), B, E, V, eps, f(ln_weight), f(ln_bias), f(w), f(bias), products(num_threads, blas),
                              out);
}

}  // namespace

PYBIND11_MODULE(decode_kernels, m) {
    m.doc() = "float32 kernels of a decode step: few-row matmuls (streaming the weight, or by BLAS), a decoder "
              "layer over a KV cache, a greedy LM head.";
    m.def("matmul", &matmul, py::arg("x"), py::arg("w"), py::arg("out"), py::arg("num_threads") = 1,
          py::arg("blas") = 0,
          "Writes x (..., K) @ w (K, N) into out (..., N): by the sgemm at address blas (Fortran interface) or, "
          "when 0, streamed on num_threads threads.");
    m.def("decode_layer", &decode_layer, py::arg("x"), py::arg("ln_weight"), py::arg("ln_bias"), py::arg("w_qkv"),
          py::arg("w_in"), py::arg("b_in"), py::arg("w_out"), py::arg("w_fc_out"), py::arg("b_fc_out"),
          py::arg("positions"), py::arg("sin"), py::arg("cos"), py::arg("k_cache"), py::arg("v_cache"),
          py::arg("write"), py::arg("mask"), py::arg("eps"), py::arg("x_next"),
          py::arg("num_threads") = 1, py::arg("blas") = 0,
          "One decoder layer of a decode step (see decode_layer.h), its products by the sgemm at address blas "
          "(Fortran interface) or, when 0, streamed on num_threads threads: writes the new key and value into the caches at "
          "column `write` and the layer's output into x_next (batch, n_embd).");
    m.def("greedy_head", &greedy_head, py::arg("x"), py::arg("ln_weight"), py::arg("ln_bias"), py::arg("w"),
          py::arg("bias"), py::arg("eps"), py::arg("tokens"), py::arg("num_threads") = 1, py::arg("blas") = 0,
          "Writes into tokens (batch,) int32 each row's first largest logit of layer_norm(x) @ w + bias (the product "
          "as decode_layer's).");
}
