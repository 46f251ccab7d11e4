//! Whether a training step keeps every block's activations for the backward
//! pass or recomputes them one block at a time, when `--keep-activations`
//! leaves it open: kept where the available memory (the GPU's, or the
//! machine's on the CPU) holds the step, since recomputing costs a second
//! forward pass of every block. The estimate counts the tensors the model's
//! code creates; `tests/finetune_memory/estimate.rs` holds it against the
//! heap that the same code holds on the CPU.

use crate::gpt2::Config;
use crate::train::LossKind;
use candle::{Device, Result};

/// The shape of one micro-batch: `batch` sequences of `seq` tokens.
#[derive(Debug, Clone, Copy)]
pub struct MicroBatch {
    pub batch: usize,
    pub seq: usize,
}

/// `[B * T, C]` tensors a block keeps for its backward pass once its forward
/// pass has run (`block::Saved`, with its output, the next block's input):
/// the first layer norm (1); q, k and v (3); the heads merged (1); the
/// residual sum (1); the second layer norm (1); the MLP's product with its
/// bias, and the GELU of it (4 + 4); the block's output (1).
const BLOCK_ROW_TENSORS: u64 = 16;
/// `[B, H, T, T]` tensors a block keeps: the causal softmax's weights.
const BLOCK_SCORE_TENSORS: u64 = 1;
/// `[B * T, C]` gradients `block::Block::backward` holds beside what the
/// block kept, at most: in the MLP the output's, the activation's and its
/// input's (1 + 4 + 4); in the attention the residual's, and q, k and v's
/// with their stack and its copy as `[B * T, 3C]` (1 + 3 + 3 + 3).
const BACKWARD_ROW_TENSORS: u64 = 10;
/// `[B, H, T, T]` gradients it holds at most: the probabilities' and the
/// scores' (beside the probabilities it kept).
const BACKWARD_SCORE_TENSORS: u64 = 2;
/// `[B * T, C]` tensors outside the blocks: the embeddings (the token
/// embeddings plus the positions', the first block's input), the last
/// block's output copied into the `Var` the top's graph starts from, and the
/// final layer norm.
const OUTER_ROW_TENSORS: u64 = 3;

/// Bytes of device memory the blocks of one micro-batch's forward pass keep
/// for its backward pass, for a model of `elem`-byte parameters: every
/// block's activations (see [`BLOCK_ROW_TENSORS`]).
pub fn kept_activation_bytes(config: &Config, shape: MicroBatch, elem: usize) -> u64 {
    config.layers as u64 * block_bytes(config, shape, elem)
}

/// One block's share of [`kept_activation_bytes`].
fn block_bytes(config: &Config, shape: MicroBatch, elem: usize) -> u64 {
    BLOCK_ROW_TENSORS * row_tensor_bytes(config, shape, elem)
        + BLOCK_SCORE_TENSORS * score_tensor_bytes(config, shape, elem)
}

fn row_tensor_bytes(config: &Config, shape: MicroBatch, elem: usize) -> u64 {
    (shape.batch * shape.seq * config.width * elem) as u64
}

fn score_tensor_bytes(config: &Config, shape: MicroBatch, elem: usize) -> u64 {
    (shape.batch * config.heads * shape.seq * shape.seq * elem) as u64
}

