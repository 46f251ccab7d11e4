//! The linear loss's three matrix products and their sums: a chunk's logits
//! (`rows · Wᵀ`), the hidden states' gradient (`G · W`) and the weight's
//! (`Gᵀ · H`, accumulated in f32, or in the weight's dtype for a
//! `low_memory` loss), on the CPU (`gemm/`) or by cuBLAS
//! (`cuda_gemm.rs`), behind one interface; and the counters the tests read.

use super::Wanted;
use crate::config::compute_dtype;
use crate::gemm;
use crate::precomputed::ScaleInPlace;
use candle::{bail, CpuStorage, DType, Device, Layout, Result, Tensor};

/// Matrix products of the linear loss run on this thread, by kind (a test
/// hook: see [`linear_products`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinearProducts {
    /// `rows · Wᵀ`: a chunk's logits.
    pub logits: usize,
    /// The rows of all those logits products together (ignored rows are
    /// not multiplied).
    pub logits_rows: usize,
    /// `G · W`: a chunk's hidden-state gradient.
    pub hidden_grad: usize,
    /// `Gᵀ · H`: a chunk's weight gradient.
    pub weight_grad: usize,
}

thread_local! {
    static PRODUCTS: std::cell::Cell<LinearProducts> = const {
        std::cell::Cell::new(LinearProducts { logits: 0, logits_rows: 0, hidden_grad: 0, weight_grad: 0 })
    };
}

pub(super) fn count_product(kind: fn(&mut LinearProducts) -> &mut usize) {
    count(kind, 1)
}

pub(super) fn count(kind: fn(&mut LinearProducts) -> &mut usize, n: usize) {
    PRODUCTS.with(|cell| {
        let mut counts = cell.get();
        *kind(&mut counts) += n;
        cell.set(counts);
    });
}

/// The matrix products the linear loss has run on this thread so far. Not
/// part of the stable API: the tests use it to check that gradients no input
/// wants are not computed.
#[cfg(feature = "testing")]
pub fn linear_products() -> LinearProducts {
    PRODUCTS.with(std::cell::Cell::get)
}

/// The output layer, detached: `weight` `[V, H]` and an optional `bias` `[V]`.
pub(super) struct Projection {
    pub(super) weight: Tensor,
    pub(super) bias: Option<Tensor>,
}

impl Projection {
    /// The logits of `rows` (`[n, H]`): `[n, V]`, by candle's ops (recorded
    /// for autograd when the inputs track).
    pub(super) fn logits(&self, rows: &Tensor) -> Result<Tensor> {
        count_product(|c| &mut c.logits);
        count(|c| &mut c.logits_rows, rows.elem_count() / rows.dim(candle::D::Minus1)?.max(1));
        self.add_bias(rows.matmul(&self.weight.t()?)?)
    }

    /// The logits of a chunk of rows (`[n, H]`): `[n, V]`, on the CPU (f32,
    /// f64) written into `buffer`, which the chunks of one pass share (a
    /// fresh `[n, V]` per chunk would fault its pages in again: ~1.4 µs per
    /// 4 KiB here, 70 ms per 1024 x 50257 f32 chunk). The chunk's logits are
    /// dead before the next chunk's are written: each becomes its gradient in
    /// place and is folded into the sums. Nothing is recorded.
    pub(super) fn chunk_logits(&self, rows: &Tensor, buffer: &mut LogitsBuffer) -> Result<Tensor> {
        let (len, vocab) = (rows.dim(0)?, self.weight.dim(0)?);
        if !gemm::ops::takes(&[rows, &self.weight]) {
            return self.logits(rows);
        }
        let shared = match &buffer.0 {
            Some(shared) if shared.dim(0)? >= len => shared.clone(),
            _ => buffer.0.insert(faulted_zeros((len, vocab), rows.dtype(), rows.device())?).clone(),
        };
        let logits = shared.narrow(0, 0, len)?;
        count_product(|c| &mut c.logits);
        count(|c| &mut c.logits_rows, len);
        gemm::ops::matmul_into(&logits, rows, &self.weight, true)?;
        self.add_bias(logits)
    }

