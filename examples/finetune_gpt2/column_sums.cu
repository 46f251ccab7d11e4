// The sums over the rows of an f32 [rows, width] matrix on CUDA, for the
// finetune_gpt2 example's Conv1D bias and layer-norm backward
// (examples/finetune_gpt2/column_sums.rs). candle's `sum(0)` runs a block per
// column whose threads read that column down the rows, each load a sector of
// its own, with a 64-bit division or two per element for its place: here a
// warp reads 32 neighbouring columns of a row, 128 contiguous bytes.
//
// Two launches. `column_sums_partial`: the rows are cut into segments of
// `segment` rows; block b sums the 32 columns (b % column_blocks) * 32.. over
// segment b / column_blocks. Warp w of the block adds the segment's rows w,
// w + warps, w + 2 warps, .. in order, one column a lane; the warps' sums are
// then added in warp order, into partials[segment][column]. `column_sums_finish`
// adds each column's partials in segment order. Which thread adds which
// element, and in what order, depends on rows, width, segment and the block
// size alone: the same sums on every run. Threads a block: a multiple of 32,
// at most 1024.

#include <stdint.h>

extern "C" __global__ void column_sums_partial(const float* __restrict__ x, int64_t rows, int width,
                                               int64_t segment, float* __restrict__ partials) {
    __shared__ float warp_sums[32][33];  // [warp][lane], padded against bank conflicts
    const int column_blocks = (width + 31) / 32;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    const int column = (blockIdx.x % column_blocks) * 32 + lane;
    const int64_t part = blockIdx.x / column_blocks;
    const int64_t start = part * segment;
    const int64_t end = start + segment < rows ? start + segment : rows;
    float sum = 0.0f;
    if (column < width) {
#pragma unroll 4
        for (int64_t r = start + warp; r < end; r += warps) sum += x[r * width + column];
    }
    warp_sums[warp][lane] = sum;
    __syncthreads();
    if (warp == 0 && column < width) {
        float total = 0.0f;
        for (int w = 0; w < warps; ++w) total += warp_sums[w][lane];
        partials[part * width + column] = total;
    }
}

extern "C" __global__ void column_sums_finish(const float* __restrict__ partials, int parts, int width,
                                              float* __restrict__ sums) {
    for (int64_t column = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; column < width;
         column += int64_t(gridDim.x) * blockDim.x) {
        float total = 0.0f;
        for (int p = 0; p < parts; ++p) total += partials[int64_t(p) * width + column];
        sums[column] = total;
    }
}
