"""Sampling guidance: the guidance interval (the trainer's sampler) and TREAD self-guidance (sample.py's
tread_guided wrapper, sampled by T.generate with cfg=1), checked against hand-written Euler loops and formulas."""
import pytest
import torch

import sample as S
import train_gpt_style as T


class LinearToy:
    """x0 prediction a * x + b(text): b is `c` for the prompt, `u` for the empty caption (all-zero text). Its
    prediction depends on x, so the sample depends on every step's guidance, not only on the last one.
    Records each call's batch size and time."""

    def __init__(self, a=0.3, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.a = a
        self.c, self.u = (torch.rand(1, 3, 8, 8, generator=g) * 0.2 - 0.1 for _ in range(2))
        self.calls = []

    def __call__(self, x, t, txt, mask, keep=None):
        self.calls.append((x.shape[0], round(float(t[0]), 6)))
        is_null = (txt.abs().sum(dim=(1, 2)) == 0).view(-1, 1, 1, 1)
        return self.a * x + torch.where(is_null, self.u, self.c), None


def euler_reference(toy, x, ts, cfg, guided, t_min_div=0.05):
    """The Euler loop written out: guided steps use u-pred + cfg (c-pred - u-pred), the others the c-pred alone."""
    for i in range(len(ts) - 1):
        t = max(ts[i], t_min_div)
        pc, pu = toy.a * x + toy.c, toy.a * x + toy.u
        x0 = pu + cfg * (pc - pu) if guided(ts[i]) else pc
        x = x + (ts[i + 1] - ts[i]) * (x - x0) / t
    return x.clamp(-1, 1)


def _run(toy, x, steps, cfg, interval, shift=2.0):
    txt, mask = torch.ones(1, 3, 4), torch.ones(1, 3, dtype=torch.bool)
    return T.sample_images(toy, txt, mask, torch.zeros(1, 3, 4), mask[:1], (8, 8), steps=steps, cfg=cfg,
                           shift=shift, t_min_div=0.05, x=x.clone(), cfg_interval=interval)


def test_guidance_interval_is_cfg_inside_and_conditional_outside():
    steps, cfg, shift = 12, 3.0, 2.0
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    ts = T.shift_t(torch.linspace(1, 0, steps + 1), shift).tolist()
    lo, hi = 0.3, 0.8
    toy = LinearToy()
    out = _run(toy, x, steps, cfg, (lo, hi), shift)
    ref = euler_reference(toy, x.double(), ts, cfg, lambda t: lo <= t <= hi).float()
    assert torch.allclose(out, ref, atol=1e-5)
    # the unconditional pass (batch 2) runs exactly at the steps inside the interval, once per step
    assert [(b, t) for b, t in toy.calls] == [(2 if lo <= t <= hi else 1, round(t, 6)) for t in ts[:-1]]
    assert 0 < sum(lo <= t <= hi for t in ts[:-1]) < steps  # the interval really splits the schedule
    # the full range is plain CFG, an empty one conditional sampling; the three differ
    full = _run(LinearToy(), x, steps, cfg, (0.0, 1.0), shift)
    assert torch.allclose(full, euler_reference(toy, x.double(), ts, cfg, lambda t: True).float(), atol=1e-5)
    cond = _run(LinearToy(), x, steps, 1.0, (0.0, 1.0), shift)
    none = _run(LinearToy(), x, steps, cfg, (0.99, 0.995), shift)  # no step's t falls inside
    assert torch.allclose(none, cond, atol=1e-6)
    assert (out - full).abs().max() > 1e-3 and (out - cond).abs().max() > 1e-3


def test_restart_replays_the_grid_between_lo_and_hi_after_noising_back():
    steps, cfg, shift = 10, 2.0, 1.0
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    fresh = [torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(3 + k)) for k in range(2)]
    toy = LinearToy()
    txt, mask = torch.ones(1, 3, 4), torch.ones(1, 3, dtype=torch.bool)
    out = T.sample_images(toy, txt, mask, torch.zeros(1, 3, 4), mask[:1], (8, 8), steps=steps, cfg=cfg, shift=shift,
                          t_min_div=0.05, x=x.clone(), cfg_interval=(0.5, 1.0), restart=(0.1, 0.4), renoise=fresh)
    ts = torch.linspace(1, 0, steps + 1).double().tolist()  # 1, 0.9, ..., 0.1, 0: lo = 0.1 (index 9), hi = 0.4 (6)
    order = list(range(9)) + [6, 7, 8] * 2 + [9]
    assert [t for _, t in toy.calls] == [round(ts[i], 6) for i in order]
    ref = x.double()
    for n, i in enumerate(order):  # the loop written out
        if n and i != order[n - 1] + 1:  # from t = 0.1 back to 0.4: x_0.4 = a x_0.1 + b noise, a = 0.6 / 0.9
            a = 0.6 / 0.9
            ref = a * ref + (0.4 ** 2 - (a * 0.1) ** 2) ** 0.5 * fresh.pop(0).double()
        pc, pu = toy.a * ref + toy.c, toy.a * ref + toy.u
        x0 = pu + cfg * (pc - pu) if ts[i] >= 0.5 else pc
        ref = ref + (ts[i + 1] - ts[i]) * (ref - x0) / max(ts[i], 0.05)
    assert not fresh  # each restart took its own noise
    assert torch.allclose(out, ref.clamp(-1, 1).float(), atol=1e-5)
    none = T.sample_images(LinearToy(), txt, mask, torch.zeros(1, 3, 4), mask[:1], (8, 8), steps=steps, cfg=cfg,
                           shift=shift, t_min_div=0.05, x=x.clone(), cfg_interval=(0.5, 1.0))
    assert (none - out).abs().max() > 1e-3


