//! Fine-tunes a GPT-2 with candle and `candle_chunked_ce`, offline.
//!
//! `cargo run --release --example finetune_gpt2` trains a small GPT-2 (the real
//! 50257-token vocabulary, fresh weights saved as safetensors and loaded back)
//! on text this repository contains, for about two minutes on 2 cores.
//! `-- --weights DIR/model.safetensors` fine-tunes a Hugging Face GPT-2 (its
//! `config.json` beside it gives the heads and settings); `-- --help` lists
//! every flag with its default. Errors are one line on stderr, exit status 1
//! (2 for a bad flag).

mod adamw;
mod bias;
mod block;
mod checkpoint;
mod cli;
mod column_sums;
mod embedding;
mod gelu;
mod gpt2;
mod heap;
mod layer_norm;
mod memory_plan;
mod rng;
mod sampling;
mod softmax;
mod split;
mod storage;
mod sum_squares;
mod train;

use adamw::AdamW;
use anyhow::{bail, Context, Result};
use candle::{Device, Tensor};
use candle_chunked_ce::LinearCrossEntropy;
use candle_nn::{Optimizer, ParamsAdamW};
use clap::Parser;
use cli::{Args, DeviceKind};
use gpt2::{Config, Gpt2};
use memory_plan::MicroBatch;
use rng::Rng;
use sampling::{sample, END_OF_TEXT, TOKENIZER_VOCAB};
use split::Split;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;
use train::Dataset;

/// Text this repository contains: the default training data.
const REPO_TEXT: [&str; 6] = [
    include_str!("../../README.md"),
    include_str!("../../BENCHMARKS.md"),
    include_str!("../../src/loss.rs"),
    include_str!("../../src/op/mod.rs"),
    include_str!("../../src/cpu/mod.rs"),
    include_str!("../../src/primitive.rs"),
];

/// Plain text, or JSONL prompt/completion records (prompt tokens masked out).
fn load_data(path: Option<&PathBuf>, bpe: &tiktoken_rs::CoreBPE) -> Result<Dataset> {
    let Some(path) = path else {
        return Ok(Dataset::from_tokens(bpe.encode_ordinary(&REPO_TEXT.join("\n\n"))));
    };
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read --data {}", path.display()))?;
    if text.trim().is_empty() {
        bail!("--data {} is empty", path.display())
    }
    let is_jsonl = path.extension().is_some_and(|e| e == "jsonl");
    if !is_jsonl {
        return Ok(Dataset::from_tokens(bpe.encode_ordinary(&text)));
    }
    let source = path.display().to_string();
    Ok(Dataset::from_jsonl(&text, &source, |s| bpe.encode_ordinary(s), END_OF_TEXT)?)
}

/// Mean loss and mean token accuracy (the model's top prediction is the next
/// token) over `batches` fixed validation batches, from one pass of the loss.
fn validation(model: &Gpt2, batches: &[train::Batch]) -> Result<(f32, f32)> {
    // The loss the example trains with evaluates too, one chunk of logits at
    // a time; the head detached, so that it computes no gradient.
    let head = model.lm_head().detach();
    let (mut loss, mut accuracy) = (0f32, 0f32);
    for batch in batches {
        let hidden = model.hidden_no_grad(&batch.inputs)?;
        let (labels, mask) = (&batch.labels, Some(&batch.mask));
        let out = LinearCrossEntropy::default().forward_with_outputs(&hidden, &head, None, labels, mask, None, None)?;
        loss += out.loss.to_scalar::<f32>()?;
        accuracy += out.token_accuracy.to_scalar::<f32>()?;
    }
    let n = batches.len() as f32;
    Ok((loss / n, accuracy / n))
}

/// Peak resident memory of this process, from /proc (Linux), in bytes.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb =
        status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()?;
    Some(kb * 1024)
}

