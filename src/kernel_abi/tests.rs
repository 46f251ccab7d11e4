use super::*;
use crate::config::LABEL_DTYPES;
use candle::Layout;

fn options() -> KernelOptions {
    KernelOptions { ignore_index: -100, softcap: None, logit_sum: false, sum_weights: None }
}

/// Bad block sizes are refused and change nothing (a good one would
/// change every test's launches: the GPU table sets it, no test does).
#[cfg(feature = "testing")]
#[test]
fn bad_row_block_sizes_are_refused() {
    for bad in [100, 2048, 16] {
        let err = set_row_block_threads(Some(bad)).expect_err("a bad block size").to_string();
        assert!(err.contains("multiple of 32 threads up to 1024"), "{err}");
    }
    assert_eq!(LaunchShape::for_vocab(DType::BF16, 128_256).threads, MAX_ROW_BLOCK);
}

#[test]
fn shapes_follow_the_vocabulary() {
    let small = LaunchShape::for_vocab(DType::BF16, 2048);
    assert_eq!((small.threads, small.rows_per_block), (256, 8));
    let large = LaunchShape::for_vocab(DType::BF16, 128_256);
    assert_eq!((large.threads, large.rows_per_block), (512, 1));
    assert_eq!(LaunchShape::for_vocab(DType::F64, 128_256).threads, 512);
    assert_eq!(LaunchShape::for_vocab(DType::F32, 257 * 4).threads, 64);
}

#[test]
fn every_dtype_has_its_entries() -> Result<()> {
    let layout = Layout::contiguous((3, 7));
    let rows = RowGeometry::new(&layout)?;
    let options = options();
    let launched = |launch: Result<Option<KernelLaunch>>| launch.map(|l| l.expect("3 x 7 has a launch").entry);
    for dtype in [DType::F32, DType::BF16, DType::F16, DType::F64] {
        let shape = LaunchShape::for_vocab(dtype, 7);
        assert!(launched(forward(&rows, dtype, &options, shape))?.starts_with("ce_fwd_"));
        assert!(launched(backward(&rows, dtype, &options, true, shape))?.starts_with("ce_bwd_inplace_"));
        let unit = UnitFactors { ce: 1.0, lse: 0.0, lse_squared: 0.0, logit_sum: 0.0 };
        let in_place = launched(forward_with_grad(&rows, dtype, &options, &unit, true, shape))?;
        assert!(in_place.starts_with("ce_fwd_grad_") && !in_place.contains("out"), "{in_place}");
        let out = forward_with_grad(&rows, dtype, &options, &unit, false, shape)?.expect("3 x 7 has a launch");
        assert!(out.entry.starts_with("ce_fwd_grad_out_"), "{}", out.entry);
        assert_eq!(out.args[2], KernelArg::Operand(Operand::Grad));
    }
    assert!(forward(&rows, DType::U8, &options, LaunchShape::for_vocab(DType::U8, 7)).is_err());
    let bad = LaunchShape { threads: 100, rows_per_block: 1, max_blocks: 1, row_splits: 1 };
    assert!(forward(&rows, DType::F32, &options, bad).is_err());
    for dtype in LABEL_DTYPES {
        let geometry = LabelGeometry::new(&Layout::contiguous(3), None)?;
        assert!(launched(labels(&geometry, dtype, -100))?.starts_with("ce_labels_"));
    }
    Ok(())
}

