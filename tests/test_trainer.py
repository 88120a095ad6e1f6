"""The trainer's parts checked against closed forms and reference implementations (diffusers, torch.optim.Muon)."""
import dataclasses
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import support
import train_gpt_style as T
from conftest import ROOT


def tiny_hp(**kw):
    base = dict(hidden=64, depth=4, heads=2, patch=4, bottleneck=16, text_dim=24, tread_start=1, tread_end=2,
                repa_block=1)
    base.update(kw)
    return T.Hyperparameters(**base)


def randomized(model, std=0.05, seed=0):  # zero-initialised layers would hide bugs
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def inputs(B=2, H=16, W=24, L=5, text_dim=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, H, W, generator=g)
    t = torch.rand(B, generator=g)
    txt = torch.randn(B, L, text_dim, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 3:] = False  # padding in the first caption
    return x, t, txt, mask


# ---------------------------------------------------------------- model


def test_model_matches_diffusers_prx_transformer():
    from diffusers import PRXTransformer2DModel
    hp = tiny_hp(hidden=128, depth=3, heads=2, patch=8, bottleneck=32, text_dim=48)
    ours = randomized(T.PRXDiT(hp)).eval()
    ref = PRXTransformer2DModel(in_channels=3, patch_size=8, context_in_dim=48, hidden_size=128, mlp_ratio=3.5,
                                num_heads=2, depth=3, axes_dim=[32, 32], bottleneck_size=32).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)  # the names map one to one
    x, t, txt, mask = inputs(H=32, W=48, text_dim=48)
    with torch.no_grad():
        a = ours(x, t, txt, mask)[0]
        b = ref(x, t, txt, attention_mask=mask).sample
    assert (a - b).abs().max() / b.abs().max() < 1e-5


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding
    t = torch.rand(7)
    ref = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0.0, scale=1000.0,
                                 max_period=10000)
    assert torch.allclose(T.timestep_embedding(t), ref, atol=1e-5)


def test_patchify_roundtrip_and_order():
    x = torch.randn(2, 3, 8, 12)
    seq = T.patchify(x, 4)
    assert seq.shape == (2, 6, 48)
    assert torch.equal(T.unpatchify(seq, 4, 8, 12), x)
    # token 1 is row 0, column 1; its features are ordered (c, ph, pw)
    assert torch.equal(seq[0, 1].view(3, 4, 4), x[0, :, 0:4, 4:8])


def test_record_config_parameter_count():
    with torch.device("meta"):
        model = T.PRXDiT(T.Hyperparameters())
    n = sum(p.numel() for p in model.parameters())
    assert 1.1e9 < n < 1.3e9, n


def test_adaln_zero_start_is_identity_in_blocks_and_zero_output():
    model = T.PRXDiT(tiny_hp())
    x, t, txt, mask = inputs()
    out, (h, ids) = model(x, t, txt, mask, hook=3)
    assert torch.count_nonzero(out) == 0 and ids is None  # zero-initialised final layer; every token saw block 3
    assert torch.allclose(h, model.img_in(T.patchify(x, 4)))  # zero gates: blocks pass tokens through


def test_padding_tokens_are_ignored():
    model = randomized(T.PRXDiT(tiny_hp())).eval()
    x, t, txt, mask = inputs()
    txt2 = txt.clone()
    txt2[0, 3:] = torch.randn(2, 24)  # change only the padded positions of caption 0
    with torch.no_grad():
        a, b = model(x, t, txt, mask)[0], model(x, t, txt2, mask)[0]
    assert torch.allclose(a, b, atol=1e-6)


def test_a_batch_padded_to_its_longest_caption_gives_the_full_padding_result():
    """Text padded to the batch's longest caption rounded up to TEXT_MULTIPLE (what the loader, the text encoder and
    the bench give) instead of text_len: outputs and gradients equal the fully padded, masked reference."""
    hp = tiny_hp(text_len=96)
    model = randomized(T.PRXDiT(hp))
    g = torch.Generator().manual_seed(3)
    n = [37, 5, 12]  # tokens per caption; the longest rounds up to 64
    full = torch.randn(3, hp.text_len, hp.text_dim, generator=g)
    mask = torch.arange(hp.text_len)[None] < torch.tensor(n)[:, None]
    full = full * mask[..., None]
    txt, short_mask = support.unpack_text_emb(support.pack_text_emb(full, mask), hp.text_len, hp.text_dim)
    assert support.TEXT_MULTIPLE == 32 and txt.shape[1] == support.text_pad_len(37, 96) == 64
    assert torch.equal(short_mask, mask[:, :64]) and support.text_pad_len(200, 96) == 96
    x, t = torch.randn(3, 3, 16, 16, generator=g), torch.rand(3, generator=g)
    outs, grads = [], []
    for emb, m in ((full, mask), (txt.float(), short_mask)):
        model.zero_grad()
        out = model(x, t, emb.to(torch.bfloat16).float(), m)[0]
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(outs[0], outs[1], atol=1e-5) and torch.allclose(grads[0], grads[1], atol=1e-5)
    assert not torch.equal(outs[0], torch.zeros_like(outs[0]))
    # the empty caption (dropout, CFG) brought to the batch's length: zeros and False added, nothing else
    (a, am), (b, bm) = support.same_text_len((txt[:1, :32], short_mask[:1, :32]), (txt, short_mask))
    assert a.shape[1:] == b.shape[1:] == txt.shape[1:] and torch.equal(a[:, :32], txt[:1, :32]) and not am[:, 32:].any()


# ---------------------------------------------------------------- TREAD


def test_tread_keep_counts_and_uniqueness():
    for n, frac in ((256, 0.5), (1024, 0.5), (63, 0.3), (10, 0.25)):
        keep = T.tread_keep(5, n, frac, "cpu")
        assert keep.shape == (5, n - round(n * frac))
        for row in keep:
            assert len(set(row.tolist())) == keep.shape[1] and row.min() >= 0 and row.max() < n
        assert not torch.equal(keep[0], keep[1])  # a fresh subset per sample


def test_tread_routed_tokens_come_back_untouched():
    hp = tiny_hp(depth=5, tread_start=1, tread_end=3)
    model = randomized(T.PRXDiT(hp)).eval()
    x, t, txt, mask = inputs()
    N = (16 // 4) * (24 // 4)
    keep = T.tread_keep(2, N, 0.5, "cpu")
    seen = {}
    for i, b in enumerate(model.blocks):
        b.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, (a[0].clone(), out.clone())))
    with torch.no_grad():
        model(x, t, txt, mask, keep)
    assert seen[0][0].shape[1] == N and seen[4][0].shape[1] == N
    for i in (1, 2, 3):
        assert seen[i][0].shape[1] == keep.shape[1]  # only kept tokens inside the routed blocks
    before, after = seen[1][0], seen[4][0]  # into block 1 (pre-routing, gathered) / into block 4 (restored)
    full_before = seen[0][1]
    for bi in range(2):
        routed = sorted(set(range(N)) - set(keep[bi].tolist()))
        assert torch.equal(after[bi, routed], full_before[bi, routed])  # exactly unchanged
        assert torch.equal(after[bi, keep[bi]], seen[3][1][bi])  # kept tokens carry the routed blocks' output
        assert torch.equal(before[bi], full_before[bi, keep[bi]])


