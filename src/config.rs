//! What every engine is handed: one loss call's validated settings, and the
//! layout of the per-row values passed between the graph node (`op/mod.rs`) and
//! the engines (`cpu/`, `cuda.rs`, `primitive.rs`, and the launch
//! descriptions in `kernel_abi/`). It imports nothing of this crate, so the
//! data flows one way: the public losses validate their settings into an
//! [`OpConfig`], the node hands it to an engine, the engine to its kernels.

use candle::{DType, Result, Tensor};

/// Which kernels compute the loss: the fused ones (`compile = true`) or
/// candle's primitive ops, a chunk of rows at a time (`compile = false`),
/// both inside the loss's graph node (`op::StatsNode`); or, on a device that
/// no custom op of this crate runs on (see `op::kernels_cover`), candle's
/// primitive ops recorded in the graph op by op and differentiated by
/// candle's autograd (`Autograd`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Engine {
    Fused,
    Primitive,
    Autograd,
}

impl Engine {
    /// The engine for a loss on a device that `op::kernels_cover` (or not), with
    /// the `compile` setting.
    pub(crate) fn select(covered: bool, compile: bool) -> Self {
        match (covered, compile) {
            (false, _) => Engine::Autograd,
            (true, true) => Engine::Fused,
            (true, false) => Engine::Primitive,
        }
    }
}

/// The dtype the maths runs in for logits of `dtype`: f64 stays f64, every
/// other float type is widened to f32 (the accumulator dtype of every engine).
pub(crate) fn compute_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Validated settings shared by the forward and backward of one loss call.
#[derive(Debug, Clone)]
pub(crate) struct OpConfig {
    pub engine: Engine,
    pub ignore_index: i64,
    pub chunk_len: usize,
    pub inplace_grad: bool,
    pub terms: RowTerms,
    /// The class weights `w` of the logit sum, `Σ_j w_j x'_j` (see the maths
    /// in `op/mod.rs`): `[V]`, contiguous, in the compute dtype, on the logits' device;
    /// only with label smoothing and class weights (it is the one kernel term
    /// that class weights reach).
    pub sum_weights: Option<Tensor>,
    /// The labels were checked against `[0, V)` on the host already (the
    /// caller's labels on the CPU, or read back: the linear loss reads them
    /// once per call): the fused CUDA forward then does not read its bad-label
    /// flag back, which would synchronise per chunk.
    /// Only the CUDA launcher reads it.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub labels_checked: bool,
}

/// The label dtypes the losses take (converted to i64 by `labels.rs`).
pub const LABEL_DTYPES: [DType; 5] = [DType::U8, DType::U32, DType::I16, DType::I32, DType::I64];

/// One validated label per row; `None` marks an ignored row.
pub(crate) type RowLabel = Option<usize>;

/// The error for a label outside `[0, vocab)` that is not `ignore_index`
/// (the CPU and CUDA paths both report it this way).
pub(crate) fn bad_label(row: usize, label: i64, vocab: usize, ignore_index: i64) -> candle::Error {
    candle::Error::Msg(format!(
        "chunked cross-entropy: label {label} at row {row} is outside [0, {vocab}) and is not ignore_index ({ignore_index})"
    ))
    .bt()
}

/// The optional terms a row's kernels compute (see `op/mod.rs`): soft-capping of
/// the logits, and the sum of the (capped) logits that label smoothing needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RowTerms {
    pub softcap: Option<f64>,
    pub logit_sum: bool,
}

impl RowTerms {
    /// Whether the row goes through an f32 copy: soft-capping rewrites every
    /// logit, and the logit sum is one more reduction of the copy.
    pub(crate) fn widened(self) -> bool {
        self.softcap.is_some() || self.logit_sum
    }
}

/// The columns of the forward statistics, `[N, STATS]` row-major, that every
/// engine writes (see the maths in `op/mod.rs`); `cuda/cross_entropy/columns.cuh` names
/// the same columns in its `enum Stat` (a test below holds the two together).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stat {
    Ce,
    Lse,
    LogitSum,
    Correct,
}

/// Values per row in the forward statistics.
pub(crate) const STATS: usize = 4;

/// The columns of the backward factors, `[N, FACTORS]` row-major: the upstream
/// gradients of the three differentiable statistics, then the row's `lse` and
/// `ce` kept from forward. `columns.cuh`'s `enum Factor` names the same columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Factor {
    GCe,
    GLse,
    GSum,
    Lse,
    Ce,
}

