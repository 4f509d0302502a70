"""thuglm's sample layouts, and the measurement that shows why the tutorial's layout is wrong."""

import math

import torch

from thuglm.data import IGNORE_INDEX, causal_lm_sample, prompt_response_sample
from thuglm.models import ChatGLMConfig, ChatGLMForConditionalGeneration

GMASK, SOP, EOP = 64, 65, 66
ALPHABET = 64  # characters are ids 0..63


def test_prompt_response_sample_masks_the_prompt_exactly():
    sample = prompt_response_sample([1, 2, 3], [7, 8], GMASK, SOP, EOP)
    assert sample["input_ids"] == [1, 2, 3, GMASK, SOP, 7, 8, EOP]
    assert sample["labels"] == [IGNORE_INDEX] * 5 + [7, 8, EOP]


def test_causal_lm_sample_predicts_every_text_token_after_sop():
    sample = causal_lm_sample([5, 6, 7], GMASK, SOP, EOP)
    assert sample["input_ids"] == [GMASK, SOP, 5, 6, 7, EOP]
    assert sample["labels"] == [IGNORE_INDEX, IGNORE_INDEX, 5, 6, 7, EOP]


def tutorial_sample(text_ids):
    """The tutorial's encoding: tokenizer(text) gives `text [gMASK] <sop>`, and it trains with labels = input_ids."""
    ids = list(text_ids) + [GMASK, SOP]
    return {"input_ids": ids, "labels": list(ids)}


def character_loss_after_training(make_sample, steps=400, batch=32, length=24, seed=0) -> float:
    """Train a tiny ChatGLM on uniformly random characters; return the held-out loss on character targets.

    No model can beat ln(64) nats a character on such data unless it sees the character it predicts.
    """
    torch.manual_seed(seed)
    config = ChatGLMConfig(
        vocab_size=128, hidden_size=64, num_layers=1, num_attention_heads=2, inner_hidden_size=256,
        max_sequence_length=64, gmask_token_id=GMASK, bos_token_id=SOP, eos_token_id=EOP, mask_token_id=67,
        pad_token_id=68,
    )
    model = ChatGLMForConditionalGeneration(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def random_batch():
        samples = [make_sample(torch.randint(0, ALPHABET, (length,)).tolist()) for _ in range(batch)]
        return (torch.tensor([s["input_ids"] for s in samples]), torch.tensor([s["labels"] for s in samples]))

    for _ in range(steps):
        ids, labels = random_batch()
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    model.eval()
    with torch.no_grad():
        ids, labels = random_batch()  # fresh characters the model never saw
        logits = model(input_ids=ids).logits[:, :-1]
        targets = labels[:, 1:]
        is_character = (targets >= 0) & (targets < ALPHABET)
        return torch.nn.functional.cross_entropy(logits[is_character], targets[is_character]).item()


def test_tutorial_layout_leaks_the_future_and_thuglm_layout_does_not():
    floor = math.log(ALPHABET)  # 4.16 nats
    leaked = character_loss_after_training(tutorial_sample)
    honest = character_loss_after_training(lambda text: causal_lm_sample(text, GMASK, SOP, EOP))
    print(f"random characters, honest floor {floor:.2f} nats: tutorial layout {leaked:.2f}, thuglm layout {honest:.2f}")
    assert leaked < 0.25 * floor, "the tutorial layout should let the loss see the next character"
    assert honest >= 0.9 * floor, "thuglm's layout must not let any predicted character be seen"