def test_tread_keeping_everything_equals_plain_forward_and_positions_travel():
    model = randomized(T.PRXDiT(tiny_hp())).eval()
    x, t, txt, mask = inputs()
    N = 24
    with torch.no_grad():
        plain = model(x, t, txt, mask)[0]
        everything = model(x, t, txt, mask, torch.arange(N).expand(2, N))[0]
        shuffled = model(x, t, txt, mask, torch.randperm(N).expand(2, N))[0]
    assert torch.allclose(plain, everything, atol=1e-5)
    # token order inside the routed blocks must not matter: RoPE positions go with the tokens
    assert torch.allclose(plain, shuffled, atol=1e-5)


def test_no_graph_breaks_in_denoiser():
    import torch._dynamo
    hp = tiny_hp()
    model = T.PRXDiT(hp)
    x, t, txt, mask = inputs()
    keep = T.tread_keep(2, 24, 0.5, "cpu")
    torch._dynamo.reset()
    ex = torch._dynamo.explain(model)(x, t, txt, mask, keep, 1)
    assert ex.graph_break_count == 0, ex.break_reasons
    assert ex.graph_count == 1


# ---------------------------------------------------------------- diffusion


def test_shift_closed_form():
    t = torch.linspace(0, 1, 11)
    assert torch.allclose(T.shift_t(t, 3.0), 3 * t / (1 + 2 * t))
    assert T.shift_t(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)
    assert torch.equal(T.shift_t(t, 1.0), t)


def test_sample_t_distribution():
    g = torch.Generator().manual_seed(0)
    hp = T.Hyperparameters(uniform_t=0.0)
    t = T.sample_t(200_000, hp, "cpu", g)
    assert t.min() >= 1e-3 and t.max() <= 1 - 1e-3
    assert t.median().item() == pytest.approx(0.75, abs=0.01)  # median of sigmoid(N(0,1)) is 1/2, shifted: 3/4
    u = T.sample_t(200_000, T.Hyperparameters(uniform_t=1.0), "cpu", g)
    assert u.mean().item() == pytest.approx(0.5, abs=0.01) and u.median().item() == pytest.approx(0.5, abs=0.01)
    # mixture: P(t < 0.25) = 0.1 * 0.25 + 0.9 * P(shifted logit-normal < 0.25)
    m = T.sample_t(200_000, T.Hyperparameters(uniform_t=0.1), "cpu", g)
    t_inv = 0.25 / (3 - 2 * 0.25)  # shift^-1(0.25)
    p_ln = 0.5 * (1 + math.erf(math.log(t_inv / (1 - t_inv)) / math.sqrt(2)))
    assert (m < 0.25).float().mean().item() == pytest.approx(0.1 * 0.25 + 0.9 * p_ln, abs=0.005)


def test_stratified_t_one_draw_per_quantile_slice_and_the_same_law():
    """stratified_t: in every batch the normal behind the logit-normal, and the uniform, put exactly one value in
    each of the B equal-probability slices (so the batch's mean t hardly varies); over many batches each sample's
    law is the i.i.d. one (the mixture's closed-form CDF, as above)."""
    B, g = 64, torch.Generator().manual_seed(1)
    phi = lambda z: 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    for uniform_t in (0.0, 1.0):
        hp = T.Hyperparameters(uniform_t=uniform_t, t_shift=1.0, stratified_t=True)
        for _ in range(20):
            t = T.sample_t(B, hp, "cpu", g).double()
            u = phi(torch.logit(t)) if uniform_t == 0 else t  # back to the uniform the slices are taken in
            assert torch.equal(torch.floor(u.sort().values * B).long(), torch.arange(B))
    iid, strat = (T.Hyperparameters(uniform_t=0.0, t_shift=1.0, stratified_t=s) for s in (False, True))
    means = [torch.stack([T.sample_t(B, h, "cpu", g).mean() for _ in range(500)]) for h in (iid, strat)]
    assert means[1].std() < 0.1 * means[0].std()  # i.i.d.: std(t) / 8; stratified: only the slices' widths
    hp = T.Hyperparameters(uniform_t=0.1, stratified_t=True)  # t_shift 3, as the record's law above
    m = torch.cat([T.sample_t(B, hp, "cpu", g) for _ in range(3000)])
    t_inv = 0.25 / (3 - 2 * 0.25)
    p_ln = 0.5 * (1 + math.erf(math.log(t_inv / (1 - t_inv)) / math.sqrt(2)))
    assert (m < 0.25).float().mean().item() == pytest.approx(0.1 * 0.25 + 0.9 * p_ln, abs=0.005)
    assert m.median().item() == pytest.approx(T.sample_t(200_000, T.Hyperparameters(uniform_t=0.1), "cpu", g)
                                              .median().item(), abs=0.01)


def test_training_draws_depend_on_the_stream_position_only():
    """A sample's noise is the same whatever batch it is drawn in; different samples and seeds get independent
    standard normals; the global batch's draws are a function of (seed, position)."""
    hp, gen = tiny_hp(tread_frac=0.5), torch.Generator()
    noise = T.sample_noise(hp, (6, 3, 8, 8), range(100, 106), gen)
    parts = [T.sample_noise(hp, (2, 3, 8, 8), range(100 + i, 102 + i), gen) for i in (0, 2, 4)]
    assert torch.equal(noise, torch.cat(parts))
    assert torch.equal(noise[3], T.sample_noise(hp, (1, 3, 8, 8), [103], gen)[0])
    assert torch.equal(noise[[4, 1]], T.sample_noise(hp, (2, 3, 8, 8), torch.tensor([104, 101]), gen))  # any order
    many = T.sample_noise(hp, (64, 3, 8, 8), range(64), gen).flatten(1)  # (64, 192)
    assert abs(many.mean()) < 0.02 and abs(many.std() - 1) < 0.02
    corr = torch.corrcoef(many)  # samples are not copies of one another
    assert (corr - torch.eye(64)).abs().max() < 0.35
    other = T.sample_noise(tiny_hp(seed=1), (6, 3, 8, 8), range(100, 106), gen)
    assert not torch.allclose(noise, other)
    a, b = T.batch_draws(hp, 8, 16, 40, gen), T.batch_draws(hp, 8, 16, 40, gen)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = T.batch_draws(hp, 8, 16, 48, gen)
    assert not torch.equal(a[1], c[1]) and a[2].shape == (8, 8)
    assert T.stream_key(0, 5, 0) != T.stream_key(0, 5, 1) != T.stream_key(1, 5, 1)
    # no two (seed, position, kind) share a generator seed, also in the low 32 bits a CPU generator keeps
    keys = [T.stream_key(s, p, k) % 2 ** 32 for s in range(4) for p in range(2000) for k in (0, 1)]
    assert len(set(keys)) == len(keys)