    pub(super) fn add_bias(&self, logits: Tensor) -> Result<Tensor> {
        match &self.bias {
            None => Ok(logits),
            Some(bias) => logits.broadcast_add(bias),
        }
    }
}

/// The `[chunk, V]` logits buffer of one pass over the chunks (see
/// [`Projection::chunk_logits`]); allocated by the first chunk, the largest.
#[derive(Default)]
pub(super) struct LogitsBuffer(Option<Tensor>);

/// The column sums `[V]` of a chunk's logits' gradient `[n, V]`, in `acc`, as
/// a `[1, n] x [n, V]` product: candle's `sum(0)` visits the elements one at a
/// time on one thread on the CPU (205 ms for 1024 x 50257 f32 on the 2-vCPU
/// VM, where the product takes 12.6 ms).
fn column_sums(logits_grad: &Tensor, acc: DType) -> Result<Tensor> {
    let g = logits_grad.to_dtype(acc)?;
    Tensor::ones((1, g.dim(0)?), acc, g.device())?.matmul(&g)?.squeeze(0)
}

/// The gradients of the rows, the weight and the bias that are [`Wanted`],
/// summed chunk by chunk: each chunk's rows get `G · W` (in their dtype), the
/// weight `Gᵀ · H` and the bias the column sums of `G` (both accumulated in
/// f32, f64 for f64).
pub(super) struct GradientSums {
    pub(super) rows: Option<Tensor>,
    pub(super) weight: Option<ProductSum>,
    pub(super) bias: Option<Sum>,
    /// The accumulator dtype, `V` and device, for a bias that received nothing.
    pub(super) acc: DType,
    pub(super) vocab: usize,
    pub(super) device: Device,
}

impl GradientSums {
    /// Sums for the [`Wanted`] gradients: zeros, but the weight's, summed in
    /// `weight_sum`, which a CUDA call leaves unwritten until its first
    /// product (see [`ProductSum::fresh`]).
    pub(super) fn new(rows: &Tensor, projection: &Projection, wanted: Wanted, weight_sum: DType) -> Result<Self> {
        let weight = &projection.weight;
        Ok(Self {
            rows: wanted.rows.then(|| faulted_zeros(rows.shape(), rows.dtype(), rows.device())).transpose()?,
            weight: wanted.weight.then(|| ProductSum::fresh(weight, weight_sum)).transpose()?,
            bias: (wanted.bias && projection.bias.is_some()).then(Sum::default),
            acc: compute_dtype(weight.dtype()),
            vocab: weight.dim(0)?,
            device: weight.device().clone(),
        })
    }

    /// Adds the chunk of rows starting at `start`, whose logits' gradient is `logits_grad`.
    pub(super) fn add(
        &mut self,
        start: usize,
        chunk: &Tensor,
        logits_grad: &Tensor,
        projection: &Projection,
    ) -> Result<()> {
        if let Some(rows) = &self.rows {
            count_product(|c| &mut c.hidden_grad);
            // Straight into the chunk's rows of the gradient on the CPU.
            let chunk_rows = rows.narrow(0, start, chunk.dim(0)?)?;
            if !gemm::ops::matmul_into(&chunk_rows, logits_grad, &projection.weight, false)? {
                rows.slice_set(&logits_grad.matmul(&projection.weight)?, 0, start)?;
            }
        }
        if let Some(weight) = &mut self.weight {
            count_product(|c| &mut c.weight_grad);
            weight.add(logits_grad, chunk)?;
        }
        if let Some(bias) = &mut self.bias {
            bias.add(column_sums(logits_grad, self.acc)?)?;
        }
        Ok(())
    }

    /// Sums that add the weight's and bias's gradients into a caller's
    /// accumulator (`weight`, and `bias` when the projection has one) and
    /// start the rows' gradient afresh.
    pub(super) fn into_accumulator(rows: &Tensor, (weight, bias): (ProductSum, Option<Tensor>)) -> Result<Self> {
        let (vocab, device) = (weight.vocab()?, weight.acc.device().clone());
        Ok(Self {
            rows: Some(faulted_zeros(rows.shape(), rows.dtype(), rows.device())?),
            acc: weight.dtype(),
            weight: Some(weight),
            bias: bias.map(|b| Sum(Some(b))),
            vocab,
            device,
        })
    }

