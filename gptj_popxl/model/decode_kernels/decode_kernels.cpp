/*
<%
setup_pybind11(cfg)
cfg['extra_compile_args'] = ['-std=c++17', '-O3', '-march=native', '-ffp-contract=fast', '-pthread', '-fopenmp',
                             '-fvisibility=hidden', '-Wno-maybe-uninitialized']
cfg['extra_link_args'] = ['-pthread', '-fopenmp']
cfg['dependencies'] = ['work_team.h', 'streamed_matmul.h', 'decode_attention.h', 'decode_layer.h',
                       '../../popxl_cpu/kernels/vector_math.h', '.cpu']
%>
*/
// Python binding of the decode kernels, built on first import by cppimport (their Python ops in this
// folder, __init__.py, load it). Takes numpy arrays; torch tensors pass theirs via .numpy().
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

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

// numpy's dtype for the kernels' element type T: float32, or float16 for gptj_streamed::Half.
template <typename T>
py::dtype dtype_of() {
    constexpr int NPY_HALF = 23;  // numpy's type number for float16 (pybind11 has no float16 type)
    return std::is_same_v<T, float> ? py::dtype::of<float>() : py::dtype(NPY_HALF);
}

// A C-contiguous array of T (float32 unless given) of `shape`, after any leading axes of size 1 (the
// runtime's replica axis); the message is built only on failure: this runs at every call.
template <typename T = float>
void require_floats(const char* name, const py::array& a, std::initializer_list<py::ssize_t> shape) {
    const py::ssize_t extra = a.ndim() - py::ssize_t(shape.size());
    bool ok = a.dtype().is(dtype_of<T>()) && (a.flags() & py::array::c_style) && extra >= 0;
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
    throw py::value_error(std::string(name) + " must be a C-contiguous " + std::string(py::str(dtype_of<T>())) +
                          " array " + wanted +
                          (shape.size() == 1 ? ",)" : ")") + ", got " + shape_of(a) + " " +
                          std::string(py::str(a.dtype())));
}

// Whether the model's tensors, of which the weight `a` is one, are float16 (else float32): the layer
// kernels run on one element type, which the checks then require of every model tensor (a weight
// decides: an activation of the wrong type is then the one named).
bool is_half(const py::array& a) { return a.dtype().is(dtype_of<gptj_streamed::Half>()); }

// The products of a kernel: by the sgemm at address `blas` (its Fortran interface; float16 weights
// widened for it), or streamed when that is 0, on num_threads threads (a layer's attention heads too).
gptj_streamed::Products products(int num_threads, uintptr_t blas) {
    return {reinterpret_cast<gptj_streamed::FortranSgemm>(blas), num_threads};
}

// x (..., K) and out C-contiguous float32, w (..., K, N) C-contiguous float32 or float16 with any leading
// axes of size 1; out holds the M = x.size / K rows of N. A float16 w is streamed (blas must be 0).
void matmul(const py::array& x, const py::array& w, py::array& out, int num_threads, uintptr_t blas) {
    const auto contiguous = [](const py::array& a) { return (a.flags() & py::array::c_style) && a.ndim() >= 1; };
    const auto is_floats = [&](const py::array& a) { return a.dtype().is(py::dtype::of<float>()) && contiguous(a); };
    const bool half = is_half(w);
    const bool shapes = is_floats(x) && (is_floats(w) || (half && contiguous(w))) && is_floats(out) && w.ndim() >= 2 &&
                        w.shape(w.ndim() - 2) == x.shape(x.ndim() - 1) &&
                        w.size() == w.shape(w.ndim() - 2) * w.shape(w.ndim() - 1) && out.writeable();
    const int64_t K = shapes ? x.shape(x.ndim() - 1) : 0, N = shapes ? w.shape(w.ndim() - 1) : 0;
    int64_t M = 1;  // the rows: x's leading axes (x may have no columns)
    for (py::ssize_t i = 0; i + 1 < x.ndim(); ++i)
        M *= x.shape(i);
    if (!shapes || out.size() != M * N)
        throw py::value_error("matmul: x (..., K) and a writeable out of (..., N) must be C-contiguous float32, "
                              "w (K, N) C-contiguous float32 or float16, and their shapes agree, got x " +
                              shape_of(x) + ", w " + shape_of(w) + " " + std::string(py::str(w.dtype())) + ", out " +
                              shape_of(out));
    require(!(half && blas), "matmul: a float16 w is streamed only (blas must be 0)");
    const auto* xs = static_cast<const float*>(x.data());
    auto* ys = static_cast<float*>(out.mutable_data());
    py::gil_scoped_release release;
    if (half)
        gptj_streamed::streamed_matmul(xs, M, K, static_cast<const gptj_streamed::Half*>(w.data()), N, ys, num_threads);
    else
        products(num_threads, blas)(xs, M, K, static_cast<const float*>(w.data()), N, ys);
}

