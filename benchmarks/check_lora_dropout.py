"""LoRA's fused dropout (training/lora_dropout.py) on a GPU: its bf16 results against the same mask applied by hand,
then the time of lora_A's product (forward and backward, compiled) after peft's dropout module, after none and
fused, and of each fused kernel, at ChatGLM-6B's input widths.

    python3 benchmarks/check_lora_dropout.py [--tokens 8192 512]

Prints one line per check and per shape; exits 1 when a result is off. The speed that counts is `thuglm train`'s
(gpu_session.sh speed, parts `-log10-fused` against `-log10`): this says where a difference comes from.
"""

from __future__ import annotations

import argparse
import sys

import torch

from thuglm.training.lora_dropout import (
    DropoutLinear,
    dropout_linear,
    dropout_linear_input_grad,
    dropout_linear_weight_grad,
    kept_mask,
)


def check_against_mask(tokens: int, width: int, rank: int, p: float) -> bool:
    x = torch.randn(tokens, width, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    weight = (torch.randn(rank, width, device="cuda") / width**0.5).to(torch.bfloat16).requires_grad_()
    seed = torch.randint(0, 2**62, (1,), device="cuda", dtype=torch.int64)
    out, bits = dropout_linear(x, weight, seed, p)
    grad = torch.randn_like(out)
    out.backward(grad)
    keep = kept_mask(bits)
    dropped = x.detach().float() * keep / (1 - p)
    expected = {"out": dropped @ weight.detach().float().T, "dx": (grad.float() @ weight.detach().float()) * keep / (1 - p),
                "dA": grad.float().T @ dropped}
    got = {"out": out.float(), "dx": x.grad.float(), "dA": weight.grad.float()}
    ok = True
    for name, want in expected.items():
        error = ((got[name] - want).norm() / want.norm()).item()
        ok &= error < 1e-2
        print(f"check {name} [{tokens}, {width}] r{rank} p{p}: relative error {error:.2e}")
    rate = keep.float().mean().item()
    ok &= abs(rate - (1 - p)) < 0.01
    print(f"check kept share {rate:.4f} (expected {1 - p:.4f})")
    return ok


def milliseconds(step, repeats: int = 20) -> float:
    for _ in range(3):
        step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def forward_and_backward(module, x: torch.Tensor, grad: torch.Tensor):
    def step():
        with torch.autocast("cuda", torch.bfloat16):
            out = module(x)
        out.backward(grad)

    return step


def time_first_product(tokens: int, width: int, p: float) -> dict[str, float]:
    """Milliseconds of lora_A's product alone (r8), forward and backward, compiled as thuglm compiles its layers:
    after peft's dropout, after none (dropout 0: the least the fused one can reach), and fused; then each fused
    kernel on its own."""
    x = torch.randn(tokens, width, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    grad = torch.randn(tokens, 8, dtype=torch.bfloat16, device="cuda")
    linear = torch.nn.Linear(width, 8, bias=False, device="cuda")
    variants = {"peft": torch.nn.Sequential(torch.nn.Dropout(p), linear), "dropout0": linear,
                "fused": DropoutLinear(linear, p)}
    times = {name: milliseconds(forward_and_backward(torch.compile(module), x, grad))
             for name, module in variants.items()}
    weight = linear.weight.detach().to(torch.bfloat16)
    seed = torch.randint(0, 2**62, (1,), device="cuda", dtype=torch.int64)
    bits = dropout_linear(x.detach(), weight, seed, p)[1]
    times["kernel forward"] = milliseconds(lambda: dropout_linear(x.detach(), weight, seed, p))
    times["kernel dx"] = milliseconds(lambda: dropout_linear_input_grad(grad, weight, bits, p))
    times["kernel dA"] = milliseconds(lambda: dropout_linear_weight_grad(grad, x.detach(), bits, p))
    times["copy of x (memory floor)"] = milliseconds(lambda: x.detach().clone())
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 512], help="tokens a step (b16, b1 of 512)")
    args = parser.parse_args()
    ok = check_against_mask(1000, 4096, 8, 0.05)
    ok &= check_against_mask(4096, 16384, 16, 0.3)
    # ChatGLM-6B's four adapted linears: (input width, output width)
    for tokens in args.tokens:
        for width in (4096, 16384):  # the input widths of ChatGLM-6B's adapted linears
            times = time_first_product(tokens, width, 0.05)
            print(f"adapter [{tokens}, {width}] lora_A, dropout 0.05, ms: "
                  + ", ".join(f"{name} {value:.3f}" for name, value in times.items()))
    print("lora dropout checks:", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
