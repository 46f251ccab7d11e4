//! The candle CUDA kernels the losses' CUDA paths run, per logits and label
//! dtype, against the `.entry` names of the PTX modules candle-kernels ships
//! (feature `cuda`; no GPU needed, so CI runs it). candle-kernels 0.11.1 has,
//! for one, no cast from i16 or i32: a path that called one failed only on a
//! GPU, at `cuModuleGetFunction` (`CUDA_ERROR_NOT_FOUND`). So the labels never
//! meet a candle kernel in their caller's dtype: `ce_labels_*` (ours, see
//! `src/labels.rs`) turns them into i64 first, and only i64 label kernels
//! appear below.
//!
//! The list is written by hand from the code (each line names where); a new
//! candle op on the CUDA path belongs here, with its dtypes. The GPU run of
//! the whole suite (`scripts/gpu-check.sh`) checks the other direction: that
//! every path actually runs.
#![cfg(feature = "cuda")]

use candle::cuda_backend::kernels;
use candle::DType;
use std::collections::BTreeSet;

/// candle's kernel-name suffix for `dtype` (`kernel_name::<T>` in candle-core).
fn suffix(dtype: DType) -> &'static str {
    match dtype {
        DType::U8 => "u8",
        DType::U32 => "u32",
        DType::I16 => "i16",
        DType::I32 => "i32",
        DType::I64 => "i64",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::F32 => "f32",
        DType::F64 => "f64",
        other => panic!("no kernel suffix for {other:?}"),
    }
}

/// The candle kernels a loss call on CUDA runs for logits (or hidden states
/// and weight) of `logits` and labels of `labels` (any label dtype), over
/// every engine, option and entry point.
fn kernels_used(logits: DType, labels: DType) -> BTreeSet<String> {
    let t = suffix(logits);
    let c = suffix(if logits == DType::F64 { DType::F64 } else { DType::F32 });
    let mut used = BTreeSet::new();
    let mut add = |names: &[String]| used.extend(names.iter().cloned());
    // The labels: `labels::row_labels` converts any label dtype with our `ce_labels_*`; i64
    // labels that are contiguous without a mask are used as they are. Nothing of candle's.
    let _ = labels;
    // loss.rs, checked_logits: logits whose vocabulary dim is strided are copied.
    add(&[format!("ucopy_{t}")]);
    // loss.rs, valid_count and CallWeights::denominator: `labels != ignore_index` on the
    // i64 labels, counted in the compute dtype, at least 1; the mean divides by it.
    add(&["ne_i64".into(), format!("cast_u8_{c}"), format!("fast_sum_{c}"), format!("fast_sum_small_{c}")]);
    add(&[format!("bmaximum_{c}"), format!("bdiv_{c}"), format!("bmul_{c}")]);
    add(&[format!("gt_{c}"), format!("where_u8_{c}"), format!("const_set_{c}")]);
    // loss.rs, call_weights: class weights (of the logits' dtype here) summed in f64 on the
    // host, gathered at the targets (ignored ones at class 0), per-token loss weights.
    add(&[format!("cast_{t}_f64"), "fast_sum_f64".into(), "fast_sum_small_f64".into(), format!("cast_{t}_{c}")]);
    add(&["where_u8_i64".into(), "bmaximum_i64".into(), "bminimum_i64".into(), format!("gather_i64_{c}")]);
    // loss.rs, token_terms and reduce: the per-token loss composed from the statistics
    // (smoothing, z-loss, weights), summed, scaled.
    add(&[format!("affine_{c}"), format!("bsub_{c}"), format!("badd_{c}"), format!("usqr_{c}")]);
    // Candle's backward through those: the scalar's seed, narrow's zero padding and `cat`,
    // then (op/mod.rs) the factors' `cat` and `contiguous`; the logits' gradient added into
    // candle's zeros (`badd` in the logits' dtype).
    add(&[format!("copy2d_{c}"), format!("ucopy_{c}"), format!("badd_{t}"), format!("bmul_{c}")]);
    // op/mod.rs, unit_factors (the linear loss and the in-place forward with gradient):
    // `Tensor::full` columns, `affine` of lse, `cat`.
    add(&[format!("const_set_{c}")]);
    // linear/rows.rs: rows selected, and put back among all rows, by u32 index (hidden
    // states, labels, weights, statistics); linear.rs: the bias added, its gradient summed
    // over rows, the rows' gradient placed chunk by chunk, accumulators rounded to the
    // inputs' dtype, and upstream_scale's comparison in f64 on the host.
    add(&[format!("is_u32_{t}"), "is_u32_i64".into(), format!("is_u32_{c}")]);
    add(&[
        format!("badd_{t}"),
        format!("cast_{t}_{c}"),
        format!("cast_{c}_{t}"),
        format!("copy2d_{t}"),
        format!("cast_{c}_f64"),
    ]);
    // precomputed.rs, scaled: a 16-bit gradient scaled by a power of two in its own dtype
    // (grad_in_forward's gradient);
    // linear/products.rs, ProductSum::into_gradient: an unwritten bf16 sum (one chunk, or
    // low_memory) zeroed.
    add(&[format!("affine_{t}"), format!("const_set_{t}")]);
    // primitive.rs (compile = false, and the autograd path): widen, max, shift, gather the
    // target, exponentials, logs, the confident branch's comparisons and `where`s, the
    // first argmax's comparisons on i64 classes, the soft-cap, the gradient narrowed back.
    add(&[format!("cast_{t}_{c}"), format!("fast_max_{c}"), format!("bsub_{c}"), format!("gather_i64_{c}")]);
    add(&[format!("uexp_{c}"), format!("ulog_{c}"), format!("le_{c}"), format!("bdiv_{c}"), format!("eq_{c}")]);
    add(&["lt_i64".into(), format!("ge_{c}"), format!("gt_{c}"), "cast_u8_f32".into(), "fast_sum_f32".into()]);
    add(&[
        format!("utanh_{c}"),
        format!("uabs_{c}"),
        format!("uneg_{c}"),
        format!("cast_{c}_{t}"),
        format!("cast_u8_{t}"),
    ]);
    // `to_dtype` to the tensor's own dtype runs nothing.
    used.retain(|name| name.strip_prefix("cast_").is_none_or(|pair| pair.split_once('_').is_none_or(|(a, b)| a != b)));
    used
}