template <typename T = float>
const T* floats(const py::array& a) { return static_cast<const T*>(a.data()); }
template <typename T = float>
T* floats(py::array& a) { return static_cast<T*>(a.mutable_data()); }

// Runs run(element) with an element of the model's type, float16 (gptj_streamed::Half) when `a`, a model
// weight, is float16 and float32 otherwise: the kernel's body, generic in that type.
template <typename Run>
void for_model_type(const py::array& a, Run&& run) {
    if (is_half(a))
        run(gptj_streamed::Half{});
    else
        run(float{});
}

// A layer's 8 weights (ln_weight, ln_bias, w_qkv, w_in, b_in, w_out, w_fc_out, b_fc_out), checked
// against the step's sizes.
template <typename T>
gptj_decode::LayerWeights<T> layer_weights(const py::array* w, int64_t E, int64_t H, int64_t D, int64_t I) {
    require_floats<T>("ln_weight", w[0], {E});
    require_floats<T>("ln_bias", w[1], {E});
    require_floats<T>("w_qkv", w[2], {E, 3 * H * D});
    require_floats<T>("w_in", w[3], {E, I});
    require_floats<T>("b_in", w[4], {I});
    require_floats<T>("w_out", w[5], {H * D, E});
    require_floats<T>("w_fc_out", w[6], {I, E});
    require_floats<T>("b_fc_out", w[7], {E});
    return {floats<T>(w[0]), floats<T>(w[1]), floats<T>(w[2]), floats<T>(w[3]),
            floats<T>(w[4]), floats<T>(w[5]), floats<T>(w[6]), floats<T>(w[7])};
}

// The sizes of a decode step, from the (first) layer's caches, weights and rotary tables.
struct StepSizes {
    int64_t B, H, D, C, E, I, P, half;
};

// The (rows, per_row) contiguous int32 positions, each a row of the (P, rotary_dim / 2) rotary tables.
const int32_t* table_rows(const py::array& positions, int64_t rows, int64_t per_row, int64_t P) {
    require(positions.dtype().is(py::dtype::of<int32_t>()) && (positions.flags() & py::array::c_style) &&
                positions.size() == rows * per_row,
            "positions must be (" + std::to_string(rows) + ", " + std::to_string(per_row) +
                ") contiguous int32 values, got " + shape_of(positions));
    const auto* p = static_cast<const int32_t*>(positions.data());
    for (int64_t i = 0; i < rows * per_row; ++i)
        if (p[i] < 0 || p[i] >= P)
            throw py::index_error("positions[" + std::to_string(i / per_row) + ", " + std::to_string(i % per_row) +
                                  "] = " + std::to_string(p[i]) + " is outside the rotary tables' " +
                                  std::to_string(P) + " rows");
    return p;
}

