#!/usr/bin/env python3
"""PyTorch + transformers' side of the main job: GPT-2 124M (transformers' GPT2Config()
defaults, random weights, seeded; --layers/--width/--heads for finetune_gpt2's smaller models)
trained with AdamW in f32 on batches of random tokens, and the tokens/s over the timed steps, on a
GPU or with --device cpu (--threads: torch.set_num_threads). It also saves that model with
save_pretrained (model.safetensors beside config.json) into --save, for `finetune_gpt2 --weights DIR` to train the same model, so that
both run on the same card in one call (scripts/gpu-check.sh):

    python3 scripts/torch_gpt2_train_bench.py --save /tmp/gpt2-124m --batch 8 --seq 512 --steps 12
    gpu-bin/finetune_gpt2 --device cuda --weights /tmp/gpt2-124m --batch 8 --seq 512 --accum 1 ...

Eager, f32, no dropout (as our example trains), the loss transformers computes from `labels`
(its mean over the sequence's next tokens). Timed: every step after --warmup, between CUDA
synchronisations; tokens per step = batch x seq.
"""
import argparse
import time

import torch
import transformers


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--layers", type=int, default=12, help="n_layer (finetune_gpt2 --layers)")
    ap.add_argument("--width", type=int, default=768, help="n_embd (finetune_gpt2 --width)")
    ap.add_argument("--heads", type=int, default=12, help="n_head (finetune_gpt2 --heads)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    ap.add_argument("--save", help="save_pretrained the model here first")
    ap.add_argument("--tf32", action="store_true",
                    help="f32 matmuls in TF32 (torch.set_float32_matmul_precision('high')), as finetune_gpt2 --tf32")
    args = ap.parse_args()
    if args.tf32:
        torch.set_float32_matmul_precision("high")
    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = transformers.GPT2Config(
        n_layer=args.layers, n_embd=args.width, n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    model = transformers.GPT2LMHeadModel(config)
    if args.save:
        model.save_pretrained(args.save, safe_serialization=True)
    model = model.to(device).train()
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    tokens = torch.randint(0, config.vocab_size, (args.steps + args.warmup, args.batch, args.seq), device=device)
    times = []
    for step in range(args.steps + args.warmup):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = model(input_ids=tokens[step], labels=tokens[step])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    per_step = sum(times) / len(times)
    peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else "-"
    print(
        f"PyTorch {torch.__version__} + transformers {transformers.__version__}: GPT-2 {params / 1e6:.0f}M f32"
        f"{' (matmuls in TF32)' if args.tf32 else ''}, "
        f"batch {args.batch} x {args.seq}, AdamW: {per_step * 1e3:.0f} ms/step, "
        f"{args.batch * args.seq / per_step:.0f} tokens/s over {len(times)} steps; peak {peak}"
    )


if __name__ == "__main__":
    main()
