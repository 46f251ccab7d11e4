//! Fine-tunes a GPT-2 with candle and `candle_chunked_ce`, offline.
//!
//! `cargo run --release --example finetune_gpt2` trains a small GPT-2 (the real
//! 50257-token vocabulary, fresh weights saved as safetensors and loaded back)
//! on text this repository contains, for about two minutes on 2 cores. Flags:
//!
//! ```text
//! --weights FILE     start from a GPT-2 model.safetensors (Hugging Face names; 124M needs --heads 12)
//! --data FILE        plain text, or JSONL of {"prompt": .., "completion": ..} (prompts masked out of the loss)
//! --loss chunked|linear|candle-nn   the cross-entropy (default chunked; linear never builds the logits)
//! --steps N --batch B --accum K --seq T --lr X --warmup N --clip X --eval-every N --seed S
//! --layers L --width C --heads H   the fresh model's shape (without --weights)
//! --save FILE        checkpoint at the end     --plot FILE.svg   loss curves
//! --device cpu|cuda  (cuda needs --features cuda)
//! ```

mod gpt2;
mod rng;
mod train;

use anyhow::{bail, Context, Result};
use candle::{Device, Tensor};
use candle_chunked_ce::ChunkedCrossEntropy;
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use gpt2::{Config, Gpt2};
use rng::Rng;
use std::path::PathBuf;
use std::time::Instant;
use train::{Dataset, LossKind};

/// Text this repository contains: the default training data.
const REPO_TEXT: [&str; 6] = [
    include_str!("../../README.md"),
    include_str!("../../BENCHMARKS.md"),
    include_str!("../../src/loss.rs"),
    include_str!("../../src/op.rs"),
    include_str!("../../src/cpu/mod.rs"),
    include_str!("../../src/reference.rs"),
];

struct Args {
    weights: Option<PathBuf>,
    data: Option<PathBuf>,
    loss: LossKind,
    steps: usize,
    batch: usize,
    accum: usize,
    seq: usize,
    lr: f64,
    warmup: usize,
    clip: f64,
    eval_every: usize,
    seed: u64,
    layers: usize,
    width: usize,
    heads: usize,
    save: Option<PathBuf>,
    plot: Option<PathBuf>,
    device: String,
}

impl Args {
    fn parse() -> Result<Self> {
        let mut args = Args {
            weights: None,
            data: None,
            loss: LossKind::Chunked,
            steps: 150,
            batch: 8,
            accum: 2,
            seq: 64,
            lr: 3e-3,
            warmup: 15,
            clip: 1.0,
            eval_every: 25,
            seed: 1,
            layers: 2,
            width: 128,
            heads: 4,
            save: None,
            plot: None,
            device: "cpu".into(),
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
            match flag.as_str() {
                "--weights" => args.weights = Some(value()?.into()),
                "--data" => args.data = Some(value()?.into()),
                "--loss" => {
                    args.loss = match value()?.as_str() {
                        "chunked" => LossKind::Chunked,
                        "candle-nn" => LossKind::CandleNn,
                        "linear" => LossKind::Linear,
                        other => bail!("--loss must be chunked, linear or candle-nn, got {other}"),
                    }
                }
                "--steps" => args.steps = value()?.parse()?,
                "--batch" => args.batch = value()?.parse()?,
                "--accum" => args.accum = value()?.parse()?,
                "--seq" => args.seq = value()?.parse()?,
                "--lr" => args.lr = value()?.parse()?,
                "--warmup" => args.warmup = value()?.parse()?,
                "--clip" => args.clip = value()?.parse()?,
                "--eval-every" => args.eval_every = value()?.parse()?,
                "--seed" => args.seed = value()?.parse()?,
                "--layers" => args.layers = value()?.parse()?,
                "--width" => args.width = value()?.parse()?,
                "--heads" => args.heads = value()?.parse()?,
                "--save" => args.save = Some(value()?.into()),
                "--plot" => args.plot = Some(value()?.into()),
                "--device" => args.device = value()?,
                other => bail!("unknown flag {other} (see the doc comment of examples/finetune_gpt2/main.rs)"),
            }
        }
        if args.steps == 0 || args.batch == 0 || args.accum == 0 || args.seq == 0 || args.eval_every == 0 {
            bail!("--steps, --batch, --accum, --seq and --eval-every must be at least 1")
        }
        Ok(args)
    }
}

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
    let mut data = Dataset::default();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let record: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{} line {}: not JSON", path.display(), i + 1))?;
        let field = |name: &str| {
            record[name].as_str().with_context(|| format!("{} line {}: no string \"{name}\"", path.display(), i + 1))
        };
        let prompt = bpe.encode_ordinary(field("prompt")?);
        let completion = bpe.encode_ordinary(field("completion")?);
        let mask = [vec![0u8; prompt.len()], vec![1u8; completion.len()]].concat();
        data.sequences.push(([prompt, completion].concat(), mask));
    }
    Ok(data)
}

