//! The `finetune_gpt2` example's data and samples: JSONL records (each ended
//! by `<|endoftext|>`, the prompt masked), the windows batches take from
//! records and plain text, the split into training and validation; samples
//! decoded as text whatever the model draws; the fresh weights' draws.

include!("common/finetune_model.rs");
#[path = "../examples/finetune_gpt2/sampling.rs"]
mod sampling;

use candle::Device;
use gpt2::{Config, Gpt2};
use rng::Rng;
use train::Dataset;

#[test]
fn jsonl_records_end_with_end_of_text() -> anyhow::Result<()> {
    let bytes = |s: &str| s.bytes().map(u32::from).collect::<Vec<u32>>();
    let text = "{\"prompt\": \"ab\", \"completion\": \"c\"}\n\n{\"prompt\": \"\", \"completion\": \"de\"}\n";
    let data = Dataset::from_jsonl(text, "t.jsonl", bytes, 50256)?;
    assert_eq!(
        data.sequences,
        vec![(vec![97, 98, 99, 50256], vec![0, 0, 1, 1]), (vec![100, 101, 50256], vec![1, 1, 1])]
    );
    let bad = Dataset::from_jsonl("{\"prompt\": \"a\", \"completion\": \"b\"}\n\n{\"prompt\": 3}", "t.jsonl", bytes, 0);
    let message = checkpoint::message(&bad.expect_err("a record without a string prompt"));
    assert_eq!(message, "t.jsonl line 3: no string \"prompt\"");
    let message = checkpoint::message(&Dataset::from_jsonl("{", "t.jsonl", bytes, 0).expect_err("not JSON"));
    assert!(message.starts_with("t.jsonl line 1: not JSON"), "{message}");
    Ok(())
}

/// Prompt/completion records whose prompts are longer than a window: every
/// window reaches the completion (randomly placed windows mostly held prompt
/// tokens only, and a step of them trained on nothing with a loss of 0), and
/// the data splits by records, at least one to validate; a single record is
/// an error, not a prompt-only training set.
#[test]
fn long_prompts_keep_their_completions_in_the_window() -> anyhow::Result<()> {
    let record = |i: u32| -> String {
        let prompt: String = (0..120).map(|w| format!("w{} ", (w + i) % 7)).collect();
        format!("{{\"prompt\": \"{prompt}\", \"completion\": \"x{i}\"}}\n")
    };
    let bytes = |s: &str| s.bytes().map(u32::from).collect::<Vec<u32>>();
    let text: String = (0..5).map(record).collect();
    let data = Dataset::from_jsonl(&text, "t.jsonl", bytes, 50256)?;
    let (train, val) = data.clone().split(0.1)?;
    assert_eq!((train.sequences.len(), val.sequences.len()), (4, 1));
    assert_eq!(val.sequences[0], data.sequences[4]);
    let mut rng = Rng::new(21);
    for set in [&train, &val] {
        let batch = set.batch(&mut rng, 16, 12, &Device::Cpu)?;
        for (row, mask) in batch.mask.to_vec2::<u8>()?.iter().enumerate() {
            // The completion (2 bytes) and <|endoftext|>, all of them, each window.
            assert_eq!(mask.iter().filter(|&&m| m != 0).count(), 3, "window {row}: {mask:?}");
        }
    }
    // A completion longer than the window: windows at random over it, each with a label trained on.
    let long = Dataset::from_jsonl(
        &format!("{{\"prompt\": \"{}\", \"completion\": \"{}\"}}\n", "p".repeat(50), "c".repeat(40)),
        "t.jsonl",
        bytes,
        50256,
    )?;
    let masks = long.batch(&mut rng, 32, 12, &Device::Cpu)?.mask.to_vec2::<u8>()?;
    assert!(masks.iter().all(|mask| mask.contains(&1)), "a window without a label trained on: {masks:?}");
    assert!(masks.iter().any(|mask| mask != &masks[0]), "every window at one place");
    let one = Dataset::from_jsonl(&record(0), "t.jsonl", bytes, 50256)?;
    let err = one.split(0.1).expect_err("one record").to_string();
    assert!(err.contains("1 record(s) with a token to train on: at least 2"), "{err}");
    Ok(())
}

