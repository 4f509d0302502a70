"""LoRA's fused dropout (training/lora_dropout.py) on a GPU: its bf16 results against the same mask applied by hand,
then the time of lora_A's product (forward and backward, compiled) after peft's dropout module, after none and
fused, and of each fused kernel, at ChatGLM-6B's input widths; with --sweep, each kernel's launch settings.

    python3 benchmarks/check_lora_dropout.py [--tokens 8192 512] [--sweep]

Prints one line per check and per shape; exits 1 when a result is off. Two times per variant: the device's (the
profiler's kernel durations: what a GPU-bound step, b16 compiled, pays) and the wall's (CUDA events around the
calls, host launches included: what a host-bound step, b1 eager, pays). At these sizes the wall time is mostly the
host's. The speed that counts is `thuglm train`'s (gpu_session.sh speed, parts `-log10-fused` against `-log10`):
this says where a difference comes from, and --sweep which `Launch` settings the kernels should ship with.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch
import triton
import triton.testing
from common import kernel_time
from torch.profiler import ProfilerActivity, profile

from thuglm.training.lora_dropout import (
    DropoutLinear,
    Launch,
    dropout_linear,
    forward_partials,
    input_grad,
    kept_mask,
    weight_grad_partials,
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


def wall_ms(step, repeats: int = 20) -> float:
    """Milliseconds a call of `step` takes from the host's side (launches included)."""
    for _ in range(3):
        step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def device_ms(step, repeats: int = 20) -> float:
    """Milliseconds of GPU kernels a call of `step` runs (the profiler's durations, the host's time left out)."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            step()
        torch.cuda.synchronize()
    return kernel_time(prof)[1] / repeats


def graph_ms(step) -> float:
    """Milliseconds of one call of `step`, replayed as a CUDA graph (no host launches): for the sweep's many
    settings, where a profiler session each would take longer than the kernels."""
    return triton.testing.do_bench_cudagraph(step, rep=5)


def forward_and_backward(module, x: torch.Tensor, grad: torch.Tensor):
    def step():
        with torch.autocast("cuda", torch.bfloat16):
            out = module(x)
        out.backward(grad)

    return step


def time_first_product(tokens: int, width: int, p: float) -> dict[str, tuple[float, float]]:
    """(device ms, wall ms) of lora_A's product alone (r8), forward and backward, compiled as thuglm compiles its
    layers: after peft's dropout, after none (dropout 0: the least the fused one can reach), and fused; then each
    fused kernel on its own (as a CUDA graph: device time; the wall time left out) and a copy of x."""
    x = torch.randn(tokens, width, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    grad = torch.randn(tokens, 8, dtype=torch.bfloat16, device="cuda")
    linear = torch.nn.Linear(width, 8, bias=False, device="cuda")
    variants = {"peft": torch.nn.Sequential(torch.nn.Dropout(p), linear), "dropout0": linear,
                "fused": DropoutLinear(linear, p)}
    times = {}
    for name, module in variants.items():
        step = forward_and_backward(torch.compile(module), x, grad)
        times[name] = (device_ms(step), wall_ms(step))
    weight = linear.weight.detach().to(torch.bfloat16)
    seed = torch.randint(0, 2**62, (1,), device="cuda", dtype=torch.int64)
    bits = forward_partials(x.detach(), weight, seed, p)[1]
    times["kernel forward"] = (graph_ms(lambda: forward_partials(x.detach(), weight, seed, p)), None)
    times["kernel dx"] = (graph_ms(lambda: input_grad(grad, weight, bits, p)), None)
    times["kernel dA"] = (graph_ms(lambda: weight_grad_partials(grad, x.detach(), bits, p)), None)
    times["copy of x (memory floor)"] = (graph_ms(lambda: x.detach().clone()), None)
    return times


def launch_settings(splits_reduction: bool) -> list[Launch]:
    """The settings --sweep tries: rows a program, warps, pipeline stages, and (for the kernels that split a
    reduction) how many programs the split aims at."""
    targets = (512, 1024, 2048) if splits_reduction else (Launch().programs,)
    return [Launch(rows, warps, stages, programs) for rows, warps, stages, programs
            in itertools.product((32, 64, 128), (2, 4, 8), (1, 2, 3), targets)]


def sweep_kernel(name: str, run, settings: list[Launch], same) -> list[tuple[float, Launch]]:
    """Each setting's ms for `run(setting)`, fastest first; a setting whose result is not the same as the default's
    (`same(result, reference)`) is reported and left out."""
    reference = run(Launch())
    timed = []
    for setting in settings:
        try:
            if not same(run(setting), reference):
                print(f"sweep {name} {setting}: a different result, left out")
                continue
            timed.append((graph_ms(lambda setting=setting: run(setting)), setting))
        except Exception as error:  # noqa: BLE001  (a setting Triton cannot build, e.g. out of shared memory)
            print(f"sweep {name} {setting}: {type(error).__name__}: {str(error).splitlines()[0][:120]}")
    return sorted(timed, key=lambda item: item[0])


def sweep_shape(tokens: int, width: int, p: float) -> dict[str, list[tuple[float, Launch]]]:
    """Every launch setting of each kernel at one adapter's shape (r8), timed, fastest first."""
    x = torch.randn(tokens, width, dtype=torch.bfloat16, device="cuda")
    weight = (torch.randn(8, width, device="cuda") / width**0.5).to(torch.bfloat16)
    grad = torch.randn(tokens, 8, dtype=torch.bfloat16, device="cuda")
    seed = torch.randint(0, 2**62, (1,), device="cuda", dtype=torch.int64)
    bits = forward_partials(x, weight, seed, p)[1]

    def same_sums(a: torch.Tensor, b: torch.Tensor) -> bool:  # partial sums split otherwise: their totals
        return torch.allclose(a.sum(0), b.sum(0), rtol=1e-3, atol=1e-3)

    kernels = {
        "forward": (lambda s: forward_partials(x, weight, seed, p, s), True,
                    lambda a, b: torch.equal(a[1], b[1]) and same_sums(a[0], b[0])),
        "dx": (lambda s: input_grad(grad, weight, bits, p, s), False,
               lambda a, b: torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-2)),
        "dA": (lambda s: weight_grad_partials(grad, x, bits, p, s), True, same_sums),
    }
    return {name: sweep_kernel(f"{name} [{tokens}, {width}]", run, launch_settings(splits_reduction), same)
            for name, (run, splits_reduction, same) in kernels.items()}


