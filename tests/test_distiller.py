"""The module distill.py trains (training/distiller.py): the teacher pass keeps no activations and the frozen
backbone gets no gradients."""

from __future__ import annotations

import torch


def _model(img_size=48):
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=img_size, patch_size=8, depth=2, embed_dim=64, num_heads=2
    )


def test_distill_step_keeps_no_teacher_activations_and_no_backbone_gradients():
    import tocom_hub
    from tocom_hub.core.bank.module import ToComBank
    from tocom_hub.training.distiller import Distiller, kd_loss

    torch.manual_seed(0)
    model = _model(32)
    tocom_hub.patch(model, method="tome", prop_attn=True)
    model.requires_grad_(False)  # what training/distill.py does before plugging the bank in
    bank = ToComBank.for_model(model, r_max=2, rank=2, method="tome")
    with torch.no_grad():
        for a in bank.lora_B.values():
            a.normal_(0.0, 0.02)
    tocom_hub.apply(model, 0, 0, bank=bank, merge=False)
    distiller = Distiller(model, bank).train()
    x = torch.randn(2, 3, 32, 32)

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        teacher = distiller.teacher(x, 0, 2)
    assert saved == [] and teacher.grad_fn is None  # the teacher pass keeps no activations
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        student = distiller.student(x, 0, 2)
    assert saved  # (the student does, for the bank's gradients)
    kd_loss(student, teacher, "logits").backward()
    assert all(p.grad is None for p in model.parameters())  # frozen: no weight gradients computed
    assert all(p.grad is not None for p in bank.parameters())
    assert any(p.grad.abs().max() > 0 for p in bank.parameters())