    /// The rows' gradient, the weight's sum and the bias's, as they are.
    pub(super) fn into_parts(self) -> (Option<Tensor>, Option<ProductSum>, Option<Tensor>) {
        (self.rows, self.weight, self.bias.and_then(|b| b.0))
    }

    /// `[rows, weight, bias]` gradients (`None` where not wanted; bias only
    /// when there is one), the weight's and bias's still in the accumulator dtype.
    pub(super) fn finish(self, has_bias: bool) -> Result<Vec<Option<Tensor>>> {
        let mut gradients = vec![self.rows, self.weight.map(ProductSum::into_gradient).transpose()?];
        if has_bias {
            gradients.push(match self.bias {
                Some(Sum(Some(sum))) => Some(sum),
                Some(Sum(None)) => Some(Tensor::zeros(self.vocab, self.acc, &self.device)?),
                None => None,
            });
        }
        Ok(gradients)
    }
}

/// The node's gradients from summed ones: scaled by the upstream `scale`
/// (skipped when it is 1) in place, each element in f32 (f64 for f64) and
/// rounded once to the sum's dtype, where a loss scale such as 2^16 is
/// representable (candle's f16 `affine` rounds it to f16's infinity), then
/// rounded to each input's dtype. The sums are ours alone (the f32
/// accumulators, the rows' gradient, a bf16 sum straight from the products):
/// scaled in place, the end of backward holds each sum and its rounded
/// gradient, not a scaled copy as well (for a bf16 `[V, H]` sum and a factor
/// such as 1/3, an f32 copy and its product would hold 8 more bytes an
/// element). A 16-bit sum scaled by anything but a power of two is rounded a
/// second time.
pub(super) fn input_gradients(
    gradients: Vec<Option<Tensor>>,
    inputs: &[&Tensor],
    scale: f64,
) -> Result<Vec<Option<Tensor>>> {
    gradients
        .into_iter()
        .zip(inputs)
        .map(|(g, input)| {
            let Some(g) = g else { return Ok(None) };
            if scale != 1.0 {
                g.inplace_op1(&ScaleInPlace(scale))?;
            }
            Ok(Some(g.to_dtype(input.dtype())?))
        })
        .collect()
}

/// Zeros whose pages are already mapped: on the CPU the buffer is advised to
/// transparent huge pages (see `cpu::advise_huge_pages`) and one thread
/// writes one element of each 4 KiB page. A fresh buffer's first write faults
/// its pages in; when that write is the gemm crate's product, the faults land
/// inside it and cost far more than a plain pass: one 1024-row chunk's
/// weight-gradient product took 871 ms into a fresh `[768, 50257]` f32
/// accumulator, 259 ms into a touched one, 320 ms with this one-thread touch
/// included (`cargo bench --bench ce_table -- --probes`).
pub(super) fn faulted_zeros(shape: impl Into<candle::Shape>, dtype: DType, device: &Device) -> Result<Tensor> {
    let zeros = Tensor::zeros(shape, dtype, device)?;
    if device.is_cpu() {
        zeros.inplace_op1(&FaultIn)?;
    }
    Ok(zeros)
}

/// See [`faulted_zeros`].
pub(super) struct FaultIn;

impl candle::InplaceOp1 for FaultIn {
    fn name(&self) -> &'static str {
        "chunked-linear-cross-entropy-fault-in"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, _: &Layout) -> Result<()> {
        fn touch<T: Copy>(values: &mut [T]) {
            crate::cpu::advise_huge_pages(values);
            let per_page = (4096 / std::mem::size_of::<T>()).max(1);
            if let Some(&zero) = values.first() {
                values.iter_mut().step_by(per_page).for_each(|x| *x = zero);
            }
        }
        match storage {
            CpuStorage::F32(v) => touch(v),
            CpuStorage::F64(v) => touch(v),
            CpuStorage::BF16(v) => touch(v),
            CpuStorage::F16(v) => touch(v),
            _ => {}
        }
        Ok(())
    }
}

