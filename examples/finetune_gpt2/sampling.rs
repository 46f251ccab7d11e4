//! Text from the model: top-k sampling with temperature, over the tokens the
//! GPT-2 tokenizer can decode, decoded as Hugging Face's and tiktoken's
//! `decode` do by default, a byte sequence that is not UTF-8 (half of a
//! character, as byte-level BPE tokens can be) becoming U+FFFD.

use crate::gpt2::Gpt2;
use crate::rng::Rng;
use candle::{Device, Result, Tensor};
use tiktoken_rs::CoreBPE;

/// GPT-2's `<|endoftext|>`, the tokenizer's last token. It ends every JSONL
/// record of the training data, so that the model learns to stop.
pub const END_OF_TEXT: u32 = 50256;

/// The GPT-2 tokenizer's vocabulary: 50256 merges and `<|endoftext|>`. A
/// checkpoint's may be larger (padded); its further tokens decode to nothing.
pub const TOKENIZER_VOCAB: usize = END_OF_TEXT as usize + 1;

/// Candidates of [`next_token`].
const TOP_K: usize = 40;

/// Temperature of [`next_token`].
const TEMPERATURE: f32 = 0.8;

/// `prompt` followed by `tokens` sampled tokens, as text.
///
/// # Errors
/// The model's, or a model vocabulary smaller than the tokenizer's.
pub fn sample(model: &Gpt2, bpe: &CoreBPE, prompt: &str, tokens: usize, rng: &mut Rng) -> Result<String> {
    let mut ids = bpe.encode_ordinary(prompt);
    let device = model.lm_head().device();
    for _ in 0..tokens {
        let start = ids.len().saturating_sub(model.config.context);
        let input = Tensor::new(&ids[start..], &Device::Cpu)?.to_device(device)?.unsqueeze(0)?;
        let hidden = model.hidden_no_grad(&input)?;
        // The next token's logits only: the last position's.
        let last: Vec<f32> = model.head(&hidden.narrow(1, hidden.dim(1)? - 1, 1)?)?.flatten_all()?.to_vec1()?;
        ids.push(next_token(&last, rng)?);
    }
    Ok(decode(bpe, &ids))
}

/// A token drawn from the [`TOP_K`] largest of `logits` (`[V]`, `V` at least
/// the tokenizer's) over the tokenizer's first [`TOKENIZER_VOCAB`], with
/// probabilities `softmax(logits / T)` among them.
///
/// # Errors
/// Fewer logits than the tokenizer's vocabulary.
pub fn next_token(logits: &[f32], rng: &mut Rng) -> Result<u32> {
    let Some(decodable) = logits.get(..TOKENIZER_VOCAB) else {
        candle::bail!("sampling: {} logits for a tokenizer of {TOKENIZER_VOCAB} tokens", logits.len())
    };
    let mut top: Vec<(usize, f32)> = decodable.iter().copied().enumerate().collect();
    top.sort_by(|a, b| b.1.total_cmp(&a.1));
    top.truncate(TOP_K);
    let weights: Vec<f64> = top.iter().map(|(_, l)| f64::from((l - top[0].1) / TEMPERATURE).exp()).collect();
    let mut pick = rng.unit() * weights.iter().sum::<f64>();
    let choice = top.iter().zip(&weights).find(|(_, w)| {
        pick -= **w;
        pick <= 0.0
    });
    Ok(choice.map_or(top[0].0, |(t, _)| t.0) as u32)
}

/// The text of token ids below [`TOKENIZER_VOCAB`] (others are skipped),
/// each byte sequence that is not UTF-8 replaced by U+FFFD.
pub fn decode(bpe: &CoreBPE, ids: &[u32]) -> String {
    let decodable: Vec<u32> = ids.iter().copied().filter(|&id| (id as usize) < TOKENIZER_VOCAB).collect();
    let bytes: Vec<u8> = bpe._decode_native_and_split(decodable).flatten().collect();
    String::from_utf8_lossy(&bytes).into_owned()
}
