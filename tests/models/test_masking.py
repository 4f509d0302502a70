import pytest
import torch

from thuglm.models.masking import MissingGlmTokensError, glm_attention_mask, glm_mask_rule, glm_position_ids

MASK, GMASK, SOP = 90, 91, 92


def positions(ids, mask=None, strict=False):
    ids = torch.tensor([ids])
    mask = None if mask is None else torch.tensor([mask])
    return glm_position_ids(ids, mask, SOP, MASK, GMASK, strict=strict)[0].tolist()


def test_positions_freeze_at_gmask_and_blocks_count_from_sop():
    # a b [gMASK] <sop> x y
    assert positions([1, 2, GMASK, SOP, 5, 6]) == [[0, 1, 2, 2, 2, 2], [0, 0, 0, 1, 2, 3]]


def test_mask_token_used_when_no_gmask():
    assert positions([1, MASK, 2, SOP, 5]) == [[0, 1, 2, 1, 1], [0, 0, 0, 1, 2]]


def test_without_sop_the_whole_text_is_context():
    assert positions([1, 2, 3]) == [[0, 1, 2], [0, 0, 0]]


def test_left_padding_does_not_shift_positions():
    assert positions([0, 0, 1, GMASK, SOP, 5], mask=[0, 0, 1, 1, 1, 1]) == [[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 2]]


def test_packed_samples_keep_their_own_positions():
    alone_a = positions([GMASK, SOP, 5, 6])
    alone_b = positions([1, GMASK, SOP, 7])
    packed = positions([GMASK, SOP, 5, 6, 1, GMASK, SOP, 7, 0], mask=[1, 1, 1, 1, 2, 2, 2, 2, 0])
    assert [row[:4] for row in packed] == alone_a
    assert [row[4:8] for row in packed] == alone_b
    assert [row[8] for row in packed] == [0, 0]


def test_strict_error_explains_how_to_encode():
    with pytest.raises(MissingGlmTokensError, match=r"row 0 .*no <sop>.*\[gMASK\] <sop>"):
        positions([1, 2, 3], strict=True)
    with pytest.raises(MissingGlmTokensError, match=r"no \[gMASK\]"):
        positions([1, SOP, 3], strict=True)


def allowed(position_ids, mask=None, past=0):
    add = glm_attention_mask(torch.tensor([position_ids]), None if mask is None else torch.tensor([mask]), past,
                             torch.float32)
    return (add[0, 0] == 0).int().tolist()


def test_prefix_lm_mask_context_is_bidirectional_and_the_rest_causal():
    # a b [gMASK] <sop> x
    pos = [[0, 1, 2, 2, 2], [0, 0, 0, 1, 2]]
    assert allowed(pos) == [
        [1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
    ]


def test_packed_mask_is_block_diagonal_and_padding_sees_nothing():
    pos = [[0, 0, 0, 0, 1, 1], [0, 1, 2, 0, 0, 1]]
    grid = allowed(pos, mask=[1, 1, 1, 2, 2, 2])
    assert grid == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 1, 1, 1],
    ]
    padded = allowed([[0, 0, 0], [0, 0, 1]], mask=[0, 1, 1])
    # the padding query sees only itself, so no softmax row is empty (NaN under fp16 autocast)
    assert padded[0] == [1, 0, 0] and padded[1] == [0, 1, 0] and padded[2] == [0, 1, 1]


def test_padding_stays_finite_under_fp16_softmax():
    mask = glm_attention_mask(torch.tensor([[[0, 0, 1], [0, 0, 1]]]), torch.tensor([[0, 1, 1]]), 0, torch.float32)
    scores = torch.zeros(1, 1, 3, 3, dtype=torch.float16) + mask.to(torch.float16)  # fp32 minimum becomes -inf
    assert torch.isfinite(torch.softmax(scores.float(), dim=-1)).all()


def test_decoding_step_sees_all_past_tokens_of_its_row():
    grid = allowed([[2], [3]], mask=[0, 1, 1, 1, 1], past=4)
    assert grid == [[0, 1, 1, 1, 1]]


def test_flex_attention_sees_the_same_rule():
    """FlexAttention evaluates the rule through vmap; its dense view must equal the additive mask's."""
    from torch.nn.attention.flex_attention import create_mask

    position_ids = torch.tensor([[[0, 0, 0, 1, 1, 1, 2, 0], [0, 0, 1, 0, 0, 1, 2, 0]]] * 2)
    attention_mask = torch.tensor([[0, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    for past in (0, 3):
        keys = torch.cat([torch.ones(2, past, dtype=torch.long), attention_mask], 1)
        dense = glm_attention_mask(position_ids, keys, past, torch.float32)[:, 0] == 0
        flex = create_mask(glm_mask_rule(position_ids, keys, past), 2, 1, 8, past + 8, device="cpu")[:, 0]
        assert torch.equal(flex, dense)