/// No launch is built for an empty problem (the driver refuses an empty
/// grid), from any entry point, in any dtype, with any block shape; and
/// every launch that is built has a grid and a block.
#[test]
fn no_empty_launch_can_be_built() -> Result<()> {
    let unit = UnitFactors { ce: 1.0, lse: 0.0, lse_squared: 0.0, logit_sum: 0.0 };
    for dims in [[0, 7], [5, 0], [0, 0], [3, 7]] {
        let rows = RowGeometry::new(&Layout::contiguous((dims[0], dims[1])))?;
        for dtype in [DType::F32, DType::BF16, DType::F16, DType::F64] {
            for shape in [
                LaunchShape::for_vocab(dtype, dims[1]),
                LaunchShape { threads: 32, rows_per_block: 1, max_blocks: 1, row_splits: 1 },
            ] {
                let options = options();
                let launches = [
                    forward(&rows, dtype, &options, shape)?,
                    forward_with_grad(&rows, dtype, &options, &unit, true, shape)?,
                    forward_with_grad(&rows, dtype, &options, &unit, false, shape)?,
                    backward(&rows, dtype, &options, false, shape)?,
                    backward(&rows, dtype, &options, true, shape)?,
                ];
                for launch in launches {
                    match &launch {
                        None => assert!(dims[0] * dims[1] == 0, "{dims:?} {dtype:?}: no launch"),
                        Some(l) => {
                            assert!(dims[0] * dims[1] > 0, "{dims:?} {dtype:?}: launched {}", l.entry);
                            assert!(l.blocks >= 1 && l.threads >= 32, "{dims:?}: {l:?}");
                        }
                    }
                }
            }
        }
    }
    for n in [0, 1, 300] {
        let geometry = LabelGeometry::new(&Layout::contiguous(n), None)?;
        for dtype in LABEL_DTYPES {
            let launch = labels(&geometry, dtype, -100)?;
            assert_eq!(launch.is_some(), n > 0, "{n} labels of {dtype:?}");
            assert!(launch.is_none_or(|l| l.blocks as usize * l.threads as usize >= n), "{n} labels: a thread each");
        }
    }
    Ok(())
}

/// The labels' entry takes the mask as raw bytes, with its own strides;
/// packed formats with no zero are refused.
#[test]
fn labels_take_any_mask() -> Result<()> {
    let labels_layout = Layout::contiguous((2, 3));
    let mask_layout = Layout::contiguous((2, 5)).narrow(1, 1, 3)?;
    for (dtype, bytes, float) in [(DType::U8, 1, 0), (DType::BF16, 2, 1), (DType::I32, 4, 0), (DType::F64, 8, 1)] {
        let geometry = LabelGeometry::new(&labels_layout, Some((&mask_layout, MaskElements::of(dtype)?)))?;
        let launch = labels(&geometry, DType::I32, 7)?.expect("6 labels");
        assert_eq!(launch.entry, "ce_labels_i32");
        assert_eq!(launch.args[1], KernelArg::Operand(Operand::Mask));
        assert_eq!(&launch.args[5..7], &[KernelArg::I32(bytes), KernelArg::I32(float)]);
        // The mask's start, inner length and strides: [2, 5] narrowed to columns 1..4.
        let mask_strides = [KernelArg::I64(1), KernelArg::I64(3), KernelArg::I64(5), KernelArg::I64(1)];
        assert_eq!(&launch.args[11..15], &mask_strides);
    }
    for dtype in [DType::F4, DType::F6E2M3, DType::F8E8M0] {
        assert!(MaskElements::of(dtype).is_err(), "{dtype:?}");
    }
    let other_shape = Layout::contiguous((3, 2));
    let mask = MaskElements::of(DType::U8)?;
    assert!(LabelGeometry::new(&labels_layout, Some((&other_shape, mask))).is_err());
    assert!(labels(&LabelGeometry::new(&labels_layout, None)?, DType::F32, -100).is_err());
    Ok(())
}

