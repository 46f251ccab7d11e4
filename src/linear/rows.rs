//! The rows the linear loss's products run on: the valid ones only.

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
    /// The valid rows' indices (`[n_valid]` u32, ascending) among `total`;
    /// `None` when no row is valid (candle's CUDA index ops would launch an
    /// empty grid, which the driver refuses).
    Valid { index: Option<Tensor>, total: usize },
}

impl RowSelection {
    pub(super) fn of(labels: &[RowLabel], device: &Device) -> Result<Self> {
        if labels.iter().all(Option::is_some) {
            return Ok(Self::All);
        }
        if u32::try_from(labels.len()).is_err() {
            bail!("linear cross-entropy: {} rows exceed the u32 row index", labels.len())
        }
        let index: Vec<u32> = (0..labels.len() as u32).filter(|&i| labels[i as usize].is_some()).collect();
        let len = index.len();
        let index = (len > 0).then(|| Tensor::from_vec(index, len, device)).transpose()?;
        Ok(Self::Valid { index, total: labels.len() })
    }

    /// The selected rows (dim 0) of `t`.
    pub(super) fn gather(&self, t: &Tensor) -> Result<Tensor> {
        match self {
            Self::All => Ok(t.clone()),
            Self::Valid { index: Some(index), .. } => t.index_select(index, 0),
            Self::Valid { index: None, .. } => zero_rows(t, 0),
        }
    }

    /// The rows of `t`, one per selected row, put back in their places among
    /// all rows, with zero rows for the others.
    pub(super) fn scatter(&self, t: &Tensor) -> Result<Tensor> {
        match self {
            Self::All => Ok(t.clone()),
            Self::Valid { index: Some(index), total } => zero_rows(t, *total)?.index_add(index, t, 0),
            Self::Valid { index: None, total } => zero_rows(t, *total),
        }
    }

    /// The input gradients (hidden states first, see [`super::products::GradientSums::finish`])
    /// with the hidden states' put back among all rows.
    pub(super) fn scatter_hidden_grad(&self, mut gradients: Vec<Option<Tensor>>) -> Result<Vec<Option<Tensor>>> {
        gradients[0] = gradients[0].take().map(|g| self.scatter(&g)).transpose()?;
        Ok(gradients)
    }
}

/// `rows` rows of zeros shaped like those of `t` (dim 0).
pub(super) fn zero_rows(t: &Tensor, rows: usize) -> Result<Tensor> {
    let mut dims = t.dims().to_vec();
    dims[0] = rows;
    Tensor::zeros(dims, t.dtype(), t.device())
}
