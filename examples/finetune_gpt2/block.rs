//! One GPT-2 transformer block (pre-norm attention, then pre-norm MLP, each
//! added to the residual stream), forward, and its backward by hand.
//!
//! candle's backward adds every gradient into fresh zeros of its tensor's
//! shape (`zeros_like` + `add`), pads each of q, k and v's gradients to the
//! fused `[B, T, 3, H, D]` with zeros and adds the three, copies each
//! transposed gradient, and its graph holds every operation's inputs: the
//! attention scores `[B, H, T, T]` beside the probabilities, each product's
//! output beside the bias added to it. [`Block::backward`] runs the same
//! operations on the same operands, less those: each gradient is formed
//! once, and a block keeps only what its backward reads ([`Saved`]). Its
//! gradients are candle's bit for bit (`tests/finetune_memory.rs`): where
//! candle adds a gradient into zeros, `0 + g` is `g` (but for the sign of a
//! zero); where it adds two into one, so does this, and `a + b` is `b + a`.
//!
//! The maths, for `out = x1 + act(ln2(x1) W_fc + b_fc) W_mp + b_mp`,
//! `x1 = x + attn(ln1(x)) W_p + b_p`, with `dout` given:
//! - a Conv1D `y = x W + b`: `dx = dy Wᵀ`, `dW = xᵀ dy`, `db = Σ_rows dy`
//!   (candle's matmul backward, operand for operand);
//! - `dx1 = dout + ln2'(dx1_ln)`, `dx = dx1 + ln1'(..)` (the residual's two
//!   paths), the layer norms', GELU's and softmax's backward by their ops;
//! - attention `s = q kᵀ`, `p = softmax(s)`, `o = p v`: `dp = do vᵀ`,
//!   `dv = pᵀ do`, `ds = softmax'(p, dp)`, `dq = ds k`, `dk = (qᵀ ds)ᵀ`.

use crate::bias::add_bias;
use crate::column_sums::column_sums;
use crate::gelu::{gelu, gelu_backward};
use crate::layer_norm::{layer_norm, layer_norm_backward};
use crate::softmax::{causal_softmax, causal_softmax_backward};
use candle::{Result, Tensor};

/// The GELU variants of Hugging Face's `activation_function` this model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `gelu_new` (GPT-2's) and `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
    /// `gelu`: the exact, erf-based GELU.
    GeluErf,
}

impl Activation {
    /// The names accepted in `config.json`, each with its activation.
    pub const NAMES: [(&'static str, Activation); 3] =
        [("gelu_new", Self::GeluTanh), ("gelu_pytorch_tanh", Self::GeluTanh), ("gelu", Self::GeluErf)];

    /// The name written to `config.json`.
    pub fn name(self) -> &'static str {
        match self {
            Self::GeluTanh => "gelu_new",
            Self::GeluErf => "gelu",
        }
    }

    fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::GeluTanh => gelu(x),
            Self::GeluErf => x.gelu_erf(),
        }
    }

    /// `dx` from the input `x` and the output's gradient `dy`: the GELU op's
    /// backward, or candle's of `gelu_erf` written out, operation for
    /// operation.
    fn backward(self, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
        match self {
            Self::GeluTanh => gelu_backward(x, dy),
            Self::GeluErf => {
                // d/dx gelu_erf(x) = 0.5 + 0.398942 e^(-x²/2) x + 0.5 erf(x / √2)
                let neg_half_square = (x.sqr()?.neg()? / 2.)?;
                let scaled_exp_arg = (0.398942 * neg_half_square.exp()? * x)?;
                let erf_scaled_sqrt = (0.5 * (x / 2f64.sqrt())?.erf()?)?;
                dy * (0.5 + scaled_exp_arg + erf_scaled_sqrt)?
            }
        }
    }
}

/// A Conv1D's weight `[in, out]` and bias `[out]`.
struct Conv1d {
    weight: Tensor,
    bias: Tensor,
}

impl Conv1d {
    /// `x W + b` for `x` `[B, T, in]`, as one `[B * T, in] x [in, out]`
    /// product: `broadcast_matmul` would run B products, and its backward
    /// would form the weight's gradient as B `[in, out]` products and then
    /// sum them. The bias is added by `add_bias`, whose backward sums the rows
    /// without a zero-filled `[B * T, out]` first.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, width) = x.dims3()?;
        let y = add_bias(&x.reshape((b * t, width))?.matmul(&self.weight)?, &self.bias)?;
        y.reshape((b, t, self.weight.dim(1)?))
    }

    /// `(dx [B, T, in], dW, db)` from the input `x` and the output's gradient
    /// `dy` (`[B * T, out]`), as candle's backward of [`Self::forward`] forms them.
    fn backward(&self, x: &Tensor, dy: &Tensor) -> Result<(Tensor, ParamGrads)> {
        let x2 = x.reshape((dy.dim(0)?, self.weight.dim(0)?))?;
        let dx = dy.matmul(&self.weight.t()?)?.reshape(x.shape())?;
        Ok((dx, ParamGrads { weight: x2.t()?.matmul(dy)?, bias: column_sums(dy)? }))
    }
}