def sweep(tokens: int, p: float = 0.05) -> None:
    """Time every launch setting of the three kernels at both widths; then the setting that is fastest over a
    step's adapters (three of width 4,096, one of 16,384), against the default."""
    totals: dict[str, dict[Launch, float]] = {}
    for width in (4096, 16384):
        adapters = 3 if width == 4096 else 1  # query_key_value, dense, dense_h_to_4h; dense_4h_to_h
        for name, timed in sweep_shape(tokens, width, p).items():
            default = {setting: ms for ms, setting in timed}.get(Launch(), float("nan"))
            print(f"sweep {name} [{tokens}, {width}]: default {default:.4f} ms; fastest "
                  + "; ".join(f"{ms:.4f} ms {setting}" for ms, setting in timed[:3]))
            by_setting = totals.setdefault(name, {})
            for ms, setting in timed:
                by_setting[setting] = by_setting.get(setting, 0.0) + adapters * ms
    for name, by_setting in totals.items():
        best = min(by_setting, key=by_setting.get)
        print(f"sweep best {name} at {tokens} tokens (3 x width 4096 + 16384): {best} {by_setting[best]:.4f} ms "
              f"against the default's {by_setting.get(Launch(), float('nan')):.4f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 512], help="tokens a step (b16, b1 of 512)")
    parser.add_argument("--sweep", action="store_true", help="also time each kernel's launch settings")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # each line in the log as it comes: a part stopped by its cap keeps them
    ok = check_against_mask(1000, 4096, 8, 0.05)
    ok &= check_against_mask(4096, 16384, 16, 0.3)
    # ChatGLM-6B's four adapted linears: (input width, output width)
    for tokens in args.tokens:
        for width in (4096, 16384):  # the input widths of ChatGLM-6B's adapted linears
            times = time_first_product(tokens, width, 0.05)
            print(f"adapter [{tokens}, {width}] lora_A, dropout 0.05, device ms (wall ms): " + ", ".join(
                f"{name} {device:.3f}" + ("" if wall is None else f" ({wall:.3f})")
                for name, (device, wall) in times.items()))
    if args.sweep:  # at the most tokens a step: where the GPU, not the host, sets the pace
        sweep(max(args.tokens))
    print("lora dropout checks:", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
