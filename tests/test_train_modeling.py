"""Document masking and the loss: a packed row must behave exactly like its documents run alone."""

import pytest
import torch
import torch.nn.functional as F

from cerbero_ray.data.packing import IGNORE_INDEX
from cerbero_ray.models import tiny
from cerbero_ray.train.modeling import PackedCausalLM, pick_attention

LENGTHS = [7, 19, 3, 11]  # 40 tokens: four documents in one row


def packed_row(vocab=32000, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (1, sum(LENGTHS)), generator=g)
    pos = torch.cat([torch.arange(n) for n in LENGTHS]).unsqueeze(0)
    return ids, pos


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("window", [None, 4])
def test_packed_logits_equal_each_document_alone(attn, window):
    model = tiny(overrides={"sliding_window": window}).eval()
    model.config._attn_implementation = attn
    ids, pos = packed_row()
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
        at = 0
        for n in LENGTHS:
            alone = model(input_ids=ids[:, at : at + n], use_cache=False).logits[0]
            torch.testing.assert_close(packed[at : at + n], alone, rtol=1e-5, atol=1e-5)
            at += n


def test_the_sliding_window_changes_long_documents():
    """The window test above would pass vacuously if the window were ignored: it must bite."""
    ids, pos = packed_row()
    outs = []
    for window in (None, 4):
        model = tiny(overrides={"sliding_window": window}).eval()
        with torch.no_grad():
            outs.append(model(input_ids=ids[:, 7:26], use_cache=False).logits)
    assert not torch.allclose(outs[0][:, 5:], outs[1][:, 5:])
    torch.testing.assert_close(outs[0][:, :4], outs[1][:, :4])


def test_without_positions_documents_would_attend_to_each_other():
    model = tiny().eval()
    ids, pos = packed_row()
    with torch.no_grad():
        masked = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        plain = model(input_ids=ids, use_cache=False).logits
    assert not torch.allclose(masked[:, 7:], plain[:, 7:])


@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_chunked_loss_equals_full_cross_entropy(chunk):
    torch.manual_seed(0)
    model = tiny()
    ids, pos = packed_row()
    labels = ids.clone()
    labels[0, :10] = IGNORE_INDEX
    labels[0, [7, 26, 29]] = IGNORE_INDEX  # each document's first label, as the packer writes them
    full = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    ref = F.cross_entropy(full[0, :-1], labels[0, 1:], ignore_index=IGNORE_INDEX, reduction="sum")
    ref.backward()
    ref_grad = model.lm_head.weight.grad.clone()
    model.zero_grad()
    wrapped = PackedCausalLM(model, loss_chunk=chunk)
    loss, n = wrapped(ids, labels, pos)
    loss.backward()
    assert n.item() == int((labels[0, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(model.lm_head.weight.grad, ref_grad, rtol=1e-4, atol=1e-6)


def test_no_loss_tokens_gives_zero_and_still_backpropagates():
    model = tiny()
    ids, pos = packed_row()
    loss, n = PackedCausalLM(model)(ids, torch.full_like(ids, IGNORE_INDEX), pos)
    loss.backward()
    assert n.item() == 0 and loss.item() == 0.0


def test_pick_attention():
    assert pick_attention("auto", cuda=False) == "sdpa"
    assert pick_attention("auto", cuda=True, micro_batch=2) == "flex_attention"
    with pytest.raises(ValueError, match="micro_batch_size=1"):
        pick_attention("flash_attention_2", cuda=True, micro_batch=2)
    assert pick_attention("auto", cuda=True) in ("flash_attention_2", "flex_attention")
    with pytest.raises(ValueError, match="train.attention"):
        pick_attention("flash", cuda=False)
    with pytest.raises(ValueError, match="flex_attention"):
        pick_attention("flex_attention", cuda=False)
