//! GPT-2 checkpoints in Hugging Face's `save_pretrained` layout: a
//! `model.safetensors` (names with or without the `transformer.` prefix) beside
//! its `config.json`. The config gives what the weights cannot (the head count,
//! the layer-norm epsilon, the activation, the tying of `lm_head`) and must
//! agree with them; without one, GPT-2's settings are assumed with
//! `heads = width / 64`, and the loader says so.

use crate::gpt2::{Activation, Config, Gpt2, LM_HEAD};
use candle::{Device, Result, Tensor};
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// Hugging Face's `config.json` of a GPT-2 (`GPT2Config`): the keys this
/// model reads, absent optional keys taking `GPT2Config`'s defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct HfConfig {
    pub n_head: usize,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_positions: usize,
    pub vocab_size: usize,
    pub layer_norm_epsilon: f64,
    pub activation: Activation,
    pub tie_word_embeddings: bool,
}

fn bad(source: &str, message: String) -> candle::Error {
    candle::Error::Msg(format!("{source}: {message}"))
}

impl HfConfig {
    /// Parses `text`; `source` names it in errors. Refuses what this model
    /// does not implement rather than computing something else.
    pub fn parse(text: &str, source: &str) -> Result<Self> {
        let json: Value = serde_json::from_str(text).map_err(|e| bad(source, format!("not JSON: {e}")))?;
        let get = |key: &str| json.get(key).filter(|v| !v.is_null());
        let count = |key: &str| -> Result<usize> {
            let value = get(key).ok_or_else(|| bad(source, format!("no `{key}`")))?;
            match value.as_u64() {
                Some(n) if n > 0 => Ok(n as usize),
                _ => Err(bad(source, format!("`{key}` must be a positive integer, got {value}"))),
            }
        };
        if let Some(kind) = get("model_type") {
            if kind != "gpt2" {
                return Err(bad(source, format!("model_type {kind} is not gpt2")));
            }
        }
        let n_embd = count("n_embd")?;
        if let Some(inner) = get("n_inner") {
            if inner.as_u64() != Some(4 * n_embd as u64) {
                return Err(bad(source, format!("n_inner {inner} is not supported (GPT-2's MLP is 4 x n_embd)")));
            }
        }
        let flag = |key: &str, default: bool| -> Result<bool> {
            match get(key) {
                None => Ok(default),
                Some(v) => v.as_bool().ok_or_else(|| bad(source, format!("`{key}` must be true or false, got {v}"))),
            }
        };
        if !flag("scale_attn_weights", true)? || flag("scale_attn_by_inverse_layer_idx", false)? {
            return Err(bad(
                source,
                "only GPT-2's attention scaling (scale_attn_weights true, scale_attn_by_inverse_layer_idx false) is supported".into(),
            ));
        }
        let activation = match get("activation_function") {
            None => Activation::GeluTanh,
            Some(name) => {
                let name = name.as_str().unwrap_or_default();
                let known = Activation::NAMES.iter().find(|(n, _)| *n == name);
                let names: Vec<&str> = Activation::NAMES.iter().map(|(n, _)| *n).collect();
                known.map(|(_, a)| *a).ok_or_else(|| {
                    bad(source, format!("activation_function {name:?} is not supported (GPT-2's: one of {names:?})"))
                })?
            }
        };
        let layer_norm_epsilon = match get("layer_norm_epsilon") {
            None => 1e-5,
            Some(v) => v
                .as_f64()
                .filter(|e| *e > 0.0 && e.is_finite())
                .ok_or_else(|| bad(source, format!("`layer_norm_epsilon` must be a positive number, got {v}")))?,
        };
        Ok(Self {
            n_head: count("n_head")?,
            n_layer: count("n_layer")?,
            n_embd,
            n_positions: count(if get("n_positions").is_some() { "n_positions" } else { "n_ctx" })?,
            vocab_size: count("vocab_size")?,
            layer_norm_epsilon,
            activation,
            tie_word_embeddings: flag("tie_word_embeddings", true)?,
        })
    }

