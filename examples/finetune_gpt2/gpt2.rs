//! A GPT-2 for training with candle: token and position embeddings, blocks of
//! (layer norm, causal self-attention with fused `c_attn` / `c_proj`, layer
//! norm, GELU MLP), a final layer norm, and an `lm_head` tied to the token
//! embedding (or its own `lm_head.weight` when untied). Tensor names and shapes
//! are those of Hugging Face's GPT-2 (Conv1D weights stored `[in, out]`);
//! `checkpoint.rs` reads and writes them with their `config.json`. Only
//! differentiable ops are used (candle-nn's fused `LayerNorm` and
//! `softmax_last_dim` record no backward): candle's, and five ops with their
//! own backward, the token embedding (`embedding.rs`), the layer norm
//! (`layer_norm.rs`), the attention's causal softmax (`softmax.rs`), GPT-2's
//! GELU (`gelu.rs`) and the Conv1D bias (`bias.rs`).

use crate::bias::add_bias;
use crate::embedding::{add_embedding_grad, embedding, embedding_grad};
use crate::gelu::gelu;
use crate::layer_norm::layer_norm;
use crate::rng::Rng;
use crate::softmax::causal_softmax;
use candle::backprop::GradStore;
use candle::{DType, Device, Result, Tensor, Var};
use std::collections::HashMap;

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
}

/// The shape and settings of a GPT-2.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Config {
    pub vocab: usize,
    pub context: usize,
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    pub layer_norm_epsilon: f64,
    pub activation: Activation,
    /// `lm_head` is `wte` (GPT-2's tying); else its own `lm_head.weight` parameter.
    pub tied: bool,
}

impl Config {
    /// GPT-2's settings (epsilon 1e-5, `gelu_new`, tied `lm_head`) at this shape.
    pub const fn gpt2(vocab: usize, context: usize, width: usize, layers: usize, heads: usize) -> Self {
        Self {
            vocab,
            context,
            width,
            layers,
            heads,
            layer_norm_epsilon: 1e-5,
            activation: Activation::GeluTanh,
            tied: true,
        }
    }

    /// Every parameter's name (without the `transformer.` prefix) and shape.
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let c = self.width;
        let mut shapes =
            vec![("wte.weight".to_string(), vec![self.vocab, c]), ("wpe.weight".into(), vec![self.context, c])];
        for i in 0..self.layers {
            let p = |name: &str| format!("h.{i}.{name}");
            shapes.extend([
                (p("ln_1.weight"), vec![c]),
                (p("ln_1.bias"), vec![c]),
                (p("attn.c_attn.weight"), vec![c, 3 * c]),
                (p("attn.c_attn.bias"), vec![3 * c]),
                (p("attn.c_proj.weight"), vec![c, c]),
                (p("attn.c_proj.bias"), vec![c]),
                (p("ln_2.weight"), vec![c]),
                (p("ln_2.bias"), vec![c]),
                (p("mlp.c_fc.weight"), vec![c, 4 * c]),
                (p("mlp.c_fc.bias"), vec![4 * c]),
                (p("mlp.c_proj.weight"), vec![4 * c, c]),
                (p("mlp.c_proj.bias"), vec![c]),
            ]);
        }
        shapes.extend([("ln_f.weight".into(), vec![c]), ("ln_f.bias".into(), vec![c])]);
        if !self.tied {
            shapes.push((LM_HEAD.into(), vec![self.vocab, c]));
        }
        shapes
    }

    /// Fresh weights: N(0, 0.02) matrices (residual projections scaled by
    /// 1/sqrt(2 * layers), as in GPT-2), zero biases, unit layer-norm gains.
    pub fn init(&self, rng: &mut Rng, device: &Device) -> Result<HashMap<String, Tensor>> {
        let residual_std = 0.02 / (2.0 * self.layers as f64).sqrt();
        self.parameter_shapes()
            .into_iter()
            .map(|(name, shape)| {
                let tensor = if name.contains("ln_") && name.ends_with(".weight") {
                    Tensor::ones(shape, DType::F32, device)?
                } else if name.ends_with(".bias") {
                    Tensor::zeros(shape, DType::F32, device)?
                } else {
                    let std = if name.ends_with("c_proj.weight") { residual_std } else { 0.02 };
                    Tensor::from_vec(rng.normals(shape.iter().product(), std), shape, device)?
                };
                Ok((name, tensor))
            })
            .collect()
    }
}

