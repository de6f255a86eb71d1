// Just enough of CUDA to run the kernels in cuda/ on a CPU with g++, for tests.
//
// A launch runs its blocks one after another; a block runs one std::thread per CUDA thread, and
// __syncthreads is a std::barrier across them. Since one block runs at a time, a function-local
// static is exactly one block's __shared__ memory. Warp shuffles go through a per-block exchange
// buffer between two block barriers, so every thread of a block must reach each shuffle (the
// kernels keep their shuffles block-uniform). Kernel arguments come as an array of pointers to
// the values, like cuLaunchKernel's kernelParams.
#pragma once

#include <barrier>
#include <bit>
#include <cmath>
#include <cstddef>
#include <thread>
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

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace emu {
inline std::barrier<>* block_barrier = nullptr;
inline std::vector<float> exchange;

inline unsigned linear_thread() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }

template <typename... P, std::size_t... I>
void launch_block(void (*kernel)(P...), void** args, std::index_sequence<I...>) {
    const std::tuple<std::decay_t<P>...> values{*static_cast<std::decay_t<P>*>(args[I])...};
    const unsigned n = blockDim.x * blockDim.y * blockDim.z;
    std::barrier<> barrier(n);
    block_barrier = &barrier;
    exchange.assign(n, 0.f);
    const dim3 block = blockIdx;
    std::vector<std::thread> threads;
    threads.reserve(n);
    for (unsigned z = 0; z < blockDim.z; z++)
        for (unsigned y = 0; y < blockDim.y; y++)
            for (unsigned x = 0; x < blockDim.x; x++)
                threads.emplace_back([&values, kernel, block, x, y, z] {
                    threadIdx = {x, y, z};
                    blockIdx = block;
                    std::apply(kernel, values);
                });
    for (auto& t : threads) t.join();
}

template <typename... P>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, void** args) {
    gridDim = grid;
    blockDim = block;
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                blockIdx = {x, y, z};
                launch_block(kernel, args, std::index_sequence_for<P...>{});
            }
}
}  // namespace emu

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float value, int lane_mask) {
    const unsigned me = emu::linear_thread();
    emu::exchange[me] = value;
    __syncthreads();
    const float other = emu::exchange[me ^ lane_mask];
    __syncthreads();
    return other;
}

inline float __uint_as_float(unsigned u) { return std::bit_cast<float>(u); }
inline unsigned __float_as_uint(float f) { return std::bit_cast<unsigned>(f); }