    /// The `config.json` of a model of `config`, as `GPT2Config` writes it.
    pub fn json(config: &Config) -> String {
        let value = json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": config.vocab,
            "n_positions": config.context,
            "n_embd": config.width,
            "n_layer": config.layers,
            "n_head": config.heads,
            "layer_norm_epsilon": config.layer_norm_epsilon,
            "activation_function": config.activation.name(),
            "tie_word_embeddings": config.tied,
        });
        serde_json::to_string_pretty(&value).expect("a JSON value serialises")
    }
}

/// The `config.json` beside a weights file.
pub fn config_path(weights: &Path) -> PathBuf {
    weights.with_file_name("config.json")
}

/// The layer indices `i` of the names `h.{i}.*`, in order.
fn layer_indices(tensors: &HashMap<String, Tensor>) -> BTreeSet<usize> {
    tensors.keys().filter_map(|name| name.strip_prefix("h.")?.split('.').next()?.parse().ok()).collect()
}

/// Builds a model from a checkpoint's tensors and its config (if any).
/// `heads` is the user's `--heads`: it must agree with `config.json`, and
/// stands in for it when there is none. Returns the model and, when
/// something was assumed, a notice saying what.
pub fn from_checkpoint(
    tensors: HashMap<String, Tensor>,
    hf: Option<&HfConfig>,
    heads: Option<usize>,
    device: &Device,
) -> Result<(Gpt2, Option<String>)> {
    let mut tensors: HashMap<String, Tensor> = tensors
        .into_iter()
        // The causal-mask buffers older checkpoints carry: constants, not parameters.
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
    let indices = layer_indices(&tensors);
    let layers = indices.last().map_or(0, |last| last + 1);
    if let Some(gap) = (0..layers).find(|i| !indices.contains(i)) {
        candle::bail!("the checkpoint's layers have a gap: no tensor of layer h.{gap}, but h.{} exists", layers - 1)
    }
    let mut notice = None;
    let heads = match (hf, heads) {
        (Some(hf), Some(flag)) if flag != hf.n_head => {
            candle::bail!("--heads {flag} contradicts config.json's n_head {}", hf.n_head)
        }
        (Some(hf), _) => hf.n_head,
        (None, Some(flag)) => flag,
        (None, None) => {
            if width < 64 || width % 64 != 0 {
                candle::bail!(
                    "no config.json beside the weights, and width {width} is not a multiple of 64: pass --heads"
                )
            }
            notice = Some(format!(
                "no config.json beside the weights: assuming GPT-2's settings and {} heads of 64 (width {width} / 64); --heads overrides",
                width / 64
            ));
            width / 64
        }
    };
    if let Some(hf) = hf {
        for (key, said, found) in [
            ("n_embd", hf.n_embd, width),
            ("n_positions", hf.n_positions, context),
            ("vocab_size", hf.vocab_size, vocab),
            ("n_layer", hf.n_layer, layers),
        ] {
            if said != found {
                candle::bail!("config.json's {key} is {said}, but the weights have {found}")
            }
        }
    }
    // An lm_head.weight is used when untied; when tied it must be the
    // embedding itself, or the checkpoint is refused: never dropped unread.
    let same_as_wte = match tensors.get(LM_HEAD) {
        Some(head) => head.dims() == wte.as_slice() && equal(head, &tensors["wte.weight"])?,
        None => true,
    };
    let tied = hf.map_or(same_as_wte, |hf| hf.tie_word_embeddings);
    match (tied, tensors.contains_key(LM_HEAD)) {
        (true, true) if !same_as_wte => candle::bail!(
            "{LM_HEAD} differs from wte.weight but config.json has tie_word_embeddings: true (set it to false to train an untied lm_head)"
        ),
        (true, true) => {
            tensors.remove(LM_HEAD);
        }
        (false, false) => {
            candle::bail!("config.json has tie_word_embeddings: false, but the weights hold no {LM_HEAD}")
        }
        _ => {}
    }
    let (layer_norm_epsilon, activation) =
        hf.map_or((1e-5, Activation::GeluTanh), |hf| (hf.layer_norm_epsilon, hf.activation));
    let config = Config { vocab, context, width, layers, heads, layer_norm_epsilon, activation, tied };
    Ok((Gpt2::new(config, tensors, device)?, notice))
}

