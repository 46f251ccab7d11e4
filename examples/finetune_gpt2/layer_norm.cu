// Layer norm for the finetune_gpt2 example, forward and backward, on CUDA:
// what candle-nn's `layer_norm_slow` does in about eleven candle operations
// forward (and some twenty-five backward, each operand's gradient added into
// fresh zeros), in one launch each way. examples/finetune_gpt2/layer_norm.rs
// holds the same maths on the CPU and says what it computes:
//
//   forward:  c = x - mean(x); r = 1 / sqrt(mean(c^2) + eps); y = c r gamma + beta
//   backward: n = c r; h = dy gamma;
//             dx = r (h - mean(h) - n mean(h n)); and, per element, dy n
//             (summed over the rows into gamma's gradient by the caller).
//
// One warp per row of `width` elements, lanes striding over it, sums in f32.
// Every thread of a block runs the same number of row iterations and
// shuffles (rows past the end reduce nothing). Row offsets are 64-bit.

#include <stdint.h>

__device__ __forceinline__ float warp_total(float x) {
    for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
    return x;
}

// A row's mean and r = 1 / sqrt(variance + eps), both passes reduced across
// the warp (n = 0 for a row past the end: every lane still shuffles).
__device__ __forceinline__ void row_moments(const float* xr, int n, int width, float eps, int lane, float& mean,
                                            float& r) {
    float sum = 0.0f;
    for (int j = lane; j < n; j += 32) sum += xr[j];
    mean = warp_total(sum) / float(width);
    float squares = 0.0f;
    for (int j = lane; j < n; j += 32) squares += (xr[j] - mean) * (xr[j] - mean);
    r = 1.0f / sqrtf(warp_total(squares) / float(width) + eps);
}

extern "C" __global__ void layer_norm_fwd(const float* __restrict__ x, const float* __restrict__ gamma,
                                          const float* __restrict__ beta, float* __restrict__ y, int64_t rows,
                                          int width, float eps) {
    const int warps = int(blockDim.x / 32), warp = int(threadIdx.x / 32), lane = int(threadIdx.x % 32);
    for (int64_t first = int64_t(blockIdx.x) * warps; first < rows; first += int64_t(gridDim.x) * warps) {
        const int64_t row = first + warp;
        const bool valid = row < rows;
        const int n = valid ? width : 0;
        const float* xr = x + (valid ? row : 0) * width;
        float mean, r;
        row_moments(xr, n, width, eps, lane, mean, r);
        float* yr = y + (valid ? row : 0) * width;
        for (int j = lane; j < n; j += 32) yr[j] = (xr[j] - mean) * r * gamma[j] + beta[j];
    }
}

// out holds two [rows, width] blocks: dx, then dy * n.
extern "C" __global__ void layer_norm_bwd(const float* __restrict__ x, const float* __restrict__ gamma,
                                          const float* __restrict__ dy, float* __restrict__ out, int64_t rows,
                                          int width, float eps) {
    const int warps = int(blockDim.x / 32), warp = int(threadIdx.x / 32), lane = int(threadIdx.x % 32);
    for (int64_t first = int64_t(blockIdx.x) * warps; first < rows; first += int64_t(gridDim.x) * warps) {
        const int64_t row = first + warp;
        const bool valid = row < rows;
        const int n = valid ? width : 0;
        const int64_t offset = (valid ? row : 0) * width;
        const float* xr = x + offset;
        const float* dyr = dy + offset;
        float mean, r;
        row_moments(xr, n, width, eps, lane, mean, r);
        float h_sum = 0.0f, hn_sum = 0.0f;
        for (int j = lane; j < n; j += 32) {
            const float h = dyr[j] * gamma[j];
            h_sum += h;
            hn_sum += h * ((xr[j] - mean) * r);
        }
        const float h_mean = warp_total(h_sum) / float(width);
        const float hn_mean = warp_total(hn_sum) / float(width);
        float* dx = out + offset;
        float* dyn = out + rows * int64_t(width) + offset;
        for (int j = lane; j < n; j += 32) {
            const float normed = (xr[j] - mean) * r;
            dx[j] = r * (dyr[j] * gamma[j] - h_mean - normed * hn_mean);
            dyn[j] = dyr[j] * normed;
        }
    }
}