/// A layer norm's gain and shift `[C]`.
struct Norm {
    gain: Tensor,
    shift: Tensor,
}

/// The gradients of a Conv1D's weight and bias.
struct ParamGrads {
    weight: Tensor,
    bias: Tensor,
}

/// One block's parameters and settings. Its forward records candle's graph
/// when the parameters are `Var`s; [`Block::forward_saved`] and
/// [`Block::backward`] take them detached.
pub struct Block {
    ln_1: Norm,
    c_attn: Conv1d,
    c_proj: Conv1d,
    ln_2: Norm,
    c_fc: Conv1d,
    mlp_proj: Conv1d,
    heads: usize,
    eps: f64,
    activation: Activation,
}

/// What a block's backward reads of its forward (each contiguous): its input
/// `x` `[B, T, C]`, the first norm's output, q, k, v `[B, H, T, D]`, the
/// attention's probabilities `[B, H, T, T]`, the heads merged `[B, T, C]`, the
/// residual `x1`, the second norm's output, the activation's input and output
/// `[B, T, 4C]`.
pub struct Saved {
    x: Tensor,
    ln1: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    probs: Tensor,
    merged: Tensor,
    x1: Tensor,
    ln2: Tensor,
    pre: Tensor,
    act: Tensor,
}

/// The gradients of a block's parameters, in [`Block::PARAMS`]' order.
pub type BlockGrads = [Tensor; 12];

impl Block {
    /// The parameters' names within a block (`h.{i}.` omitted), in the order
    /// of [`BlockGrads`].
    pub const PARAMS: [&'static str; 12] = [
        "ln_1.weight",
        "ln_1.bias",
        "attn.c_attn.weight",
        "attn.c_attn.bias",
        "attn.c_proj.weight",
        "attn.c_proj.bias",
        "ln_2.weight",
        "ln_2.bias",
        "mlp.c_fc.weight",
        "mlp.c_fc.bias",
        "mlp.c_proj.weight",
        "mlp.c_proj.bias",
    ];

    /// The block of `params` (f32, in [`Self::PARAMS`]' order, with GPT-2's
    /// shapes: checked by the model that holds them), `heads` attention
    /// heads, the layer norms' `eps` and the MLP's `activation`.
    pub fn new(params: [Tensor; 12], heads: usize, eps: f64, activation: Activation) -> Self {
        let [ln_1_gain, ln_1_shift, c_attn_w, c_attn_b, c_proj_w, c_proj_b, ln_2_gain, ln_2_shift, c_fc_w, c_fc_b, mlp_w, mlp_b] =
            params;
        Self {
            ln_1: Norm { gain: ln_1_gain, shift: ln_1_shift },
            c_attn: Conv1d { weight: c_attn_w, bias: c_attn_b },
            c_proj: Conv1d { weight: c_proj_w, bias: c_proj_b },
            ln_2: Norm { gain: ln_2_gain, shift: ln_2_shift },
            c_fc: Conv1d { weight: c_fc_w, bias: c_fc_b },
            mlp_proj: Conv1d { weight: mlp_w, bias: mlp_b },
            heads,
            eps,
            activation,
        }
    }

    /// The parameters' shapes at width `c`, in [`Self::PARAMS`]' order.
    pub fn param_shapes(c: usize) -> [Vec<usize>; 12] {
        let (norm, conv) = (|| vec![c], |inputs: usize, outputs: usize| [vec![inputs, outputs], vec![outputs]]);
        let ([attn_w, attn_b], [proj_w, proj_b]) = (conv(c, 3 * c), conv(c, c));
        let ([fc_w, fc_b], [mlp_w, mlp_b]) = (conv(c, 4 * c), conv(4 * c, c));
        [norm(), norm(), attn_w, attn_b, proj_w, proj_b, norm(), norm(), fc_w, fc_b, mlp_w, mlp_b]
    }