/// Plain text's windows are drawn uniformly over the text, one draw for the
/// sequence and one for the start, as they always were (the records' rules
/// leave them alone): the same windows as before for the same seed.
#[test]
fn plain_text_windows_start_uniformly() -> anyhow::Result<()> {
    let (len, seq, rows) = (300u32, 16usize, 8usize);
    let text = Dataset::from_tokens((0..len).collect());
    let inputs = text.batch(&mut Rng::new(31), rows, seq, &Device::Cpu)?.inputs.to_vec2::<u32>()?;
    let mut replay = Rng::new(31);
    for row in inputs {
        assert_eq!(replay.below(1), 0);
        let start = replay.below(len as usize - seq) as u32;
        assert_eq!(row, (start..start + seq as u32).collect::<Vec<u32>>());
    }
    Ok(())
}

/// The id of the GPT-2 token whose bytes are exactly `bytes`.
fn token_of(bpe: &tiktoken_rs::CoreBPE, bytes: &[u8]) -> u32 {
    (0..sampling::TOKENIZER_VOCAB as u32)
        .find(|&id| bpe._decode_native_and_split(vec![id]).next().as_deref() == Some(bytes))
        .expect("a token of these bytes")
}

/// A token that is half of a UTF-8 character decodes to U+FFFD (tiktoken's
/// `decode` refuses it: a sample ending in one failed the example after
/// training), and a padded vocabulary's ids past the tokenizer's to nothing.
#[test]
fn samples_decode_half_characters_and_padded_ids() -> anyhow::Result<()> {
    let bpe = tiktoken_rs::r50k_base()?;
    let lead = token_of(&bpe, &[0xC3]); // the first byte of "é"
    assert!(bpe.decode(vec![lead]).is_err(), "tiktoken's decode accepts a lone lead byte");
    let mut ids = bpe.encode_ordinary("Hello");
    ids.extend([lead, sampling::TOKENIZER_VOCAB as u32 + 2, token_of(&bpe, &[0xA9])]);
    ids.push(lead);
    assert_eq!(sampling::decode(&bpe, &ids), "Hello\u{e9}\u{fffd}");
    Ok(())
}

/// Sampling draws only tokens the tokenizer has, the largest logit among
/// them when it leads by far, even where a padded id's logit is larger;
/// fewer logits than the tokenizer's vocabulary are refused.
#[test]
fn sampling_draws_decodable_tokens_only() -> anyhow::Result<()> {
    let vocab = sampling::TOKENIZER_VOCAB;
    let mut logits = vec![0f32; vocab + 5];
    logits[vocab..].fill(100.0);
    logits[7] = 60.0;
    let mut rng = Rng::new(3);
    for _ in 0..50 {
        assert_eq!(sampling::next_token(&logits, &mut rng)?, 7);
    }
    let err = sampling::next_token(&logits[..vocab - 1], &mut rng).expect_err("too few logits").to_string();
    assert!(err.contains("50256 logits for a tokenizer of 50257 tokens"), "{err}");
    // A model with a padded vocabulary samples text after its prompt.
    let config = Config::gpt2(vocab + 3, 16, 8, 1, 2);
    let model = Gpt2::new(config, config.init(&mut Rng::new(4), &Device::Cpu)?, &Device::Cpu)?;
    let text = sampling::sample(&model, &tiktoken_rs::r50k_base()?, "The loss", 24, &mut Rng::new(5))?;
    assert!(text.starts_with("The loss") && text.len() > "The loss".len(), "{text:?}");
    Ok(())
}

/// The fresh model's draws on rayon's threads are the sequential ones, bit
/// for bit, and leave the stream where the sequential calls do: the same
/// weights for a seed as before, and the same draws after them.
#[test]
fn parallel_normals_are_the_sequential_draws() {
    let (n, std) = (100_003usize, 0.02);
    let (mut sequential, mut parallel) = (Rng::new(7), Rng::new(7));
    let want: Vec<u32> = (0..n).map(|_| ((sequential.normal() * std) as f32).to_bits()).collect();
    let got: Vec<u32> = parallel.normals(n, std).into_iter().map(f32::to_bits).collect();
    assert!(got == want, "the draws differ");
    assert_eq!(parallel.next_u64(), sequential.next_u64(), "the stream after them");
}