def test_flow_loss_closed_form():
    g = torch.Generator().manual_seed(0)
    x0, eps, pred = (torch.randn(6, 3, 8, 8, generator=g) for _ in range(3))
    t = torch.tensor([0.001, 0.02, 0.05, 0.3, 0.7, 0.999])
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    loss = T.flow_loss(pred, x0, x_t, t, 0.05)
    expected = ((pred - x0) ** 2).mean(dim=(1, 2, 3)) / t.clamp(min=0.05) ** 2
    assert torch.allclose(loss, expected, rtol=1e-4)
    # the true velocity is noise - x0 wherever t is above the clamp
    v = T.velocity(x_t, x0, t, 0.05)
    assert torch.allclose(v[3:], (eps - x0)[3:], atol=1e-4)


def test_euler_sampler_with_perfect_denoiser_returns_guided_target():
    """If the model predicts x0 exactly, every Euler step stays on the straight line to x0; with a conditional
    x0 `c` and an unconditional x0 `u`, guidance must land on u + cfg (c - u)."""
    g = torch.Generator().manual_seed(0)
    c, u = (torch.rand(2, 3, 8, 8, generator=g) * 0.2 - 0.1 for _ in range(2))  # |u + 3.5 (c - u)| < 1

    def oracle(x, t, txt, mask):  # conditional half first, then the unconditional (empty caption) half
        assert torch.equal(txt[2:], torch.zeros_like(txt[2:])) and txt[:2].abs().min() > 0
        return torch.cat([c, u]), None

    txt, mask = torch.ones(2, 3, 4), torch.ones(2, 3, dtype=torch.bool)
    for sampler in ("euler", "heun"):
        out = T.sample_images(oracle, txt, mask, torch.zeros(1, 3, 4), mask[:1], (8, 8), steps=7, cfg=3.5,
                              shift=3.0, t_min_div=0.05, generator=torch.Generator().manual_seed(0), sampler=sampler)
        assert torch.allclose(out, u + 3.5 * (c - u), atol=1e-5)


def test_heun_sampler_matches_a_written_out_heun_loop_on_a_denoiser_that_depends_on_x_and_t():
    """x0(x_t, t) linear in x_t and t, different for the conditional and unconditional captions: Heun (the trapezoid
    of the velocities at both ends, the last step plain Euler) written out step by step, guidance included."""
    g = torch.Generator().manual_seed(0)
    c = torch.rand(2, 3, 8, 8, generator=g) - 0.5
    x1 = 0.3 * torch.randn(2, 3, 8, 8, generator=g)  # small: the final clamp to [-1, 1] cuts nothing
    steps, cfg, shift, t_min_div = 6, 2.5, 3.0, 0.05

    def x0_of(x, t, cond):  # cond: 1 for the caption, 0 for the empty caption; x: one or both halves
        return (0.5 + 0.3 * cond) * x + t * (0.2 - 0.4 * cond) * c.repeat(len(x) // len(c), 1, 1, 1)

    def denoiser(x, t, txt, mask):  # the sampler's batch: conditional half, then unconditional half
        return x0_of(x, t.view(-1, 1, 1, 1), txt[:, :1, :1].view(-1, 1, 1, 1)), None

    def reference(heun):
        ts = [shift * s / (1 + (shift - 1) * s) for s in (1 - i / steps for i in range(steps + 1))]
        vel = lambda x, t: (x - (x0_of(x, t, 0) + cfg * (x0_of(x, t, 1) - x0_of(x, t, 0)))) / max(t, t_min_div)
        x = x1.double()
        for i in range(steps):
            h = ts[i + 1] - ts[i]
            d = vel(x, ts[i])
            if heun and i < steps - 1:
                d = (d + vel(x + h * d, ts[i + 1])) / 2
            x = x + h * d
        return x.clamp(-1, 1)

    txt, mask = torch.ones(2, 3, 4), torch.ones(2, 3, dtype=torch.bool)
    out = {s: T.sample_images(denoiser, txt, mask, torch.zeros(1, 3, 4), mask[:1], (8, 8), steps, cfg, shift,
                              t_min_div, sampler=s, x=x1.clone()) for s in ("euler", "heun")}
    for s in out:
        assert torch.allclose(out[s].double(), reference(s == "heun"), atol=1e-5), s
    assert (out["heun"] - out["euler"]).abs().max() > 1e-2  # this denoiser tells the two apart


# ---------------------------------------------------------------- REPA, perceptual


def _tiny_vit(kind, tmp_path, patch):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel, Dinov2WithRegistersConfig, Dinov2WithRegistersModel
    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_register_tokens=4)
    if kind == "v3":
        m = DINOv3ViTModel(DINOv3ViTConfig(patch_size=patch, **cfg))
    else:
        m = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(patch_size=patch, image_size=56, **cfg))
    m.save_pretrained(tmp_path / kind)
    return T.load_vit(str(tmp_path / kind), "cpu", torch.float32)


def test_repa_target_grid_matches_dit_grid(tmp_path):
    dino = _tiny_vit("v3", tmp_path, 16)
    x0 = torch.rand(2, 3, 64, 96) * 2 - 1
    for patch in (4, 8, 32):
        tgt = T.repa_targets(dino, x0, patch)
        assert tgt.shape == (2, (64 // patch) * (96 // patch), 32)  # no CLS, no registers
    # the DiT token of row r, col c sees the same pixels as DINOv3's patch (r, c): a local change moves only it
    x1 = x0.clone()
    x1[:, :, 16:24, 40:48] = 1.0  # patch size 8: row 2, col 5 of a 8 x 12 grid
    diff = (T.repa_targets(dino, x1, 8) - T.repa_targets(dino, x0, 8)).abs().sum(-1)[0]
    assert diff.argmax().item() == 2 * 12 + 5


def test_repa_loss_is_negative_cosine_on_visible_tokens(monkeypatch):
    hp = tiny_hp(depth=5, tread_start=1, tread_end=3)
    repa = T.REPA(hp, types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=8)))
    repa.proj = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False))  # the identity, 8 wide like the targets
    torch.nn.init.eye_(repa.proj[0].weight)
    tok = torch.randn(2, 5, 8)
    tgt = torch.randn(2, 10, 8)
    monkeypatch.setattr(T, "repa_targets", lambda dino, x0, patch: tgt)  # DINOv3's features: tested above
    keep = torch.tensor([[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]])
    x0 = torch.zeros(2, 3, 1, 1)  # only its batch size and device are read: the targets are stubbed
    loss = repa((tok, keep), x0, 8)
    expected = -torch.stack([F.cosine_similarity(tok[b], tgt[b, keep[b]], dim=-1).mean() for b in range(2)])
    assert torch.allclose(loss, expected, atol=1e-6)
    assert torch.allclose(repa((tgt, None), x0, 8), -torch.ones(2), atol=1e-6)
    # precomputed targets (the loader's flat (B, N * E) rows from repa/) take the place of DINOv3's forward
    assert torch.equal(repa((tok, keep), x0, 8, tgt.flatten(1)), loss)
    # the DiT says which tokens its hooked block saw: the kept ones inside the TREAD blocks, all outside them
    model = T.PRXDiT(hp)
    x, t, txt, mask = inputs()
    keep = T.tread_keep(2, 24, 0.5, "cpu")
    for block, want in ((0, None), (1, keep), (3, keep), (4, None)):
        tokens, ids = model(x, t, txt, mask, keep, hook=block)[1]
        assert (ids is None and want is None or torch.equal(ids, want)) and tokens.shape[1] == (24 if want is None
                                                                                               else 12)


