"""compiled_or_eager: a compiler failure costs speed, not the run."""

import logging

import pytest
import torch

from thuglm.models import compiling


def scaled_softmax(x: torch.Tensor) -> torch.Tensor:
    return (x * 2).softmax(dim=-1)


@pytest.fixture
def failing_compiler(monkeypatch):
    """torch.compile as on a GPU without Triton: compiling succeeds lazily, the first call raises."""
    calls = []

    def compile_that_fails(fn, **options):
        def call(*args, **kwargs):
            calls.append(fn)
            raise RuntimeError("Cannot find a working triton installation.\nmore detail")
        return call

    monkeypatch.setattr(compiling, "_compiled", {})
    monkeypatch.setattr(compiling, "_guarded", {})
    monkeypatch.setattr(compiling.torch, "compile", compile_that_fails)
    return calls


def test_a_function_that_fails_to_compile_runs_as_written_with_one_warning(failing_compiler, caplog):
    x = torch.randn(3, 5)
    fused = compiling.compiled_or_eager(scaled_softmax)
    with caplog.at_level(logging.WARNING, logger=compiling.__name__):
        first, second = fused(x), fused(x)
    torch.testing.assert_close(first, scaled_softmax(x))
    torch.testing.assert_close(second, scaled_softmax(x))
    assert failing_compiler == [scaled_softmax]  # tried once, not on every call
    [record] = caplog.records
    assert "compiling scaled_softmax failed (RuntimeError: Cannot find a working triton installation.)" in record.message
    assert compiling.compiled_or_eager(scaled_softmax) is fused  # one wrapper a function, shared by its callers


def test_running_out_of_memory_is_not_taken_for_a_compiler_failure(monkeypatch):
    def compile_that_runs_out(fn, **options):
        def call(*args, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory")
        return call

    monkeypatch.setattr(compiling, "_compiled", {})
    monkeypatch.setattr(compiling, "_guarded", {})
    monkeypatch.setattr(compiling.torch, "compile", compile_that_runs_out)
    with pytest.raises(torch.OutOfMemoryError):
        compiling.compiled_or_eager(scaled_softmax)(torch.randn(2, 2))


def test_the_loss_on_a_gpu_falls_back_to_its_written_arithmetic(failing_compiler):
    """The chunked loss's fused arithmetic (`losses._fused_on` on CUDA) through the fallback: same loss, same
    gradients as the arithmetic as written (`_fused_on` on a CPU)."""
    from thuglm.models import losses

    hidden = torch.randn(9, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    labels = torch.randint(0, 40, (1, 9))
    written = losses.linear_cross_entropy(hidden[None], weight, labels, chunk_tokens=4)
    written_grads = torch.autograd.grad(written, [hidden, weight])
    gpu_path = losses._fused_on(torch.device("cuda"), losses._token_losses_and_logit_grads)
    assert gpu_path is not losses._token_losses_and_logit_grads
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(losses, "_fused_on", lambda device, fn: compiling.compiled_or_eager(fn))
        fallen_back = losses.linear_cross_entropy(hidden[None], weight, labels, chunk_tokens=4)
        fallen_back_grads = torch.autograd.grad(fallen_back, [hidden, weight])
    torch.testing.assert_close(fallen_back, written)
    for a, e in zip(fallen_back_grads, written_grads):
        torch.testing.assert_close(a, e)
    assert failing_compiler  # the compiled form was tried first