// Checks what every layer of a step shares (positions, rotary tables, mask, write column) and one
// layer's caches; returns the positions.
template <typename T>
const int32_t* check_step(const StepSizes& n, py::array& k_cache, py::array& v_cache, const py::array& positions,
                          const py::array& sin, const py::array& cos, int64_t write, const py::array& mask) {
    require_floats<T>("k_cache", k_cache, {n.B, n.H, n.D, n.C});
    require_floats<T>("v_cache", v_cache, {n.B, n.H, n.C, n.D});
    require(k_cache.writeable() && v_cache.writeable(), "k_cache and v_cache must be writeable");
    require_floats("sin", sin, {n.P, n.half});
    require_floats("cos", cos, {n.P, n.half});
    require_floats("mask", mask, {n.B, n.C});
    require(2 * n.half <= n.D, "rotary_dim " + std::to_string(2 * n.half) + " exceeds head_dim " + std::to_string(n.D));
    require(write >= 0 && write < n.C, "write column " + std::to_string(write) + " outside the cache's " +
                                           std::to_string(n.C) + " columns");
    return table_rows(positions, n.B, 1, n.P);
}

// B writeable int32 values in a C-contiguous array.
int32_t* int32s(const char* name, py::array& a, int64_t B) {
    require(a.dtype().is(py::dtype::of<int32_t>()) && (a.flags() & py::array::c_style) && a.size() == B &&
                a.writeable(),
            std::string(name) + " must be " + std::to_string(B) + " writeable contiguous int32 values, got " +
                shape_of(a));
    return static_cast<int32_t*>(a.mutable_data());
}

// The LayerNorm and LM head of a greedy head, checked; returns the vocabulary size.
template <typename T>
int64_t check_head(int64_t E, const py::array& ln_weight, const py::array& ln_bias, const py::array& w,
                   const py::array& bias) {
    const int64_t V = dim(w, -1);
    require_floats<T>("ln_weight", ln_weight, {E});
    require_floats<T>("ln_bias", ln_bias, {E});
    require_floats<T>("w", w, {E, V});
    require_floats<T>("bias", bias, {V});
    require(V > 0, "the LM head has no columns");
    return V;
}

void decode_layer(const py::array& x, const py::array& ln_weight, const py::array& ln_bias, const py::array& w_qkv,
                  const py::array& w_in, const py::array& b_in, const py::array& w_out, const py::array& w_fc_out,
                  const py::array& b_fc_out, const py::array& positions, const py::array& sin, const py::array& cos,
                  py::array& k_cache, py::array& v_cache, int64_t write, const py::array& mask, float eps,
                  py::array& x_next, int num_threads, uintptr_t blas) {
    for_model_type(w_qkv, [&](auto element) {
        using T = decltype(element);
        const StepSizes n{dim(k_cache, -4), dim(k_cache, -3), dim(k_cache, -2), dim(k_cache, -1),
                          dim(x, -1),       dim(w_in, -1),    dim(sin, -2),     dim(sin, -1)};
        const py::array weights[] = {ln_weight, ln_bias, w_qkv, w_in, b_in, w_out, w_fc_out, b_fc_out};
        const auto layer = layer_weights<T>(weights, n.E, n.H, n.D, n.I);
        const int32_t* p = check_step<T>(n, k_cache, v_cache, positions, sin, cos, write, mask);
        require_floats<T>("x", x, {n.B, n.E});
        require_floats<T>("x_next", x_next, {n.B, n.E});
        require(x_next.writeable(), "x_next must be writeable");
        const auto product = products(num_threads, blas);
        py::gil_scoped_release release;
        gptj_decode::decode_layer(floats<T>(x), n.B, n.E, n.H, n.D, n.I, eps, layer, p, floats(sin), floats(cos),
                                  2 * n.half, floats<T>(k_cache), floats<T>(v_cache), n.C, write, floats(mask),
                                  product, floats<T>(x_next));
    });
}

