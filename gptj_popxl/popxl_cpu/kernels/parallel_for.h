// Splitting a loop, or rows, over OpenMP threads: header-only, shared by the runtime's kernels and the custom ops.
#pragma once

#include <algorithm>
#include <cstdint>

namespace gptj_kernels {

// Runs fn(begin, end) over [0, n) split into at most num_threads chunks of at least `grain` items, on
// OpenMP threads: built with -fopenmp after torch is loaded, this shares torch's libgomp and so its warm
// thread pool (a thread started per call costs more than a call's share of the work).
template <typename F>
void parallel_for(int64_t n, int64_t grain, int num_threads, const F& fn) {
    const int64_t chunks = std::min<int64_t>(std::max(num_threads, 1), (n + grain - 1) / std::max<int64_t>(grain, 1));
    if (chunks <= 1) {
        fn(int64_t(0), n);
        return;
    }
    const int64_t step = (n + chunks - 1) / chunks;
#pragma omp parallel for num_threads(int(chunks)) schedule(static, 1)
    for (int64_t k = 0; k < chunks; ++k)
        fn(k * step, std::min(n, (k + 1) * step));
}

// Values a thread takes at least in the kernels' elementwise and row loops: below, waking a second thread
// costs more than it saves.
constexpr int64_t GRAIN_VALUES = 16384;

// Runs row(r) for each of `rows` rows of `length` values, on up to num_threads threads, each given rows of
// at least GRAIN_VALUES values in all.
template <typename F>
void parallel_rows(int64_t rows, int64_t length, int num_threads, const F& row) {
    parallel_for(rows, std::max<int64_t>(1, GRAIN_VALUES / std::max<int64_t>(length, 1)), num_threads,
                 [&](int64_t first, int64_t last) {
                     for (int64_t r = first; r < last; ++r)
                         row(r);
                 });
}

}  // namespace gptj_kernels