fn plot(path: &PathBuf, train: &[(usize, f32)], val: &[(usize, f32)]) -> Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let max_step = train.last().map_or(1, |p| p.0).max(1);
    let max_loss = train.iter().chain(val).map(|p| p.1).fold(0f32, f32::max) * 1.05;
    let mut chart = ChartBuilder::on(&root)
        .caption("finetune_gpt2: loss", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(0..max_step, 0f32..max_loss)?;
    chart.configure_mesh().x_desc("step").y_desc("cross-entropy (nats)").draw()?;
    chart
        .draw_series(LineSeries::new(train.iter().copied(), &BLUE))?
        .label("train")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE));
    chart
        .draw_series(LineSeries::new(val.iter().copied(), &RED))?
        .label("validation")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED));
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE).draw()?;
    root.present()?;
    Ok(())
}

/// AdamW with weight decay on the matrices only: biases and layer-norm gains
/// (the vectors) are not decayed, as in GPT-2's and most fine-tuning recipes.
struct Optimizers {
    decayed: AdamW,
    not_decayed: AdamW,
}

impl Optimizers {
    fn new(model: &Gpt2, lr: f64, weight_decay: f64) -> Result<Self> {
        let (matrices, vectors): (Vec<_>, Vec<_>) =
            model.named_vars().into_iter().map(|(_, v)| v.clone()).partition(|v| v.rank() >= 2);
        Ok(Self {
            decayed: AdamW::new(matrices, ParamsAdamW { lr, weight_decay, ..Default::default() })?,
            not_decayed: AdamW::new(vectors, ParamsAdamW { lr, weight_decay: 0.0, ..Default::default() })?,
        })
    }

    fn step(&mut self, grads: &candle::backprop::GradStore, scale: Option<&Tensor>, lr: f64) -> Result<()> {
        for opt in [&mut self.decayed, &mut self.not_decayed] {
            opt.set_learning_rate(lr);
            opt.step_scaled(grads, scale)?;
        }
        Ok(())
    }
}

fn main() -> ExitCode {
    heap::keep_freed_memory();
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) if !e.use_stderr() => {
            // --help, --version
            e.print().ok();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let rendered = e.render().to_string();
            eprintln!("{} (see --help)", rendered.lines().next().unwrap_or("error: bad arguments"));
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, without backtraces.
fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let part = match cause.downcast_ref::<candle::Error>() {
            Some(candle_error) => checkpoint::message(candle_error),
            None => cause.to_string().lines().map(str::trim).collect::<Vec<_>>().join(" "),
        };
        if parts.last() != Some(&part) {
            parts.push(part);
        }
    }
    parts.join(": ")
}

/// `what: message` of an error about what a flag names (`--save`, `--data FILE`).
fn flag_error(what: &str, e: &candle::Error) -> anyhow::Error {
    anyhow::anyhow!("{what}: {}", checkpoint::message(e))
}

