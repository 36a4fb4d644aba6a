// Host emulation of the CUDA built-ins that kernels/cuda/*.cu use, so g++ can compile a kernel file
// unchanged and run it on a CPU (tests/kernels/test_cuda_host_emulation.py).
//
// Every CUDA thread of a block is a ucontext coroutine on the one calling OS thread; the scheduler resumes
// them round-robin. A thread runs until it waits at a barrier (__syncthreads, or the warp exchange inside
// a shuffle) and is resumed once every thread of that barrier has arrived, which is the ordering the
// kernels rely on. Blocks run one after another. `__shared__` variables are `static` (one per kernel
// instantiation, shared by the threads of the running block); atomics are plain read-modify-writes, exact
// because threads only switch at barriers. Arithmetic intrinsics map to IEEE fp32 operations (compile with
// -ffp-contract=off and without fast-math, so nothing is fused or approximated).
//
// What this proves: the kernel's algorithm and arithmetic (bit tricks, radix select, tie rules, loads)
// give the torch twin's bits. What it cannot: timing, memory races the barriers would hide, real warp
// divergence. The GPU tests (`-m gpu`) run the same source compiled by NVRTC.
#pragma once

#include <ucontext.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __shared__ static

struct HostDim3 {
    unsigned int x = 0, y = 0, z = 0;
};

static HostDim3 threadIdx, blockIdx, blockDim, gridDim;

namespace cuda_host {

constexpr int kWarp = 32;
constexpr size_t kStackBytes = 64 * 1024;

struct Barrier {
    int expected = 0;
    int arrived = 0;
    unsigned long long generation = 0;
};

struct Thread {
    ucontext_t context;
    bool done = false;
    const Barrier* waiting = nullptr;  // resumed once waiting->generation moves past `generation`
    unsigned long long generation = 0;
};

struct State {
    std::vector<Thread> threads;
    std::unique_ptr<char[]> stacks;
    ucontext_t scheduler;
    int current = 0;
    Barrier block_barrier;
    std::vector<Barrier> warp_barriers;
    std::vector<unsigned long long> warp_slots;  // [warps * 32] values exchanged by shuffles
    std::function<void()> body;
    const char* error = nullptr;  // first misuse found (unsupported mask, partial warp)
};

static State state;

inline void fail(const char* message) {
    if (state.error == nullptr) state.error = message;
}

// Arrive at `barrier`; return once every expected thread has arrived.
inline void wait(Barrier& barrier) {
    const unsigned long long generation = barrier.generation;
    if (++barrier.arrived == barrier.expected) {
        barrier.arrived = 0;
        ++barrier.generation;
        return;
    }
    Thread& me = state.threads[state.current];
    me.waiting = &barrier;
    me.generation = generation;
    swapcontext(&me.context, &state.scheduler);
}

inline void thread_entry() {
    state.body();
    state.threads[state.current].done = true;  // returning resumes the scheduler (uc_link)
}

// Runs `body` as every thread of a grid of `blocks` blocks of `threads` threads (1-D). Returns nullptr, or
// what went wrong: a deadlock (threads waiting at a barrier that the others never reach) or a misuse.
inline const char* launch(unsigned int blocks, unsigned int threads, std::function<void()> body) {
    if (threads % kWarp != 0) return "block size must be a multiple of 32";
    const int warps = threads / kWarp;
    state.body = std::move(body);
    state.error = nullptr;
    state.threads.assign(threads, Thread());
    state.stacks.reset(new char[threads * kStackBytes]);
    state.warp_barriers.assign(warps, Barrier());
    state.warp_slots.assign(threads, 0);
    blockDim = {threads, 1, 1};
    gridDim = {blocks, 1, 1};
    for (unsigned int b = 0; b < blocks; ++b) {
        blockIdx = {b, 0, 0};
        state.block_barrier = Barrier();
        state.block_barrier.expected = threads;
        for (Barrier& w : state.warp_barriers) w = Barrier(), w.expected = kWarp;
        for (unsigned int t = 0; t < threads; ++t) {
            Thread& th = state.threads[t];
            th = Thread();
            getcontext(&th.context);
            th.context.uc_stack.ss_sp = state.stacks.get() + t * kStackBytes;
            th.context.uc_stack.ss_size = kStackBytes;
            th.context.uc_link = &state.scheduler;
            makecontext(&th.context, thread_entry, 0);
        }
        for (unsigned int alive = threads; alive > 0;) {
            bool progressed = false;
            alive = 0;
            for (unsigned int t = 0; t < threads; ++t) {
                Thread& th = state.threads[t];
                if (th.done) continue;
                ++alive;
                if (th.waiting != nullptr && th.waiting->generation == th.generation) continue;
                th.waiting = nullptr;
                state.current = t;
                threadIdx = {t, 0, 0};
                swapcontext(&state.scheduler, &th.context);
                progressed = true;
            }
            if (alive > 0 && !progressed) return "deadlock: threads wait at a barrier the others never reach";
        }
        if (state.error != nullptr) return state.error;
    }
    return nullptr;
}

template <class T>
inline T exchange(T value, int source_lane) {
    static_assert(sizeof(T) <= sizeof(unsigned long long), "shuffle of a wider type");
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
    unsigned long long* slots = state.warp_slots.data() + warp * kWarp;
    std::memcpy(&slots[lane], &value, sizeof(T));
    wait(state.warp_barriers[warp]);  // every lane has published its value
    T result = value;
    if (source_lane >= 0 && source_lane < kWarp) std::memcpy(&result, &slots[source_lane], sizeof(T));
    wait(state.warp_barriers[warp]);  // every lane has read before a next shuffle overwrites
    return result;
}

}  // namespace cuda_host

inline void __syncthreads() { cuda_host::wait(cuda_host::state.block_barrier); }

template <class T>
inline T __shfl_down_sync(unsigned int mask, T value, unsigned int delta) {
    if (mask != 0xffffffffu) cuda_host::fail("only full-warp shuffles are emulated");
    const int lane = threadIdx.x % cuda_host::kWarp;
    return cuda_host::exchange(value, lane + (int)delta < cuda_host::kWarp ? lane + (int)delta : -1);
}

template <class T>
inline T __shfl_up_sync(unsigned int mask, T value, unsigned int delta) {
    if (mask != 0xffffffffu) cuda_host::fail("only full-warp shuffles are emulated");
    const int lane = threadIdx.x % cuda_host::kWarp;
    return cuda_host::exchange(value, lane >= (int)delta ? lane - (int)delta : -1);
}

inline unsigned int atomicAdd(unsigned int* address, unsigned int value) {
    const unsigned int old = *address;
    *address = old + value;
    return old;
}

inline float __uint_as_float(unsigned int u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, sizeof f);
    return f;
}

inline unsigned int __float_as_uint(float f) {
    unsigned int u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}

inline int __float_as_int(float f) {
    int i;
    std::memcpy(&i, &f, sizeof i);
    return i;
}

inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