fn equal(a: &Tensor, b: &Tensor) -> Result<bool> {
    let a = a.to_dtype(candle::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let b = b.to_dtype(candle::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(a == b)
}

/// Loads `model.safetensors` (or the file `path` names) and the
/// `config.json` beside it, if there is one; see [`from_checkpoint`].
pub fn load(path: &Path, heads: Option<usize>, device: &Device) -> Result<(Gpt2, Option<String>)> {
    let path = if path.is_dir() { path.join("model.safetensors") } else { path.to_path_buf() };
    if !path.exists() {
        candle::bail!("weights file {} does not exist", path.display())
    }
    let config_file = config_path(&path);
    let hf = match std::fs::read_to_string(&config_file) {
        Ok(text) => Some(HfConfig::parse(&text, &config_file.display().to_string())?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => candle::bail!("cannot read {}: {e}", config_file.display()),
    };
    let tensors = candle::safetensors::load(&path, device).map_err(|e| {
        candle::Error::Msg(format!("{} is not a readable safetensors file: {}", path.display(), message(&e)))
    })?;
    from_checkpoint(tensors, hf.as_ref(), heads, device)
}

/// Where [`save`] writes for `--save PATH`: `PATH/model.safetensors` for a
/// directory (one that exists, or a path ending in a separator), else PATH;
/// its directory created and checked writable, so that a bad path fails
/// before the training, not after it.
///
/// # Errors
/// A directory that cannot be created or written to.
pub fn save_path(path: &Path) -> Result<PathBuf> {
    let names_a_directory = path.as_os_str().to_string_lossy().ends_with(std::path::MAIN_SEPARATOR);
    let file = if path.is_dir() || names_a_directory { path.join("model.safetensors") } else { path.to_path_buf() };
    writable_directory_of(&file)?;
    Ok(file)
}

/// Creates the directory `file` will be written in, if need be, and checks
/// that a file can be created there.
///
/// # Errors
/// `file` is a directory, or its directory cannot be created or written to.
pub fn writable_directory_of(file: &Path) -> Result<()> {
    if file.is_dir() {
        candle::bail!("{} is a directory, not a file", file.display())
    }
    let dir = match file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)
        .map_err(|e| candle::Error::Msg(format!("cannot create the directory {}: {e}", dir.display())))?;
    let probe = dir.join(format!(".finetune_gpt2_probe_{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(|e| candle::Error::Msg(format!("cannot write in {}: {e}", dir.display())))?;
    std::fs::remove_file(&probe).ok();
    Ok(())
}

/// Saves the model as `save_pretrained` would: the safetensors at `path`, and
/// its `config.json` beside it (replacing one that is there).
pub fn save(model: &Gpt2, path: &Path) -> Result<()> {
    candle::safetensors::save(&model.hf_tensors(), path)?;
    std::fs::write(config_path(path), HfConfig::json(&model.config))?;
    Ok(())
}

/// A candle error's message on one line, without the backtrace candle
/// attaches to it when `RUST_BACKTRACE` is set.
pub fn message(e: &candle::Error) -> String {
    match e {
        candle::Error::WithBacktrace { inner, .. } => message(inner),
        candle::Error::Context { inner, context } => format!("{context}: {}", message(inner)),
        candle::Error::WithPath { inner, path } => format!("{}: {}", path.display(), message(inner)),
        other => other.to_string().lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" "),
    }
}