/// The untied output projection's name (Hugging Face's, without a prefix).
pub const LM_HEAD: &str = "lm_head.weight";

/// A GPT-2 whose parameters are candle `Var`s.
pub struct Gpt2 {
    pub config: Config,
    params: HashMap<String, Var>,
}

impl Gpt2 {
    /// The model of `config` from named tensors (names without the
    /// `transformer.` prefix): exactly the parameters of `config`, each with its
    /// shape (any float dtype; kept as f32 `Var`s on `device`).
    pub fn new(config: Config, mut tensors: HashMap<String, Tensor>, device: &Device) -> Result<Self> {
        if config.heads == 0 || !config.width.is_multiple_of(config.heads) {
            candle::bail!("{} attention heads do not divide the width {}", config.heads, config.width)
        }
        let mut params = HashMap::new();
        for (name, shape) in config.parameter_shapes() {
            let tensor =
                tensors.remove(&name).ok_or_else(|| candle::Error::Msg(format!("GPT-2 checkpoint lacks `{name}`")))?;
            if tensor.dims() != shape.as_slice() {
                candle::bail!("GPT-2 tensor `{name}` has shape {:?}, expected {shape:?}", tensor.shape())
            }
            params.insert(name, Var::from_tensor(&tensor.to_dtype(DType::F32)?.to_device(device)?)?);
        }
        if !tensors.is_empty() {
            let mut extra: Vec<String> = tensors.into_keys().collect();
            extra.sort();
            candle::bail!("the checkpoint holds tensors this GPT-2 does not use: {extra:?}")
        }
        Ok(Self { config, params })
    }

    /// The parameters under Hugging Face's names (`transformer.` prefix, and
    /// `lm_head.weight` when untied), as `save_pretrained` writes them.
    pub fn hf_tensors(&self) -> HashMap<String, Tensor> {
        self.params
            .iter()
            .map(|(name, var)| {
                let hf_name = if name == LM_HEAD { name.clone() } else { format!("transformer.{name}") };
                (hf_name, var.as_tensor().clone())
            })
            .collect()
    }

    /// The parameters, sorted by name.
    pub fn named_vars(&self) -> Vec<(&str, &Var)> {
        let mut vars: Vec<(&str, &Var)> = self.params.iter().map(|(n, v)| (n.as_str(), v)).collect();
        vars.sort_by_key(|(name, _)| *name);
        vars
    }

    fn p(&self, name: &str) -> &Tensor {
        self.params[name].as_tensor()
    }

    fn layer_norm(&self, x: &Tensor, prefix: &str) -> Result<Tensor> {
        let (weight, bias) = (self.p(&format!("{prefix}.weight")), self.p(&format!("{prefix}.bias")));
        layer_norm(x, weight, bias, self.config.layer_norm_epsilon)
    }

    /// GPT-2's Conv1D: `x @ W + b` with `W` stored `[in, out]`, for `x` `[B,
    /// T, in]`, as one `[B * T, in] x [in, out]` product: `broadcast_matmul`
    /// would run B products, and its backward would form the weight's
    /// gradient as B `[in, out]` products and then sum them, instead of one
    /// product over all B * T rows. The bias is added by `add_bias`, whose
    /// backward sums the rows without a zero-filled `[B * T, out]` first.
    fn conv1d(&self, x: &Tensor, prefix: &str) -> Result<Tensor> {
        let (b, t, width) = x.dims3()?;
        let weight = self.p(&format!("{prefix}.weight"));
        let y = add_bias(&x.reshape((b * t, width))?.matmul(weight)?, self.p(&format!("{prefix}.bias")))?;
        y.reshape((b, t, weight.dim(1)?))
    }

