// HIP-CPU has no bfloat16: the two conversions our kernels use, on the bits
// (tests/kernels_on_cpu.rs only).
#pragma once

#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
    std::uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 x) {
    const std::uint32_t wide = std::uint32_t(x.bits) << 16;
    float f;
    std::memcpy(&f, &wide, sizeof f);
    return f;
}

// Round to nearest, ties to even; NaN stays a (quiet) NaN.
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    std::uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {std::uint16_t((u >> 16) | 0x40u)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return {std::uint16_t(u >> 16)};
}