/// Mean loss and mean token accuracy (the model's top prediction is the next
/// token) over `batches` fixed validation batches, from one pass of the loss.
fn validation(model: &Gpt2, batches: &[train::Batch]) -> Result<(f32, f32)> {
    let (mut loss, mut accuracy) = (0f32, 0f32);
    for batch in batches {
        let logits = model.logits(&batch.inputs)?;
        let out =
            ChunkedCrossEntropy::default().forward_with_outputs(&logits, &batch.labels, Some(&batch.mask), None)?;
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

/// Top-k sampling with temperature from `prompt`.
fn sample(model: &Gpt2, bpe: &tiktoken_rs::CoreBPE, prompt: &str, tokens: usize, rng: &mut Rng) -> Result<String> {
    let mut ids = bpe.encode_ordinary(prompt);
    for _ in 0..tokens {
        let start = ids.len().saturating_sub(model.config.context);
        let input = Tensor::new(&ids[start..], &Device::Cpu)?.to_device(model_device(model))?.unsqueeze(0)?;
        let logits = model.logits(&input)?.squeeze(0)?;
        let last: Vec<f32> = logits.get(logits.dim(0)? - 1)?.to_vec1()?;
        let mut top: Vec<(usize, f32)> = last.iter().copied().enumerate().collect();
        top.sort_by(|a, b| b.1.total_cmp(&a.1));
        top.truncate(40);
        let weights: Vec<f64> = top.iter().map(|(_, l)| (((l - top[0].1) / 0.8) as f64).exp()).collect();
        let mut pick = rng.unit() * weights.iter().sum::<f64>();
        let choice = top.iter().zip(&weights).find(|(_, w)| {
            pick -= **w;
            pick <= 0.0
        });
        ids.push(choice.map_or(top[0].0, |(t, _)| t.0) as u32);
    }
    bpe.decode(ids)
}

fn model_device(model: &Gpt2) -> &Device {
    model.named_vars()[0].1.as_tensor().device()
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

/// glibc hands every freed buffer above its mmap threshold back to the OS, so
/// each training step would fault its logits-sized buffers in again, 4 KiB at a
/// time (most of a step's time on our 2-core VMs, see BENCHMARKS.md). This
/// process keeps freed memory in its heap instead; both losses run with it.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes glibc's allocator; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

fn main() -> Result<()> {
    keep_freed_memory();
    let args = Args::parse()?;
    let device = match args.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0).context("--device cuda needs --features cuda and a GPU")?,
        other => bail!("--device must be cpu or cuda, got {other}"),
    };
    let bpe = tiktoken_rs::r50k_base()?;
    let data = load_data(args.data.as_ref(), &bpe)?;
    if data.len() < 2 {
        bail!("the data holds {} tokens: nothing to train on", data.len())
    }
    let (train_data, val_data) = data.split(0.1);

    let model = match &args.weights {
        Some(path) => Gpt2::load(path, args.heads, &device)?,
        None => {
            let config =
                Config { vocab: 50257, context: 1024, width: args.width, layers: args.layers, heads: args.heads };
            let path = std::env::temp_dir().join(format!("finetune_gpt2_init_{}.safetensors", std::process::id()));
            let fresh = Gpt2::from_tensors(config.init(&mut Rng::new(args.seed), &device)?, args.heads, &device)?;
            fresh.save(&path)?;
            let model = Gpt2::load(&path, args.heads, &device)?;
            std::fs::remove_file(&path).ok();
            model
        }
    };
    if args.seq > model.config.context {
        bail!("--seq {} exceeds the model's context of {} tokens", args.seq, model.config.context)
    }
    let params: usize = model.named_vars().iter().map(|(_, v)| v.elem_count()).sum();
    println!(
        "GPT-2: {} layers, width {}, {} heads, {:.1} M parameters; {} training / {} validation tokens; loss: {:?}",
        model.config.layers,
        model.config.width,
        model.config.heads,
        params as f64 / 1e6,
        train_data.len(),
        val_data.len(),
        args.loss
    );

    let mut rng = Rng::new(args.seed);
    let val_source = if val_data.len() > args.seq { &val_data } else { &train_data };
    let val_batches: Vec<train::Batch> =
        (0..4).map(|_| val_source.batch(&mut rng, args.batch, args.seq, &device)).collect::<candle::Result<_>>()?;
    let vars: Vec<candle::Var> = model.named_vars().into_iter().map(|(_, v)| v.clone()).collect();
    let mut opt = AdamW::new(vars, ParamsAdamW { lr: args.lr, weight_decay: 0.01, ..Default::default() })?;

    let (start_val, start_accuracy) = validation(&model, &val_batches)?;
    let (mut train_curve, mut val_curve) = (Vec::new(), vec![(0, start_val)]);
    let mut accuracy = start_accuracy;
    let bar = indicatif::ProgressBar::new(args.steps as u64);
    bar.set_style(indicatif::ProgressStyle::with_template("{bar:30} step {pos}/{len} | {msg} | ETA {eta}")?);
    let started = Instant::now();
    let mut trained_tokens = 0usize;
    let mut first_loss = None;
    for step in 0..args.steps {
        let batches: Vec<train::Batch> = (0..args.accum)
            .map(|_| train_data.batch(&mut rng, args.batch, args.seq, &device))
            .collect::<candle::Result<_>>()?;
        let (loss, mut grads) = train::step_gradients(&model, &batches, args.loss)?;
        if step == 0 {
            let missing = train::missing_gradients(&model, &grads);
            if !missing.is_empty() {
                bail!("these parameters received no gradient: {missing:?}")
            }
            first_loss = Some(loss);
        }
        train::clip_grad_norm(&model, &mut grads, args.clip)?;
        opt.set_learning_rate(train::learning_rate(step, args.steps, args.warmup, args.lr));
        opt.step(&grads)?;
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
    for prompt in ["The loss", "fn forward", "cross-entropy"] {
        println!("sample: {:?}", sample(&model, &bpe, prompt, 24, &mut rng)?);
    }
    if let Some(path) = &args.save {
        model.save(path)?;
        println!("saved {}", path.display());
    }
    if let Some(path) = &args.plot {
        plot(path, &train_curve, &val_curve)?;
        println!("plotted {}", path.display());
    }
    Ok(())
}