    fn attention(&self, x: &Tensor, prefix: &str) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let (heads, head_dim) = (self.config.heads, c / self.config.heads);
        // [B, T, 3, H, D] is a view of the product; each of q, k and v is then one copy, [B, H, T, D]
        // (reshaping the narrowed [B, T, C] first would copy it twice: its strides do not reshape).
        let qkv = self.conv1d(x, &format!("{prefix}.c_attn"))?.reshape((b, t, 3, heads, head_dim))?;
        let split = |i: usize| qkv.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2)?.contiguous();
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);
        let weights = causal_softmax(&q.matmul(&k.t()?)?, 1.0 / (head_dim as f64).sqrt())?;
        let y = weights.matmul(&v)?.transpose(1, 2)?.reshape((b, t, c))?;
        self.conv1d(&y, &format!("{prefix}.c_proj"))
    }

    /// The token plus position embeddings `[B, T, C]` of token ids `[B, T]` (u32).
    pub fn embed(&self, tokens: &Tensor) -> Result<Tensor> {
        self.embed_with(self.p("wte.weight"), tokens)
    }

    /// [`embed`](Self::embed) through this token embedding.
    fn embed_with(&self, wte: &Tensor, tokens: &Tensor) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        if t > self.config.context {
            candle::bail!("sequence length {t} exceeds the model's context of {} tokens", self.config.context)
        }
        let embedded = embedding(wte, &tokens.flatten_all()?)?.reshape((b, t, self.config.width))?;
        embedded.broadcast_add(&self.p("wpe.weight").narrow(0, 0, t)?)
    }

    /// Transformer block `i` (pre-norm attention, then pre-norm MLP, each
    /// added to the residual stream) of `x` `[B, T, C]`.
    pub fn block(&self, x: &Tensor, i: usize) -> Result<Tensor> {
        let h = format!("h.{i}");
        let x = (x + self.attention(&self.layer_norm(x, &format!("{h}.ln_1"))?, &format!("{h}.attn"))?)?;
        let m = self.conv1d(&self.layer_norm(&x, &format!("{h}.ln_2"))?, &format!("{h}.mlp.c_fc"))?;
        let m = self.config.activation.apply(&m)?;
        &x + self.conv1d(&m, &format!("{h}.mlp.c_proj"))?
    }

    /// The final layer norm of the last block's output.
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        self.layer_norm(x, "ln_f")
    }

    /// The final hidden states `[B, T, C]` of token ids `[B, T]` (u32).
    pub fn hidden(&self, tokens: &Tensor) -> Result<Tensor> {
        let mut x = self.embed(tokens)?;
        for i in 0..self.config.layers {
            x = self.block(&x, i)?;
        }
        self.final_norm(&x)
    }

    /// The `lm_head` weight `[V, C]`: the token embedding when tied.
    pub fn lm_head(&self) -> &Tensor {
        self.p(if self.config.tied { "wte.weight" } else { LM_HEAD })
    }

    /// Next-token logits `[B, T, V]` of final hidden states `[B, T, C]`.
    pub fn head(&self, hidden: &Tensor) -> Result<Tensor> {
        hidden.broadcast_matmul(&self.lm_head().t()?)
    }

    /// Next-token logits `[B, T, V]` through the `lm_head`.
    #[allow(dead_code)] // the tests' whole-graph reference; the example evaluates with the linear loss
    pub fn logits(&self, tokens: &Tensor) -> Result<Tensor> {
        self.head(&self.hidden(tokens)?)
    }

    /// [`hidden`](Self::hidden) for evaluation and sampling, detached: the
    /// same values, but no block's activations outlive the block (candle
    /// keeps every intermediate tensor of a graph alive while its output is).
    pub fn hidden_no_grad(&self, tokens: &Tensor) -> Result<Tensor> {
        let mut x = self.embed(tokens)?.detach();
        for i in 0..self.config.layers {
            x = self.block(&x, i)?.detach();
        }
        Ok(self.final_norm(&x)?.detach())
    }

    /// The loss that `loss_of(&self.hidden(tokens)?)` gives and the gradients
    /// of the parameters (detached), those of `loss.backward()` on the whole
    /// graph, bit for bit. With `keep_activations` the blocks run as one
    /// graph, every block's activations alive until the backward pass ends.
    /// Without, activation checkpointing: the forward pass keeps each block's
    /// input only, and the backward pass recomputes one block at a time from
    /// it, so that one block's activations are alive at a time instead of the
    /// whole model's; each block's backward runs the same operations in the
    /// same order, started from the gradient of its output through
    /// `sum(output * gradient)`. A loss that forms its gradients itself
    /// ([`TopLoss::Direct`]) hands over the final hidden states' gradient,
    /// which starts the backward the same way; the parameters it reads get
    /// theirs from it. Either way the embeddings stay outside the blocks'
    /// graph: the token embedding's gradient is added by hand, as the whole
    /// graph's backward adds it, in place into the `lm_head`'s when they are
    /// tied, without candle's `[V, C]` zeros and add. `lap` is called as each
    /// [`Phase`] ends (to time them).
    pub fn loss_and_gradients(
        &self,
        tokens: &Tensor,
        loss_of: impl FnOnce(&Tensor) -> Result<TopLoss>,
        keep_activations: bool,
        lap: &mut dyn FnMut(Phase) -> Result<()>,
    ) -> Result<(Tensor, GradStore)> {
        let mut kept = GradStore::default();
        let wte = self.p("wte.weight");
        let embedded = self.embed_with(&wte.detach(), tokens)?;
        let first = embedded.detach();
        let (loss, grad) = if keep_activations {
            self.backward_kept(first, loss_of, &mut kept, lap)?
        } else {
            self.backward_recomputed(first, loss_of, &mut kept, lap)?
        };
        let mut grads = (embedded * &grad)?.sum_all()?.backward()?;
        self.keep(&mut grads, &mut kept);
        // As the whole graph's backward adds them: into the lm_head's gradient
        // (tied), here in place, or alone (into zeros, which leaves them as they are).
        let (b, t) = tokens.dims2()?;
        let (ids, rows) = (tokens.flatten_all()?, grad.reshape((b * t, self.config.width))?);
        let wte_grad = match kept.remove(wte) {
            Some(head) => {
                let head = head.contiguous()?;
                add_embedding_grad(&head, &ids, &rows)?;
                head
            }
            None => embedding_grad(&ids, &rows, self.config.vocab)?,
        };
        kept.insert(wte, wte_grad);
        lap(Phase::Backward)?;
        Ok((loss, kept))
    }

    /// Moves the parameters' gradients from `grads` to `kept`, detached.
    fn keep(&self, grads: &mut GradStore, kept: &mut GradStore) {
        for var in self.params.values() {
            if let Some(g) = grads.remove(var.as_tensor()) {
                kept.insert(var.as_tensor(), g.detach());
            }
        }
    }

    /// The final norm of the last block's output `x`, the loss of it, and
    /// candle's backward from that loss: the loss and the gradients, less the
    /// parameters' (moved to `kept`). The forward and loss phases end here.
    fn top_backward(
        &self,
        x: &Tensor,
        loss_of: impl FnOnce(&Tensor) -> Result<TopLoss>,
        kept: &mut GradStore,
        lap: &mut dyn FnMut(Phase) -> Result<()>,
    ) -> Result<(Tensor, GradStore)> {
        let hidden = self.final_norm(x)?;
        lap(Phase::Forward)?;
        let loss = loss_of(&hidden)?;
        lap(Phase::Loss)?;
        let (loss, mut grads) = loss.backward(&hidden)?;
        self.keep(&mut grads, kept);
        Ok((loss, grads))
    }

    /// The loss and the gradient of the blocks' input `first`, through one
    /// graph of every block (the parameters' gradients go to `kept`).
    fn backward_kept(
        &self,
        first: Tensor,
        loss_of: impl FnOnce(&Tensor) -> Result<TopLoss>,
        kept: &mut GradStore,
        lap: &mut dyn FnMut(Phase) -> Result<()>,
    ) -> Result<(Tensor, Tensor)> {
        let first = Var::from_tensor(&first)?;
        let mut x = first.as_tensor().clone();
        for i in 0..self.config.layers {
            x = self.block(&x, i)?;
        }
        let (loss, mut grads) = self.top_backward(&x, loss_of, kept, lap)?;
        Ok((loss, output_gradient(&mut grads, &first)?))
    }

    /// [`backward_kept`](Self::backward_kept), one block's graph at a time.
    fn backward_recomputed(
        &self,
        first: Tensor,
        loss_of: impl FnOnce(&Tensor) -> Result<TopLoss>,
        kept: &mut GradStore,
        lap: &mut dyn FnMut(Phase) -> Result<()>,
    ) -> Result<(Tensor, Tensor)> {
        let mut inputs = Vec::with_capacity(self.config.layers);
        let mut x = first;
        for i in 0..self.config.layers {
            let next = self.block(&x, i)?.detach();
            inputs.push(x);
            x = next;
        }
        let top = Var::from_tensor(&x)?;
        drop(x);
        let (loss, mut grads) = self.top_backward(top.as_tensor(), loss_of, kept, lap)?;
        let mut grad = output_gradient(&mut grads, &top)?;
        drop(grads);
        for i in (0..self.config.layers).rev() {
            let input = Var::from_tensor(&inputs.pop().expect("one input per block"))?;
            let mut grads = (self.block(input.as_tensor(), i)? * &grad)?.sum_all()?.backward()?;
            self.keep(&mut grads, kept);
            grad = output_gradient(&mut grads, &input)?;
        }
        Ok((loss, grad))
    }
}

