"""The ``beit``, ``relpos`` (``vision_transformer_relpos``) and ``cait`` families against independent
references: plain timm, EViT written as key masking on the plain model (the pruned tokens' keys masked out of
the relative-position bias from the next block on), and CaiT's proportional attention checked on duplicated
tokens (a merged token of size s must act exactly as its s equal members, through talking heads and class
attention)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from bank_helpers import naive_delta, random_groups
from tiny_relfam import CLASS_TOKEN, REL_VARIANTS, make_rel

import tocom_hub
from tocom_hub import ToComBank
from tocom_hub.core.compensation.marker import MARKER_KEY
from tocom_hub.core.families.relbias import gather_pair_bias
from tocom_hub.core.families.relpos import mlp_bias_at

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _n_in(model):  # tokens entering the first block (CaiT's blocks hold no class token)
    return model.patch_embed.num_patches + (0 if type(model).__name__.endswith("Cait") else model.num_prefix_tokens)


@pytest.mark.parametrize("method", ["tome", "evit"])
@pytest.mark.parametrize("variant", sorted(REL_VARIANTS))
def test_r0_bit_exact_r_runs_sizes_and_unpatch(variant, method):
    model = make_rel(variant)
    plain = copy.deepcopy(model)
    with torch.no_grad():
        ref = plain(X)
        tocom_hub.patch(model, method=method)
        assert torch.equal(model(X), ref)
        tocom_hub.set_r(model, 6)
        out = model(X)
        assert out.shape == ref.shape and torch.isfinite(out).all() and not torch.allclose(out, ref)
        if method == "tome":
            size, n_in = tocom_hub.get_size(model), _n_in(model)
            assert size.shape[1] == n_in - 2 * 6 and torch.equal(size.sum(dim=(1, 2)), torch.full((2,), float(n_in)))
        tocom_hub.unpatch(model)
        assert type(model) is type(plain) and torch.equal(model(X), ref)


@pytest.mark.parametrize("method", ["tome", "evit"])
@pytest.mark.parametrize("variant", CLASS_TOKEN)
def test_reduction_in_the_last_block_leaves_class_token_logits(variant, method):
    model = make_rel(variant)
    ref = copy.deepcopy(model)(X)
    tocom_hub.patch(model, method=method)
    tocom_hub.set_r(model, [0, 9])
    with torch.no_grad():
        assert (model(X) - ref).abs().max() <= 1e-6
        tocom_hub.set_r(model, [9, 0])
        assert (model(X) - ref).abs().max() > 1e-4  # (reduced earlier, it does change them)


def test_gather_pair_bias_is_the_bias_at_the_tokens_places():
    bias = torch.randn(1, 3, 7, 7)
    index = torch.tensor([[0, 4, 2, -1], [0, 1, 6, 3]])
    out = gather_pair_bias(bias, index)
    for b in range(2):
        for i, a in enumerate(index[b].tolist()):
            for j, c in enumerate(index[b].tolist()):
                want = bias[0, :, a, c] if a >= 0 and c >= 0 else torch.zeros(3)  # the fused token: no position
                assert torch.equal(out[b, :, i, j], want)
    assert gather_pair_bias(bias, None) is bias


def _evit_by_masking(model, r):
    """EViT as the *plain* model: no token removed, the pruned tokens' keys masked out of every later block's
    attention through its relative-position bias (-inf added). Each block's attentiveness is the class
    token's row of the softmax the plain block computed (its bias included), or, without a class token, the
    mean query's softmax(q·k) over the live tokens (no position)."""
    prefix, blocks = model.num_prefix_tokens, list(model.blocks)
    state = {}
    for blk in blocks:
        blk.attn.fused_attn = False  # the explicit softmax, read at attn_drop

    def pre(blk, args, kwargs):  # the key mask of this block, on top of the model's bias
        x = args[0]
        if "alive" not in state:
            state["alive"] = torch.ones(x.shape[:2], dtype=torch.bool)
        mask = torch.zeros(x.shape[0], 1, 1, x.shape[1]).masked_fill(~state["alive"][:, None, None], float("-inf"))
        state["mask"] = mask
        key = "shared_rel_pos_bias" if "shared_rel_pos_bias" in kwargs else "shared_rel_pos"
        shared = kwargs.get(key)
        rel_pos = getattr(blk.attn, "rel_pos", None)
        if rel_pos is not None:  # relpos: a block's own bias wins over the shared one: mask it there
            rel_pos.get_bias = lambda rp=rel_pos: type(rp).get_bias(rp) + state["mask"]
        else:
            kwargs[key] = mask if shared is None else shared + mask
        return args, kwargs

    def attn_in(attn, args):  # q, k as the block's attention computes them
        x = args[0]
        B, N, _ = x.shape
        if getattr(attn, "q_bias", None) is not None:
            qkv = F.linear(x, attn.qkv.weight, torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias]))
        else:
            qkv = attn.qkv(x)
        q, k, _ = qkv.reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        state["qk"] = (getattr(attn, "q_norm", torch.nn.Identity())(q), getattr(attn, "k_norm", torch.nn.Identity())(k))

    def post(blk, args, kwargs, out):
        q, k = state["qk"]
        alive = state["alive"]
        if prefix:
            score = state["probs"][:, :, 0].mean(1)  # [B, N]: 0 on masked keys
        else:
            query = (q * alive[:, None, :, None]).sum(2, keepdim=True) / alive.sum(1).view(-1, 1, 1, 1)
            logits = (query * blk.attn.scale) @ k.transpose(-2, -1) + state["mask"]
            score = logits.softmax(-1).mean(1)[:, 0]
        for b in range(out.shape[0]):
            cand = [j for j in range(prefix, out.shape[1]) if alive[b, j]]
            keep = max(len(cand) - r, 1)
            for j in sorted(cand, key=lambda j: -float(score[b, j]))[keep:]:
                alive[b, j] = False

    hooks = []
    for blk in blocks:
        hooks.append(blk.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(blk.attn.register_forward_pre_hook(attn_in))
        hooks.append(blk.attn.attn_drop.register_forward_pre_hook(lambda m, a: state.update(probs=a[0])))
        hooks.append(blk.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad():
            out = model.forward_features(X)
    finally:
        for h in hooks:
            h.remove()
    return out, state["alive"]


@pytest.mark.parametrize("variant", ["beit_avg", "beit_shared", "relpos_cls_token", "relpos_shared_avg"])
def test_evit_with_relative_position_bias_is_key_masking_of_the_plain_model(variant):
    model = make_rel(variant)
    ref, alive = _evit_by_masking(copy.deepcopy(model), r=10)
    tocom_hub.patch(model, method="evit", trace_source=True)
    tocom_hub.set_r(model, 10)
    with torch.no_grad():
        out = model.forward_features(X)
    src = tocom_hub.get_source(model)  # [B, N_out, N_in] one-hot: where each kept token came from
    assert torch.equal(src.sum(dim=1) > 0, alive)
    assert (out - src @ ref).abs().max() <= 1e-5


def _paired_image(seed=3):
    """An image whose patches come in equal horizontal pairs (patch 2i == patch 2i+1 in each row)."""
    g = torch.Generator().manual_seed(seed)
    half = torch.randn(2, 3, 8, 4, 64, generator=g)  # [B, C, rows, pairs, patch pixels]
    img = half.repeat_interleave(2, dim=3).view(2, 3, 8, 8, 8, 8)  # ..., rows, cols, ph, pw
    return img.permute(0, 1, 2, 4, 3, 5).reshape(2, 3, 64, 64)


@pytest.mark.parametrize("variant", ["cait_token", "cait_avg"])
def test_cait_merged_duplicates_act_as_their_members(variant):
    """With the position embedding zeroed, equal patches give equal tokens; ToMe in the first block merges
    r exact duplicates. Proportional attention (log s after talking heads' pre-softmax mixing, proj_w's bias
    counted s times, log s in class attention, size-weighted pooling) makes the merged model the plain one."""
    model = make_rel(variant)
    with torch.no_grad():
        model.pos_embed.zero_()
    x = _paired_image()
    plain = copy.deepcopy(model)
    tocom_hub.patch(model, trace_source=True)
    tocom_hub.set_r(model, [20, 0])

    def pooled(m):  # the pooled features (pre-logits): the class token or the size-weighted average
        return m.forward_head(m.forward_features(x), pre_logits=True)

    with torch.no_grad():
        ref, out = pooled(plain), pooled(model)
        assert tocom_hub.get_size(model).max() == 2  # 20 pairs merged, each of two equal tokens
        assert (out - ref).abs().max() <= 1e-5
        assert (model(x) - plain(x)).abs().max() <= 1e-5
        tocom_hub.patch(model, prop_attn=False)  # a wrong variant: without the size bias it differs
        assert (pooled(model) - ref).abs().max() > 1e-4  # (10x the tolerance above; seen: 3e-4 .. )


@pytest.mark.parametrize("variant", ["beit_avg", "beit_shared", "relpos_bias_table_cls"])
def test_centroid_rule_is_refused_for_a_bias_table(variant):
    model = make_rel(variant)
    with pytest.raises(ValueError, match="centroid' is not supported with a relative-position bias"):
        tocom_hub.patch(model, positions="centroid")
    assert not tocom_hub.is_patched(model)
    tocom_hub.patch(make_rel("cait_token"), positions="centroid")  # no positional state: nothing to refuse


@pytest.mark.parametrize("variant", ["relpos_cls_token", "relpos_rpn_avg", "relpos_shared_avg"])
def test_relpos_mlp_bias_at_the_grid_is_timms_bias(variant):
    model = make_rel(variant)
    tocom_hub.patch(model, positions="centroid")
    family = model._tocom_state.family
    x = torch.zeros(1, _n_in(model), 1)
    coords = family.initial_coords(None, x)
    for rel_pos in family.biases:
        got = mlp_bias_at(rel_pos, coords)[0]
        assert got.shape == rel_pos.get_bias()[0].shape and (got - rel_pos.get_bias()[0]).abs().max() <= 1e-5
    assert torch.equal(coords[0, -1], torch.tensor([7.0, 7.0]))  # the last patch: row 7, column 7


@pytest.mark.parametrize("variant", ["relpos_cls_token", "relpos_shared_avg"])
def test_relpos_centroid_rule_runs_differs_from_keep_and_tracks_the_mean_patch(variant):
    model = make_rel(variant)
    with torch.no_grad():
        ref = copy.deepcopy(model)(X)
    outs = {}
    for rule in ("keep", "centroid"):
        tocom_hub.patch(model, positions=rule, trace_source=True)
        tocom_hub.set_r(model, 0)
        with torch.no_grad():
            assert torch.equal(model(X), ref)
            tocom_hub.set_r(model, 8)
            outs[rule] = model.forward_features(X)  # (the class token's bias row is 0: compare every token)
    assert torch.isfinite(outs["centroid"]).all() and (outs["keep"] - outs["centroid"]).abs().max() > 1e-4
    ctx, src = model._tocom_state.last(), tocom_hub.get_source(model)
    family = model._tocom_state.family
    full = family.initial_coords(None, torch.zeros(1, _n_in(model), 1))[0]
    mean = (src @ full) / src.sum(-1, keepdim=True)
    prefix = model.num_prefix_tokens
    assert (ctx.coords[:, prefix:] - mean[:, prefix:]).abs().max() <= 1e-5
    if prefix:  # reduced in the last block only: the class token is unchanged under the centroid rule too
        tocom_hub.set_r(model, [0, 9])
        with torch.no_grad():
            assert (model(X) - ref).abs().max() <= 1e-6


@pytest.mark.parametrize("variant", ["beit_avg", "relpos_cls_token", "cait_token"])
def test_bank_apply_changes_only_q_and_v_by_the_delta_and_remove_is_exact(variant):
    model = make_rel(variant)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bank = ToComBank.for_model(model, r_max=4, rank=2, targets=("q", "v"))
    groups = random_groups(bank, seed=2)
    tocom_hub.apply(model, 1, 3, bank=bank)
    after = model.state_dict()
    del after[MARKER_KEY]
    d = 64
    for k, v in after.items():
        b = int(k.split(".")[1]) if k.startswith("blocks.") else None
        if k.startswith("blocks.") and k.endswith("attn.qkv.weight"):
            for i, t in ((0, "q"), (2, "v")):
                want = before[k][i * d : (i + 1) * d].double() + naive_delta(groups, t, b, 1, 3, bank.scale)
                assert (v[i * d : (i + 1) * d].double() - want).abs().max() <= 1e-5
            assert torch.equal(v[d : 2 * d], before[k][d : 2 * d])
        else:
            assert torch.equal(v, before[k]), k
    tocom_hub.remove(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("variant", ["beit_avg", "relpos_rpn_avg", "cait_avg"])
def test_bank_unmerged_equals_merged_and_remove_is_exact(variant):
    """Unmerged mode (hooks) on BEiT's fused qkv with q/v bias (routed through the Linear while applied),
    the relpos qkv and CaiT's talking-heads qkv; remove() gives the plain model back, bit-exact."""
    model = make_rel(variant)
    plain = copy.deepcopy(model)
    bank = ToComBank.for_model(model, r_max=4, rank=2)
    random_groups(bank, seed=3, std=1.0)
    merged = copy.deepcopy(model)
    tocom_hub.apply(merged, 0, 2, bank=bank)
    tocom_hub.apply(model, 0, 2, bank=bank, merge=False)
    with torch.no_grad():
        assert (model(X) - merged(X)).abs().max() <= 1e-5
        with tocom_hub.compensate.disabled(model):  # the bank does something
            assert (model.forward_features(X) - merged.forward_features(X)).abs().max() > 1e-2
        tocom_hub.remove(model)
        assert torch.equal(model(X), plain(X))
    assert [vars(b.attn).get("qkv_bias_separate") for b in model.blocks] == [
        vars(p.attn).get("qkv_bias_separate") for p in plain.blocks
    ]


def _cait_evit_by_masking(model, r):
    """EViT on CaiT as the *plain* model with the pruned tokens absent as keys: timm's talking-heads formula
    summed over the live keys only (-inf before the softmax, and proj_w's per-key bias only on live keys) and
    the class attention blind to them. Attentiveness: the mean live query's softmax(q·k) over live keys."""
    state = {}

    def talking_heads(attn, x):
        B, N, C = x.shape
        H = attn.num_heads
        alive = state.setdefault("alive", torch.ones(B, N, dtype=torch.bool))
        q, k, v = attn.qkv(x).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
        dead = (~alive)[:, None, None, :]
        logits = attn.proj_l(((q * attn.scale) @ k.transpose(-2, -1)).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        probs = logits.masked_fill(dead, float("-inf")).softmax(-1)
        mixed = torch.einsum("gh,bhij->bgij", attn.proj_w.weight, probs)
        mixed = mixed + attn.proj_w.bias.view(1, H, 1, 1) * alive[:, None, None, :]
        out = attn.proj((mixed @ v).transpose(1, 2).reshape(B, N, C))
        query = (q * alive[:, None, :, None]).sum(2, keepdim=True) / alive.sum(1).view(-1, 1, 1, 1)
        score = ((query * attn.scale) @ k.transpose(-2, -1)).masked_fill(dead, float("-inf")).softmax(-1)
        state["score"] = score.mean(1)[:, 0]
        return out

    def class_attn(attn, u):
        B, N, C = u.shape
        H = attn.num_heads
        q = attn.q(u[:, :1]).reshape(B, 1, H, C // H).transpose(1, 2)
        k = attn.k(u).reshape(B, N, H, C // H).transpose(1, 2)
        v = attn.v(u).reshape(B, N, H, C // H).transpose(1, 2)
        live = torch.cat([torch.ones(B, 1, dtype=torch.bool), state["alive"]], dim=1)
        logits = ((q * attn.scale) @ k.transpose(-2, -1)).masked_fill(~live[:, None, None, :], float("-inf"))
        return attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(B, 1, C))

    def prune(blk, args, out):
        alive, score = state["alive"], state["score"]
        for b in range(out.shape[0]):
            cand = [j for j in range(out.shape[1]) if alive[b, j]]
            keep = max(len(cand) - r, 1)
            for j in sorted(cand, key=lambda j: -float(score[b, j]))[keep:]:
                alive[b, j] = False

    for blk in model.blocks:
        blk.attn.forward = lambda x, attn=blk.attn: talking_heads(attn, x)
        blk.register_forward_hook(prune)
    for blk in model.blocks_token_only:
        blk.attn.forward = lambda u, attn=blk.attn: class_attn(attn, u)
    with torch.no_grad():
        return model.forward_features(X), state["alive"]


@pytest.mark.parametrize("variant", ["cait_token", "cait_avg"])
def test_cait_evit_is_key_masking_of_the_plain_model(variant):
    model = make_rel(variant)
    ref, alive = _cait_evit_by_masking(copy.deepcopy(model), r=10)
    tocom_hub.patch(model, method="evit", trace_source=True)
    tocom_hub.set_r(model, 10)
    with torch.no_grad():
        out = model.forward_features(X)  # [class token, kept tokens]
    src = tocom_hub.get_source(model)  # [B, N_out, N_in] over the patch tokens (the blocks hold no class token)
    assert torch.equal(src.sum(dim=1) > 0, alive)
    assert (out[:, 1:] - src @ ref[:, 1:]).abs().max() <= 1e-5
    assert (out[:, 0] - ref[:, 0]).abs().max() <= 1e-5  # the class attention saw exactly the kept tokens


@pytest.mark.parametrize("variant", ["beit_avg", "relpos_rpn_avg", "cait_avg"])
def test_patched_model_pickles_deepcopies_and_keeps_working_in_train_mode(variant):
    import pickle

    model = tocom_hub.patch(make_rel(variant))
    tocom_hub.set_r(model, 5)
    with torch.no_grad():
        ref = model(X)
        assert torch.equal(pickle.loads(pickle.dumps(model))(X), ref)
        assert torch.equal(copy.deepcopy(model)(X), ref)
    model.train()
    model(X).square().sum().backward()  # gradients flow through the gathered bias / talking heads
    grads = [p.grad for n, p in model.named_parameters() if "relative_position" in n or "proj_l" in n or "rel_pos" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_relpos_centroid_rule_compiles_fullgraph_without_recompiles():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    x = X[:, :, :32, :32]
    model = tocom_hub.patch(make_rel("relpos_cls_token", img_size=32), positions="centroid")
    eager = copy.deepcopy(model)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)  # a graph break raises
    try:
        with torch.no_grad():
            for r in (0, 3):
                tocom_hub.set_r(model, r)
                compiled(x)
            with torch._dynamo.config.patch(error_on_recompile=True):
                for r in (3, 0, 3):
                    tocom_hub.set_r(model, r)
                    tocom_hub.set_r(eager, r)
                    assert (compiled(x) - eager(x)).abs().max() <= 1e-5
        assert counter.frame_count == 2
    finally:
        torch._dynamo.reset()
