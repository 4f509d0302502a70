"""The chunked linear + cross-entropy loss equals the plain lm_head + ForCausalLMLoss path (fp32, 1e-5)."""

import math

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from thuglm.models.losses import IGNORE_INDEX, default_chunk_tokens, linear_cross_entropy, perplexity


def plain_loss(hidden, weight, labels, num_items_in_batch=None):
    return ForCausalLMLoss(hidden @ weight.T, labels, weight.shape[0], num_items_in_batch=num_items_in_batch)


def make(batch=3, seq=11, hidden=16, vocab=50, seed=0):
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq, hidden, generator=generator, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=generator, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, seq), generator=generator)
    labels[0, :4] = -100  # a prompt
    labels[2, -3:] = -100  # padding
    return h, w, labels


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("chunk_tokens", [1, 4, 7, 64])
@pytest.mark.parametrize("num_items_in_batch", [None, 20])
def test_loss_and_gradients_equal_the_plain_path(chunk_tokens, num_items_in_batch):
    h, w, labels = make()
    expected = plain_loss(h, w, labels, num_items_in_batch)
    actual = linear_cross_entropy(h, w, labels, num_items_in_batch, chunk_tokens=chunk_tokens)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    for a, e in zip(grads(actual * 3.0, h, w), grads(expected * 3.0, h, w)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_frozen_weight_gets_no_gradient_and_hidden_still_does():
    h, w, labels = make()
    w = w.detach()
    (actual,) = grads(linear_cross_entropy(h, w, labels, chunk_tokens=5), h)
    (expected,) = grads(plain_loss(h, w, labels), h)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weight_trained", [False, True])
def test_under_autocast_fp32_hidden_states_and_a_bf16_weight_give_autocast_s_loss_and_gradients(weight_trained):
    """What a bf16 run on a GPU hands the loss: the final layer norm's fp32 output (autocast runs norms in fp32) and
    the bf16 lm_head weight. The loss's matmuls must take autocast's dtype as the plain path does."""
    h, w, labels = make(vocab=300, hidden=32)
    w = w.detach().to(torch.bfloat16).requires_grad_(weight_trained)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = linear_cross_entropy(h, w, labels, chunk_tokens=4)
        expected = plain_loss(h, w, labels)
    tensors = (h, w) if weight_trained else (h,)
    torch.testing.assert_close(actual, expected.float(), rtol=1e-3, atol=1e-3)
    for a, e in zip(grads(actual, *tensors), grads(expected, *tensors)):
        assert a.dtype == e.dtype
        torch.testing.assert_close(a, e, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compiled_chunk_arithmetic_a_gpu_runs_gives_the_written_out_loss_and_gradients(monkeypatch, dtype):
    """On a GPU each chunk's softmax, loss and logit gradient run compiled (`_fused_on`); here the same compilation on
    the CPU (inductor's CPU backend) against the code as written, chunks of two lengths (one graph, dynamic)."""
    from thuglm.models import losses

    h, w, labels = make(vocab=300, hidden=32)
    h, w = h.detach().to(dtype).requires_grad_(), w.detach().to(dtype).requires_grad_()
    written = linear_cross_entropy(h, w, labels, chunk_tokens=8)
    written_grads = grads(written, h, w)
    compiled: dict = {}
    monkeypatch.setattr(losses, "_fused_on", lambda device, fn: compiled.setdefault(
        fn.__name__, torch.compile(fn, dynamic=True)))
    fused = linear_cross_entropy(h, w, labels, chunk_tokens=8)  # 33 tokens: four chunks of 8, one of 1
    assert set(compiled) == {"_token_losses", "_token_losses_and_logit_grads"}
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(fused, written, **tolerance)
    for a, e in zip(grads(fused, h, w), written_grads):
        assert a.dtype == e.dtype == dtype
        torch.testing.assert_close(a, e, **tolerance)
    with torch.no_grad():  # evaluation: the losses alone
        torch.testing.assert_close(linear_cross_entropy(h, w, labels, chunk_tokens=8), written.detach(), **tolerance)


def test_default_chunk_bounds_the_fp32_logits():
    assert default_chunk_tokens(130528, 512) == 32  # batch 1: a sixteenth of the tokens, 16 MB
    assert default_chunk_tokens(130528, 16384) == 512  # large batches: 256 MB of fp32 logits
    assert default_chunk_tokens(3840, 1536) == 1024  # a small vocabulary: 16 MB chunks


def test_model_trains_on_the_same_loss_without_logits(model):
    ids = torch.randint(5, 100, (2, 12))
    ids[:, 3], ids[:, 4] = model.config.gmask_token_id, model.config.bos_token_id
    labels = ids.clone()
    labels[:, :4] = -100
    model.eval()
    reference = model(input_ids=ids, labels=labels)
    reference_grads = torch.autograd.grad(reference.loss, [model.transformer.layers[0].mlp.dense_h_to_4h.weight,
                                                            model.lm_head.weight])
    model.train()  # the tiny model has no dropout: train and eval compute the same function
    fused = model(input_ids=ids, labels=labels)
    assert fused.logits is None
    fused_grads = torch.autograd.grad(fused.loss, [model.transformer.layers[0].mlp.dense_h_to_4h.weight,
                                                    model.lm_head.weight])
    torch.testing.assert_close(fused.loss, reference.loss, rtol=1e-5, atol=1e-5)
    for a, e in zip(fused_grads, reference_grads):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    assert model(input_ids=ids, labels=labels, skip_logits=False).logits.shape == (2, 12, model.config.vocab_size)


def test_perplexity_is_the_exponential_of_the_loss_and_infinite_past_a_float():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert perplexity(1000.0) == math.inf  # math.exp would raise OverflowError


def test_one_ignore_index_everywhere():
    import thuglm.data
    import thuglm.data.collator
    import thuglm.data.processing
    import thuglm.inference.evaluation

    assert IGNORE_INDEX == torch.nn.CrossEntropyLoss().ignore_index
    for module in (thuglm.data, thuglm.data.collator, thuglm.data.processing, thuglm.inference.evaluation):
        assert module.IGNORE_INDEX is IGNORE_INDEX
