"""Eq. 8 against a per-anchor float64 oracle; the branch equals the frozen features at init."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as Fn

from pipeline.training.loss import ppap_loss
from pipeline.training.model import ClusterProbe, LinearProbe, build_model

# ----------------------------------------------------------------------------------- helpers

def random_sets(n: int, m: int, seed: int, p_pos=0.15, p_amb=0.2, empty_every=4):
    """Random anchors and disjoint CSR positive/ambiguous sets (anchor excluded, sorted)."""
    rng = np.random.default_rng(seed)
    anchors = rng.choice(n, size=m, replace=False)
    pos_ptr, pos_idx, amb_ptr, amb_idx = [0], [], [0], []
    for k, a in enumerate(anchors):
        u = rng.random(n)
        others = np.arange(n) != a
        pos = np.flatnonzero(others & (u < p_pos)) if k % empty_every else np.empty(0, np.int64)
        amb = np.flatnonzero(others & (u >= p_pos) & (u < p_pos + p_amb))
        pos_idx += list(pos)
        amb_idx += list(amb)
        pos_ptr.append(len(pos_idx))
        amb_ptr.append(len(amb_idx))
    as64 = lambda x: np.asarray(x, np.int64)  # noqa: E731
    return as64(anchors), as64(pos_ptr), as64(pos_idx), as64(amb_ptr), as64(amb_idx)


def naive_loss(z: torch.Tensor, anchors, pptr, pidx, aptr, aidx, tau: float) -> torch.Tensor:
    """Eq. 8 written literally, one anchor at a time (use float64 z)."""
    n = z.shape[0]
    terms = []
    for k, i in enumerate(anchors):
        pos = [int(j) for j in pidx[pptr[k]:pptr[k + 1]]]
        amb = {int(j) for j in aidx[aptr[k]:aptr[k + 1]]}
        if not pos:
            continue
        neg = [j for j in range(n) if j != i and j not in amb and j not in pos]
        denom_rows = pos + neg
        sim = lambda j: z[i] @ z[j] / tau  # noqa: E731
        denom = torch.logsumexp(torch.stack([sim(j) for j in denom_rows]), 0)
        terms.append(-sum(sim(p) - denom for p in pos) / len(pos))
    if not terms:
        return z.sum() * 0.0
    return torch.stack(terms).mean()


def unit_rows(n: int, d: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return Fn.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)


# ------------------------------------------------------------------------------------- loss

@pytest.mark.parametrize("tau", [0.8, 0.1])
def test_loss_matches_naive_oracle_value_and_gradient(tau):
    n, m = 60, 17
    sets = random_sets(n, m, seed=1)
    z64 = unit_rows(n, 8, seed=2).requires_grad_(True)
    ref = naive_loss(z64, *sets, tau=tau)
    ref.backward()

    z32 = z64.detach().float().requires_grad_(True)
    loss, stats = ppap_loss(z32, *sets, tau=tau, chunk=5)
    loss.backward()
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-5)
    torch.testing.assert_close(z32.grad.double(), z64.grad, rtol=1e-4, atol=1e-6)

    npos = np.diff(sets[1])
    namb = np.diff(sets[3])
    assert stats.anchors == m and stats.anchors_used == int((npos > 0).sum())
    assert stats.mean_pos == pytest.approx(npos.mean())
    assert stats.mean_neg == pytest.approx((n - 1 - npos - namb).mean())


def test_loss_is_chunk_invariant_in_value_and_gradient():
    n, m = 80, 31
    sets = random_sets(n, m, seed=3)
    z = unit_rows(n, 6, seed=4, dtype=torch.float32)
    results = []
    for chunk in (1, 4, 7, 31, 1000):
        zz = z.clone().requires_grad_(True)
        loss, _ = ppap_loss(zz, *sets, tau=0.5, chunk=chunk)
        loss.backward()
        results.append((loss.detach(), zz.grad))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-5, atol=1e-7)


def test_no_positive_anywhere_gives_zero_loss_and_zero_gradient():
    n, m = 20, 5
    anchors = np.arange(m, dtype=np.int64)
    empty_ptr = np.zeros(m + 1, np.int64)
    none = np.empty(0, np.int64)
    z = unit_rows(n, 4, seed=5, dtype=torch.float32).requires_grad_(True)
    loss, stats = ppap_loss(z, anchors, empty_ptr, none, empty_ptr, none, tau=0.1, chunk=2)
    loss.backward()
    assert loss.item() == 0.0 and not torch.isnan(loss)
    assert torch.count_nonzero(z.grad) == 0
    assert stats.anchors_used == 0 and stats.mean_neg == n - 1


def test_everything_ambiguous_except_positive_gives_log_one():
    # one anchor, one positive, all other rows ambiguous: the denominator is the positive alone
    n = 10
    z = unit_rows(n, 4, seed=6, dtype=torch.float32).requires_grad_(True)
    amb = np.arange(2, n, dtype=np.int64)
    loss, stats = ppap_loss(z, [0], [0, 1], [1], [0, amb.size], amb, tau=0.3)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert stats.mean_neg == 0


def test_parity_factor_scales_by_tau_over_007():
    sets = random_sets(40, 9, seed=7)
    z = unit_rows(40, 5, seed=8, dtype=torch.float32)
    plain, _ = ppap_loss(z, *sets, tau=0.8)
    scaled, _ = ppap_loss(z, *sets, tau=0.8, parity_factor=True)
    assert scaled.item() == pytest.approx(plain.item() * 0.8 / 0.07, rel=1e-6)


def test_loss_rejects_bad_sets():
    z = unit_rows(10, 4, seed=9, dtype=torch.float32)
    none = np.empty(0, np.int64)
    with pytest.raises(ValueError, match="pos_indptr"):
        ppap_loss(z, [0, 1], [0, 1], [3], [0, 0, 0], none, tau=0.5)
    with pytest.raises(ValueError, match="outside"):
        ppap_loss(z, [0], [0, 1], [10], [0, 0], none, tau=0.5)
    with pytest.raises(ValueError, match="own positive"):
        ppap_loss(z, [3], [0, 1], [3], [0, 0], none, tau=0.5)


# ------------------------------------------------------------------------------------ model

def tiny_vit(seed: int = 0, dim: int = 32, grid: int = 4):
    from timm.models.vision_transformer import VisionTransformer

    m = VisionTransformer(img_size=grid * 4, patch_size=4, embed_dim=dim, depth=2, num_heads=2,
                          num_classes=0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # seeded weights; LayerNorm affine kept non-trivial
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.ndim == 1 else 0.0) * 0.5)
    return m.eval()


def tiny_backbone(seed: int = 0):
    """pipeline.data.backbones' tiny random ViT if available, else a timm one of the same kind."""
    try:
        from pipeline.data.backbones import forward_tokens, load_backbone
    except ImportError:
        m = tiny_vit(seed)
        def fwd(model, x):
            t = model._pos_embed(model.patch_embed(x))
            for blk in model.blocks[:-1]:
                t = blk(t)
            return t, model.norm(model.blocks[-1](t))[:, 1:]
        return m, fwd, 16, 32
    model, info, _ = load_backbone("vit_tiny_random", seed=seed)
    side = 8 * info.patch_size
    return model, forward_tokens, side, info.embed_dim


