"""The GPU paths of the trainer (skipped without CUDA): flex_attention / flash-attention document
masking against each document run alone, in bf16, with and without a sliding window."""

import pytest
import torch

from cerbero_ray.models import tiny
from cerbero_ray.train.modeling import pick_attention

pytestmark = pytest.mark.gpu
LENGTHS = [70, 190, 30, 222]


@pytest.mark.parametrize("window", [None, 64])
def test_packed_logits_equal_each_document_alone_on_gpu(window):
    model = (
        tiny(overrides={"sliding_window": window, "hidden_size": 128, "num_attention_heads": 4})
        .cuda()
        .bfloat16()
        .eval()
    )
    model.config._attn_implementation = pick_attention("auto", cuda=True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 32000, (1, sum(LENGTHS)), generator=g).cuda()
    pos = torch.cat([torch.arange(n) for n in LENGTHS]).unsqueeze(0).cuda()
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0].float()
        at = 0
        for n in LENGTHS:
            model.config._attn_implementation = "sdpa"
            alone = model(input_ids=ids[:, at : at + n], use_cache=False).logits[0].float()
            model.config._attn_implementation = pick_attention("auto", cuda=True)
            torch.testing.assert_close(packed[at : at + n], alone, rtol=2e-2, atol=2e-2)
            at += n
