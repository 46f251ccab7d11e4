//! The example's command line (its own module, so that `tests/finetune_cli.rs`
//! can parse with it).

use crate::train::LossKind;
use clap::Parser;
use std::path::PathBuf;

/// Fine-tunes a GPT-2 with candle and candle_chunked_ce's fused cross-entropy.
///
/// Without --weights: a fresh GPT-2 (real 50257-token vocabulary) on text this
/// repository contains. With --weights: a Hugging Face GPT-2 checkpoint, with
/// defaults for fine-tuning pretrained weights.
#[derive(Parser, Debug)]
// Negative numbers parse as values, so that `--lr -1` is refused for its value (at least 0)
// rather than as an unknown argument `-1`.
#[command(name = "finetune_gpt2", allow_negative_numbers = true)]
pub struct Args {
    /// GPT-2 model.safetensors (or its directory) in Hugging Face's layout; its config.json beside it gives the
    /// heads, layer-norm epsilon, activation and tying [default: a fresh model]
    #[arg(long, value_name = "FILE")]
    pub weights: Option<PathBuf>,
    /// Plain text, or .jsonl of {"prompt": .., "completion": ..} records (prompts masked out of the loss, each
    /// record ended by <|endoftext|>) [default: text this repository contains]
    #[arg(long, value_name = "FILE")]
    pub data: Option<PathBuf>,
    /// The cross-entropy: ours without logits (LinearCrossEntropy, over the hidden states and the lm_head weight:
    /// the fastest and leanest), ours over the logits, or candle-nn's
    #[arg(long, value_enum, default_value_t = LossKind::Linear)]
    pub loss: LossKind,
    /// Optimizer steps
    #[arg(long, default_value_t = 150, value_parser = at_least_one)]
    pub steps: usize,
    /// Sequences per micro-batch
    #[arg(long, default_value_t = 8, value_parser = at_least_one)]
    pub batch: usize,
    /// Micro-batches per step (gradient accumulation)
    #[arg(long, default_value_t = 2, value_parser = at_least_one)]
    pub accum: usize,
    /// Keep every block's activations for the backward pass instead of recomputing them one block at a time (the
    /// same gradients, bit for bit): 1.1-1.2x the tokens/s for GPT-2 124M at batch 4 x 256 tokens on the CPU, at
    /// 3.0 GB peak instead of 2.6 GB [default: true when the step's estimated memory fits in 90% of the memory
    /// available now, the GPU's on CUDA, the machine's on the CPU (else false, with a note)]
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub keep_activations: Option<bool>,
    /// Tokens per sequence (at most the model's context)
    #[arg(long, default_value_t = 64, value_parser = at_least_one)]
    pub seq: usize,
    /// Peak learning rate [default: 3e-3 for a fresh model, 1e-4 with --weights]
    #[arg(long, value_parser = finite_non_negative)]
    pub lr: Option<f64>,
    /// AdamW weight decay, on matrices only (never on biases or layer-norm gains)
    #[arg(long, default_value_t = 0.01, value_parser = finite_non_negative)]
    pub weight_decay: f64,
    /// Linear warm-up steps, then cosine decay to 10% of --lr
    #[arg(long, default_value_t = 15)]
    pub warmup: usize,
    /// Gradient clipping: largest global L2 norm (inf: no clipping)
    #[arg(long, default_value_t = 1.0, value_parser = positive)]
    pub clip: f64,
    /// Validate every N steps
    #[arg(long, default_value_t = 25, value_parser = at_least_one)]
    pub eval_every: usize,
    /// Seed of the fresh weights, batches and samples
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Layers of a fresh model
    #[arg(long, default_value_t = 2, conflicts_with = "weights", value_parser = at_least_one)]
    pub layers: usize,
    /// Width of a fresh model
    #[arg(long, default_value_t = 128, conflicts_with = "weights", value_parser = at_least_one)]
    pub width: usize,
    /// Attention heads [default: 4 for a fresh model; with --weights config.json's n_head (an error if they
    /// differ), or width / 64 without a config.json]
    #[arg(long, value_parser = at_least_one)]
    pub heads: Option<usize>,
    /// Save the trained model here (and its config.json beside it); a directory gets model.safetensors.
    /// Checked writable (missing directories created) before training
    #[arg(long, value_name = "FILE|DIR")]
    pub save: Option<PathBuf>,
    /// Plot the loss curves to this SVG
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Where to train
    #[arg(long, value_enum, default_value_t = DeviceKind::Auto)]
    pub device: DeviceKind,
    /// On CUDA, let f32 matrix products use TF32 tensor cores, as PyTorch's
    /// `torch.backends.cuda.matmul.allow_tf32 = True` does: several times the f32 throughput, the products'
    /// inputs rounded to a 10-bit mantissa (sums stay f32)
    #[arg(long)]
    pub tf32: bool,
}

fn at_least_one(value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err("must be a whole number of at least 1".into()),
    }
}

fn positive(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(x) if x > 0.0 => Ok(x),
        _ => Err("must be a number above 0 (inf: no clipping)".into()),
    }
}

fn finite_non_negative(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        _ => Err("must be a finite number of at least 0".into()),
    }
}

/// Where the example trains.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// CUDA's first GPU where built with `--features cuda` and one opens; else the CPU, saying why
    Auto,
    /// The CPU
    Cpu,
    /// CUDA's first GPU (needs `--features cuda`): an error where none opens
    Cuda,
}