def test_pdino_loss_zero_for_equal_and_positive_otherwise(tmp_path):
    dino = _tiny_vit("v2", tmp_path, 14)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert T.pdino_loss(dino, x, x, 56).abs().max() < 1e-5
    assert (T.pdino_loss(dino, -x, x, 56) > 1e-3).all()


def _vit_reference(vit, img01, size, mode, antialias=False):  # PRX's resize, clamp, ImageNet normalisation, by hand
    x = F.interpolate(img01, size=size, mode=mode, antialias=antialias).clamp(0, 1)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]))
    x = (x - mean) / std
    return vit(pixel_values=x).last_hidden_state[:, 1 + vit.config.num_register_tokens:]


def test_repa_targets_and_pdino_resize_as_prx_does(tmp_path):
    """REPA's target: the clean image subsampled by 16/patch in nearest mode (patch 32: every other pixel), as PRX's
    interpolate(scale_factor=16/32). P-DINO: bilinear to pdino_res without antialias, then clamped to [0, 1] (an
    overshooting prediction is seen clamped), as PRX. Each against its formula; the antialiased resize differs."""
    dino3, dino2 = _tiny_vit("v3", tmp_path, 16), _tiny_vit("v2", tmp_path, 14)
    x0 = torch.rand(2, 3, 64, 96) * 2 - 1
    want = _vit_reference(dino3, ((x0 + 1) / 2)[..., ::2, ::2], (32, 48), "nearest")
    assert torch.allclose(T.repa_targets(dino3, x0, 32), want, atol=1e-5)
    pred, x = torch.randn(2, 3, 64, 64) * 1.5, torch.rand(2, 3, 64, 64) * 2 - 1  # pred overshoots [-1, 1]
    fp, ft = (_vit_reference(dino2, (v + 1) / 2, (56, 56), "bilinear") for v in (pred, x))
    assert torch.allclose(T.pdino_loss(dino2, pred, x, 56), (1 - F.cosine_similarity(fp, ft, dim=-1)).mean(1),
                          atol=1e-5)
    aa = _vit_reference(dino2, (pred + 1) / 2, (56, 56), "bilinear", antialias=True)
    assert not torch.allclose(aa, fp, atol=1e-3)  # the test tells the resizes apart


def test_lpips_loss_matches_package_on_half_size():
    import lpips
    torch.manual_seed(0)
    lp = T.load_lpips("cpu", pretrained=False)
    a, b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    half = lambda x: F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    ref = lp(half(a), half(b)).flatten()
    assert torch.allclose(T.lpips_loss(lp, a, b), ref)
    assert T.lpips_loss(lp, a, a).abs().max() < 1e-6
    assert isinstance(lp, lpips.LPIPS) and not any(p.requires_grad for p in lp.parameters())


# ---------------------------------------------------------------- optimiser


def test_newton_schulz_singular_values_near_one():
    g = torch.Generator().manual_seed(0)
    for shape in ((64, 64), (32, 96), (96, 32)):  # condition numbers up to ~40: gradients are not worse
        Q1, _ = torch.linalg.qr(torch.randn(shape[0], shape[0], generator=g))
        Q2, _ = torch.linalg.qr(torch.randn(shape[1], shape[1], generator=g))
        k = min(shape)
        G = Q1[:, :k] @ torch.diag(torch.logspace(-1.6, 0, k) * 7.0) @ Q2[:, :k].T
        S = torch.linalg.svdvals(T.newton_schulz(G))
        assert S.min() > 0.6 and S.max() < 1.25, (S.min(), S.max())


def test_muon_matches_torch_reference():
    """Three matrices of one shape (orthogonalised together, batched) and one of another shape."""
    g = torch.Generator().manual_seed(0)
    shapes = [(48, 32), (48, 32), (48, 32), (16, 64)]
    w0 = [torch.randn(*s, generator=g) for s in shapes]
    grads = [[torch.randn(*s, generator=g) for s in shapes] for _ in range(3)]
    ours_p = [torch.nn.Parameter(w.clone()) for w in w0]
    ref_p = [torch.nn.Parameter(w.clone()) for w in w0]
    ours = T.Muon(ours_p, lr=0.02)
    ref = torch.optim.Muon(ref_p, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0,
                           adjust_lr_fn="match_rms_adamw")
    for step in grads:
        for a, b, gr in zip(ours_p, ref_p, step):
            a.grad, b.grad = gr.clone(), gr.clone()
        ours.step(), ref.step()
    for a, b, w in zip(ours_p, ref_p, w0):  # both orthogonalise in bf16; the order of operations differs
        assert ((a - w) - (b - w)).norm() / (b - w).norm() < 3e-2


def test_muon_state_is_allocated_once_and_bf16_transport_changes_no_bit():
    """Newton-Schulz works in bf16, so sending the matrices in bf16 (half the all-to-all's bytes) must give exactly
    the update of fp32 matrices; the momentum buffers are made at the first step and updated in place after."""
    g = torch.Generator().manual_seed(0)
    shapes = [(48, 32), (48, 32), (16, 64)]
    w0 = [torch.randn(*s, generator=g) for s in shapes]
    ps = [torch.nn.Parameter(w.clone()) for w in w0]
    opt = T.Muon(ps, lr=0.02)
    ref, bufs, ptrs = [w.clone() for w in w0], [torch.zeros_like(w) for w in w0], []
    for _ in range(3):
        grads = [torch.randn(*s, generator=g) for s in shapes]
        for p, gr in zip(ps, grads):
            p.grad = gr.clone()
        opt.step()
        ptrs.append([opt.state[p]["momentum_buffer"].data_ptr() for p in ps])
        for w, b, gr in zip(ref, bufs, grads):  # written out: fp32 in, Newton-Schulz's own bf16 inside
            b.lerp_(gr, 0.05)
            w.add_(T.newton_schulz(gr.lerp(b, 0.95)[None])[0], alpha=-0.02 * 0.2 * math.sqrt(max(w.shape)))
    assert all(torch.equal(p.data, w) for p, w in zip(ps, ref))
    assert ptrs[0] == ptrs[1] == ptrs[2]


