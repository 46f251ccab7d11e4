// The sum of the squares of one f32 tensor on CUDA, for the finetune_gpt2
// example's gradient clipping (examples/finetune_gpt2/sum_squares.rs): one
// launch a gradient, where candle's `sqr`, `sum_all`, `to_dtype` and `add`
// took four, the first writing a squared copy of the gradient.
//
// Block b sums the squares of its grid-stride share of x in f64 (each square
// of an f32 is exact there) and writes the block's sum to partials[b]; the
// caller sums the partials. Which thread adds which element, and the order of
// the warp and block sums, depend on n and the launch shape alone: the same
// result on every run. n is 64-bit; threads a block: a multiple of 32 (the
// full-mask shuffles), at most 1024 (the warp sums' array).

#include <stdint.h>

extern "C" __global__ void sum_squares(const float* __restrict__ x, int64_t n, double* __restrict__ partials) {
    double sum = 0.0;
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
        const double v = x[i];
        sum += v * v;
    }
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    __shared__ double warp_sums[32];
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = sum;
    __syncthreads();
    if (threadIdx.x == 0) {
        double block = 0.0;
        for (unsigned w = 0; w < (blockDim.x + 31) / 32; ++w) block += warp_sums[w];
        partials[blockIdx.x] = block;
    }
}
