// A team of helper threads that share the chunks of one job with the calling thread, without ever
// waiting for a helper to wake up: header-only.
//
// The caller publishes a job (a function of a chunk index and a chunk count), then claims chunks
// itself; helpers claim chunks as they come. The call returns once every chunk is done, so a helper
// that is not running (the machine busy with other processes) costs nothing but its share, which
// the caller takes over; a fork-join team (OpenMP) would instead wait for it at the join. Helpers
// spin briefly between jobs (a decode step calls every few microseconds), then sleep.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace gptj_streamed {

class WorkTeam {
  public:
    // The process-wide team with at least `helpers` helper threads (created on first need).
    static WorkTeam& instance(int helpers) {
        static WorkTeam team;
        team.grow(helpers);
        return team;
    }

    // Runs fn(i) for every i < chunks on `threads` threads: this one and threads - 1 of the team's.
    static void share(int threads, int64_t chunks, const std::function<void(int64_t)>& fn) {
        instance(threads - 1).run(chunks, threads - 1, fn);
    }

    // Runs fn(i) for every i < chunks, on this thread and up to `helpers` helper threads.
    void run(int64_t chunks, int helpers, const std::function<void(int64_t)>& fn) {
        std::lock_guard<std::mutex> one_job(job_mutex_);
        job_.store(&fn, std::memory_order_relaxed);
        chunks_.store(chunks, std::memory_order_relaxed);
        done_.store(0, std::memory_order_relaxed);
        allowed_.store(helpers, std::memory_order_relaxed);
        const uint64_t generation = (state_.load(std::memory_order_relaxed) >> 32) + 1;
        state_.store(generation << 32, std::memory_order_release);  // opens the job: chunk 0 next
        wake();
        work(generation);
        while (done_.load(std::memory_order_acquire) < chunks)
            pause();
        state_.store((generation << 32) | CLOSED, std::memory_order_release);  // late helpers find nothing
    }

    ~WorkTeam() {
        stop_.store(true);
        wake();
        for (auto& t : threads_)
            t.join();
    }

  private:
    static constexpr uint64_t CLOSED = 0xffffffffu;
    static constexpr int SPINS = 5000;  // pauses, some 100 us, before a helper sleeps

    static void pause() {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
    }

    void grow(int helpers) {
        std::lock_guard<std::mutex> lock(job_mutex_);
        while (int(threads_.size()) < helpers) {
            const int index = int(threads_.size());
            threads_.emplace_back([this, index] { helper(index); });
        }
    }

    // Claims and runs chunks of job `generation` until none is left.
    void work(uint64_t generation) {
        uint64_t s = state_.load(std::memory_order_acquire);
        while ((s >> 32) == generation) {
            const uint64_t next = s & CLOSED;
            if (next >= uint64_t(chunks_.load(std::memory_order_relaxed)))
                return;
            if (state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel)) {
                (*job_.load(std::memory_order_relaxed))(int64_t(next));
                done_.fetch_add(1, std::memory_order_release);
                s = state_.load(std::memory_order_acquire);
            }
        }
    }

    void wake() {
        std::lock_guard<std::mutex> lock(sleep_mutex_);
        sleep_cv_.notify_all();
    }

    void helper(int index) {
        uint64_t seen = state_.load(std::memory_order_acquire) >> 32;
        while (!stop_.load(std::memory_order_relaxed)) {
            uint64_t generation = state_.load(std::memory_order_acquire) >> 32;
            for (int spin = 0; generation == seen && spin < SPINS; ++spin) {
                pause();
                generation = state_.load(std::memory_order_acquire) >> 32;
            }
            if (generation == seen) {
                std::unique_lock<std::mutex> lock(sleep_mutex_);
                sleep_cv_.wait(lock, [&] {
                    return stop_.load() || (state_.load(std::memory_order_acquire) >> 32) != seen;
                });
                continue;
            }
            seen = generation;
            if (index < allowed_.load(std::memory_order_relaxed))
                work(generation);
        }
    }

    std::mutex job_mutex_, sleep_mutex_;
    std::condition_variable sleep_cv_;
    std::vector<std::thread> threads_;
    // Job generation (high 32 bits) and next chunk (low 32 bits; CLOSED once the job is over).
    std::atomic<uint64_t> state_{0};
    std::atomic<int64_t> done_{0};
    std::atomic<int> allowed_{0};
    std::atomic<bool> stop_{false};
    // The open job; written before its generation is published (release), read after (acquire).
    std::atomic<const std::function<void(int64_t)>*> job_{nullptr};
    std::atomic<int64_t> chunks_{0};
};

}  // namespace gptj_streamed
