// The token embedding's backward for the finetune_gpt2 example, on CUDA
// (examples/finetune_gpt2/embedding.rs): sums[id] += the rows of grad at the
// positions with that id, summed from 0 in position order (into zeros, candle's
// index_add bit for bit), with the positions in parallel: candle-kernels'
// index_add runs one thread per column, each adding every position's row in turn.
//
// A block per position j (grid-stride past the grid). The block whose position
// is the first with its id adds that id's row; the others return after finding
// an earlier one (a scan of the ids before j, blockDim at a time: N^2 / 2 id
// reads in all, early stops aside). The adding block takes the columns
// blockDim at a time, and for each walks the positions from j a tile of blockDim
// at a time: it marks the tile's positions with the id, numbers them in order
// with a prefix sum in shared memory, and each thread adds those rows, in that
// order, to its column's sum, which goes into the row at the end. No atomics:
// one block writes each row. Every loop over tiles starts with a barrier, so
// that no thread resets a shared flag or count while another still reads the
// previous tile's; every thread of the block reaches every barrier (the loops'
// bounds and the `continue`s depend on values all threads read alike).

#include <stdint.h>

#define MAX_BLOCK 1024

extern "C" __global__ void embedding_bwd(const float* __restrict__ grad, const unsigned* __restrict__ ids,
                                         float* __restrict__ sums, int64_t n, int width, int64_t vocab) {
    __shared__ int found;               // a tile holds a position with the id
    __shared__ int order[MAX_BLOCK];    // inclusive prefix sum of the tile's marks
    __shared__ int matches[MAX_BLOCK];  // the tile's positions with the id, in order (offsets in the tile)
    const int t = threadIdx.x, threads = blockDim.x;
    for (int64_t j = blockIdx.x; j < n; j += gridDim.x) {
        const unsigned id = ids[j];
        if (id >= vocab) {
            continue;  // no row (u32::MAX) or outside the vocabulary
        }
        // 1. An earlier position with the id adds the row.
        int earlier = 0;
        for (int64_t base = 0; base < j && !earlier; base += threads) {
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
        // 2. This block adds the row: columns c0.., positions j.. with the id, tile by tile.
        float* row = sums + int64_t(id) * width;
        for (int c0 = 0; c0 < width; c0 += threads) {
            const int c = c0 + t;
            float sum = 0.0f;
            for (int64_t base = j; base < n; base += threads) {
                __syncthreads();
                if (t == 0) found = 0;
                __syncthreads();
                const int64_t k = base + t;
                const int mark = k < n && ids[k] == id;
                if (mark) found = 1;
                __syncthreads();
                if (!found) {
                    continue;  // read between two barriers, the same for every thread
                }
                order[t] = mark;
                for (int offset = 1; offset < threads; offset <<= 1) {
                    __syncthreads();
                    const int before = t >= offset ? order[t - offset] : 0;
                    __syncthreads();
                    order[t] += before;
                }
                if (mark) matches[order[t] - 1] = t;
                __syncthreads();
                if (c < width) {
                    const int count = order[threads - 1];
                    for (int m = 0; m < count; ++m) {
                        sum += grad[(base + matches[m]) * width + c];
                    }
                }
            }
            if (c < width) {
                row[c] += sum;
            }
        }
    }
}