def test_branch_code_equals_frozen_features_at_init():
    model, fwd, side, dim = tiny_backbone()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, side, side, generator=g)
    with torch.no_grad():
        mid, feats = fwd(model, x)
    hw = feats.shape[1]
    h = w = int(math.isqrt(hw))
    manifest = dict(embed_dim=dim, grid_train=[h, w], num_classes=5, has_labels=True)
    branch, linear, cluster = build_model(manifest, model, seed=0)
    with torch.no_grad():
        code, z = branch(mid)
    assert code.shape == (3, dim, h, w)
    expect = feats.transpose(1, 2).reshape(3, dim, h, w)
    assert torch.equal(code, expect)
    # rows of z follow F's order b*h*w + y*w + x and are unit vectors
    assert z.shape == (3 * h * w, dim)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3 * h * w))
    torch.testing.assert_close(z[h * w + 2 * w + 1],
                               Fn.normalize(branch.head(code[1, :, 2, 1]), dim=0))
    # the fp16 cache round trip stays within fp16 tolerance
    with torch.no_grad():
        code16 = branch.encode(mid.half().float())
    torch.testing.assert_close(code16, expect, rtol=2e-2, atol=2e-2)
    # only block + head train; the norm is frozen; the backbone is untouched
    names = {n for n, p in branch.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("block.", "head.")) for n in names)
    theirs = {q.data_ptr() for q in model.parameters()}
    assert all(p.data_ptr() not in theirs for p in branch.parameters())


def test_build_model_is_seeded_and_uses_no_global_rng():
    model = tiny_vit()
    manifest = dict(embed_dim=32, grid_train=[4, 4], num_classes=3, has_labels=True)
    state = torch.get_rng_state()
    a = build_model(manifest, model, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    b = build_model(manifest, model, seed=5)
    c = build_model(manifest, model, seed=6)
    for ma, mb in zip(a, b):
        for (k, va), vb in zip(ma.state_dict().items(), mb.state_dict().values()):
            assert torch.equal(va, vb), k
    assert not torch.equal(a[2].centroids, c[2].centroids)
    no_labels = build_model({**manifest, "has_labels": False}, model, n_clusters=7)
    assert no_labels[1] is None and no_labels[2].n_clusters == 7


def test_linear_probe_loss_ignores_minus_one_and_matches_manual_ce():
    g = torch.Generator().manual_seed(1)
    probe = LinearProbe(6, 3, g)
    code = torch.randn(2, 6, 4, 4, generator=g)
    labels = torch.randint(-1, 3, (2, 16, 16), generator=g)
    loss = probe.loss(code, labels)
    logits = Fn.interpolate(probe.conv(code), size=(16, 16), mode="bilinear", align_corners=False)
    keep = labels >= 0
    logp = logits.log_softmax(1).permute(0, 2, 3, 1)[keep]
    manual = -logp.gather(1, labels[keep][:, None]).mean()
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)
    # probe on upsampled code == upsampled probe logits (1x1 conv commutes with bilinear)
    up = Fn.interpolate(code, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(probe.predict_logits(code, (16, 16)), probe.conv(up),
                               rtol=1e-5, atol=1e-5)
    all_ignored = probe.loss(code, torch.full((2, 16, 16), -1))
    assert all_ignored.item() == 0.0


def test_cluster_probe_scores_are_cosines_and_loss_is_minus_mean_max():
    g = torch.Generator().manual_seed(2)
    probe = ClusterProbe(5, 4, g)
    code = torch.randn(2, 5, 3, 3, generator=g)
    s = probe.scores(code)
    v = code[1, :, 2, 0]
    c = probe.centroids[3]
    assert s[1, 3, 2, 0].item() == pytest.approx((v @ c / v.norm() / c.norm()).item(), rel=1e-5)
    assert probe.loss(code).item() == pytest.approx(-s.max(1).values.mean().item(), rel=1e-6)
    # a code vector equal to a centroid scores cosine 1 with it
    code2 = probe.centroids.detach()[2].view(1, 5, 1, 1) * 3.0
    assert probe.scores(code2)[0, 2, 0, 0].item() == pytest.approx(1.0, abs=1e-6)