def test_grid_shift_rolls_the_dits_input_and_its_x0_back_the_same_for_every_batch():
    """grid_shift=g: step n's DiT sees x rolled by a draw s_n in [-g, g]^2 (Generator seeded 0), its x0 is rolled by
    -s_n. For LinearToy, x0 = a x + b rolled by -s_n: the Euler loop written out with those rolls. A model that
    commutes with rolling (b constant) samples as without shifts; each image is the same alone or in a batch."""
    steps, cfg, g = 8, 2.0, 3
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    txt, mask = torch.ones(2, 3, 4), torch.ones(2, 3, dtype=torch.bool)
    run = lambda toy, x, shift: T.sample_images(toy, txt[:len(x)], mask[:len(x)], torch.zeros(1, 3, 4), mask[:1],
                                                (8, 8), steps=steps, cfg=cfg, shift=1.0, t_min_div=0.05, x=x.clone(),
                                                grid_shift=(shift, 1))
    toy = LinearToy()
    out = run(toy, x, g)
    rolls = torch.randint(-g, g + 1, (steps, 2), generator=torch.Generator().manual_seed(0)).tolist()
    assert any(r != [0, 0] for r in rolls) and all(-g <= v <= g for r in rolls for v in r)
    ts, ref = torch.linspace(1, 0, steps + 1).double().tolist(), x.double()
    for i, (dy, dx) in enumerate(rolls):
        c, u = (b.double().roll((-dy, -dx), (2, 3)) for b in (toy.c, toy.u))
        x0 = toy.a * ref + u + cfg * (c - u)
        ref = ref + (ts[i + 1] - ts[i]) * (ref - x0) / max(ts[i], 0.05)
    assert torch.allclose(out, ref.clamp(-1, 1).float(), atol=1e-5)
    assert (out - run(LinearToy(), x, 0)).abs().max() > 1e-3  # the rolls changed the sample
    assert torch.allclose(run(LinearToy(), x[1:], g), out[1:], atol=1e-6)  # alone as in the batch
    flat = LinearToy()
    flat.c, flat.u = flat.c.mean().expand_as(flat.c), flat.u.mean().expand_as(flat.u)
    assert torch.allclose(run(flat, x, g), run(flat, x, 0), atol=1e-5)


@pytest.mark.parametrize("last", [2, 5])
def test_last_rolls_average_the_last_steps_x0_over_further_rolls(last):
    """grid_shift=(g, K): every step but the last as with K = 1; the last step's x0 is the mean over its own roll s_n
    and the next K - 1 draws of the same generator. The Euler loop written out for LinearToy with those rolls."""
    steps, cfg, g = 6, 2.0, 3
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    txt, mask = torch.ones(2, 3, 4), torch.ones(2, 3, dtype=torch.bool)
    run = lambda k: T.sample_images(toy, txt, mask, torch.zeros(1, 3, 4), mask[:1], (8, 8), steps=steps, cfg=cfg,
                                    shift=1.0, t_min_div=0.05, x=x.clone(), grid_shift=(g, k))
    toy = LinearToy()
    out = run(last)
    rolls = torch.randint(-g, g + 1, (steps + last - 1, 2), generator=torch.Generator().manual_seed(0)).tolist()
    assert len({tuple(r) for r in rolls[steps - 1:]}) > 1  # the last step's rolls differ
    ts, ref = torch.linspace(1, 0, steps + 1).double().tolist(), x.double()
    for i in range(steps):
        x0 = 0
        for dy, dx in [rolls[i]] + (rolls[steps:] if i == steps - 1 else []):
            c, u = (b.double().roll((-dy, -dx), (2, 3)) for b in (toy.c, toy.u))
            x0 = x0 + (toy.a * ref + u + cfg * (c - u)) / (last if i == steps - 1 else 1)
        ref = ref + (ts[i + 1] - ts[i]) * (ref - x0) / max(ts[i], 0.05)
    assert torch.allclose(out, ref.clamp(-1, 1).float(), atol=1e-5)
    assert (out - run(1)).abs().max() > 1e-3  # the further rolls changed the sample