def test_muon_without_amp_orthogonalises_in_fp32():
    """amp=0 (the CPU demo on a CPU without bf16 instructions): Newton-Schulz and its transport stay in fp32, so the
    update is the fp32 iteration's, closer to the fp64 iteration than bf16's is."""
    g = torch.Generator().manual_seed(0)
    G = torch.randn(3, 48, 32, generator=g)
    exact = T.newton_schulz(G.double(), dtype=torch.float64)
    err = {dt: ((T.newton_schulz(G, dtype=dt).double() - exact).norm() / exact.norm()).item()
           for dt in (torch.float32, torch.bfloat16)}
    assert err[torch.float32] < 1e-5 < 1e-3 < err[torch.bfloat16], err
    hp = tiny_hp(amp=False)
    muon = T.build_optimizers(T.PRXDiT(hp), torch.nn.Linear(1, 1), hp)[0]
    assert muon.dtype == torch.float32
    hp = tiny_hp(amp=True)
    assert T.build_optimizers(T.PRXDiT(hp), torch.nn.Linear(1, 1), hp)[0].dtype == torch.bfloat16
    w0 = torch.randn(48, 32, generator=g)
    p = torch.nn.Parameter(w0.clone())
    opt = T.Muon([p], lr=0.02, dtype=torch.float32)
    p.grad = torch.randn(48, 32, generator=g)
    opt.step()  # first step: momentum 0.05 grad, Nesterov 0.0975 grad (Newton-Schulz normalises the scale away)
    ref = w0 - 0.02 * 0.2 * math.sqrt(48) * T.newton_schulz(p.grad * (0.05 * 0.95 + 0.05), dtype=torch.float32)
    assert torch.allclose(p.data, ref, atol=1e-6)


def test_normuon_puts_each_row_over_its_running_rms_and_keeps_the_norm_of_muons_update():
    """normuon: the orthogonalised update's rows divided by their running RMS (decay 0.95), then scaled back to the
    orthogonalised update's Frobenius norm. The first step's update has rows of one RMS and plain Muon's norm; four
    steps equal the loop written out."""
    g = torch.Generator().manual_seed(0)
    shapes = [(48, 32), (16, 64)]
    w0 = [torch.randn(*s, generator=g) for s in shapes]
    grads = [[torch.randn(*s, generator=g) for s in shapes] for _ in range(4)]
    nor, plain = [[torch.nn.Parameter(w.clone()) for w in w0] for _ in range(2)]
    opts = T.Muon(nor, lr=0.02, dtype=torch.float32, normuon=True), T.Muon(plain, lr=0.02, dtype=torch.float32)
    for p, q, gr in zip(nor, plain, grads[0]):
        p.grad, q.grad = gr.clone(), gr.clone()
    for o in opts:
        o.step()
    for p, q, w in zip(nor, plain, w0):
        d, e = p.data - w, q.data - w
        assert d.norm().item() == pytest.approx(e.norm().item(), rel=1e-5)
        rms = d.pow(2).mean(dim=1).sqrt()
        assert torch.allclose(rms, rms.mean().expand_as(rms), rtol=1e-4)
    plain_rms = (plain[0].data - w0[0]).pow(2).mean(dim=1).sqrt()  # a tall matrix's rows differ under Muon
    assert plain_rms.max() > 1.2 * plain_rms.min()
    nor = [torch.nn.Parameter(w.clone()) for w in w0]
    opt = T.Muon(nor, lr=0.02, dtype=torch.float32, normuon=True)
    opt.found_inf = torch.tensor(0.0)  # as train_step sets it
    ref, bufs, vs = [w.clone() for w in w0], [torch.zeros_like(w) for w in w0], [torch.zeros(s[0], 1) for s in shapes]
    for step in grads:
        for p, gr in zip(nor, step):
            p.grad = gr.clone()
        opt.step()
        for w, b, v, gr in zip(ref, bufs, vs, step):  # written out
            b.lerp_(gr, 0.05)
            o = T.newton_schulz(gr.lerp(b, 0.95)[None], dtype=torch.float32)[0]
            v.mul_(0.95).add_(0.05 * o.pow(2).mean(dim=1, keepdim=True))
            h = o / (v.sqrt() + 1e-8)
            w.add_(h * (o.norm() / h.norm()), alpha=-0.02 * 0.2 * math.sqrt(max(w.shape)))
    assert all(torch.allclose(p.data, w, atol=1e-6) for p, w in zip(nor, ref))
    assert T.PRESETS["cpu"]["normuon"] and not T.Hyperparameters().normuon  # the record keeps PRX's plain Muon
    hp = tiny_hp(normuon=True)
    assert T.build_optimizers(T.PRXDiT(hp), torch.nn.Linear(1, 1), hp)[0].param_groups[0]["normuon"]


def test_cpu_bf16_detection_reads_the_cpu_flags_and_picks_the_demo_precision(tmp_path):
    cases = (("fpu sse avx2 fma", False), ("avx2 avx512f avx512_bf16", True), ("avx2 amx_bf16 amx_tile", True),
             ("avx512f avx512_bf16x", False))
    for flags, has in cases:
        (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        assert support.cpu_has_bf16(str(tmp_path / "cpuinfo")) is has, flags
    assert support.cpu_has_bf16(str(tmp_path / "missing")) is False  # no /proc (macOS, Windows): fp32
    assert T.PRESETS["cpu"]["amp"] == support.cpu_has_bf16() and T.Hyperparameters().amp  # the record keeps bf16


def test_shard_rows_is_fsdp_chunking_and_unsharded_orthogonalise_is_newton_schulz():
    for n in (1, 5, 30, 64):
        for world in (1, 2, 3, 4, 8):
            ref = [len(c) for c in torch.arange(n).chunk(world)]
            assert T.shard_rows(n, world) == ref + [0] * (world - len(ref))
    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(s, generator=g) for s in ((6, 4), (3, 5), (6, 4))]
    out = T.orthogonalise(mats, [m.shape for m in mats], None, 5)
    for m, o in zip(mats, out):
        assert torch.allclose(o, T.newton_schulz(m[None])[0], atol=1e-6)


def test_every_parameter_in_exactly_one_group_and_muon_gets_block_matrices():
    hp = tiny_hp()
    model, proj = T.PRXDiT(hp), torch.nn.Linear(hp.hidden, 32)  # the REPA projector's place
    muon, adam = T.build_optimizers(model, proj, hp)
    mu = {id(p) for p in muon.param_groups[0]["params"]}
    expected = {id(p) for n, p in model.named_parameters() if n.startswith("blocks.") and p.ndim == 2}
    assert mu == expected and len(mu) == 4 * 7  # qkv, txt_kv, out, gate, up, down, modulation
    ad = {id(p) for g in adam.param_groups for p in g["params"]}
    assert not mu & ad and len(mu | ad) == len(list(model.parameters())) + len(list(proj.parameters()))
    (adam_only,) = T.build_optimizers(model, proj, dataclasses.replace(hp, muon=False))  # muon=0: Adam for all
    assert isinstance(adam_only, torch.optim.Adam) and {id(p) for g in adam_only.param_groups for p in g["params"]} \
        == mu | ad


