"""A dense fp32 base under bf16 autocast: the residual stream stays fp32 while the sublayers return bf16."""

from __future__ import annotations

import pytest
import torch

from bezoar_kernels.dispatch import backend
from bezoar_kernels.rmsnorm import rms_norm_add, rms_norm_add_reference
from tests.utils import assert_close


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_rms_norm_add_takes_the_sum_in_the_wider_dtype(kernels):
    x = torch.randn(5, 37).to(torch.bfloat16).requires_grad_()
    residual = torch.randn(5, 37, requires_grad=True)
    weight = torch.rand(37) + 0.5
    with backend(kernels):
        y, s = rms_norm_add(x, residual, weight, 1e-6)
    y_ref, s_ref = rms_norm_add_reference(x.detach().float(), residual.detach(), weight, 1e-6)
    assert s.dtype == torch.float32 and y.dtype == torch.float32
    assert_close(s, s_ref, 0, 0, "s")
    assert_close(y, y_ref, 1e-6, 1e-6, "y")
    (y.sum() + s.sum()).backward()
    assert x.grad.dtype == torch.bfloat16 and residual.grad.dtype == torch.float32
    assert torch.isfinite(x.grad.float()).all() and residual.grad.abs().sum() > 0


def test_dense_fp32_model_with_lora_trains_under_bf16_autocast(tiny_dir):
    from bezoar.model import load
    from bezoar.model.lora import LoraConfig, apply_lora, lora_parameters

    model = load(tiny_dir, device="cpu", dtype="float32")
    apply_lora(model, LoraConfig(r=4, targets=["q_proj", "v_proj"]))
    model.train()
    ids = torch.randint(3, 500, (2, 11))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                 ids[:, 1:].reshape(-1))
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in lora_parameters(model)]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