    /// The block's output `[B, T, C]` for its input `x` `[B, T, C]` (f32).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_saved(x)?.0)
    }

    /// [`Self::forward`], and what [`Self::backward`] reads.
    pub fn forward_saved(&self, x: &Tensor) -> Result<(Tensor, Saved)> {
        let saved = self.saved(x)?;
        let out = (&saved.x1 + self.mlp_proj.forward(&saved.act)?)?;
        Ok((out, saved))
    }

    /// What [`Self::backward`] reads of the forward of `x`: the forward up to
    /// the MLP's activation (the rest, its projection, the backward does not
    /// read), for a backward that runs the block again from its input.
    pub fn saved(&self, x: &Tensor) -> Result<Saved> {
        let (b, t, c) = x.dims3()?;
        let (heads, head_dim) = (self.heads, c / self.heads);
        let x = x.contiguous()?;
        let ln1 = layer_norm(&x, &self.ln_1.gain, &self.ln_1.shift, self.eps)?;
        // [B, T, 3, H, D] is a view of the product; each of q, k and v is then one copy, [B, H, T, D]
        // (reshaping the narrowed [B, T, C] first would copy it twice: its strides do not reshape).
        let qkv = self.c_attn.forward(&ln1)?.reshape((b, t, 3, heads, head_dim))?;
        let split = |i: usize| qkv.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2)?.contiguous();
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);
        drop(qkv);
        let probs = causal_softmax(&q.matmul(&k.t()?)?, self.scale(head_dim))?;
        let merged = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, c))?;
        let x1 = (&x + self.c_proj.forward(&merged)?)?;
        let ln2 = layer_norm(&x1, &self.ln_2.gain, &self.ln_2.shift, self.eps)?;
        let pre = self.c_fc.forward(&ln2)?;
        let act = self.activation.apply(&pre)?;
        Ok(Saved { x, ln1, q, k, v, probs, merged, x1, ln2, pre, act })
    }

    fn scale(&self, head_dim: usize) -> f64 {
        1.0 / (head_dim as f64).sqrt()
    }

    /// The gradient of the block's input `[B, T, C]` and of its parameters,
    /// from what its forward saved and the output's gradient `dout` (`[B, T,
    /// C]`): those of candle's backward through [`Self::forward`], bit for
    /// bit, without a graph (see the module docs).
    ///
    /// # Errors
    /// A `dout` of another shape than the block's output; candle's errors.
    pub fn backward(&self, saved: Saved, dout: Tensor) -> Result<(Tensor, BlockGrads)> {
        let Saved { x, ln1, q, k, v, probs, merged, x1, ln2, pre, act } = saved;
        if dout.shape() != x.shape() {
            candle::bail!("block backward: output gradient {:?} for a block of {:?}", dout.shape(), x.shape())
        }
        let (b, t, c) = x.dims3()?;
        let (rows, heads, head_dim) = (b * t, self.heads, c / self.heads);
        let dout = dout.contiguous()?;
        // The MLP.
        let (d_act, mlp_proj) = self.mlp_proj.backward(&act, &dout.reshape((rows, c))?)?;
        drop(act);
        let d_pre = self.activation.backward(&pre, &d_act)?;
        drop((pre, d_act));
        let (d_ln2, c_fc) = self.c_fc.backward(&ln2, &d_pre.reshape((rows, ()))?)?;
        drop((ln2, d_pre));
        let (dx1_norm, ln_2_gain, ln_2_shift) = layer_norm_backward(&x1, &self.ln_2.gain, &d_ln2, self.eps)?;
        let dx1 = (&dout + dx1_norm)?;
        drop((x1, dout, d_ln2));
        // The attention.
        let (d_merged, c_proj) = self.c_proj.backward(&merged, &dx1.reshape((rows, c))?)?;
        drop(merged);
        let d_o = d_merged.reshape((b, t, heads, head_dim))?.transpose(1, 2)?.contiguous()?;
        drop(d_merged);
        let d_probs = d_o.matmul(&v.t()?)?;
        drop(v);
        let d_v = probs.t()?.matmul(&d_o)?;
        drop(d_o);
        let d_scores = causal_softmax_backward(&probs, &d_probs, self.scale(head_dim))?;
        drop((probs, d_probs));
        let d_q = d_scores.matmul(&k.t()?.t()?)?;
        let d_k = q.t()?.matmul(&d_scores)?.t()?;
        drop((d_scores, q, k));
        // q, k and v's gradients into the product's [B, T, 3, H, D], as [B * T, 3C].
        let d_qkv = Tensor::stack(&[d_q.transpose(1, 2)?, d_k.transpose(1, 2)?, d_v.transpose(1, 2)?], 2)?
            .reshape((rows, 3 * c))?;
        drop((d_q, d_k, d_v));
        let (d_ln1, c_attn) = self.c_attn.backward(&ln1, &d_qkv)?;
        drop((ln1, d_qkv));
        let (dx_norm, ln_1_gain, ln_1_shift) = layer_norm_backward(&x, &self.ln_1.gain, &d_ln1, self.eps)?;
        let dx = (dx1 + dx_norm)?;
        let grads = [
            ln_1_gain,
            ln_1_shift,
            c_attn.weight,
            c_attn.bias,
            c_proj.weight,
            c_proj.bias,
            ln_2_gain,
            ln_2_shift,
            c_fc.weight,
            c_fc.bias,
            mlp_proj.weight,
            mlp_proj.bias,
        ];
        Ok((dx, grads))
    }
}
