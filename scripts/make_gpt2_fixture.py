"""Writes tests/fixtures/gpt2_tiny/: a small GPT-2 made by transformers' GPT2LMHeadModel
(save_pretrained: model.safetensors beside config.json) and expected.safetensors, what
transformers computes from it in float64: logits, the masked mean cross-entropy, and the
gradients of that loss. tests/gpt2_fixture.rs holds the finetune_gpt2 example's model
against it.

    python3 -m venv /tmp/hfvenv && /tmp/hfvenv/bin/pip install torch transformers safetensors
    /tmp/hfvenv/bin/python scripts/make_gpt2_fixture.py

Deterministic for a given torch version (seeded); the versions used are stored in
expected.safetensors' metadata.
"""

import json
import pathlib

import safetensors.torch
import torch
import transformers

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "gpt2_tiny"

# 3 heads of 16 (not width / 64), a vocabulary that is not a multiple of anything, and a
# layer-norm epsilon other than GPT-2's 1e-5: each must come from config.json.
CONFIG = transformers.GPT2Config(
    vocab_size=211,
    n_positions=32,
    n_embd=48,
    n_layer=2,
    n_head=3,
    layer_norm_epsilon=1e-3,
    activation_function="gelu_new",
    tie_word_embeddings=True,
    bos_token_id=None,
    eos_token_id=None,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
)
BATCH, SEQ = 2, 16
# Gradients checked: the (tied) embedding, one attention weight, one bias, the final LayerNorm.
GRADIENTS = [
    "transformer.wte.weight",
    "transformer.wpe.weight",
    "transformer.h.0.attn.c_attn.weight",
    "transformer.h.1.attn.c_attn.bias",
    "transformer.h.1.mlp.c_proj.bias",
    "transformer.ln_f.weight",
    "transformer.ln_f.bias",
]


def main():
    torch.manual_seed(12)
    model = transformers.GPT2LMHeadModel(CONFIG).eval()
    # Non-trivial weights: matrices large enough for peaked logits, random biases, LayerNorm
    # gains away from 1.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name or name.startswith("transformer.ln_f"):
                p.copy_((1.0 + 0.2 * torch.randn_like(p)) if name.endswith("weight") else 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    OUT.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(OUT, safe_serialization=True)
    (OUT / "generation_config.json").unlink(missing_ok=True)

    # The reference in float64, from exactly the f32 weights saved.
    model = transformers.GPT2LMHeadModel.from_pretrained(OUT, dtype=torch.float64, attn_implementation="eager").eval()
    tokens = torch.randint(0, CONFIG.vocab_size, (BATCH, SEQ + 1))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    mask = torch.ones(BATCH, SEQ, dtype=torch.uint8)
    mask[0, :5] = 0  # a prompt
    mask[1, 11:] = 0  # padding
    mask[1, 2] = 0
    logits = model(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, CONFIG.vocab_size), labels.masked_fill(mask == 0, -100).reshape(-1), ignore_index=-100
    )
    loss.backward()
    params = dict(model.named_parameters())
    expected = {
        "inputs": inputs.to(torch.int64).contiguous(),
        "labels": labels.to(torch.int64).contiguous(),
        "mask": mask.contiguous(),
        "logits": logits.detach().to(torch.float64).contiguous(),
        "loss": loss.detach().reshape(()),
    }
    for name in GRADIENTS:
        expected["grad." + name.removeprefix("transformer.")] = params[name].grad.detach().contiguous()
    metadata = {"torch": torch.__version__, "transformers": transformers.__version__}
    safetensors.torch.save_file(expected, OUT / "expected.safetensors", metadata=metadata)
    files = sorted(p.name for p in OUT.iterdir())
    size = sum(p.stat().st_size for p in OUT.iterdir())
    print(json.dumps({"files": files, "bytes": size, "loss": loss.item(), **metadata}))


if __name__ == "__main__":
    main()
