"""AdaptFormer (tocom_hub/tools/adaptformer.py) against a hand-written Eq. 10 forward."""

from __future__ import annotations

import torch


def test_adaptformer_matches_eq10_reference():
    """Eq. 10 by hand on an unpatched timm block vs the hooks, plain and with ToMe (r=0 ≡ timm)."""
    from timm.models.vision_transformer import VisionTransformer

    import tocom_hub
    from tocom_hub.tools.adaptformer import AdaptFormer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5).eval()
    adapters = AdaptFormer.for_model(model, bottleneck=4, scale=0.5)
    with torch.no_grad():
        for a in adapters.adapters:
            a.up.weight.normal_()
            a.up.bias.normal_()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        t = model.patch_embed(x)
        t = model._pos_embed(t)
        for blk, ad in zip(model.blocks, adapters.adapters):
            t = t + blk.attn(blk.norm1(t))
            t = t + blk.mlp(blk.norm2(t)) + 0.5 * ad.up(torch.relu(ad.down(t)))
        ref = model.forward_head(model.norm(t))
        plain = model(x)
        adapters.attach(model)
        hooked = model(x)
        tocom_hub.patch(model)
        patched = model(x)
        tocom_hub.set_r(model, 3)
        merged = model(x)  # runs (token count changes inside the blocks)
        adapters.detach(model)
        tocom_hub.set_r(model, 0)
        back = model(x)
    assert (hooked - ref).abs().max() < 1e-5
    assert (patched - ref).abs().max() < 1e-5
    assert (hooked - plain).abs().max() > 1e-3 and merged.shape == ref.shape
    assert (back - plain).abs().max() < 1e-5


def test_adaptformer_hooks_are_per_thread_and_copyable():
    """Two threads running a merged, adapted model at once get the serial outputs (the captured MLP input is
    the calling thread's own); a deep copy of the adapted model gives the same outputs."""
    import copy
    import threading

    from timm.models.vision_transformer import VisionTransformer

    import tocom_hub
    from tocom_hub.tools.adaptformer import AdaptFormer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=5).eval()
    adapters = AdaptFormer.for_model(model, bottleneck=4, scale=0.5)
    with torch.no_grad():
        for a in adapters.adapters:
            a.up.weight.normal_()
    adapters.attach(model)
    tocom_hub.patch(model)
    tocom_hub.set_r(model, 6)
    xs = [torch.randn(b, 3, 32, 32) for b in (1, 3, 2, 4) * 3]
    with torch.no_grad():
        serial = [model(x) for x in xs]
        got, go = [None] * len(xs), threading.Barrier(2)

        def run(k):
            go.wait()
            for i in range(k, len(xs), 2):
                got[i] = model(xs[i])

        threads = [threading.Thread(target=run, args=(k,)) for k in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        copied = copy.deepcopy(model)(xs[0])
    for a, b in zip(got, serial):
        assert torch.equal(a, b)
    assert torch.equal(copied, serial[0])