/// Values per row in the backward factors.
pub(crate) const FACTORS: usize = 5;

/// The upstream gradients' columns (`g_ce`, `g_lse`, `g_sum`) lead the factors.
pub(crate) const UPSTREAM: usize = 3;

impl Stat {
    /// This column of `[N, STATS]` statistics, as `[N, 1]`.
    pub(crate) fn of(self, stats: &Tensor) -> Result<Tensor> {
        column(stats, self as usize)
    }
}

impl Factor {
    /// This column of `[N, FACTORS]` factors, as `[N, 1]`.
    pub(crate) fn of(self, factors: &Tensor) -> Result<Tensor> {
        column(factors, self as usize)
    }
}

/// Column `i` of a row-major `[N, C]` tensor, as `[N, 1]`; with no rows, at
/// offset 0 (candle's reductions index the storage at a narrowed view's
/// start, even when it is empty).
fn column(t: &Tensor, i: usize) -> Result<Tensor> {
    t.narrow(1, if t.dim(0)? == 0 { 0 } else { i }, 1)
}

/// The backward factors `[N, FACTORS]` from the upstream gradients (their
/// first [`UPSTREAM`] columns: those of `ce`, `lse` and `logit_sum`) and the
/// forward `stats`.
pub(crate) fn backward_factors(upstream: &Tensor, stats: &Tensor) -> Result<Tensor> {
    Tensor::cat(&[&upstream.narrow(1, 0, UPSTREAM)?, &Stat::Lse.of(stats)?, &Stat::Ce.of(stats)?], 1)
}

/// The gradients that a valid row's statistics receive when a scalar loss
/// receives 1 (see `ChunkedCrossEntropy::unit_factors`): `g_ce = ce`, `g_lse =
/// lse + lse_squared * lse_r` (with the row's log-sum-exp `lse_r`), `g_sum =
/// logit_sum`. Public only for the kernel tests (`kernel_abi`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UnitFactors {
    /// `g_ce`.
    pub ce: f64,
    /// The constant part of `g_lse`.
    pub lse: f64,
    /// The part of `g_lse` proportional to the row's log-sum-exp (z-loss).
    pub lse_squared: f64,
    /// `g_sum`.
    pub logit_sum: f64,
}

impl UnitFactors {
    /// The factors of a loss whose value receives `scale` instead of 1.
    pub(crate) fn scaled(self, scale: f64) -> Self {
        Self {
            ce: self.ce * scale,
            lse: self.lse * scale,
            lse_squared: self.lse_squared * scale,
            logit_sum: self.logit_sum * scale,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernels name the columns in the same order: their enums, read from
    /// `cuda/cross_entropy/columns.cuh`, list them as `Stat` and `Factor` do.
    #[test]
    fn the_kernels_name_the_same_columns() {
        let source = include_str!("../cuda/cross_entropy/columns.cuh");
        let enum_members = |name: &str| -> Vec<String> {
            let start = source.find(&format!("enum {name} {{")).expect("enum in columns.cuh") + name.len() + 7;
            let end = start + source[start..].find('}').expect("enum's end");
            source[start..end].split(',').map(|m| m.trim().to_string()).collect()
        };
        let stats = [Stat::Ce, Stat::Lse, Stat::LogitSum, Stat::Correct];
        let rust_stats: Vec<String> = stats.iter().map(|s| format!("STAT_{}", snake(&format!("{s:?}")))).collect();
        assert_eq!(enum_members("Stat"), [rust_stats, vec!["STATS".to_string()]].concat());
        assert!(stats.iter().enumerate().all(|(i, &s)| s as usize == i) && stats.len() == STATS);
        let factors = [Factor::GCe, Factor::GLse, Factor::GSum, Factor::Lse, Factor::Ce];
        let rust_factors: Vec<String> =
            factors.iter().map(|f| format!("FACTOR_{}", snake(&format!("{f:?}")))).collect();
        assert_eq!(enum_members("Factor"), [rust_factors, vec!["FACTORS".to_string()]].concat());
        assert!(factors.iter().enumerate().all(|(i, &f)| f as usize == i) && factors.len() == FACTORS);
    }

    /// `LogitSum` as `LOGIT_SUM`, `GCe` as `G_CE`.
    fn snake(camel: &str) -> String {
        let mut out = String::new();
        for (i, c) in camel.chars().enumerate() {
            if c.is_uppercase() && i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_uppercase());
        }
        out
    }
}