void prefill_layer(const py::array& x, const py::array& ln_weight, const py::array& ln_bias, const py::array& w_qkv,
                   const py::array& w_in, const py::array& b_in, const py::array& w_out, const py::array& w_fc_out,
                   const py::array& b_fc_out, const py::array& positions, const py::array& sin, const py::array& cos,
                   const py::array& mask, float eps, py::array& k, py::array& v, py::array& x_next, int num_threads,
                   uintptr_t blas) {
    for_model_type(w_qkv, [&](auto element) {
        using T = decltype(element);
        const int64_t B = dim(k, -4), H = dim(k, -3), S = dim(k, -2), D = dim(k, -1), E = dim(x, -1), I = dim(w_in, -1);
        const int64_t P = dim(sin, -2), half = dim(sin, -1);
        require_floats<T>("k", k, {B, H, S, D});  // the sizes come from k: checked first
        const py::array weights[] = {ln_weight, ln_bias, w_qkv, w_in, b_in, w_out, w_fc_out, b_fc_out};
        const auto layer = layer_weights<T>(weights, E, H, D, I);
        require_floats<T>("x", x, {B, S, E});
        require_floats<T>("x_next", x_next, {B, S, E});
        require_floats<T>("v", v, {B, H, S, D});
        require_floats("mask", mask, {B, S, S});
        require_floats("sin", sin, {P, half});
        require_floats("cos", cos, {P, half});
        using Named = std::pair<const char*, const py::array*>;
        for (const auto& [name, a] : {Named{"k", &k}, Named{"v", &v}, Named{"x_next", &x_next}})
            require(a->writeable(), std::string(name) + " must be writeable");
        require(2 * half <= D, "rotary_dim " + std::to_string(2 * half) + " exceeds head_dim " + std::to_string(D));
        const int32_t* p = table_rows(positions, B, S, P);
        const auto product = products(num_threads, blas);
        py::gil_scoped_release release;
        gptj_decode::prefill_layer(floats<T>(x), B, S, E, H, D, I, eps, layer, p, floats(sin), floats(cos), 2 * half,
                                   floats(mask), product, floats<T>(k), floats<T>(v),
                                   floats<T>(x_next));
    });
}

void greedy_head(const py::array& x, const py::array& ln_weight, const py::array& ln_bias, const py::array& w,
                 const py::array& bias, float eps, py::array& tokens, int num_threads, uintptr_t blas) {
    for_model_type(w, [&](auto element) {
        using T = decltype(element);
        const int64_t E = dim(w, -2), B = E ? x.size() / E : 0;
        const int64_t V = check_head<T>(E, ln_weight, ln_bias, w, bias);
        require_floats<T>("x", x, {B, E});
        int32_t* out = int32s("tokens", tokens, B);
        const auto product = products(num_threads, blas);
        py::gil_scoped_release release;
        gptj_decode::greedy_head(floats<T>(x), B, E, V, eps, floats<T>(ln_weight), floats<T>(ln_bias), floats<T>(w),
                                 floats<T>(bias), product, out);
    });
}

