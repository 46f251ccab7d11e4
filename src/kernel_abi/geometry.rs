//! Where the rows of the logits, the labels and the mask's elements live in
//! their storage, as the kernels' arguments describe them.

use super::KernelArg;
use candle::{bail, DType, Layout, Result};

/// elements. The rows of `[.., V]` logits, the labels and the mask are all
/// found this way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Strided {
    start: i64,
    inner: i64,
    stride_outer: i64,
    stride_inner: i64,
}

impl Strided {
    /// The elements of leading `dims` (one or two) with their `strides`,
    /// from `start`; `None` for another rank.
    fn new(dims: &[usize], strides: &[usize], start: usize) -> Option<(usize, Self)> {
        let i = |v: usize| v as i64;
        let (count, inner, stride_outer, stride_inner) = match (dims, strides) {
            ([n], [s]) => (*n, (*n).max(1), 0, *s),
            ([b, s], [sb, ss]) => (b * s, (*s).max(1), *sb, *ss),
            _ => return None,
        };
        Some((
            count,
            Self { start: i(start), inner: i(inner), stride_outer: i(stride_outer), stride_inner: i(stride_inner) },
        ))
    }

    pub(super) fn args(&self) -> [KernelArg; 4] {
        [
            KernelArg::I64(self.start),
            KernelArg::I64(self.inner),
            KernelArg::I64(self.stride_outer),
            KernelArg::I64(self.stride_inner),
        ]
    }
}

/// Where the rows of `[.., V]` logits live (see `Strided`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowGeometry {
    /// Rows (`N`).
    pub rows: usize,
    /// Row length (`V`).
    pub vocab: usize,
    pub(super) strided: Strided,
}

impl RowGeometry {
    /// The rows of a rank 2 or 3 layout whose last dim is unit-stride, with
    /// `V < 2^31` (the kernels index within a row in 32 bits).
    pub fn new(layout: &Layout) -> Result<Self> {
        let (dims, strides) = (layout.dims(), layout.stride());
        let vocab = *dims.last().unwrap_or(&0);
        if vocab > 1 && strides.last() != Some(&1) {
            bail!("chunked cross-entropy (cuda): the vocabulary dim must be unit-stride, strides {strides:?}")
        }
        if vocab > i32::MAX as usize {
            bail!("chunked cross-entropy (cuda): a vocabulary of {vocab} is over the kernels' 2^31 - 1")
        }
        let leading = dims.len().saturating_sub(1);
        let (rows, strided) = match Strided::new(&dims[..leading], &strides[..leading], layout.start_offset()) {
            Some(rows) if matches!(dims.len(), 2 | 3) => rows,
            _ => bail!("chunked cross-entropy (cuda): logits must be rank 2 or 3, got {:?}", layout.shape()),
        };
        Ok(Self { rows, vocab, strided })
    }

    /// Whether a launch over these rows has nothing to do.
    pub(super) fn is_empty(&self) -> bool {
        self.rows == 0 || self.vocab == 0
    }
}

/// How a mask's elements are read (see [`super::labels`]): `bytes` per element, and
/// whether it is a float (its sign bit then does not count, so `-0.0` is 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaskElements {
    pub(super) bytes: i32,
    pub(super) float: bool,
}

impl MaskElements {
    /// The elements of a mask of `dtype`: every integer and float dtype of up
    /// to 8 bytes whose zero is all bits clear (but for a float's sign).
    pub fn of(dtype: DType) -> Result<Self> {
        let float = match dtype {
            DType::U8 | DType::U32 | DType::I16 | DType::I32 | DType::I64 => false,
            DType::BF16 | DType::F16 | DType::F32 | DType::F64 | DType::F8E4M3 => true,
            other => bail!(
                "chunked cross-entropy: a mask of {other:?} is not supported (an integer or a float dtype of 8 to 64 bits)"
            ),
        };
        Ok(Self { bytes: dtype.size_in_bytes() as i32, float })
    }
}

/// The caller's labels (and mask) as the `ce_labels_*` entries read them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LabelGeometry {
    /// Labels (`N`).
    pub rows: usize,
    pub(super) labels: Strided,
    pub(super) mask: Option<(Strided, MaskElements)>,
}

impl LabelGeometry {
    /// `labels`' layout (rank 1 or 2), and the mask's layout and elements
    /// when there is one (the same dims).
    pub fn new(labels: &Layout, mask: Option<(&Layout, MaskElements)>) -> Result<Self> {
        let strided =
            |layout: &Layout, what: &str| match Strided::new(layout.dims(), layout.stride(), layout.start_offset()) {
                Some(found) => Ok(found),
                None => bail!("chunked cross-entropy: {what} must be rank 1 or 2, got {:?}", layout.shape()),
            };
        let (rows, labels_strided) = strided(labels, "labels")?;
        let mask = match mask {
            None => None,
            Some((layout, elements)) => {
                if layout.dims() != labels.dims() {
                    bail!(
                        "chunked cross-entropy: mask {:?} must have the labels' shape {:?}",
                        layout.shape(),
                        labels.shape()
                    )
                }
                Some((strided(layout, "the mask")?.1, elements))
            }
        };
        Ok(Self { rows, labels: labels_strided, mask })
    }
}