/// Class weights pick the `_weighted_` entries and bind their operand,
/// except in a forward without the logit sum, which does not read them;
/// weights that do not fit the rows are refused, and so is the forward
/// with gradient, which has no weighted entry.
#[test]
fn class_weights_pick_the_weighted_entries() -> Result<()> {
    let rows = RowGeometry::new(&Layout::contiguous((3, 7)))?;
    let weights = Tensor::ones(7, DType::F32, &candle::Device::Cpu)?;
    let options = KernelOptions { logit_sum: true, sum_weights: Some(weights.clone()), ..self::options() };
    let shape = LaunchShape::for_vocab(DType::BF16, 7);
    let bound = KernelArg::Operand(Operand::SumWeights);
    for (launch, entry) in [
        (forward(&rows, DType::BF16, &options, shape)?, "ce_fwd_weighted_bf16"),
        (backward(&rows, DType::BF16, &options, false, shape)?, "ce_bwd_weighted_bf16"),
        (backward(&rows, DType::BF16, &options, true, shape)?, "ce_bwd_inplace_weighted_bf16"),
    ] {
        let launch = launch.expect("3 x 7 has a launch");
        assert_eq!((launch.entry, launch.args[2]), (entry, bound));
    }
    let unit = UnitFactors { ce: 1.0, lse: 0.0, lse_squared: 0.0, logit_sum: 0.0 };
    for in_place in [true, false] {
        assert!(forward_with_grad(&rows, DType::BF16, &options, &unit, in_place, shape).is_err());
    }
    let unsummed = KernelOptions { logit_sum: false, ..options.clone() };
    let launch = forward(&rows, DType::BF16, &unsummed, shape)?.expect("3 x 7 has a launch");
    assert_eq!((launch.entry, launch.args[2]), ("ce_fwd_bf16", KernelArg::Null));
    for bad in [Tensor::ones(6, DType::F32, &candle::Device::Cpu)?, weights.to_dtype(DType::F64)?] {
        let options = KernelOptions { sum_weights: Some(bad), ..options.clone() };
        assert!(backward(&rows, DType::BF16, &options, false, shape).is_err());
    }
    Ok(())
}

/// Split rows: the backward's grid has a block for each split of each row
/// (up to `max_blocks`) and passes the count after `rows_per_block`; the
/// forward, which reduces a row within one block, neither sizes its grid by
/// the splits nor takes them; counts outside 1 to `MAX_ROW_SPLITS`, and
/// splits of rows that a warp works on, are refused.
#[test]
fn split_rows_size_the_backward_only() -> Result<()> {
    let rows = RowGeometry::new(&Layout::contiguous((10, 5000)))?;
    let split = LaunchShape { threads: 128, rows_per_block: 1, max_blocks: MAX_BLOCKS, row_splits: 4 };
    let whole = LaunchShape { row_splits: 1, ..split };
    for in_place in [false, true] {
        let launch = backward(&rows, DType::F32, &options(), in_place, split)?.expect("a launch");
        assert_eq!(launch.blocks, 40, "{in_place}");
        let unsplit = backward(&rows, DType::F32, &options(), in_place, whole)?.expect("a launch");
        assert_eq!(unsplit.blocks, 10);
        // rows_per_block, then row_splits, where the unsplit launch has them too.
        let at = launch.args.iter().position(|a| *a == KernelArg::I32(1)).expect("rows_per_block");
        assert_eq!(launch.args[at + 1], KernelArg::I32(4));
        assert_eq!(unsplit.args[at + 1], KernelArg::I32(1));
        assert_eq!(launch.args.len(), unsplit.args.len());
    }
    let capped = LaunchShape { max_blocks: 7, ..split };
    assert_eq!(backward(&rows, DType::F32, &options(), false, capped)?.expect("a launch").blocks, 7);
    let forward_launch = forward(&rows, DType::F32, &options(), split)?.expect("a launch");
    assert_eq!(forward_launch, forward(&rows, DType::F32, &options(), whole)?.expect("a launch"));
    assert_eq!(forward_launch.blocks, 10);
    for bad in [
        LaunchShape { row_splits: 0, ..split },
        LaunchShape { row_splits: MAX_ROW_SPLITS + 1, ..split },
        LaunchShape { rows_per_block: 4, ..split },
    ] {
        let err = backward(&rows, DType::F32, &options(), false, bad).expect_err("a bad split").to_string();
        assert!(err.contains("row_splits") || err.contains("share a row"), "{bad:?}: {err}");
    }
    Ok(())
}

/// Bad split counts are refused and change nothing (a good one would change
/// every test's launches: the GPU table sets it, no test does).
#[cfg(feature = "testing")]
#[test]
fn bad_row_split_counts_are_refused() {
    for bad in [0, MAX_ROW_SPLITS + 1, 1000] {
        let err = set_row_splits(Some(bad)).expect_err("a bad split count").to_string();
        assert!(err.contains("shared by 1 to 64 blocks"), "{err}");
    }
    assert_eq!(LaunchShape::for_vocab(DType::BF16, 128_256).row_splits, 1);
}