// `steps` greedy decode steps, each fed the previous one's tokens: step i unmasks column
// (column + i) % cache_len of mask (every row attends to the column it writes from then on), runs
// the whole step (embedding, every layer writing its caches at that column, greedy head) at the rows'
// positions, writes its tokens into column first_step + i of out (0 where that is outside out, as
// dynamic_update_), then advances the positions, wrapping at n_positions. token and positions end
// as the next step's.
void greedy_decode_steps(py::array& token, py::array& positions, int64_t column, py::array& mask, py::array& out,
                         int64_t first_step, int64_t steps, int64_t n_positions, const py::array& embedding,
                         const std::vector<py::array>& weights, const py::array& sin, const py::array& cos,
                         std::vector<py::array>& k_caches, std::vector<py::array>& v_caches,
                         const py::array& ln_weight, const py::array& ln_bias, const py::array& w,
                         const py::array& bias, float eps, int num_threads, uintptr_t blas) {
    for_model_type(embedding, [&](auto element) {
        using T = decltype(element);
        const size_t L = k_caches.size();
        require(L > 0 && v_caches.size() == L && weights.size() == 8 * L,
                "greedy_decode_steps takes 8 weights and a key and a value cache per layer, got " +
                    std::to_string(weights.size()) + " weights, " + std::to_string(L) + " key and " +
                    std::to_string(v_caches.size()) + " value caches");
        const StepSizes n{dim(k_caches[0], -4), dim(k_caches[0], -3), dim(k_caches[0], -2), dim(k_caches[0], -1),
                          dim(embedding, -1),   dim(weights[3], -1),  dim(sin, -2),         dim(sin, -1)};
        const int64_t V = dim(embedding, -2), vocab = check_head<T>(n.E, ln_weight, ln_bias, w, bias);
        require_floats<T>("embedding", embedding, {V, n.E});
        require(V > 0, "the embedding table has no rows");
        require(steps >= 0 && n_positions > 0 && n_positions <= n.P,
                "steps must be >= 0 and n_positions in [1, " + std::to_string(n.P) + "], got " + std::to_string(steps) +
                    " and " + std::to_string(n_positions));
        require(column >= 0 && column < n.C, "column " + std::to_string(column) + " outside the cache's " +
                                                 std::to_string(n.C) + " columns");
        std::vector<gptj_decode::LayerWeights<T>> layers;
        std::vector<T*> keys, values;
        const int32_t* checked = nullptr;
        for (size_t l = 0; l < L; ++l) {
            layers.push_back(layer_weights<T>(&weights[8 * l], n.E, n.H, n.D, n.I));
            checked = check_step<T>(n, k_caches[l], v_caches[l], positions, sin, cos, column, mask);
            keys.push_back(floats<T>(k_caches[l]));
            values.push_back(floats<T>(v_caches[l]));
        }
        require(positions.writeable(), "positions must be writeable");
        int32_t* p = const_cast<int32_t*>(checked);
        for (int64_t b = 0; b < n.B; ++b)
            require(p[b] < n_positions, "position " + std::to_string(p[b]) + " of row " + std::to_string(b) +
                                            " is not below n_positions " + std::to_string(n_positions));
        int32_t* ids = int32s("token", token, n.B);
        require(out.dtype().is(py::dtype::of<int32_t>()) && (out.flags() & py::array::c_style) && out.writeable() &&
                    dim(out, -2) == n.B && out.size() == n.B * dim(out, -1),
                "out must be a writeable C-contiguous int32 (" + std::to_string(n.B) + ", chunk) array, got " +
                    shape_of(out));
        require(dim(out, -1) > 0, "out must have a column for the tokens, got " + shape_of(out));
        require(mask.writeable(), "mask must be writeable");
        const int64_t chunk = dim(out, -1);
        int32_t* tokens = static_cast<int32_t*>(out.mutable_data());
        float* unmasked = floats(mask);
        std::vector<int32_t> next(n.B);
        const auto product = products(num_threads, blas);
        py::gil_scoped_release release;
        for (int64_t i = 0; i < steps; ++i) {
            const int64_t write = (column + i) % n.C, index = first_step + i;
            for (int64_t b = 0; b < n.B; ++b)
                unmasked[b * n.C + write] = 0.0f;
            gptj_decode::greedy_decode_step(ids, floats<T>(embedding), V, n.B, n.E, n.H, n.D, n.I, eps, layers, p,
                                            floats(sin), floats(cos), 2 * n.half, keys, values, n.C, write, unmasked,
                                            floats<T>(ln_weight), floats<T>(ln_bias), floats<T>(w), floats<T>(bias),
                                            vocab, product, next.data());
            for (int64_t b = 0; b < n.B; ++b) {
                tokens[b * chunk + (index >= 0 && index < chunk ? index : 0)] = next[b];
                ids[b] = next[b];
                p[b] = int32_t((p[b] + 1) % n_positions);
            }
        }
    });
}

}  // namespace

