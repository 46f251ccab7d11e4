// Causal softmax for the finetune_gpt2 example's attention, forward and
// backward, on CUDA: what candle's primitive operations do in about a dozen
// passes over the [B, H, T, T] scores each way (scale, add the mask, max,
// subtract, exp, sum, divide, and their backward with a zeros + add per
// operand), in one pass forward and one backward. examples/finetune_gpt2/
// softmax.rs holds the same maths on the CPU, and says what it computes:
//
//   forward:  x_j = s_j * scale; p_j = exp(x_j - max_k x_k) / sum_k exp(x_k - max) for j <= i
//             (query i = row % T), p_j = 0 for j > i;
//   backward: ds_j = scale * p_j * (dp_j - sum_k p_k dp_k) for j <= i, 0 above.
//
// One warp per row, lanes striding over its columns, sums in f32. Every
// thread of a block runs the same number of row iterations and shuffles
// (rows past the end reduce nothing), so that a warp never diverges across a
// shuffle. Row offsets are 64-bit.

#include <stdint.h>

__device__ __forceinline__ float warp_max(float x) {
    for (int offset = 16; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
    return x;
}

__device__ __forceinline__ float warp_sum(float x) {
    for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
    return x;
}

extern "C" __global__ void causal_softmax_fwd(const float* __restrict__ scores, float* __restrict__ probs,
                                              int64_t rows, int t, float scale) {
    const int warps = int(blockDim.x / 32), warp = int(threadIdx.x / 32), lane = int(threadIdx.x % 32);
    for (int64_t first = int64_t(blockIdx.x) * warps; first < rows; first += int64_t(gridDim.x) * warps) {
        const int64_t row = first + warp;
        const bool valid = row < rows;
        const int last = valid ? int(row % t) : -1;  // the query: columns 0..=last are seen
        const float* s = scores + (valid ? row : 0) * t;
        float m = -INFINITY;
        for (int j = lane; j <= last; j += 32) m = fmaxf(m, s[j] * scale);
        m = warp_max(m);
        float sum = 0.0f;
        for (int j = lane; j <= last; j += 32) sum += expf(s[j] * scale - m);
        sum = warp_sum(sum);
        if (valid) {
            float* p = probs + row * t;
            for (int j = lane; j < t; j += 32) p[j] = j <= last ? expf(s[j] * scale - m) / sum : 0.0f;
        }
    }
}

extern "C" __global__ void causal_softmax_bwd(const float* __restrict__ probs, const float* __restrict__ grad,
                                              float* __restrict__ out, int64_t rows, int t, float scale) {
    const int warps = int(blockDim.x / 32), warp = int(threadIdx.x / 32), lane = int(threadIdx.x % 32);
    for (int64_t first = int64_t(blockIdx.x) * warps; first < rows; first += int64_t(gridDim.x) * warps) {
        const int64_t row = first + warp;
        const bool valid = row < rows;
        const int last = valid ? int(row % t) : -1;
        const float* p = probs + (valid ? row : 0) * t;
        const float* g = grad + (valid ? row : 0) * t;
        float dot = 0.0f;
        for (int j = lane; j <= last; j += 32) dot += p[j] * g[j];
        dot = warp_sum(dot);
        if (valid) {
            float* d = out + row * t;
            for (int j = lane; j < t; j += 32) d[j] = j <= last ? scale * (p[j] * (g[j] - dot)) : 0.0f;
        }
    }
}