/// Bytes a training step with every block's activations kept needs beyond
/// the parameters and the optimizer's moments (already allocated), at most,
/// for `micro_batches` micro-batches of `shape` and `params` parameters. Its
/// peak comes while the loss runs or while the backward pass does; both hold
/// the blocks' activations ([`kept_activation_bytes`]) and those outside the
/// blocks ([`OUTER_ROW_TENSORS`]), and, from the second micro-batch on, the
/// sum of the parameters' gradients so far and, as each new gradient is
/// added to it, one sum beside the other (counted as the largest, the token
/// embedding's `[V, C]`). Beside those:
/// - the loss's own buffers: the linear loss's f32 sum of the output
///   layer's gradient (`[V, C]`), a chunk of logits (on CUDA at least 2048
///   rows: counted as all of them, `[B * T, V]`) and the hidden states'
///   gradient; the chunked loss holds the logits, their gradient,
///   and candle's zero-filled gradient sum and its result (four
///   `[B * T, V]`); candle-nn's, with its log-softmax's intermediates and
///   their gradients, ten (9.2 measured on the CPU); either of those two
///   also the output layer's gradient (`[V, C]`) and the zeros candle's
///   backward adds it into;
/// - the backward pass's: the gradients of one block's activations, formed
///   as it walks back through that block ([`BACKWARD_ROW_TENSORS`],
///   [`BACKWARD_SCORE_TENSORS`]), the parameters' gradients, and the linear
///   loss's f32 sum.
pub fn kept_step_bytes(
    config: &Config,
    shape: MicroBatch,
    elem: usize,
    params: usize,
    loss: LossKind,
    micro_batches: usize,
) -> u64 {
    let rows = (shape.batch * shape.seq) as u64;
    let (vocab, width, elem64) = (config.vocab as u64, config.width as u64, elem as u64);
    let linear_sum = 4 * vocab * width;
    let output_layer_grad = 2 * vocab * width * elem64;
    let loss_bytes = match loss {
        LossKind::Linear => linear_sum + rows * vocab * elem64 + 2 * rows * width * elem64,
        LossKind::Chunked => 4 * rows * vocab * elem64 + output_layer_grad,
        LossKind::CandleNn => 10 * rows * vocab * elem64 + output_layer_grad,
    };
    let grads = params as u64 * elem64;
    let earlier_sum = if micro_batches > 1 { grads + vocab * width * elem64 } else { 0 };
    let activations =
        kept_activation_bytes(config, shape, elem) + OUTER_ROW_TENSORS * row_tensor_bytes(config, shape, elem);
    let walking_back = BACKWARD_ROW_TENSORS * row_tensor_bytes(config, shape, elem)
        + BACKWARD_SCORE_TENSORS * score_tensor_bytes(config, shape, elem);
    let backward = walking_back + grads + if loss == LossKind::Linear { linear_sum } else { 0 };
    activations + earlier_sum + loss_bytes.max(backward)
}

/// The part of the available memory a step may plan to use: the rest is left to
/// what the estimate does not count (cuBLAS's workspace, the pool's
/// fragmentation, small tensors).
const USABLE_FRACTION: f64 = 0.9;

/// Whether `need` bytes fit in `free` bytes of device memory with room to spare.
fn fits(need: u64, free: u64) -> bool {
    need as f64 <= USABLE_FRACTION * free as f64
}

/// The default of `--keep-activations` on `device` for a step that needs
/// `need` bytes with them kept ([`kept_step_bytes`]): kept when that [`fits`]
/// the memory available now, with a note to print when it does not. On CUDA
/// the device's (`candle_chunked_ce::available_memory`); on the CPU the
/// host's (Linux's `MemAvailable`): GPT-2 124M at 4 x 256 tokens trains
/// 1.1-1.2x faster kept, at 3.0 GB resident instead of 2.6. Recomputed where
/// neither can be read.
///
/// # Errors
/// The driver's, if it cannot report the device's memory.
pub fn default_keep_activations(device: &Device, need: u64) -> Result<(bool, Option<String>)> {
    // The driver's free memory and what CUDA's pool keeps unused (the example retains freed memory).
    let available = match candle_chunked_ce::available_memory(device)? {
        Some(free) => Some((free, "the GPU")),
        None if device.is_cpu() => host_available_memory().map(|free| (free, "this machine")),
        None => None,
    };
    let Some((free, what)) = available else { return Ok((false, None)) };
    if fits(need, free) {
        return Ok((true, None));
    }
    let gb = |bytes: u64| bytes as f64 / 1e9;
    let note = format!(
        "keeping every block's activations would need about {:.1} GB and {what} has {:.1} GB available: recomputing \
         each block in the backward pass instead (--keep-activations overrides this)",
        gb(need),
        gb(free)
    );
    Ok((false, Some(note)))
}

/// The memory new allocations can have now on this host: Linux's
/// `MemAvailable` (`/proc/meminfo`), in bytes; `None` where it cannot be read.
fn host_available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = info.lines().find_map(|line| line.strip_prefix("MemAvailable:"))?.trim().strip_suffix("kB")?;
    Some(kib.trim().parse::<u64>().ok()? * 1024)
}