class GaussianDenoiser:
    """The exact x0 prediction E[x0 | x_t] for data x0 ~ N(mu, sigma^2) per pixel, x_t = (1 - t) x0 + t noise."""

    def __init__(self, mu, sigma):
        self.mu, self.var = mu, sigma ** 2

    def __call__(self, x, t, txt, mask):
        s = (1 - t).double().view(-1, 1, 1, 1)
        var_t = s ** 2 * self.var + t.double().view(-1, 1, 1, 1) ** 2
        return self.mu + s * self.var / var_t * (x.double() - s * self.mu), None


@pytest.mark.parametrize("restarts", [0, 8])
def test_restarts_keep_the_data_distribution_of_an_exact_denoiser(restarts):
    """With the exact denoiser a fine Euler grid lands on N(mu, sigma^2); a restart's noise must be the flow's own
    marginal at restart_hi (std hi, given x at lo), or the final spread grows with every restart (noise of std hi
    instead: +2.9 % here)."""
    mu, sigma, steps = 0.1, 0.2, 400
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 128, 128, generator=g).double()
    fresh = [torch.randn(1, 3, 128, 128, generator=g).double() for _ in range(restarts)]
    txt, mask = torch.ones(1, 3, 4), torch.ones(1, 3, dtype=torch.bool)
    out = T.sample_images(GaussianDenoiser(mu, sigma), txt, mask, torch.zeros(1, 3, 4), mask[:1], (128, 128),
                          steps=steps, cfg=1.0, shift=1.0, t_min_div=1e-4, x=x, restart=(0.2, 0.5), renoise=fresh)
    assert out.mean().item() == pytest.approx(mu, abs=0.005)
    assert out.std().item() == pytest.approx(sigma, rel=0.012)


def test_stochastic_steps_redraw_eta_of_the_predicted_noise_from_eta_lo_up():
    """eta=(e, lo): a step from t >= lo to s lands on (1 - s) x0 + s (sqrt(1 - e^2) eps + e xi), with eps = (x - (1 - t)
    x0) / t the noise the step predicts and xi the next draw of noise() (DDIM's family with sigma = e s); the steps
    below lo are Euler steps and draw nothing. The loop written out."""
    steps, cfg, e, lo = 10, 2.0, 0.6, 0.45
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    draws = [torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(10 + k)) for k in range(steps)]
    txt, mask = torch.ones(1, 3, 4), torch.ones(1, 3, dtype=torch.bool)
    run = lambda eta, it: T.sample_images(LinearToy(), txt, mask, torch.zeros(1, 3, 4), mask[:1], (8, 8), steps=steps,
                                          cfg=cfg, shift=1.0, t_min_div=0.05, x=x.clone(), cfg_interval=(0.3, 1.0),
                                          eta=eta, noise=lambda: next(it))
    it = iter(draws)
    out = run((e, lo), it)
    toy, ts, ref, used = LinearToy(), torch.linspace(1, 0, steps + 1).double().tolist(), x.double(), 0
    for i in range(steps):
        t, s = ts[i], ts[i + 1]
        pc, pu = toy.a * ref + toy.c, toy.a * ref + toy.u
        x0 = pu + cfg * (pc - pu) if t >= 0.3 else pc
        if t >= lo:
            eps = (ref - (1 - t) * x0) / t
            ref = (1 - s) * x0 + s * ((1 - e ** 2) ** 0.5 * eps + e * draws[used].double())
            used += 1
        else:
            ref = ref + (s - t) * (ref - x0) / max(t, 0.05)
    assert used == 6 and next(it) is draws[used]  # t = 1, 0.9, ..., 0.5 drew one noise each, in order
    assert torch.allclose(out, ref.clamp(-1, 1).float(), atol=1e-5)
    euler = run((0.0, lo), iter(()))  # eta 0 draws nothing (an empty iterator would raise)
    assert (euler - out).abs().max() > 1e-3
    plain = T.sample_images(LinearToy(), txt, mask, torch.zeros(1, 3, 4), mask[:1], (8, 8), steps=steps, cfg=cfg,
                            shift=1.0, t_min_div=0.05, x=x.clone(), cfg_interval=(0.3, 1.0))
    assert torch.equal(euler, plain)


