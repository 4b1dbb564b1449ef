"""DPO on CUDA: the Triton path (fused log-prob kernel, packed attention) against the torch path."""

from __future__ import annotations

import pytest
import torch

from bezoar.model import Tokenizer
from bezoar.train.config import DPOSection
from bezoar.train.dpo import DPOStage
from bezoar_kernels.dispatch import backend
from tests.train.dpo_helpers import documents, lora_grads, one_batch, policy, write_pairs
from tests.utils import assert_close

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_dpo_step_triton_matches_torch_on_cuda(tiny_dir, tmp_path, autocast):
    tokenizer = Tokenizer(tiny_dir)
    docs, cfg = documents(write_pairs(tmp_path / "pairs.jsonl", 9, seed=3), tokenizer)
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in one_batch(docs, cfg, tokenizer, 8).items()}
    results = {}
    for name in ("torch", "triton"):
        model = policy(tiny_dir).cuda()
        stage = DPOStage(DPOSection(beta=0.1))
        with backend(name), torch.autocast("cuda", dtype=autocast or torch.float32, enabled=autocast is not None):
            loss, metrics = stage.loss(model, batch)
            loss.backward()
        results[name] = (loss.detach().float(), metrics, lora_grads(model))
    (lt, mt, gt), (lk, mk, gk) = results["torch"], results["triton"]
    # fp32: kernels against references; bf16: both sides round the activations, in different places
    loss_tol, logp_rel, grad_tol = (1e-4, 1e-4, 1e-3) if autocast is None else (5e-2, 2e-2, 1e-1)
    assert_close(lk, lt, loss_tol, loss_tol, "loss")
    for key in ("logps/chosen", "logps/rejected"):
        assert mk[key] == pytest.approx(mt[key], rel=logp_rel), key
    for n in gt:
        scale = max(1e-6, float(gt[n].abs().max()))
        assert_close(gk[n], gt[n], grad_tol * scale, grad_tol, n)