def test_weight_init_is_prxs():
    """PRX's init (the record and the demo): every Linear with PyTorch's default init, U(+-1/sqrt(fan_in)) weights and
    biases, but the blocks' modulation and the final layer zero (adaLN-Zero). DiT's Xavier init lost to it on the
    demo (docs/demo.md) and is no constant any more; a checkpoint config that still names it samples as before."""
    torch.manual_seed(0)
    hp = dataclasses.replace(T.Hyperparameters(), hidden=256, depth=3, heads=4, bottleneck=64, text_dim=96)
    model = T.PRXDiT(hp)
    zero = {id(b.modulation.lin) for b in model.blocks} | {id(model.final_layer.adaLN_modulation[1]),
                                                          id(model.final_layer.linear)}
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        w, b = m.weight.detach(), (m.bias if m.bias is not None else torch.zeros(0)).detach()  # some have none
        if id(m) in zero:
            assert not w.any() and not b.any(), name
            continue
        bound = 1 / math.sqrt(m.weight.shape[1])
        assert w.abs().max() <= bound and w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1), name
        if len(b):
            assert b.abs().max() <= bound and b.abs().max() > bound / 2, name  # random, not zero
    assert "weight_init" not in {f.name for f in dataclasses.fields(T.Hyperparameters)}
    import sample
    old = dict(dataclasses.asdict(T.parse_args([], False)), weight_init="xavier")
    assert sample.hp_from_config(old) == T.parse_args([], False)


