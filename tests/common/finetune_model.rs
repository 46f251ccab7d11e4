// The `finetune_gpt2` example's model and training step, as the example's
// modules: what the tests of the example share, written once. Included at a
// test crate's root (`include!`), not declared as a module: the example's
// modules name each other from the crate root (`crate::bias`, ...), and
// `#[path]` here is relative to this file. A test crate declares the other
// modules it needs (`cli`, `sampling`, ...) itself. Not every test crate
// calls every item, hence `dead_code`.

#[path = "../../examples/finetune_gpt2/bias.rs"]
#[allow(dead_code)]
mod bias;
#[path = "../../examples/finetune_gpt2/block.rs"]
#[allow(dead_code)]
mod block;
#[path = "../../examples/finetune_gpt2/checkpoint.rs"]
#[allow(dead_code)]
mod checkpoint;
#[path = "../../examples/finetune_gpt2/column_sums.rs"]
#[allow(dead_code)]
mod column_sums;
#[path = "../../examples/finetune_gpt2/embedding.rs"]
#[allow(dead_code)]
mod embedding;
#[path = "../../examples/finetune_gpt2/gelu.rs"]
#[allow(dead_code)]
mod gelu;
#[path = "../../examples/finetune_gpt2/gpt2.rs"]
#[allow(dead_code)]
mod gpt2;
#[path = "../../examples/finetune_gpt2/layer_norm.rs"]
#[allow(dead_code)]
mod layer_norm;
#[path = "../../examples/finetune_gpt2/rng.rs"]
#[allow(dead_code)]
mod rng;
#[path = "../../examples/finetune_gpt2/softmax.rs"]
#[allow(dead_code)]
mod softmax;
#[path = "../../examples/finetune_gpt2/storage.rs"]
#[allow(dead_code)]
mod storage;
#[path = "../../examples/finetune_gpt2/sum_squares.rs"]
#[allow(dead_code)]
mod sum_squares;
#[path = "../../examples/finetune_gpt2/train.rs"]
#[allow(dead_code)]
mod train;
