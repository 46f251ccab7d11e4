//! A GPT-2 for training with candle: token and position embeddings, blocks of
//! (layer norm, causal self-attention with fused `c_attn` / `c_proj`, layer
//! norm, GELU MLP), a final layer norm, and an `lm_head` tied to the token
//! embedding. Tensor names and shapes are those of Hugging Face's GPT-2
//! `model.safetensors` (Conv1D weights stored `[in, out]`), with or without the
//! `transformer.` prefix. Only differentiable candle ops are used (candle-nn's
//! fused `LayerNorm` and `softmax_last_dim` record no backward).

use crate::rng::Rng;
use candle::{DType, Device, Result, Tensor, Var, D};
use std::collections::HashMap;
use std::path::Path;

/// The shape of a GPT-2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    pub vocab: usize,
    pub context: usize,
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
}

impl Config {
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
                    let values: Vec<f32> = (0..shape.iter().product()).map(|_| (rng.normal() * std) as f32).collect();
                    Tensor::from_vec(values, shape, device)?
                };
                Ok((name, tensor))
            })
            .collect()
    }
}

/// A GPT-2 whose parameters are candle `Var`s.
pub struct Gpt2 {
    pub config: Config,
    params: HashMap<String, Var>,
    causal_mask: Tensor,
}

impl Gpt2 {
    /// Builds the model from named tensors (as read from a safetensors file),
    /// checking that every GPT-2 tensor is present with the right shape.
    /// `heads` is not stored in the weights (GPT-2 124M has 12).
    pub fn from_tensors(tensors: HashMap<String, Tensor>, heads: usize, device: &Device) -> Result<Self> {
        let tensors: HashMap<String, Tensor> = tensors
            .into_iter()
            .filter(|(name, _)| !name.ends_with(".attn.bias") && !name.ends_with(".attn.masked_bias"))
            .map(|(name, t)| (name.strip_prefix("transformer.").unwrap_or(&name).to_string(), t))
            .collect();
        let dims = |name: &str| -> Result<Vec<usize>> {
            match tensors.get(name) {
                Some(t) => Ok(t.dims().to_vec()),
                None => {
                    let mut found: Vec<&String> = tensors.keys().collect();
                    found.sort();
                    found.truncate(5);
                    candle::bail!("not a GPT-2 checkpoint: no tensor `{name}` (it has e.g. {found:?})")
                }
            }
        };
        let (wte, wpe) = (dims("wte.weight")?, dims("wpe.weight")?);
        let (&[vocab, width], &[context, _]) = (wte.as_slice(), wpe.as_slice()) else {
            candle::bail!("not a GPT-2 checkpoint: wte {wte:?} and wpe {wpe:?} must be matrices")
        };
        let layers = (0..).take_while(|i| tensors.contains_key(&format!("h.{i}.ln_1.weight"))).count();
        if heads == 0 || width % heads != 0 {
            candle::bail!("{heads} attention heads do not divide the width {width}")
        }
        let config = Config { vocab, context, width, layers, heads };
        let mut params = HashMap::new();
        for (name, shape) in config.parameter_shapes() {
            let tensor =
                tensors.get(&name).ok_or_else(|| candle::Error::Msg(format!("GPT-2 checkpoint lacks `{name}`")))?;
            if tensor.dims() != shape.as_slice() {
                candle::bail!("GPT-2 tensor `{name}` has shape {:?}, expected {shape:?}", tensor.shape())
            }
            params.insert(name, Var::from_tensor(&tensor.to_dtype(DType::F32)?.to_device(device)?)?);
        }
        let causal_mask = causal_mask(context, device)?;
        Ok(Self { config, params, causal_mask })
    }

    /// Loads a safetensors file (Hugging Face's GPT-2 or one saved by [`Gpt2::save`]).
    pub fn load(path: &Path, heads: usize, device: &Device) -> Result<Self> {
        if !path.exists() {
            candle::bail!("weights file {} does not exist", path.display())
        }
        let tensors = candle::safetensors::load(path, device)
            .map_err(|e| candle::Error::Msg(format!("{} is not a readable safetensors file: {e}", path.display())))?;
        Self::from_tensors(tensors, heads, device)
    }

    /// Saves the parameters under their GPT-2 names.
    pub fn save(&self, path: &Path) -> Result<()> {
        let tensors: HashMap<String, Tensor> =
            self.params.iter().map(|(name, var)| (name.clone(), var.as_tensor().clone())).collect();
        candle::safetensors::save(&tensors, path)
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
        candle_nn::ops::layer_norm_slow(x, weight, bias, 1e-5)
    }

    /// GPT-2's Conv1D: `x @ W + b` with `W` stored `[in, out]`.
    fn conv1d(&self, x: &Tensor, prefix: &str) -> Result<Tensor> {
        x.broadcast_matmul(self.p(&format!("{prefix}.weight")))?.broadcast_add(self.p(&format!("{prefix}.bias")))
    }

    fn attention(&self, x: &Tensor, prefix: &str) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let (heads, head_dim) = (self.config.heads, c / self.config.heads);
        let qkv = self.conv1d(x, &format!("{prefix}.c_attn"))?;
        let split =
            |i: usize| qkv.narrow(D::Minus1, i * c, c)?.reshape((b, t, heads, head_dim))?.transpose(1, 2)?.contiguous();
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);
        let scores = (q.matmul(&k.t()?)? / (head_dim as f64).sqrt())?;
        let mask = self.causal_mask.narrow(0, 0, t)?.narrow(1, 0, t)?;
        let weights = candle_nn::ops::softmax(&scores.broadcast_add(&mask)?, D::Minus1)?;
        let y = weights.matmul(&v)?.transpose(1, 2)?.reshape((b, t, c))?;
        self.conv1d(&y, &format!("{prefix}.c_proj"))
    }

    /// The final hidden states `[B, T, C]` of token ids `[B, T]` (u32).
    pub fn hidden(&self, tokens: &Tensor) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        if t > self.config.context {
            candle::bail!("sequence length {t} exceeds the model's context of {} tokens", self.config.context)
        }
        let embedded =
            self.p("wte.weight").index_select(&tokens.flatten_all()?, 0)?.reshape((b, t, self.config.width))?;
        let mut x = embedded.broadcast_add(&self.p("wpe.weight").narrow(0, 0, t)?)?;
        for i in 0..self.config.layers {
            let h = format!("h.{i}");
            x = (&x + self.attention(&self.layer_norm(&x, &format!("{h}.ln_1"))?, &format!("{h}.attn"))?)?;
            let m = self.conv1d(&self.layer_norm(&x, &format!("{h}.ln_2"))?, &format!("{h}.mlp.c_fc"))?.gelu()?;
            x = (&x + self.conv1d(&m, &format!("{h}.mlp.c_proj"))?)?;
        }
        self.layer_norm(&x, "ln_f")
    }

    /// The `lm_head` weight `[V, C]`: the token embedding (tied).
    pub fn lm_head(&self) -> &Tensor {
        self.p("wte.weight")
    }

    /// Next-token logits `[B, T, V]` through the `lm_head` tied to `wte`.
    pub fn logits(&self, tokens: &Tensor) -> Result<Tensor> {
        self.hidden(tokens)?.broadcast_matmul(&self.lm_head().t()?)
    }
}

/// `[T, T]` additive mask: 0 on and below the diagonal, -inf above.
fn causal_mask(context: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> =
        (0..context).flat_map(|i| (0..context).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Tensor::from_vec(mask, (context, context), device)
}
