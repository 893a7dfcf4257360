"""Document-masked attention in bf16 (the attention the trainer picks: flex_attention / flash
attention on CUDA, SDPA with a block mask on CPU) against each document run alone, with and
without a sliding window; on CPU in the default tier, on CUDA in the ``gpu`` tier."""

import pytest
import torch

from cerbero_ray.models import tiny
from cerbero_ray.train.modeling import pick_attention
from conftest import DEVICES

LENGTHS = [70, 190, 30, 222]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", [None, 64])
def test_packed_bf16_logits_equal_each_document_alone(window, device):
    cuda = device == "cuda"
    model = (
        tiny(overrides={"sliding_window": window, "hidden_size": 128, "num_attention_heads": 4})
        .to(device)
        .bfloat16()
        .eval()
    )
    model.config._attn_implementation = pick_attention("auto", cuda=cuda)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 32000, (1, sum(LENGTHS)), generator=g).to(device)
    pos = torch.cat([torch.arange(n) for n in LENGTHS]).unsqueeze(0).to(device)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0].float()
        at = 0
        for n in LENGTHS:
            model.config._attn_implementation = "sdpa"
            alone = model(input_ids=ids[:, at : at + n], use_cache=False).logits[0].float()
            model.config._attn_implementation = pick_attention("auto", cuda=cuda)
            torch.testing.assert_close(packed[at : at + n], alone, rtol=2e-2, atol=2e-2)
            at += n
