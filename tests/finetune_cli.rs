//! The `finetune_gpt2` example's command line: `--help` prints every flag with
//! its default, and bad flags are clap errors (the example exits with status 2).

include!("common/finetune_model.rs");
#[path = "../examples/finetune_gpt2/cli.rs"]
mod cli;

use clap::error::ErrorKind;
use clap::Parser;
use cli::{Args, DeviceKind};
use train::LossKind;

fn parse(args: &[&str]) -> Result<Args, clap::Error> {
    Args::try_parse_from(std::iter::once("finetune_gpt2").chain(args.iter().copied()))
}

#[test]
fn help_lists_every_flag_with_its_default() {
    let err = parse(&["--help"]).expect_err("--help stops the program");
    assert_eq!(err.kind(), ErrorKind::DisplayHelp);
    let help = err.to_string();
    for flag in [
        "--weights",
        "--data",
        "--loss",
        "--steps",
        "--batch",
        "--accum",
        "--keep-activations",
        "--seq",
        "--lr",
        "--weight-decay",
        "--warmup",
        "--clip",
        "--eval-every",
        "--seed",
        "--layers",
        "--width",
        "--heads",
        "--save",
        "--plot",
        "--device",
        "--tf32",
    ] {
        assert!(help.contains(flag), "--help does not mention {flag}:\n{help}");
    }
    assert!(help.contains("[default: linear]"), "the default loss:\n{help}");
    assert!(help.contains("[default: 150]"), "the default steps:\n{help}");
}

#[test]
fn defaults() -> Result<(), clap::Error> {
    let args = parse(&[])?;
    assert_eq!(args.loss, LossKind::Linear);
    assert_eq!((args.steps, args.batch, args.accum, args.seq), (150, 8, 2, 64));
    assert_eq!(args.device, DeviceKind::Auto);
    assert_eq!(parse(&["--device", "cpu"])?.device, DeviceKind::Cpu);
    // No --keep-activations: the device decides (on CUDA by its free memory, memory_plan.rs).
    assert!(args.weights.is_none() && args.heads.is_none() && args.lr.is_none() && args.keep_activations.is_none());
    assert!(!args.tf32);
    assert!(parse(&["--tf32", "--device", "cuda"])?.tf32);
    let args = parse(&["--loss", "chunked", "--keep-activations", "--heads", "12"])?;
    assert_eq!((args.loss, args.keep_activations, args.heads), (LossKind::Chunked, Some(true), Some(12)));
    let args = parse(&["--keep-activations", "false", "--device", "cuda"])?;
    assert_eq!((args.keep_activations, args.device), (Some(false), DeviceKind::Cuda));
    Ok(())
}

#[test]
fn bad_flags_are_errors() {
    let kind = |args: &[&str]| parse(args).err().map(|e| e.kind());
    assert_eq!(kind(&["--no-such-flag"]), Some(ErrorKind::UnknownArgument));
    assert_eq!(kind(&["--steps", "0"]), Some(ErrorKind::ValueValidation));
    assert_eq!(kind(&["--steps", "ten"]), Some(ErrorKind::ValueValidation));
    assert_eq!(kind(&["--loss", "mse"]), Some(ErrorKind::InvalidValue));
    // Clipping needs a largest norm above 0 (inf: none).
    for clip in ["--clip=0", "--clip=-1", "--clip=NaN"] {
        assert_eq!(kind(&[clip]), Some(ErrorKind::ValueValidation), "{clip}");
    }
    assert_eq!(parse(&["--clip", "inf"]).map(|a| a.clip).ok(), Some(f64::INFINITY));
    // A learning rate or weight decay of NaN, infinity or below 0 (each trained to NaN
    // weights without a word); a model of no layers, width or heads.
    for flag in ["--lr", "--weight-decay"] {
        for value in ["NaN", "inf", "-1e-3"] {
            assert_eq!(kind(&[&format!("{flag}={value}")]), Some(ErrorKind::ValueValidation), "{flag}={value}");
        }
        // Written apart, a negative value is still the flag's value, refused for being below 0.
        assert_eq!(kind(&[flag, "-1"]), Some(ErrorKind::ValueValidation), "{flag} -1");
        assert!(parse(&[flag, "0"]).is_ok(), "{flag} 0");
    }
    for flag in ["--layers", "--width", "--heads"] {
        assert_eq!(kind(&[flag, "0"]), Some(ErrorKind::ValueValidation), "{flag} 0");
    }
    // A fresh model's shape contradicts a checkpoint's.
    assert_eq!(kind(&["--weights", "model.safetensors", "--layers", "3"]), Some(ErrorKind::ArgumentConflict));
}