PYBIND11_MODULE(decode_kernels, m) {
    m.doc() = "float32 and float16 kernels of a decode step: few-row matmuls (streaming the weight, or by BLAS), "
              "a decoder layer over a KV cache, a greedy LM head.";
    m.def("matmul", &matmul, py::arg("x"), py::arg("w"), py::arg("out"), py::arg("num_threads") = 1,
          py::arg("blas") = 0,
          "Writes x (..., K) @ w (K, N) into out (..., N), float32 (w float32 or float16): by the sgemm at "
          "address blas (Fortran interface, float32 w) or, when 0, streamed on num_threads threads.");
    m.def("decode_layer", &decode_layer, py::arg("x"), py::arg("ln_weight"), py::arg("ln_bias"), py::arg("w_qkv"),
          py::arg("w_in"), py::arg("b_in"), py::arg("w_out"), py::arg("w_fc_out"), py::arg("b_fc_out"),
          py::arg("positions"), py::arg("sin"), py::arg("cos"), py::arg("k_cache"), py::arg("v_cache"),
          py::arg("write"), py::arg("mask"), py::arg("eps"), py::arg("x_next"),
          py::arg("num_threads") = 1, py::arg("blas") = 0,
          "One decoder layer of a decode step (see decode_layer.h), its products by the sgemm at address blas "
          "(Fortran interface) or, when 0, streamed, on num_threads threads (which also share the attention's "
          "heads): writes the new key and value into the caches at column `write` and the layer's output into "
          "x_next (batch, n_embd).");
    m.def("greedy_decode_steps", &greedy_decode_steps, py::arg("token"), py::arg("positions"), py::arg("column"),
          py::arg("mask"), py::arg("out"), py::arg("first_step"), py::arg("steps"), py::arg("n_positions"),
          py::arg("embedding"), py::arg("weights"), py::arg("sin"), py::arg("cos"), py::arg("k_caches"),
          py::arg("v_caches"), py::arg("ln_weight"), py::arg("ln_bias"), py::arg("w"), py::arg("bias"),
          py::arg("eps"), py::arg("num_threads") = 1, py::arg("blas") = 0,
          "`steps` whole greedy decode steps (see decode_layer.h), each fed the last one's tokens: step i unmasks "
          "and writes cache column (column + i) % cache_len, puts its tokens (batch,) into column first_step + i of "
          "out (batch, chunk) and advances positions (batch,) wrapping at n_positions; token and positions are "
          "left as the next step's.");
    m.def("prefill_layer", &prefill_layer, py::arg("x"), py::arg("ln_weight"), py::arg("ln_bias"), py::arg("w_qkv"),
          py::arg("w_in"), py::arg("b_in"), py::arg("w_out"), py::arg("w_fc_out"), py::arg("b_fc_out"),
          py::arg("positions"), py::arg("sin"), py::arg("cos"), py::arg("mask"), py::arg("eps"), py::arg("k"),
          py::arg("v"), py::arg("x_next"), py::arg("num_threads") = 1, py::arg("blas") = 0,
          "One decoder layer over the seq tokens of each row (see decode_layer.h), the tokens at positions "
          "(batch, seq) attending to their row's tokens under mask (batch, seq, seq): writes the rotated keys and "
          "the values into k and v (batch, heads, seq, head_dim) and the layer's output into x_next.");
    m.def("greedy_head", &greedy_head, py::arg("x"), py::arg("ln_weight"), py::arg("ln_bias"), py::arg("w"),
          py::arg("bias"), py::arg("eps"), py::arg("tokens"), py::arg("num_threads") = 1, py::arg("blas") = 0,
          "Writes into tokens (batch,) int32 each row's first largest logit of layer_norm(x) @ w + bias (the product "
          "as decode_layer's).");
}