def test_stochastic_steps_keep_the_data_distribution_of_an_exact_denoiser():
    """With the exact denoiser, steps that redraw half of their predicted noise from t = 0.5 up still land on N(mu,
    sigma^2), as the deterministic grid does (a step that added the fresh noise without shrinking the predicted
    noise to sqrt(1 - eta^2) of itself would widen the spread)."""
    mu, sigma, steps = 0.1, 0.2, 400
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 128, 128, generator=g).double()
    txt, mask = torch.ones(1, 3, 4), torch.ones(1, 3, dtype=torch.bool)
    out = T.sample_images(GaussianDenoiser(mu, sigma), txt, mask, torch.zeros(1, 3, 4), mask[:1], (128, 128),
                          steps=steps, cfg=1.0, shift=1.0, t_min_div=1e-4, x=x, eta=(0.5, 0.5),
                          noise=lambda: torch.randn(1, 3, 128, 128, generator=g).double())
    assert out.mean().item() == pytest.approx(mu, abs=0.005)
    assert out.std().item() == pytest.approx(sigma, rel=0.012)


def tiny_dit(seed=0):
    hp = T.Hyperparameters(hidden=64, depth=4, heads=2, patch=4, bottleneck=16, text_dim=24, tread_start=1,
                           tread_end=2)
    model = T.PRXDiT(hp).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


class ToyText:
    def __call__(self, captions):  # the caption's length sets the embedding; "" is all zeros
        emb = torch.stack([torch.full((5, 24), len(c) / 40.0) * torch.linspace(-1, 1, 24) for c in captions])
        mask = torch.ones(len(captions), 5, dtype=torch.bool)
        return emb, mask


def test_tread_guidance_one_is_the_conditional_sample_and_one_step_is_prx_formula():
    model, text = tiny_dit(), ToyText()
    prompts = ["a red circle", "two blue squares in a row"]
    kw = dict(size=(16, 16), steps=4, shift=1.0, t_min_div=0.05, seed=3, batch=2)
    cond = T.generate(model, text, prompts, cfg=1.0, **kw)
    assert torch.allclose(T.generate(S.tread_guided(model, 1.0, 0.5, (0.0, 1.0)), text, prompts, cfg=1.0, **kw), cond,
                          atol=1e-6)
    guided = T.generate(S.tread_guided(model, 1.5, 0.5, (0.0, 1.0)), text, prompts, cfg=1.0, **kw)
    assert (guided - cond).abs().max() > 1e-3
    # guidance only for t in the interval: one that no step's t falls in gives the conditional sample
    outside = T.generate(S.tread_guided(model, 1.5, 0.5, (0.99, 0.995)), text, prompts, cfg=1.0, **kw)
    assert torch.equal(outside, cond)
    # one Euler step from t = 1 lands on the guided x0, PRX's convention: x0_routed + S (x0_full - x0_routed)
    noise = torch.stack([torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(3 + j)) for j in range(2)])
    txt, mask = text(prompts)
    t = torch.ones(2)
    full = model(noise, t, txt, mask)[0]
    keep = T.tread_keep(1, 16, 0.5, "cpu", torch.Generator().manual_seed(0)).expand(2, -1)
    assert keep.shape == (2, 8)
    routed = model(noise, t, txt, mask, keep)[0]
    assert (full - routed).abs().max() > 1e-3  # the routed model really differs
    one = T.generate(S.tread_guided(model, 1.5, 0.5, (0.0, 1.0)), text, prompts, cfg=1.0, **{**kw, "steps": 1})
    assert torch.allclose(one, (routed + 1.5 * (full - routed)).clamp(-1, 1), atol=1e-5)


@pytest.mark.parametrize("guidance", ["cfg_interval", "tread", "restarts"])
def test_same_seed_same_image_whatever_the_batch(guidance):
    model, text = tiny_dit(1), ToyText()
    prompts = ["a red circle", "a blue square", "a green triangle in the top left"]
    kw = dict(size=(16, 24), steps=3, cfg=2.0, shift=1.0, t_min_div=0.05, seed=11)
    if guidance == "cfg_interval":
        kw["cfg_interval"] = (0.2, 0.7)
    elif guidance == "restarts":  # each image's restart noise comes from its own seed too
        kw.update(steps=5, restarts=(2, 0.2, 0.6))
        assert not torch.allclose(T.generate(model, text, prompts, **kw),
                                  T.generate(model, text, prompts, **{**kw, "restarts": (0, 0.2, 0.6)}))
    else:  # TREAD self-guidance replaces CFG: the wrapper, sampled with cfg=1
        model, kw["cfg"] = S.tread_guided(model, 1.0, 0.5, (0.0, 1.0)), 1.0
    a = T.generate(model, text, prompts, batch=3, **kw)
    assert torch.equal(a, T.generate(model, text, prompts, batch=3, **kw))
    assert torch.allclose(a, T.generate(model, text, prompts, batch=1, **kw), atol=1e-5)
    assert not torch.allclose(a, T.generate(model, text, prompts, batch=3, **{**kw, "seed": 12}))
