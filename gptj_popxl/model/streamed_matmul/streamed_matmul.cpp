/*
<%
setup_pybind11(cfg)
cfg['extra_compile_args'] = ['-std=c++17', '-O3', '-march=native', '-ffp-contract=fast', '-fopenmp',
                             '-fvisibility=hidden']
cfg['extra_link_args'] = ['-fopenmp']
cfg['dependencies'] = ['streamed_matmul.h']
%>
*/
// Python binding of the streamed matmul kernel, built on first import by cppimport (its Python op in
// this folder, __init__.py, loads it). Takes numpy arrays; torch tensors pass theirs via .numpy().
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

#include "streamed_matmul.h"

namespace py = pybind11;

namespace {

void require(bool ok, const std::string& message) {
    if (!ok)
        throw py::value_error(message);
}

bool is_float32_matrix(const py::array& a) {
    return a.ndim() == 2 && a.dtype().is(py::dtype::of<float>()) && (a.flags() & py::array::c_style);
}

void streamed_matmul(const py::array& x, const py::array& w, py::array& out, int num_threads) {
    require(is_float32_matrix(x) && is_float32_matrix(w) && is_float32_matrix(out),
            "x, w and out must be C-contiguous float32 matrices");
    const int64_t M = x.shape(0), K = x.shape(1), N = w.shape(1);
    require(w.shape(0) == K && out.shape(0) == M && out.shape(1) == N && out.writeable(),
            "x (M, K), w (K, N) and a writeable out (M, N) must agree, got x (" + std::to_string(M) + ", " +
                std::to_string(K) + "), w (" + std::to_string(w.shape(0)) + ", " + std::to_string(N) +
                "), out (" + std::to_string(out.shape(0)) + ", " + std::to_string(out.shape(1)) + ")");
    const auto* xs = static_cast<const float*>(x.data());
    const auto* ws = static_cast<const float*>(w.data());
    auto* ys = static_cast<float*>(out.mutable_data());
    py::gil_scoped_release release;
    gptj_streamed::streamed_matmul(xs, M, K, ws, N, ys, num_threads);
}

}  // namespace

PYBIND11_MODULE(streamed_matmul, m) {
    m.doc() = "float32 x @ w for a few rows of x, streaming w once (OpenMP over output columns).";
    m.def("streamed_matmul", &streamed_matmul, py::arg("x"), py::arg("w"), py::arg("out"),
          py::arg("num_threads") = 1, "Writes x (M, K) @ w (K, N) into out (M, N).");
}
