// Splitting a loop over OpenMP threads: header-only, shared by the runtime's kernels and the custom ops.
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

}  // namespace gptj_kernels
