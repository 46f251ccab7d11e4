"""PyTorch's values for tests/weights.rs: class weights (F.cross_entropy's
`weight`), label smoothing, and per-token loss weights (applied to the
per-token losses, the mean divided by the summed weights of the valid tokens).
Run with any PyTorch: python3 scripts/weighted_ce_literals.py"""
import torch
import torch.nn.functional as F

torch.set_printoptions(precision=17)
x0 = torch.tensor([[0.5, -1.25, 2.0, 0.75, -0.5],
                   [1.5, 0.25, -2.0, 3.0, 0.0],
                   [-0.75, 1.0, 0.5, -1.5, 2.25],
                   [2.5, -0.25, 1.25, 0.0, -3.0]], dtype=torch.float64)
y = torch.tensor([1, 4, -100, 0])
c = torch.tensor([0.5, 2.0, 1.0, 0.0, 1.5], dtype=torch.float64)
t = torch.tensor([1.0, 0.5, 3.0, 2.0], dtype=torch.float64)


def show(name, f):
    x = x0.clone().requires_grad_(True)
    loss = f(x)
    grad, = torch.autograd.grad(loss.sum(), x)
    print(f"// {name}")
    print("loss", [float(v) for v in loss.detach().flatten()])
    print("grad", [float(v) for v in grad.flatten()])


show("class weights, mean", lambda x: F.cross_entropy(x, y, weight=c))
show("class weights, sum", lambda x: F.cross_entropy(x, y, weight=c, reduction="sum"))
show("class weights, none", lambda x: F.cross_entropy(x, y, weight=c, reduction="none"))
show("class weights + smoothing 0.1, mean", lambda x: F.cross_entropy(x, y, weight=c, label_smoothing=0.1))
show("class weights + smoothing 0.1, none", lambda x: F.cross_entropy(x, y, weight=c, label_smoothing=0.1, reduction="none"))


def token_weighted(x):
    per_token = F.cross_entropy(x, y, weight=c, label_smoothing=0.1, reduction="none") * t
    valid = (y != -100).double()
    return per_token.sum() / (t * c[y.clamp(min=0)] * valid).sum()


show("loss weights + class weights + smoothing 0.1, mean", token_weighted)


def token_only(x):
    per_token = F.cross_entropy(x, y, reduction="none") * t
    return per_token.sum() / (t * (y != -100).double()).sum()


show("loss weights alone, mean", token_only)
