// ---------------------------------------------------------------------------
// Labels: the caller's labels, of any integer dtype L and any strides, to the
// [N] contiguous i64 the other kernels read, with masked tokens set to
// ignore_index. candle-kernels has no CUDA cast from i16 or i32 (nor compare
// on them), so the loss converts them here, in one pass. Element r of the
// labels is at start + (r / inner) * stride_outer + (r % inner) * stride_inner
// (a [N] or [B, S] view), and of the mask at its own offsets. The mask, when
// there is one, is read as raw bytes: mask_bytes (1, 2, 4 or 8) per element,
// 0 unless some bit is set, the sign bit left out for a float mask
// (mask_float), so that -0.0 is 0 and NaN is not, as `mask != 0`.
// cross_entropy.cu instantiates labels_to_i64 per label dtype as `ce_labels_*`.
// ---------------------------------------------------------------------------
#pragma once

#include "elements.cuh"

__device__ __forceinline__ bool mask_keeps(const unsigned char* __restrict__ mask, int64_t offset, int mask_bytes,
                                           int mask_float) {
    const unsigned char* element = mask + offset * mask_bytes;
    uint64_t bits;
    switch (mask_bytes) {
    case 1: bits = *element; break;
    case 2: bits = *reinterpret_cast<const uint16_t*>(element); break;
    case 4: bits = *reinterpret_cast<const uint32_t*>(element); break;
    default: bits = *reinterpret_cast<const uint64_t*>(element); break;
    }
    if (mask_float) bits &= ~(uint64_t(1) << (8 * mask_bytes - 1));
    return bits != 0;
}

template <typename L>
__device__ void labels_to_i64(const L* __restrict__ labels, const unsigned char* __restrict__ mask,
                              int64_t* __restrict__ out, int64_t rows, int64_t ignore_index, int mask_bytes,
                              int mask_float, int64_t start, int64_t inner, int64_t stride_outer,
                              int64_t stride_inner, int64_t mask_start, int64_t mask_inner, int64_t mask_stride_outer,
                              int64_t mask_stride_inner) {
    for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < rows; r += int64_t(gridDim.x) * blockDim.x) {
        const bool kept = mask == nullptr ||
                          mask_keeps(mask, row_offset(r, mask_start, mask_inner, mask_stride_outer, mask_stride_inner),
                                     mask_bytes, mask_float);
        out[r] = kept ? int64_t(labels[row_offset(r, start, inner, stride_outer, stride_inner)]) : ignore_index;
    }
}
