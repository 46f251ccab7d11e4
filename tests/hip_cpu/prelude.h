// Force-included before cuda/cross_entropy.cu when tests/kernels_on_cpu.rs
// compiles it for the CPU with HIP-CPU: the CUDA spellings our kernels use,
// on top of what HIP-CPU offers. Nothing here is part of the crate.
#pragma once

#include <hip/hip_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
// HIP-CPU leaves __forceinline__ empty without NDEBUG: the small functions
// that are `inline` on a GPU would be defined once in every translation unit
// that includes the kernels (see library.rs), and collide at the link.
#undef __forceinline__
#define __forceinline__ inline

#include <math.h>  // the float overloads of exp, log, tanh, ... in the global namespace

// Register limits are a GPU matter.
#define __launch_bounds__(...)

// Our kernels use 32-lane warps; HIP-CPU's warps have 64 lanes, and its
// __shfl_down/__shfl_up are wrong for lanes 32-63. An xor shuffle at an offset
// below 32 stays within its 32-lane half, so it is built on the absolute-lane
// __shfl. Every shuffle is a whole-block barrier here: the kernels must reach
// each one the same number of times in every thread of a block, which is also
// what a full mask promises on a GPU. A partial mask is refused loudly.
template <typename T> T __shfl_xor_sync(unsigned mask, T value, int offset) {
    if (mask != 0xffffffffu || offset <= 0 || offset >= 32) {
        std::fprintf(stderr, "hip-cpu shim: __shfl_xor_sync(mask %#x, offset %d) is not a full 32-lane xor\n", mask,
                     offset);
        std::abort();
    }
    const int lane = int(threadIdx.x % warpSize);
    return __shfl(value, lane ^ offset);
}

// A broadcast from lane `source` of the caller's 32-lane warp, on the same
// absolute-lane __shfl.
template <typename T> T __shfl_sync(unsigned mask, T value, int source) {
    if (mask != 0xffffffffu || source < 0 || source >= 32) {
        std::fprintf(stderr, "hip-cpu shim: __shfl_sync(mask %#x, lane %d) is not a full 32-lane shuffle\n", mask,
                     source);
        std::abort();
    }
    const int lane = int(threadIdx.x % warpSize);
    return __shfl(value, lane / 32 * 32 + source);
}
