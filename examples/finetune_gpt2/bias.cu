// The bias of GPT-2's Conv1D layers for the finetune_gpt2 example, on CUDA:
// y = x + b row by row. As an op of its own (examples/finetune_gpt2/bias.rs)
// its backward hands the bias the rows' sum directly, where candle's
// `broadcast_add` first adds the gradient into fresh zeros the size of the
// broadcast [B * T, out] bias and then sums those.
//
// Grid-stride loop over the n elements of x; n is 64-bit.

#include <stdint.h>

extern "C" __global__ void add_bias(const float* __restrict__ x, const float* __restrict__ bias, float* __restrict__ y,
                                    int64_t n, int width) {
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
        y[i] = x[i] + bias[i % width];
    }
}