/// Every `.entry` name in one PTX module.
fn entries(ptx: &str) -> impl Iterator<Item = String> + '_ {
    ptx.lines().filter_map(|line| {
        let rest =
            line.trim_start().strip_prefix(".visible .entry ").or_else(|| line.trim_start().strip_prefix(".entry "))?;
        Some(rest.split(|c: char| c == '(' || c.is_whitespace()).next()?.to_string())
    })
}

/// Every entry of the modules candle's CUDA backend loads kernels from.
fn candle_entries() -> BTreeSet<String> {
    let modules = [
        kernels::AFFINE,
        kernels::BINARY,
        kernels::CAST,
        kernels::FILL,
        kernels::INDEXING,
        kernels::REDUCE,
        kernels::TERNARY,
        kernels::UNARY,
    ];
    modules.iter().flat_map(|module| entries(module.ptx())).collect()
}

#[test]
fn every_candle_kernel_the_cuda_path_runs_exists() {
    let available = candle_entries();
    assert!(available.len() > 100, "too few candle entries parsed: {}", available.len());
    let mut missing = Vec::new();
    for logits in [DType::F32, DType::BF16, DType::F16, DType::F64] {
        for labels in [DType::U8, DType::U32, DType::I16, DType::I32, DType::I64] {
            for kernel in kernels_used(logits, labels) {
                if !available.contains(&kernel) {
                    missing.push(format!("{kernel} (logits {logits:?}, labels {labels:?})"));
                }
            }
        }
    }
    assert!(missing.is_empty(), "candle-kernels has no entry for:\n{}", missing.join("\n"));
}

/// The gap that made this test: candle-kernels 0.11.1 cannot cast i16 or
/// i32 labels (to i64, or anything), which is why they never meet a candle
/// kernel. Fails once a candle release adds the casts; then labels may again
/// go through `to_dtype` on CUDA.
#[test]
fn candle_cannot_cast_i16_or_i32_labels() {
    let available = candle_entries();
    for name in ["cast_i32_i64", "cast_i16_i64", "cast_i32_f32", "ne_i32", "ne_i16"] {
        assert!(!available.contains(name), "candle-kernels now has {name}");
    }
    assert!(available.contains("cast_u32_i64") && available.contains("cast_u8_i64"), "the casts that do exist");
}