def test_lr_schedule():
    hp = T.Hyperparameters(warmup=10, cooldown=0.5, stages=[T.Stage(32, 4, 4, 100, True), T.Stage(64, 4, 4, 40, False)])
    f = [T.lr_factor(s, hp) for s in range(140)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[49] == pytest.approx(1.0)
    assert f[75] == f[99] == f[100] == f[119] == 1.0  # only the last stage cools down: stage 1 ends at the full rate
    assert f[130] == pytest.approx(0.5) and f[139] == pytest.approx(0.05)
    assert all(T.lr_factor(s, T.Hyperparameters(warmup=10)) == 1.0 for s in range(9, 200))  # record: constant
    for policy in ("reset", "reset_ema"):  # the warm-up starts again with stage 2; stage 1 unchanged
        g = [T.lr_factor(s, dataclasses.replace(hp, stage_switch=policy)) for s in range(140)]
        assert g[:100] == f[:100]
        assert g[100:] == pytest.approx([min(1, (i + 1) / 10) * min(1, (40 - i) / 20) for i in range(40)])


def test_training_steps_reduce_loss_on_fixed_batch():
    torch.manual_seed(0)
    hp = tiny_hp(lr=1e-3, warmup=1)
    model = T.PRXDiT(hp)
    opts = T.build_optimizers(model, torch.nn.Module(), hp)
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    txt, mask = torch.randn(4, 5, 24), torch.ones(4, 5, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    t = T.sample_t(4, hp, "cpu", g)
    noise = torch.randn(x0.shape, generator=g)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise

    def loss_now():
        return T.flow_loss(model(x_t, t, txt, mask)[0], x0, x_t, t, 0.05).mean()

    first = loss_now().item()
    for _ in range(30):
        loss_now().backward()
        for o in opts:
            o.step(), o.zero_grad()
    assert loss_now().item() < 0.5 * first


# ---------------------------------------------------------------- config


def test_override_parser():
    hp = T.parse_args(["lr=3e-4", "compile=0", "stage2.steps=7", "run_dir=x"], cuda_available=True)
    assert hp.lr == 3e-4 and hp.compile is False and hp.stages[1].steps == 7 and hp.preset == "record"
    assert T.parse_args([], cuda_available=False).preset == "cpu"
    assert T.parse_args(["stages=1"], cuda_available=True).stages[0].res == 512
    bad = [["nope=1"], ["lr=fast"], ["compile=maybe"], ["stage3.steps=1"], ["stage1.res=500"], ["repa_block=16"],
           ["tread_end=16"], ["stage1.micro_batch=3"], ["preset=gpu"], ["lr"], ["heads=5"], ["patch=0"], ["heads=0"],
           ["log_every=0"], ["ema_every=0"], ["resume=maybe"], ["cooldown=-1"], ["stage1.res=0"], ["sample_every=-1"]]
    for args in bad:
        with pytest.raises(ValueError):
            T.parse_args(args, cuda_available=True)


def test_bad_constant_is_one_clear_line_before_any_model():
    r = subprocess.run([sys.executable, str(ROOT / "train_gpt_style.py"), "lerning_rate=1"], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "lerning_rate" in lines[0] and "lr" in lines[0] and "Traceback" not in r.stderr


def fake_nvidia_smi(folder, driver, names):  # an nvidia-smi on PATH that reports `driver` and GPUs `names`
    exe = Path(folder, "nvidia-smi")
    exe.write_text("#!/bin/sh\n" + "".join(f"echo '{driver}, {n}'\n" for n in names))
    exe.chmod(0o755)
    return folder


def test_a_gpu_torch_cannot_use_is_one_line_naming_driver_wheel_and_fix(tmp_path, monkeypatch, capsys):
    """No CUDA for torch (this machine) while the driver sees GPUs: refused before anything else, unless preset=cpu."""
    monkeypatch.setenv("PATH", f"{fake_nvidia_smi(tmp_path, '535.104.05', ['NVIDIA H100 80GB HBM3'] * 8)}:"
                       f"{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert support.gpu_driver() == ("535.104.05", ["NVIDIA H100 80GB HBM3"] * 8)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    with pytest.raises(SystemExit) as e:
        T.main(["run_dir=never"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == (
        "error: the NVIDIA driver 535.104.05 sees 8 GPU(s) (NVIDIA H100 80GB HBM3) but torch "
        f"{torch.__version__} cannot use them: it is built for CUDA 13.0, which needs driver >= 580; install the "
        "torch build for your driver's CUDA (README: older NVIDIA drivers) or update the driver; preset=cpu runs the "
        "CPU demo\n")
    assert not Path("never").exists()
    hp = T.parse_args([], False)
    monkeypatch.setattr(torch.version, "cuda", "12.8")  # new enough: another cause, the same fix
    with pytest.raises(ValueError, match=r"cannot use them: it is built for CUDA 12.8; install"):
        support.check_device(hp, False, [])
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(ValueError, match=r"torch \S+ cannot use them: it is a CPU-only build;"):
        support.check_device(hp, False, [])
    support.check_device(hp, False, ["preset=cpu"])  # the demo asked for: no refusal
    support.check_device(hp, True, [])  # torch has CUDA: nothing to say
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # GPUs hidden on purpose
    support.check_device(hp, False, [])
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no driver at all
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert support.gpu_driver() is None
    support.check_device(hp, False, [])


def test_preset_record_without_cuda_is_refused_unless_the_model_is_shrunk(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no driver
    record = T.parse_args(["preset=record"], True)
    with pytest.raises(ValueError, match="^preset=record trains the record's 1.2B-parameter model, which needs a CUDA "):
        support.check_device(record, False, ["preset=record"])
    support.check_device(record, True, ["preset=record"])
    support.check_device(T.parse_args(["preset=record", "hidden=64", "heads=2"], True), False, ["preset=record"])


# ---------------------------------------------------------------- FLOPs


@pytest.mark.parametrize("tread_frac", [0.0, 0.5])
def test_analytic_flops_match_flop_counter(tread_frac):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    hp = T.Hyperparameters(hidden=256, depth=5, heads=4, patch=8, bottleneck=32, text_dim=48, text_len=16,
                           tread_frac=tread_frac, tread_start=1, tread_end=3, repa_block=2)
    model, proj = T.PRXDiT(hp), T.REPA(hp, types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=64))).proj
    B, res = 2, 64
    x, t, txt = torch.randn(B, 3, res, res), torch.rand(B), torch.randn(B, hp.text_len, hp.text_dim)
    mask = torch.ones(B, hp.text_len, dtype=torch.bool)
    keep = T.tread_keep(B, (res // 8) ** 2, tread_frac, "cpu") if tread_frac else None
    with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out, (h, _) = model(x, t, txt, mask, keep, hp.repa_block)
        (out.square().mean() + proj(h).square().mean()).backward()
    measured = fc.get_total_flops() / B
    analytic = support.dit_train_flops(hp, res, repa_dim=64)
    assert abs(analytic - measured) / measured < 0.05, (analytic, measured)


def test_bench_runs_the_records_accumulation_on_two_buckets_with_padded_captions():
    """The bench's stages and synthetic micro-batches at the record configuration (text width shrunk): each device's
    share of the global batch on 8 devices (stage 1: 4 micro-batches of 32, stage 2: 8 of 8), N + 2 steps (one
    compiling step per bucket), one bucket per global batch (the square one, then the most elongated), captions of
    BENCH_CAPTION_TOKENS' mean length padded as the loader pads."""
    hp = T.parse_args(["preset=record", "bench=3", "text_dim=8"], False)
    stages = support.bench_stages(hp, 1)
    assert [(st.batch, st.micro_batch, st.steps) for st in stages] == [(128, 32, 5), (64, 8, 5)]
    assert support.BENCH_CAPTION_TOKENS[0] == 130 and hp.text_len == 256
    for st, accum in zip(stages, (4, 8)):
        st = dataclasses.replace(st, res=st.res // 8)  # the shapes are what is checked, not the pixels
        buckets = support.aspect_buckets(st.res, 8, hp.aspect_max)
        it = support.synthetic_batches(st, hp, 1, buckets, repa_dim=16 if st.repa else 0)
        got = [next(it) for _ in range(4 * accum)]  # two global batches of each bucket
        shapes = [tuple(imgs.shape[2:]) for imgs, *_ in got]
        square = min(buckets, key=lambda b: abs(math.log(b[0] / b[1])))
        want = [square[::-1]] * accum + [buckets[0][::-1]] * accum
        assert shapes == want * 2 and square[0] == square[1] and buckets[0][0] != buckets[0][1]
        lengths = []
        for a, (imgs, captions, (txt, mask), targets, slots) in enumerate(got):
            n = mask.sum(1)
            tokens = (imgs.shape[2] // hp.patch) * (imgs.shape[3] // hp.patch)  # REPA targets, as repa/ gives them
            assert targets.shape == (st.micro_batch, tokens * 16) and targets.dtype == torch.bfloat16 if st.repa \
                else targets is None
            assert imgs.shape[0] == st.micro_batch and captions is None and txt.dtype == torch.bfloat16
            assert mask.shape[1] == support.text_pad_len(int(n.max()), hp.text_len) == txt.shape[1]
            assert torch.equal(mask, torch.arange(mask.shape[1])[None] < n[:, None])  # real tokens first
            assert not txt[~mask].any() and txt[mask].abs().sum(-1).min() > 0
            assert torch.equal(slots, torch.arange(a % accum * st.micro_batch, (a % accum + 1) * st.micro_batch))
            lengths += n.tolist()
        assert 115 < sum(lengths) / len(lengths) < 145 and min(lengths) < 100 and max(lengths) > 160
        # text_sort (the record's): a device's micro-batches hold captions of similar lengths, as the loader deals
        # them: each global batch's are in ascending order, so each is padded less than the unsorted ones
        for i in range(0, len(got), accum):
            n = [m.sum(1) for _, _, (_, m), _, _ in got[i:i + accum]]
            assert all(n[j].max() <= n[j + 1].min() for j in range(accum - 1))
        unsorted = support.synthetic_batches(st, dataclasses.replace(hp, text_sort=False), 1, buckets)
        padded = [sum(next(it)[2][1].shape[1] for _ in range(2 * accum)) for it in (iter(got), unsorted)]
        assert padded[0] < 0.85 * padded[1], padded
        if st.repa:  # repa_online=1: no targets come with the batch, DINOv3 computes them in the step
            assert next(support.synthetic_batches(st, dataclasses.replace(hp, repa_online=True), 1, buckets, 16))[3] \
                is None


def test_expected_text_len_matches_the_order_statistics_of_the_caption_lengths():
    """The time budget's mean padded text length against closed forms, for captions n = round(N(130, 60)) clipped to
    1..256 (F(k) = P(n <= k)): in stream order a micro-batch of m is padded to its longest, the max of m draws,
    P(max <= k) = F(k)^m; dealt by length on W devices, micro-batch a of rank r holds the sorted positions j W + r
    (a m <= j < (a + 1) m), so its longest is the order statistic i = ((a + 1) m - 1) W + r + 1 of the G lengths,
    P(X_(i) <= k) = P(Binomial(G, F(k)) >= i). Padding rounds up to 32 tokens."""
    from scipy.stats import binom, norm
    hp = T.parse_args(["preset=record"], False)
    k = np.arange(1, hp.text_len + 1)
    F = norm.cdf(k + 0.5, *support.BENCH_CAPTION_TOKENS)
    F[-1] = 1.0
    pad = np.array([support.text_pad_len(int(x), hp.text_len) for x in k])
    mean_pad = lambda cdf: pad @ np.diff(np.concatenate([[0.0], cdf]))  # noqa: E731  E[pad(X)] from P(X <= k)
    W = 8
    for st in hp.stages:
        m, G = st.micro_batch, st.batch
        plain = mean_pad(F ** m)
        dealt = np.mean([mean_pad(binom.sf(((a + 1) * m - 1) * W + r, G, F))
                         for r in range(W) for a in range(G // W // m)])
        in_order = dataclasses.replace(hp, text_sort=False)
        assert support.expected_text_len(in_order, st, W) == pytest.approx(plain, abs=1.5)
        assert support.expected_text_len(hp, st, W) == pytest.approx(dealt, abs=1.5)
        assert dealt < 0.75 * plain


def test_record_flops_match_the_recipe():
    hp = T.Hyperparameters()
    assert support.dit_train_flops(T.Hyperparameters(tread_frac=0), 512) / 1e12 == pytest.approx(1.35, rel=0.03)
    assert support.dit_train_flops(hp, 512) / 1e12 == pytest.approx(0.95, rel=0.03)
    assert support.dit_train_flops(hp, 1024) / 1e12 == pytest.approx(3.5, rel=0.03)


def test_sdpa_constant_sets_the_gpu_kernel_order():
    """attention_backend(cuda, order): the kernels in that order, first usable wins (set_priority); CPU: math."""
    from torch.nn.attention import SDPBackend
    ids = lambda *ks: [int(getattr(SDPBackend, k)) for k in ks]
    default = torch._C._get_sdp_priority_order()
    for order, first in (("cudnn,efficient,math", ids("CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH")),
                         (T.Hyperparameters().sdpa, ids("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION",
                                                        "MATH"))):
        with support.attention_backend(torch.device("cuda"), order):
            assert list(torch._C._get_sdp_priority_order())[:len(first)] == first
            assert torch.backends.cuda.flash_sdp_enabled() == ("flash" in order)
    assert list(torch._C._get_sdp_priority_order()) == list(default)  # restored on exit
    for bad in ("cudnn,fast", ""):
        with pytest.raises(ValueError, match="sdpa="):
            T.parse_args([f"sdpa={bad}"], False)


def test_cpu_attention_equals_sdpa_in_outputs_and_gradients():
    """support.attention on CPU (the explicit product, fp32 softmax) against SDPA's math kernel in float64: outputs
    and the gradients of q, k and v, with the text padding mask (rows of different lengths) and without; in bf16
    under autocast, within bf16's rounding of the fp64 result."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    g = torch.Generator().manual_seed(0)
    B, H, N, L, D = 3, 2, 5, 9, 8
    lens = torch.tensor([1, 4, 0])  # text tokens per row; the image tokens (last N keys) always attend
    mask = torch.cat([torch.arange(L - N)[None] < lens[:, None], torch.ones(B, N, dtype=torch.bool)], 1)[:, None, None]
    for m in (mask, None):
        qkv = [torch.randn(B, H, n, D, generator=g, dtype=torch.float64) for n in (N, L, L)]
        with sdpa_kernel(SDPBackend.MATH):
            ref = [x.clone().requires_grad_() for x in qkv]
            out_ref = F.scaled_dot_product_attention(*ref, attn_mask=m)
        w = torch.randn(out_ref.shape, generator=g, dtype=torch.float64)
        (out_ref * w).sum().backward()
        got = [x.float().requires_grad_() for x in qkv]
        out = support.attention(*got, m)
        (out * w.float()).sum().backward()
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), out_ref, rtol=1e-5, atol=1e-5)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = support.attention(*[x.bfloat16() for x in qkv], m)
        assert half.dtype == torch.bfloat16
        torch.testing.assert_close(half.double(), out_ref, rtol=0.05, atol=0.05)
    k2, v2 = qkv[1].clone(), qkv[2].clone()  # masked keys take no weight: changing them changes nothing
    k2[0, :, 1:L - N], v2[0, :, 1:L - N] = 1e3, -1e3
    torch.testing.assert_close(support.attention(qkv[0], k2, v2, mask), support.attention(*qkv, mask))


# ---------------------------------------------------------------- the demo's benchmark


def test_score_demo_logs_every_attribute_and_fully_right_per_prompt_set(tmp_path, monkeypatch):
    """score_demo's figures per prompt set are score_shapes' on the sampled images: fully right and the accuracy of
    colour, position, shape and size, in the log and in what the run writes to metrics.jsonl. The stand-in sampler renders each prompt
    with one attribute changed on some objects, so that the five figures differ."""
    import numpy as np
    from evals import parse_shapes_caption, render_shapes, score_shapes, shapes_prompts
    sets = {k: v[:12] for k, v in shapes_prompts().items()}
    for name, prompts in sets.items():
        (tmp_path / f"prompts_{name}.txt").write_text("\n".join(prompts) + "\n")
    swap = [lambda o: o, lambda o: (o[0], "red" if o[1] != "red" else "blue", *o[2:]),
            lambda o: (*o[:3], "center" if o[3] != "center" else "top left"),
            lambda o: (o[0], o[1], "square" if o[2] != "square" else "circle", o[3]),
            lambda o: ("large" if o[0] == "small" else "small", *o[1:])]
    change = [0, 1, 2, 2, 3, 3, 3, 4, 4, 4, 4, 0]  # prompt k gets swap[change[k]]: each attribute a different count

    def sample(model, text, hp, prompts, res, seed, batch, device):  # prompt k: objects with change[k] (0: as asked)
        imgs = [np.asarray(render_shapes([swap[change[k]](o) for o in parse_shapes_caption(p)], res))
                for k, p in enumerate(prompts)]
        return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2) / 127.5 - 1

    lines, grids = [], []
    monkeypatch.setattr(T, "sample", sample)
    monkeypatch.setattr(support, "write_grid", lambda imgs, path, *a: grids.append(path.name))
    hp = T.Hyperparameters(data=str(tmp_path), stages=[T.Stage(48, 1, 1, 1, False)])
    result = T.score_demo(None, None, hp, tmp_path, lines.append)  # what the run writes to metrics.jsonl
    assert list(result) == list(sets) and grids == [f"eval_{name}.png" for name in sets]
    for name, prompts in sets.items():
        ref = score_shapes(list(support.to_uint8(sample(None, None, hp, prompts, 48, 0, 0, "cpu"))), prompts)
        assert result[name] == {k: ref[k] for k in ("full", "color", "position", "shape", "size")}
        assert f"shapes score {name}: " + " ".join(f"{k}:{ref[k]:.3f}" for k in ("full", "color", "position",
                                                                                "shape", "size")) in lines
        assert len(set(ref[k] for k in ("full", "color", "position", "shape", "size"))) == 5  # a mix-up shows


def test_ema_update_is_the_closed_form_and_decay_zero_copies_the_live_weights():
    """ema <- decay * ema + (1 - decay) * live, in place; decay 0 (the CPU demo's) leaves an exact copy of the live
    weights, which is what samples and ema.pt then hold."""
    torch.manual_seed(0)
    live, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in ema.parameters()]
    T.ema_update(ema, live, 0.9)
    for e, b, p in zip(ema.parameters(), before, live.parameters(), strict=True):
        assert torch.allclose(e, 0.9 * b + 0.1 * p) and not torch.equal(e, p)
    T.ema_update(ema, live, 0.0)
    assert all(torch.equal(e, p) for e, p in zip(ema.parameters(), live.parameters(), strict=True))
