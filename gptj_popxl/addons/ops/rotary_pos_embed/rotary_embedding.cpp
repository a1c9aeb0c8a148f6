/*
<%
setup_pybind11(cfg)
cfg['extra_compile_args'] = ['-std=c++17', '-O3', '-march=native', '-ffp-contract=off', '-fvisibility=hidden', '-fopenmp']
cfg['extra_link_args'] = ['-fopenmp']
cfg['dependencies'] = ['rotary_embedding.h', '../../../popxl_cpu/kernels/parallel_for.h', '.cpu']
%>
*/
// Python binding of the rotary embedding kernel, built on first import by cppimport
// (its Python op in this folder, __init__.py, loads it). Takes numpy arrays; torch tensors pass theirs via .numpy().
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

#include "rotary_embedding.h"

namespace py = pybind11;

namespace {

std::string shape_of(const py::array& a) {
    std::string s = "(";
    for (py::ssize_t i = 0; i < a.ndim(); ++i)
        s += (i ? ", " : "") + std::to_string(a.shape(i));
    return s + (a.ndim() == 1 ? ",)" : ")");
}

std::string describe(const char* name, const py::array& a) {
    return std::string(name) + " " + shape_of(a) + " " + std::string(py::str(a.dtype()));
}

bool is_float16(const py::array& a) { return a.dtype().kind() == 'f' && a.itemsize() == 2; }

// Throws ValueError with message() when not ok; the message is built only then (building it calls
// into Python, which would cost more than a small call's work).
template <typename Message>
void require(bool ok, const Message& message) {
    if (!ok)
        throw py::value_error(message());
}

void require_contiguous(const char* name, const py::array& a) {
    require(a.flags() & py::array::c_style, [&] { return std::string(name) + " must be C-contiguous"; });
}

// out = rotation of x by the table rows at positions; see rotary_embedding.h for the formula.
void rotary_embedding(const py::array& x, const py::array& sin, const py::array& cos, const py::array& positions,
                      py::array& out, int64_t rotary_dim, bool inverse, int num_threads) {
    const bool half = is_float16(x);
    require(x.ndim() == 4 && (half || x.dtype().is(py::dtype::of<float>())), [&] {
        return "x must be (batch, seq, heads, head_dim) float32 or float16, got " + describe("x", x);
    });
    require(out.ndim() == 4 && out.dtype().is(x.dtype()) && out.shape(0) == x.shape(0) &&
                out.shape(1) == x.shape(1) && out.shape(2) == x.shape(2) && out.shape(3) == x.shape(3),
            [&] { return describe("out", out) + " must match " + describe("x", x); });
    require(out.writeable(), [] { return "out must be writeable"; });
    for (const auto* t : {&sin, &cos})
        require(t->ndim() == 2 && t->dtype().is(py::dtype::of<float>()) && t->shape(1) * 2 == rotary_dim &&
                    t->shape(0) == sin.shape(0),
                [&] {
                    return "sin and cos must be float32 (max_positions, rotary_dim/2 = " +
                           std::to_string(rotary_dim / 2) + "), got " + describe("sin", sin) + " and " +
                           describe("cos", cos);
                });
    require(positions.ndim() == 2 && positions.dtype().is(py::dtype::of<int32_t>()) &&
                positions.shape(0) == x.shape(0) && positions.shape(1) == x.shape(1),
            [&] {
                return "positions must be int32 (batch, seq) = (" + std::to_string(x.shape(0)) + ", " +
                       std::to_string(x.shape(1)) + "), got " + describe("positions", positions);
            });
    require_contiguous("x", x);
    require_contiguous("out", out);
    require_contiguous("sin", sin);
    require_contiguous("cos", cos);
    require_contiguous("positions", positions);

    const auto* s = static_cast<const float*>(sin.data());
    const auto* c = static_cast<const float*>(cos.data());
    const auto* p = static_cast<const int32_t*>(positions.data());
    const int64_t B = x.shape(0), S = x.shape(1), H = x.shape(2), D = x.shape(3), P = sin.shape(0);
    void* y = out.mutable_data();
    py::gil_scoped_release release;
    if (half)
        gptj_rotary::rotary_forward(static_cast<const gptj_rotary::half*>(x.data()), s, c, p,
                                    static_cast<gptj_rotary::half*>(y), B, S, H, D, rotary_dim, P, inverse,
                                    num_threads);
    else
        gptj_rotary::rotary_forward(static_cast<const float*>(x.data()), s, c, p, static_cast<float*>(y), B, S, H,
                                    D, rotary_dim, P, inverse, num_threads);
}

}  // namespace

PYBIND11_MODULE(rotary_embedding, m) {
    m.doc() = "GPT-J rotary position embedding kernel (float32 and float16, threaded over rows).";
    m.def("rotary_embedding", &rotary_embedding, py::arg("x"), py::arg("sin"), py::arg("cos"),
          py::arg("positions"), py::arg("out"), py::arg("rotary_dim"), py::arg("inverse") = false,
          py::arg("num_threads") = 1,
          "Writes into `out` the rotation of `x` (batch, seq, heads, head_dim) by the sin/cos table rows at "
          "`positions` (batch, seq) int32; `inverse` rotates backwards. Raises ValueError on bad shapes and "
          "IndexError on a position outside the tables.");
}
