//! A GPT-2 for training with candle: token and position embeddings, blocks of
//! (layer norm, causal self-attention with fused `c_attn` / `c_proj`, layer
//! norm, GELU MLP; `block.rs`), a final layer norm, and an `lm_head` tied to
//! the token embedding (or its own `lm_head.weight` when untied). Tensor names
//! and shapes are those of Hugging Face's GPT-2 (Conv1D weights stored `[in,
//! out]`); `checkpoint.rs` reads and writes them with their `config.json`.
//! Only differentiable ops are used (candle-nn's fused `LayerNorm` and
//! `softmax_last_dim` record no backward): candle's, and five ops with their
//! own backward, the token embedding (`embedding.rs`), the layer norm
//! (`layer_norm.rs`), the attention's causal softmax (`softmax.rs`), GPT-2's
//! GELU (`gelu.rs`) and the Conv1D bias (`bias.rs`). Training runs the
//! backward by hand (the blocks' in `block.rs`), but for a loss that candle
//! differentiates: candle's backward from it through the final norm.

pub use crate::block::Activation;
use crate::block::{Block, Saved};
use crate::column_sums::column_sums;
use crate::embedding::{add_embedding_grad, embedding, embedding_grad};
use crate::layer_norm::{layer_norm, layer_norm_backward};
use crate::rng::Rng;
use candle::backprop::GradStore;
use candle::{DType, Device, Result, Tensor, Var};
use std::collections::HashMap;

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
            let block = Block::PARAMS.iter().zip(Block::param_shapes(c));
            shapes.extend(block.map(|(name, shape)| (format!("h.{i}.{name}"), shape)));
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

    /// Block `i`'s parameters: the `Var`s themselves (a forward then records
    /// candle's graph), or `detached` (it records none).
    fn block_params(&self, i: usize, detached: bool) -> Block {
        let params = Block::PARAMS.map(|name| {
            let t = self.p(&format!("h.{i}.{name}"));
            if detached {
                t.detach()
            } else {
                t.clone()
            }
        });
        Block::new(params, self.config.heads, self.config.layer_norm_epsilon, self.config.activation)
    }

    /// The token plus position embeddings `[B, T, C]` of token ids `[B, T]` (u32).
    pub fn embed(&self, tokens: &Tensor) -> Result<Tensor> {
        self.embed_with(self.p("wte.weight"), self.p("wpe.weight"), tokens)
    }

    /// [`embed`](Self::embed) through these token and position embeddings.
    fn embed_with(&self, wte: &Tensor, wpe: &Tensor, tokens: &Tensor) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        if t > self.config.context {
            candle::bail!("sequence length {t} exceeds the model's context of {} tokens", self.config.context)
        }
        let embedded = embedding(wte, &tokens.flatten_all()?)?.reshape((b, t, self.config.width))?;
        embedded.broadcast_add(&wpe.narrow(0, 0, t)?)
    }

    /// Transformer block `i` (pre-norm attention, then pre-norm MLP, each
    /// added to the residual stream) of `x` `[B, T, C]`, through candle's graph.
    pub fn block(&self, x: &Tensor, i: usize) -> Result<Tensor> {
        self.block_params(i, false).forward(x)
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
            x = self.block_params(i, true).forward(&x)?;
        }
        Ok(self.final_norm(&x)?.detach())
    }

    /// The loss that `loss_of(&self.hidden(tokens)?)` gives and the gradients
    /// of the parameters (detached), those of `loss.backward()` on the whole
    /// graph, bit for bit. The blocks run without candle's graph, and their
    /// backward by hand ([`Block::backward`]). With `keep_activations` every
    /// block's [`Saved`] activations stay alive until the backward pass ends.
    /// Without, activation checkpointing: the forward pass keeps each block's
    /// input only, and the backward pass runs one block at a time from it
    /// again, so that one block's activations are alive at a time instead of
    /// the whole model's. A loss that forms its gradients itself
    /// ([`TopLoss::Direct`]) hands over the final hidden states' gradient, and
    /// the final norm's backward runs by hand from it; another runs candle's
    /// backward from the loss through the final norm. The embeddings'
    /// gradients are formed by hand too, as the whole graph's backward forms
    /// them: the token embedding's added in place into the `lm_head`'s when
    /// they are tied, without candle's `[V, C]` zeros and add. `lap` is called
    /// as each [`Phase`] ends (to time them).
    pub fn loss_and_gradients(
        &self,
        tokens: &Tensor,
        loss_of: impl FnOnce(&Tensor) -> Result<TopLoss>,
        keep_activations: bool,
        lap: &mut dyn FnMut(Phase) -> Result<()>,
    ) -> Result<(Tensor, GradStore)> {
        let mut kept = GradStore::default();
        let (wte, wpe) = (self.p("wte.weight"), self.p("wpe.weight"));
        let first = self.embed_with(&wte.detach(), &wpe.detach(), tokens)?;
        let (loss, grad) = self.backward_blocks(first, loss_of, keep_activations, &mut kept, lap)?;
        let (b, t) = tokens.dims2()?;
        let (c, context) = (self.config.width, self.config.context);
        // The positions' rows: the sum over the batch (candle's backward of the broadcast add sums
        // it from 0 in batch order, as `column_sums` does), then zeros for the positions past T.
        let positions = column_sums(&grad.reshape((b, t * c))?)?.reshape((t, c))?;
        let wpe_grad = positions.pad_with_zeros(0, 0, context - t)?;
        kept.insert(wpe, wpe_grad);
        // As the whole graph's backward adds them: into the lm_head's gradient
        // (tied), here in place, or alone (into zeros, which leaves them as they are).
        let (ids, rows) = (tokens.flatten_all()?, grad.reshape((b * t, c))?);
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

    /// The final norm of the last block's output `x`, the loss of it, and the
    /// loss (detached) and the gradient of `x`; the parameters' gradients go
    /// to `kept`. A [`TopLoss::Graph`] runs candle's backward from the loss
    /// (the norm's input is a `Var` for it); a [`TopLoss::Direct`] hands over
    /// the final hidden states' gradient, from which the norm's backward runs
    /// by hand, as candle's backward of `sum(hidden * hidden_grad)` would run
    /// it. The forward and loss phases end here.
    fn top_backward(
        &self,
        x: Tensor,
        loss_of: impl FnOnce(&Tensor) -> Result<TopLoss>,
        kept: &mut GradStore,
        lap: &mut dyn FnMut(Phase) -> Result<()>,
    ) -> Result<(Tensor, Tensor)> {
        let top = Var::from_tensor(&x)?;
        drop(x);
        let hidden = self.final_norm(top.as_tensor())?;
        lap(Phase::Forward)?;
        let loss = loss_of(&hidden)?;
        lap(Phase::Loss)?;
        drop(hidden);
        match loss {
            TopLoss::Graph(loss) => {
                let mut grads = loss.backward()?;
                self.keep(&mut grads, kept);
                Ok((loss.detach(), output_gradient(&mut grads, &top)?))
            }
            TopLoss::Direct { loss, hidden_grad } => {
                let (gain, shift) = (self.p("ln_f.weight"), self.p("ln_f.bias"));
                let eps = self.config.layer_norm_epsilon;
                let (dx, d_gain, d_shift) = layer_norm_backward(top.as_tensor(), gain, &hidden_grad, eps)?;
                kept.insert(gain, d_gain);
                kept.insert(shift, d_shift);
                Ok((loss, dx))
            }
        }
    }

    /// The last block's output for the blocks' input `first` `[B, T, C]`, run
    /// without candle's graph, and what each block keeps for its backward:
    /// everything its backward reads with `keep_activations`, else its input.
    pub fn forward_checkpoints(&self, first: Tensor, keep_activations: bool) -> Result<(Tensor, Vec<Checkpoint>)> {
        let mut checkpoints = Vec::with_capacity(self.config.layers);
        let mut x = first;
        for i in 0..self.config.layers {
            let block = self.block_params(i, true);
            let (out, checkpoint) = if keep_activations {
                let (out, saved) = block.forward_saved(&x)?;
                (out, Checkpoint::Saved(saved))
            } else {
                (block.forward(&x)?, Checkpoint::Input(x))
            };
            checkpoints.push(checkpoint);
            x = out;
        }
        Ok((x, checkpoints))
    }

    /// The loss and the gradient of the blocks' input `first`; the blocks'
    /// parameters' gradients go to `kept`. The forward keeps every block's
    /// [`Saved`] activations, or (without `keep_activations`) its input only,
    /// from which the backward recomputes them one block at a time. Each
    /// block's backward is [`Block::backward`], by hand; the top's candle's.
    fn backward_blocks(
        &self,
        first: Tensor,
        loss_of: impl FnOnce(&Tensor) -> Result<TopLoss>,
        keep_activations: bool,
        kept: &mut GradStore,
        lap: &mut dyn FnMut(Phase) -> Result<()>,
    ) -> Result<(Tensor, Tensor)> {
        let (x, checkpoints) = self.forward_checkpoints(first, keep_activations)?;
        let (loss, mut grad) = self.top_backward(x, loss_of, kept, lap)?;
        for (i, checkpoint) in checkpoints.into_iter().enumerate().rev() {
            let block = self.block_params(i, true);
            let saved = match checkpoint {
                Checkpoint::Saved(saved) => saved,
                Checkpoint::Input(x) => block.saved(&x)?,
            };
            let (dx, block_grads) = block.backward(saved, grad)?;
            for (name, g) in Block::PARAMS.iter().zip(block_grads) {
                kept.insert(self.p(&format!("h.{i}.{name}")), g);
            }
            grad = dx;
        }
        Ok((loss, grad))
    }
}

/// What the forward pass keeps of a block for the backward pass.
pub enum Checkpoint {
    /// Everything its backward reads.
    Saved(Saved),
    /// Its input, to run it again from.
    Input(Tensor),
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

/// The gradient of `var` in `grads`, detached (zeros where it has none).
fn output_gradient(grads: &mut GradStore, var: &Var) -> Result<Tensor> {
    match grads.remove(var.as_tensor()) {
        Some(g) => Ok(g.detach()),
        None => var.zeros_like(),
    }
}