/// `Σ_chunks Gᵀ · H`, the weight gradient, accumulated in f32 (f64 for f64),
/// or for a `low_memory` loss in the weight's dtype (each chunk's product
/// formed in f32 and added with one rounding), in place, with no `[V, H]`
/// product per chunk. On the CPU it is held
/// transposed, `[H, V]` += `Hᵀ · G` by `gemm::ops::AddTransposedProduct` (on
/// f32/f64 copies of the chunk's operands): the gemm crate runs that
/// orientation at torch's speed and the other at three quarters of it
/// (BENCHMARKS.md), and the gradient handed out is the transposed view (candle's
/// backprop copies it into its own sum anyway). On CUDA (f32, bf16, f16) one
/// cuBLAS GEMM per chunk reads the operands as they are and adds into the
/// `[V, H]` accumulator (`beta = 1`, see `cuda_gemm.rs`). f64 on CUDA, and
/// other devices, take candle ops: a `[V, H]` product and a new sum per chunk.
#[derive(Debug)]
pub(super) struct ProductSum {
    pub(super) acc: Tensor,
    /// `acc` is `[H, V]`, the gradient transposed (the CPU).
    pub(super) transposed: bool,
    /// `acc` holds nothing yet and is uninitialised: a call's fresh sum on
    /// CUDA ([`ProductSum::fresh`]), whose first product overwrites it
    /// (cuBLAS with `beta = 0`: no zeros written, none read). Only
    /// [`add`](Self::add) and [`into_gradient`](Self::into_gradient) take such
    /// a sum; the other readers refuse it.
    unwritten: bool,
}

impl ProductSum {
    /// Zeros for the gradient of `weight`, summed in `dtype`: the compute
    /// dtype (f32, f64 for f64), or the weight's own (a `low_memory` loss,
    /// whose sum is the gradient handed out, rounded once per chunk).
    pub(super) fn new(weight: &Tensor, dtype: DType) -> Result<Self> {
        let (shape, transposed) = Self::shape(weight, dtype)?;
        Ok(Self { acc: faulted_zeros(shape, dtype, weight.device())?, transposed, unwritten: false })
    }

    /// A sum for one call's chunks, as [`new`](Self::new) but, on CUDA where
    /// cuBLAS forms the products (f32, bf16, f16 weights), uninitialised:
    /// the first chunk's product is written over it, the 2 or 4 `V·H` bytes of
    /// zeros neither written nor read.
    pub(super) fn fresh(weight: &Tensor, dtype: DType) -> Result<Self> {
        if !cublas_sums(weight.device(), weight.dtype()) {
            return Self::new(weight, dtype);
        }
        let (shape, transposed) = Self::shape(weight, dtype)?;
        // SAFETY: nothing reads `acc` before a product has written every
        // element: `add` overwrites it with the first chunk's product (cuBLAS
        // with `beta = 0` reads no element of it), `into_gradient` zeroes it if
        // no chunk ran, and every other reader refuses an unwritten sum.
        let acc = unsafe { Tensor::empty(shape, dtype, weight.device())? };
        Ok(Self { acc, transposed, unwritten: true })
    }

    /// The sum's shape (`[V, H]`, or `[H, V]` on the CPU) and whether that is
    /// transposed, after checking `dtype` against `weight`'s.
    fn shape(weight: &Tensor, dtype: DType) -> Result<((usize, usize), bool)> {
        if dtype != compute_dtype(weight.dtype()) && dtype != weight.dtype() {
            bail!("linear cross-entropy: a {:?} weight's gradient is not summed in {dtype:?}", weight.dtype())
        }
        let transposed = weight.device().is_cpu();
        let (vocab, width) = weight.dims2()?;
        Ok((if transposed { (width, vocab) } else { (vocab, width) }, transposed))
    }

    /// Fails on a sum no product has written yet (see `unwritten`).
    fn written(&self) -> Result<&Self> {
        if self.unwritten {
            bail!("linear cross-entropy: a weight-gradient sum was read before any product was added")
        }
        Ok(self)
    }

