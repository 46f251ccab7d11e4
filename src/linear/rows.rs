//! The rows the linear loss's products run on: the valid ones only.

use crate::candle_limits::check_cuda_elements;
use crate::config::RowLabel;
use candle::{bail, Device, Result, Tensor};

/// The rows the products run on. A row whose label is `ignore_index` adds
/// nothing to the loss or to any gradient (its statistics and its logits'
/// gradient are 0, see `op/mod.rs`), so when some rows are ignored the products
/// run on a dense copy of the others: all three matmuls shrink by the ignored
/// share (prompt and padding tokens, often a third of a fine-tuning batch or
/// more), for a gather of the `[N, H]` rows and a scatter of their gradient.
pub(super) enum RowSelection {
    /// Every row is valid: the rows as they are, no copy.
    All,
    /// Some rows are ignored: `None` when none is valid (candle's CUDA index
    /// ops would launch an empty grid, which the driver refuses).
    Valid { rows: Option<ValidRows>, total: usize },
}

/// Where the valid rows are, both ways, as `u32` index tensors on the rows' device.
pub(super) struct ValidRows {
    /// `[n_valid]`: each valid row's place among all rows, ascending.
    index: Tensor,
    /// `[total]`: each row's place among the valid rows, or [`NO_ROW`] for an ignored row.
    places: Tensor,
}

/// The index that candle's `index_select` turns into a zero row: the index
/// dtype's maximum, on the CPU and in candle-kernels' CUDA kernel (candle
/// 0.11; `tests/linear.rs`, `index_select_zeroes_rows_at_the_index_maximum`).
const NO_ROW: u32 = u32::MAX;

impl RowSelection {
    pub(super) fn of(labels: &[RowLabel], device: &Device) -> Result<Self> {
        if labels.iter().all(Option::is_some) {
            return Ok(Self::All);
        }
        if u32::try_from(labels.len()).is_err() {
            bail!("linear cross-entropy: {} rows exceed the u32 row index", labels.len())
        }
        let total = labels.len();
        let index: Vec<u32> = (0..total as u32).filter(|&i| labels[i as usize].is_some()).collect();
        if index.is_empty() {
            return Ok(Self::Valid { rows: None, total });
        }
        // A place is below `total <= u32::MAX`: never NO_ROW.
        let mut places = vec![NO_ROW; total];
        for (place, &row) in index.iter().enumerate() {
            places[row as usize] = place as u32;
        }
        let valid = index.len();
        let rows = ValidRows {
            index: Tensor::from_vec(index, valid, device)?,
            places: Tensor::from_vec(places, total, device)?,
        };
        Ok(Self::Valid { rows: Some(rows), total })
    }

    /// The selected rows (dim 0) of `t`.
    pub(super) fn gather(&self, t: &Tensor) -> Result<Tensor> {
        match self {
            Self::All => Ok(t.clone()),
            Self::Valid { rows: Some(rows), .. } => indexed_rows(t, &rows.index),
            Self::Valid { rows: None, .. } => zero_rows(t, 0),
        }
    }

    /// The rows of `t`, one per selected row, put back in their places among
    /// all rows, with zero rows for the others: one gather, each row of the
    /// result read from its place in `t` or zeroed. (candle's `index_add` into
    /// zeros, used before, runs on CUDA one thread per column, each adding
    /// every row in turn: `H` threads, `n_valid` steps each.)
    pub(super) fn scatter(&self, t: &Tensor) -> Result<Tensor> {
        match self {
            Self::All => Ok(t.clone()),
            Self::Valid { rows: Some(rows), .. } => indexed_rows(t, &rows.places),
            Self::Valid { rows: None, total } => zero_rows(t, *total),
        }
    }

    /// The input gradients (hidden states first, see [`super::products::GradientSums::finish`])
    /// with the hidden states' put back among all rows.
    pub(super) fn scatter_hidden_grad(&self, mut gradients: Vec<Option<Tensor>>) -> Result<Vec<Option<Tensor>>> {
        gradients[0] = gradients[0].take().map(|g| self.scatter(&g)).transpose()?;
        Ok(gradients)
    }
}

/// `t.index_select(index, 0)`, refused where candle-kernels' CUDA kernel
/// could not count the source's or the result's elements (its loop and
/// indices are `unsigned int`: see `candle_limits`).
fn indexed_rows(t: &Tensor, index: &Tensor) -> Result<Tensor> {
    let row = t.elem_count() / t.dim(0)?.max(1);
    let largest = t.elem_count().max(index.elem_count() * row);
    check_cuda_elements(t.device(), largest, || {
        let rows = t.dim(0).unwrap_or(0).max(index.elem_count());
        format!("linear cross-entropy: {rows} rows of {row} gathered by candle's index_select; pass fewer rows a call")
    })?;
    t.index_select(index, 0)
}

/// `rows` rows of zeros shaped like those of `t` (dim 0).
pub(super) fn zero_rows(t: &Tensor, rows: usize) -> Result<Tensor> {
    let mut dims = t.dims().to_vec();
    dims[0] = rows;
    Tensor::zeros(dims, t.dtype(), t.device())
}