/// What a loss hands the model's top for the backward pass.
pub enum TopLoss {
    /// A loss to differentiate through candle's graph.
    Graph(Tensor),
    /// The loss and the gradient of the final hidden states, formed by the
    /// loss itself (`LinearCrossEntropy::accumulate_grads`, which adds the
    /// output layer's gradient into its own accumulator).
    Direct { loss: Tensor, hidden_grad: Tensor },
}

impl TopLoss {
    /// The loss (detached), and the gradients of what `hidden` (the final
    /// hidden states the loss read) depends on: candle's backward from the
    /// loss, or from `sum(hidden * hidden_grad)`, whose gradient with respect
    /// to `hidden` is `hidden_grad` exactly.
    pub fn backward(self, hidden: &Tensor) -> Result<(Tensor, GradStore)> {
        match self {
            TopLoss::Graph(loss) => Ok((loss.detach(), loss.backward()?)),
            TopLoss::Direct { loss, hidden_grad } => Ok((loss, (hidden * hidden_grad)?.sum_all()?.backward()?)),
        }
    }
}

/// The phases of a training step, as [`Gpt2::loss_and_gradients`] reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The blocks and the final norm, forward.
    Forward,
    /// The loss (and, for a loss that forms them itself, its gradients).
    Loss,
    /// Everything else of the backward pass.
    Backward,
}

/// The gradient of a block's input `var`, detached.
fn output_gradient(grads: &mut GradStore, var: &Var) -> Result<Tensor> {
    match grads.remove(var.as_tensor()) {
        Some(g) => Ok(g.detach()),
        None => var.zeros_like(),
    }
}
