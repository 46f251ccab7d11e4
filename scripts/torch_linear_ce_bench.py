#!/usr/bin/env python3
"""PyTorch baselines for the linear cross-entropy (issue 5's GPU part), as a markdown table.

On the same device and inputs as our `gpu_table --linear`, forward+backward into hidden and weight of
  eager    F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=-100)
  compile  the same function under torch.compile
  liger    LigerFusedLinearCrossEntropyLoss (only if `liger_kernel` imports)
with the median time and the peak above the inputs (CUDA: the allocator's; CPU: the rise of the
process's peak RSS during one step, as `cargo bench --bench ce_table -- --linear --direct` reads
ours), and the size of the weight gradient, which our target adds 1 GiB to.

With --modes, instead: each way a linear loss is called in practice, timed as one call (forward,
and backward when anything wants a gradient), as `cargo bench --bench ce_table -- --linear` times ours:
  training     hidden and weight require grad
  evaluation   nothing does (torch.no_grad())
  frozen head  only hidden does (a frozen or LoRA output layer)
for eager, compile and F.linear_cross_entropy (where this PyTorch has it), and compile on the valid
rows alone (`hidden[labels != -100]`, as a PyTorch user can skip the ignored tokens' work, and
as our loss does inside). Every K-th label is ignored (--ignore-every K, 10 by default, 0 for none).

Usage (GPU machine):  python3 torch_linear_ce_bench.py --shape 8192x4096x128256 --dtype bf16
CPU smoke test:       python3 torch_linear_ce_bench.py --device cpu --shape 256x64x1000 --reps 2
CPU, by mode:         python3 torch_linear_ce_bench.py --device cpu --shape 4096x768x50257 --dtype f32 --modes
"""
import argparse

import torch
import torch.nn.functional as F

from torch_ce_bench import sync, timed  # the same timers as the logits benchmark, beside this file

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def matmul_ce(hidden, weight, labels):
    return F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=-100)


def linear_ce(hidden, weight, labels):
    return F.linear_cross_entropy(hidden, weight, labels, ignore_index=-100)


def on_valid_rows(fn):
    """`fn` on the rows whose label is not ignored: the same mean, without their products."""
    def call(hidden, weight, labels):
        keep = labels != -100
        return fn(hidden[keep], weight, labels[keep])

    return call


def modes_table(hidden, weight, labels, device, reps, warmup):
    impls = {"eager": matmul_ce, "compile": torch.compile(matmul_ce, dynamic=False)}
    if hasattr(F, "linear_cross_entropy"):
        impls["F.linear_cross_entropy"] = linear_ce
    impls["compile, valid rows"] = on_valid_rows(torch.compile(matmul_ce, dynamic=False))
    print("| mode | " + " | ".join(f"{name} ms" for name in impls) + " |")
    print("|---|" + "---:|" * len(impls))
    for mode, hidden_grad, weight_grad in [("training", True, True), ("evaluation", False, False),
                                           ("frozen head", True, False)]:
        h = hidden.detach().requires_grad_(hidden_grad)
        w = weight.detach().requires_grad_(weight_grad)
        cells = []
        for fn in impls.values():
            def call():
                h.grad = w.grad = None
                if hidden_grad or weight_grad:
                    fn(h, w, labels).backward()
                else:
                    with torch.no_grad():
                        fn(h, w, labels).item()

            cells.append(f"{timed(call, device, reps, warmup):.0f}")
        print(f"| {mode} | " + " | ".join(cells) + " |")


def rss_kib(field):
    """A KiB field of /proc/self/status (0 where unreadable)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_rise(step):
    """GiB by which one call of step() raises the process's peak RSS (Linux: clear_refs resets it)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    base = rss_kib("VmRSS:")
    step()
    return (rss_kib("VmHWM:") - base) / 2**20


def implementations():
    impls = {"eager": matmul_ce, "compile": torch.compile(matmul_ce, dynamic=False)}
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
        impls["liger"] = lambda h, w, y: liger(w, h, y)
    except Exception as err:  # not installed: say so once, measure the rest
        print(f"# liger: not available ({type(err).__name__}: {err})")
    return impls


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="8192x4096x128256", help="NxHxV")
    ap.add_argument("--dtype", default="bf16", choices=DTYPES)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--modes", action="store_true", help="time training, evaluation and a frozen head")
    ap.add_argument("--ignore-every", type=int, default=10, help="ignore every K-th label (0: none)")
    args = ap.parse_args()
    device = torch.device(args.device)
    n, h, v = (int(x) for x in args.shape.lower().split("x"))
    dtype = DTYPES[args.dtype]
    gen = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(n, h, generator=gen).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) * 0.02).to(device, dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=gen).to(device)
    if args.ignore_every > 0:
        labels[:: args.ignore_every] = -100
    if args.modes:
        share = f"1 in {args.ignore_every}" if args.ignore_every > 0 else "no"
        print(f"# {torch.__version__} on {device}, {torch.get_num_threads()} threads, N={n} H={h} V={v} {args.dtype},"
              f" {share} labels ignored")
        modes_table(hidden, weight, labels, device, args.reps, args.warmup)
        return
    weight_grad_gib = v * h * hidden.element_size() / 2**30
    print(f"# {torch.__version__} on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")
    print(f"# N={n} H={h} V={v} {args.dtype}: weight gradient {weight_grad_gib:.2f} GiB, target peak <= {weight_grad_gib + 1:.2f} GiB")
    impls = implementations()
    print("| implementation | fwd+bwd ms | peak extra GiB |")
    print("|---|---:|---:|")
    for name, fn in impls.items():
        def step():
            hidden.grad = weight.grad = None
            fn(hidden, weight, labels).backward()

        try:
            ms = timed(step, device, args.reps, args.warmup)
            peak = "-"
            if device.type == "cpu":
                hidden.grad = weight.grad = None
                rise = rss_rise(step)
                peak = "-" if rise is None else f"{rise:.2f} (RSS)"
            if device.type == "cuda":
                hidden.grad = weight.grad = None
                sync(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                step()
                sync(device)
                peak = f"{(torch.cuda.max_memory_allocated(device) - base) / 2**30:.2f}"
            print(f"| {name} | {ms:.2f} | {peak} |")
        except Exception as err:  # e.g. out of memory: report the cell, keep going
            print(f"| {name} | failed: {type(err).__name__}: {str(err).splitlines()[0][:80]} | - |")
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