/// The model: from --weights, or fresh (saved and loaded back, as a checkpoint would be).
fn build_model(args: &Args, device: &Device) -> Result<Gpt2> {
    let (model, notice) = match &args.weights {
        Some(path) => checkpoint::load(path, args.heads, device)?,
        None => {
            let heads = args.heads.unwrap_or(4);
            let config = Config::gpt2(50257, 1024, args.width, args.layers, heads);
            let fresh = Gpt2::new(config, config.init(&mut Rng::new(args.seed), device)?, device)?;
            let dir = std::env::temp_dir().join(format!("finetune_gpt2_init_{}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            let path = dir.join("model.safetensors");
            checkpoint::save(&fresh, &path)?;
            let loaded = checkpoint::load(&path, Some(heads), device);
            std::fs::remove_dir_all(&dir).ok();
            loaded?
        }
    };
    if let Some(notice) = notice {
        println!("note: {notice}");
    }
    Ok(model)
}

/// The device `kind` names. `auto` takes CUDA's first GPU where the example
/// was built with the `cuda` feature and one opens; where none opens it trains
/// on the CPU and says why on stderr (so that a GPU machine's driver problem
/// is not a silent CPU run).
fn open_device(kind: DeviceKind) -> Result<Device> {
    let cuda = || Device::new_cuda(0);
    Ok(match kind {
        DeviceKind::Cpu => Device::Cpu,
        DeviceKind::Cuda => cuda().map_err(|e| {
            anyhow::anyhow!("--device cuda needs --features cuda and a GPU ({})", checkpoint::message(&e))
        })?,
        DeviceKind::Auto if cfg!(feature = "cuda") => cuda().unwrap_or_else(|e| {
            eprintln!("note: no GPU opened ({}): training on the CPU", checkpoint::message(&e));
            Device::Cpu
        }),
        DeviceKind::Auto => Device::Cpu,
    })
}

/// "the CPU", or the GPU's name as the driver gives it.
fn device_name(device: &Device) -> String {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => match dev.cuda_stream().context().name() {
            Ok(name) => format!("GPU 0 ({name})"),
            Err(_) => "GPU 0".into(),
        },
        Device::Cpu => "the CPU".into(),
        other => format!("{:?}", other.location()),
    }
}

fn run(args: Args) -> Result<()> {
    let device = open_device(args.device)?;
    // On a GPU: keep freed memory in CUDA's pool (every step's buffers are the same, and mapping them
    // afresh each step cost 2.9x end to end in the loss's own benchmark).
    candle_chunked_ce::retain_freed_memory(&device)?;
    if args.tf32 {
        if !device.is_cuda() {
            bail!("--tf32 applies to CUDA's f32 matrix products, and this run trains on the CPU")
        }
        // candle's switch, which the loss's own cuBLAS products follow too.
        candle::cuda::set_gemm_reduced_precision_f32(true);
    }
    // The outputs' paths, checked before any training.
    let save_path = match &args.save {
        Some(path) => Some(checkpoint::save_path(path).map_err(|e| flag_error("--save", &e))?),
        None => None,
    };
    if let Some(path) = &args.plot {
        checkpoint::writable_directory_of(path).map_err(|e| flag_error("--plot", &e))?;
    }
    let bpe = tiktoken_rs::r50k_base()?;
    let data = load_data(args.data.as_ref(), &bpe)?;
    if data.len() < 2 {
        bail!("the data holds {} tokens: nothing to train on", data.len())
    }
    let (train_data, val_data) = data.split(0.1).map_err(|e| {
        flag_error(&args.data.as_ref().map_or("the data".into(), |p| format!("--data {}", p.display())), &e)
    })?;

    let model = build_model(&args, &device)?;
    if model.config.vocab < TOKENIZER_VOCAB {
        bail!(
            "the model's vocabulary of {} tokens is smaller than the GPT-2 tokenizer's {}",
            model.config.vocab,
            TOKENIZER_VOCAB
        )
    }
    if args.seq > model.config.context {
        bail!("--seq {} exceeds the model's context of {} tokens", args.seq, model.config.context)
    }
    let lr = args.lr.unwrap_or(if args.weights.is_some() { 1e-4 } else { 3e-3 });
    let params: usize = model.named_vars().iter().map(|(_, v)| v.elem_count()).sum();
    println!(
        "GPT-2: {} layers, width {}, {} heads, {:.1} M parameters; {} training / {} validation tokens; loss: {:?}; lr {lr:e}{}; on {}",
        model.config.layers,
        model.config.width,
        model.config.heads,
        params as f64 / 1e6,
        train_data.len(),
        val_data.len(),
        args.loss,
        if args.tf32 { "; f32 products in TF32" } else { "" },
        device_name(&device)
    );

    let mut rng = Rng::new(args.seed);
    // Records are padded to a window; plain text needs one window's tokens.
    let val_source = if val_data.records || val_data.len() > args.seq {
        &val_data
    } else {
        println!(
            "note: validating on training text: the last 10% of the text is {} tokens, not a window of --seq {} + 1",
            val_data.len(),
            args.seq
        );
        &train_data
    };
    let val_batches: Vec<train::Batch> =
        (0..4).map(|_| val_source.batch(&mut rng, args.batch, args.seq, &device)).collect::<candle::Result<_>>()?;
    let mut opt = Optimizers::new(&model, lr, args.weight_decay)?;
    // With the model and the optimizer's moments in memory: does a step with every block's activations
    // kept fit in what is left? (memory_plan.rs)
    let keep_activations = match args.keep_activations {
        Some(keep) => keep,
        None => {
            let shape = MicroBatch { batch: args.batch, seq: args.seq };
            let elem = model.lm_head().dtype().size_in_bytes();
            let need = memory_plan::kept_step_bytes(&model.config, shape, elem, params, args.loss, args.accum);
            let (keep, note) = memory_plan::default_keep_activations(&device, need)?;
            if let Some(note) = note {
                println!("note: {note}");
            }
            keep
        }
    };

    let (start_val, start_accuracy) = validation(&model, &val_batches)?;
    let (mut train_curve, mut val_curve) = (Vec::new(), vec![(0, start_val)]);
    let mut accuracy = start_accuracy;
    let bar = indicatif::ProgressBar::new(args.steps as u64);
    bar.set_style(indicatif::ProgressStyle::with_template("{bar:30} step {pos}/{len} | {msg} | ETA {eta}")?);
    let started = Instant::now();
    let mut split = Split::default();
    let mut trained_tokens = 0usize;
    let mut first_loss = None;
    for step in 0..args.steps {
        let batches: Vec<train::Batch> = (0..args.accum)
            .map(|_| train_data.batch(&mut rng, args.batch, args.seq, &device))
            .collect::<candle::Result<_>>()?;
        split.start(&device)?;
        let mut lap = |phase| split.lap(&device, phase);
        let (step_loss, grads) = train::step_gradients_timed(&model, &batches, args.loss, keep_activations, &mut lap)?;
        if step == 0 {
            let missing = train::missing_gradients(&model, &grads);
            if !missing.is_empty() {
                bail!("these parameters received no gradient: {missing:?}")
            }
        }
        // The clipping's factor goes to AdamW, which scales each gradient as it reads it.
        let clip = train::clip_factor(&model, &grads, args.clip)?;
        opt.step(&grads, clip.factor.as_ref(), train::learning_rate(step, args.steps, args.warmup, lr))?;
        drop(grads); // not held through validation
        split.optimizer(&device)?;
        // The step's one read from the device, once all of it is queued.
        let loss = step_loss.to_scalar::<f32>()?;
        first_loss.get_or_insert(loss);
        trained_tokens += batches.len() * args.batch * args.seq;
        train_curve.push((step + 1, loss));
        if (step + 1) % args.eval_every == 0 || step + 1 == args.steps {
            let (val_loss, val_accuracy) = validation(&model, &val_batches)?;
            val_curve.push((step + 1, val_loss));
            accuracy = val_accuracy;
        }
        let tokens_per_s = trained_tokens as f64 / started.elapsed().as_secs_f64();
        let val = val_curve.last().unwrap().1;
        bar.set_message(format!(
            "loss {loss:.3} | val {val:.3}, accuracy {:.1}% | {tokens_per_s:.0} tok/s",
            100.0 * accuracy
        ));
        bar.inc(1);
    }
    bar.finish();
    let seconds = started.elapsed().as_secs_f64();
    let end_val = val_curve.last().unwrap().1;
    println!(
        "loss: train {:.6} (step 0) -> {:.3}, validation {start_val:.3} -> {end_val:.3} (token accuracy {:.1}% -> {:.1}%); {:.0} tokens/s; {:.1} s; peak RSS {}",
        first_loss.unwrap_or(f32::NAN),
        train_curve.last().unwrap().1,
        100.0 * start_accuracy,
        100.0 * accuracy,
        trained_tokens as f64 / seconds,
        seconds,
        peak_rss().map_or("unknown".into(), |b| format!("{:.0} MB", b as f64 / 1e6))
    );
    println!("{}", split.summary(&device, keep_activations, args.accum * args.batch * args.seq)?);
    // Saved before anything else can fail.
    if let Some(path) = &save_path {
        checkpoint::save(&model, path)?;
        println!("saved {}", path.display());
    }
    for prompt in ["The loss", "fn forward", "cross-entropy"] {
        println!("sample: {:?}", sample(&model, &bpe, prompt, 24, &mut rng)?);
    }
    if let Some(path) = &args.plot {
        plot(path, &train_curve, &val_curve)?;
        println!("plotted {}", path.display());
    }
    Ok(())
}
