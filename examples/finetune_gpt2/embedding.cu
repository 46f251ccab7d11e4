// The token embedding's backward for the finetune_gpt2 example, on CUDA
// (examples/finetune_gpt2/embedding.rs): sums[id] = the rows of grad at the
// positions with that id, added into 0 in position order, as candle's index_add
// adds them (so the same f32 sums, bit for bit), but with the positions in
// parallel: candle-kernels' index_add runs one thread per column, each adding
// every position's row in turn.
//
// A block per position j (grid-stride past the grid). The block whose position
// is the first with its id writes that id's row; the others return after
// finding an earlier one. The writing block walks the later positions a tile
// of BLOCK at a time: it marks the tile's positions with the id, numbers them in
// order with a prefix sum in shared memory, and then each thread adds those
// rows, in that order, to the columns it owns. No atomics: one block writes each
// row. Every loop over tiles starts with a barrier, so that no thread resets a
// shared flag or count while another still reads the previous tile's.

#include <stdint.h>

#define BLOCK 256

extern "C" __global__ void embedding_bwd(const float* __restrict__ grad, const unsigned* __restrict__ ids,
                                         float* __restrict__ sums, int64_t n, int width, int64_t vocab) {
    __shared__ int found;           // a tile holds a position with the id
    __shared__ int order[BLOCK];    // inclusive prefix sum of the tile's marks
    __shared__ int matches[BLOCK];  // the tile's positions with the id, in order (offsets in the tile)
    const int t = threadIdx.x;
    for (int64_t j = blockIdx.x; j < n; j += gridDim.x) {
        const unsigned id = ids[j];
        if (id >= vocab) {
            continue;  // uniform: every thread reads the same id
        }
        // 1. An earlier position with the id writes the row.
        int earlier = 0;
        for (int64_t base = 0; base < j && !earlier; base += BLOCK) {
            __syncthreads();
            if (t == 0) found = 0;
            __syncthreads();
            const int64_t k = base + t;
            if (k < j && ids[k] == id) found = 1;
            __syncthreads();
            earlier = found;
        }
        if (earlier) {
            continue;
        }
        // 2. This block writes the row: positions j.. with the id, tile by tile.
        float* row = sums + int64_t(id) * width;
        for (int64_t base = j; base < n; base += BLOCK) {
            __syncthreads();
            if (t == 0) found = 0;
            __syncthreads();
            const int64_t k = base + t;
            const int mark = k < n && ids[k] == id;
            if (mark) found = 1;
            __syncthreads();
            if (!found) {
                continue;  // uniform, read between two barriers
            }
            order[t] = mark;
            for (int offset = 1; offset < BLOCK; offset <<= 1) {
                __syncthreads();
                const int before = t >= offset ? order[t - offset] : 0;
                __syncthreads();
                order[t] += before;
            }
            if (mark) matches[order[t] - 1] = t;
            __syncthreads();
            const int count = order[BLOCK - 1];
            for (int c = t; c < width; c += BLOCK) {
                float sum = row[c];  // 0 before the first tile, this thread's own sum after
                for (int m = 0; m < count; ++m) {
                    sum += grad[(base + matches[m]) * width + c];
                }
                row[c] = sum;
            }
        }
    }
}
