// Just enough of CUDA to run the kernels in cuda/ on a CPU with g++, for tests.
//
// A launch runs its blocks one after another; a block runs each CUDA thread as a fiber (ucontext) on
// the calling thread, and __syncthreads switches back to a scheduler that resumes the fibers only
// once every one of them has reached the barrier. A block whose threads do not all meet at each
// barrier (some finished, others waiting) is reported as an error instead of hanging. Since one
// block runs at a time, a function-local static is exactly one block's __shared__ memory. Warp
// shuffles go through a per-block exchange buffer and a barrier, so every thread of a block must reach
// each shuffle (the kernels keep their shuffles block-uniform). Kernel arguments come as
// an array of pointers to the values, like cuLaunchKernel's kernelParams.
#pragma once

#include <ucontext.h>

#include <bit>
#include <cmath>
#include <cstddef>
#include <functional>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

struct alignas(16) float4 {
    float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace emu {
constexpr std::size_t kStackBytes = 256 * 1024;

struct Fiber {
    ucontext_t context;
    std::unique_ptr<char[]> stack{new char[kStackBytes]};
    dim3 index;
    bool done = false;
    unsigned shuffles = 0;  // how many this thread has done: their parity picks the exchange buffer
};

inline ucontext_t scheduler;
inline Fiber* current = nullptr;
inline std::function<void()> body;
inline std::vector<float> exchange;

inline void run_fiber() {
    body();
    current->done = true;  // returning resumes the scheduler through uc_link
}

// Runs the current block to completion; false if its threads did not meet at some barrier.
inline bool run_block(std::vector<Fiber>& fibers) {
    for (auto& f : fibers) {
        f.done = false;
        f.shuffles = 0;
        getcontext(&f.context);
        f.context.uc_stack = {f.stack.get(), 0, kStackBytes};
        f.context.uc_link = &scheduler;
        makecontext(&f.context, run_fiber, 0);
    }
    for (;;) {  // one pass resumes every fiber up to its next barrier or its end
        std::size_t finished = 0;
        for (auto& f : fibers) {
            current = &f;
            threadIdx = f.index;
            swapcontext(&scheduler, &f.context);
            finished += f.done;
        }
        if (finished == fibers.size()) return true;
        if (finished) return false;
    }
}

template <typename... P, std::size_t... I>
int launch_packed(void (*kernel)(P...), dim3 grid, dim3 block, void** args, std::index_sequence<I...>) {
    const std::tuple<std::decay_t<P>...> values{*static_cast<std::decay_t<P>*>(args[I])...};
    gridDim = grid;
    blockDim = block;
    std::vector<Fiber> fibers(block.x * block.y * block.z);
    std::size_t n = 0;
    for (unsigned z = 0; z < block.z; z++)
        for (unsigned y = 0; y < block.y; y++)
            for (unsigned x = 0; x < block.x; x++) fibers[n++].index = {x, y, z};
    exchange.assign(2 * fibers.size(), 0.f);
    body = [&] { std::apply(kernel, values); };
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                blockIdx = {x, y, z};
                if (!run_block(fibers)) return 1;
            }
    return 0;
}

// 0 on success, 1 when the threads of a block did not all reach the same barriers.
template <typename... P>
int launch(void (*kernel)(P...), dim3 grid, dim3 block, void** args) {
    return launch_packed(kernel, grid, block, args, std::index_sequence_for<P...>{});
}

inline unsigned linear_thread() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }
}  // namespace emu

inline void __syncthreads() { swapcontext(&emu::current->context, &emu::scheduler); }

// One barrier per shuffle: consecutive shuffles alternate between two halves of the exchange buffer, and
// no thread can write a half again before every thread has passed the barrier after reading it.
inline float __shfl_xor_sync(unsigned, float value, int lane_mask) {
    const unsigned me = emu::linear_thread(), half = (emu::current->shuffles++ % 2) * (emu::exchange.size() / 2);
    emu::exchange[half + me] = value;
    __syncthreads();
    return emu::exchange[half + (me ^ lane_mask)];
}

inline float __uint_as_float(unsigned u) { return std::bit_cast<float>(u); }
inline unsigned __float_as_uint(float f) { return std::bit_cast<unsigned>(f); }