    pub(super) fn dtype(&self) -> DType {
        self.acc.dtype()
    }

    /// Adds `lhsᵀ · rhs` (`lhs` `[k, V]`, `rhs` `[k, H]`, of the weight's dtype).
    pub(super) fn add(&mut self, lhs: &Tensor, rhs: &Tensor) -> Result<()> {
        #[cfg(feature = "cuda")]
        if cublas_sums(self.acc.device(), lhs.dtype()) {
            // The chunk's gradient and rows are contiguous already (no copy).
            let (lhs, rhs) = (lhs.contiguous()?, rhs.contiguous()?);
            let first = std::mem::replace(&mut self.unwritten, false);
            return match first {
                true => crate::cuda_gemm::write_transposed_product(&self.acc, &lhs, &rhs),
                false => crate::cuda_gemm::add_transposed_product(&self.acc, &lhs, &rhs),
            };
        }
        self.written()?;
        // The products in the compute dtype; a 16-bit sum rounds each chunk's
        // (`gemm::add_matmul_tn_rounded`).
        let compute = compute_dtype(self.dtype());
        let (lhs, rhs) = (lhs.to_dtype(compute)?.contiguous()?, rhs.to_dtype(compute)?.contiguous()?);
        if self.transposed {
            // `[H, V] += rhsᵀ · lhs`.
            self.acc.inplace_op3(&rhs, &lhs, &gemm::ops::AddTransposedProduct)
        } else {
            self.acc = (self.acc.to_dtype(compute)? + lhs.t()?.matmul(&rhs)?)?.to_dtype(self.dtype())?;
            Ok(())
        }
    }

    /// The summed gradient, `[V, H]` (a transposed view on the CPU); zeros
    /// if no product was added.
    pub(super) fn into_gradient(mut self) -> Result<Tensor> {
        if std::mem::replace(&mut self.unwritten, false) {
            self.acc.zero_set()?;
        }
        self.gradient()
    }

    /// The summed gradient, `[V, H]`, as a view of the sum (transposed on the CPU).
    pub(super) fn gradient(&self) -> Result<Tensor> {
        if self.written()?.transposed {
            self.acc.t()
        } else {
            Ok(self.acc.clone())
        }
    }

    /// `V`.
    fn vocab(&self) -> Result<usize> {
        self.acc.dim(if self.transposed { 1 } else { 0 })
    }

    /// Sets the sum to zero in place.
    pub(super) fn zero(&self) -> Result<()> {
        self.acc.zero_set()
    }

    /// Multiplies the sum by `factor` in place.
    pub(super) fn scale(&self, factor: f64) -> Result<()> {
        self.written()?.acc.inplace_op1(&ScaleInPlace(factor))
    }

    /// Adds a dense `[V, H]` gradient (any float dtype).
    pub(super) fn add_dense(&mut self, gradient: &Tensor) -> Result<()> {
        self.written()?;
        let gradient = if self.transposed { gradient.t()? } else { gradient.clone() };
        self.acc = (&self.acc + gradient.to_dtype(self.dtype())?)?;
        Ok(())
    }
}

/// Whether cuBLAS forms the weight-gradient products of operands of `dtype`
/// on `device` (CUDA with this crate's `cuda` feature; f32, bf16, f16): the
/// one condition under which [`ProductSum::fresh`] leaves a sum unwritten and
/// [`ProductSum::add`] writes its first product over it.
fn cublas_sums(device: &Device, dtype: DType) -> bool {
    cfg!(feature = "cuda") && device.is_cuda() && matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
}

/// A gradient summed over chunks in the accumulator dtype; the first chunk's
/// term starts the sum (no zero-filled buffer).
#[derive(Default)]
pub(super) struct Sum(Option<Tensor>);

impl Sum {
    pub(super) fn add(&mut self, term: Tensor) -> Result<()> {
        self.0 = Some(match self.0.take() {
            None => term,
            Some(sum) => (sum + term)?,
        });
        Ok(())
    }
}
