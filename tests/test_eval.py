"""The evaluation (the leaf module evals.py, driven by the trainer's prepare_eval and evaluate): metric maths against
closed forms and direct loops, feature extractors built as tiny random models of the real classes and loaded through
the real code path, the reference cache, a run that evaluates."""
import dataclasses
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import evals
import sample as S
import train_gpt_style as T
from conftest import ROOT

# ---------------------------------------------------------------- Fréchet distance


def spd(d, seed):  # a random symmetric positive definite matrix
    a = torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def test_frechet_distance_closed_forms():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert evals.frechet_distance([0.5], [[4.0]], [2.0], [[9.0]]) == pytest.approx(1.5 ** 2 + (2 - 3) ** 2, rel=1e-12)
    # diagonal (commuting) covariances: |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2
    a, b = torch.tensor([1.0, 2.0, 0.5, 3.0]).double(), torch.tensor([0.3, 2.0, 4.0, 1.0]).double()
    mu1, mu2 = torch.tensor([0.0, 1.0, -1.0, 2.0]).double(), torch.tensor([1.0, 1.0, 0.0, 0.0]).double()
    ref = (mu1 - mu2).pow(2).sum() + (a.sqrt() - b.sqrt()).pow(2).sum()
    assert evals.frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(ref.item(), rel=1e-10)
    # identical Gaussians: 0
    s = spd(6, 0)
    assert abs(evals.frechet_distance(mu1[:1].expand(6), s, mu1[:1].expand(6), s)) < 1e-9


def test_frechet_distance_non_commuting_covariances():
    d = 7
    s1, s2 = spd(d, 1), spd(d, 2)
    assert (s1 @ s2 - s2 @ s1).abs().max() > 0.1  # they really do not commute
    mu1, mu2 = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    try:  # the usual FID reference: scipy's matrix square root of S1 S2
        from scipy.linalg import sqrtm
        tr = np.trace(sqrtm(s1.numpy() @ s2.numpy())).real
    except ImportError:  # eigenvalues of S1 S2 (real, positive: it is similar to S1^1/2 S2 S1^1/2)
        tr = np.sqrt(np.linalg.eigvals(s1.numpy() @ s2.numpy()).real).sum()
    ref = ((mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace()).item() - 2 * tr
    assert evals.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-9)
    # and from samples: gaussian_stats is numpy's mean and (unbiased) covariance
    f = torch.randn(50, 4, generator=torch.Generator().manual_seed(3))
    mu, cov = evals.gaussian_stats(f)
    assert np.allclose(mu.numpy(), f.double().numpy().mean(0)) and np.allclose(cov.numpy(), np.cov(f.double().numpy().T))


# ---------------------------------------------------------------- MMD


def mmd_loops(x, y, sigma, scale, unbiased):
    """Squared MMD written out with double loops."""
    k = lambda a, b: math.exp(-sum((ai - bi) ** 2 for ai, bi in zip(a, b)) / (2 * sigma ** 2))
    x, y = x.tolist(), y.tolist()
    m, n = len(x), len(y)
    if unbiased:
        xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
        yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    else:
        xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m)) / m ** 2
        yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n)) / n ** 2
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return scale * (xx + yy - 2 * xy)


@pytest.mark.parametrize("sigma,unbiased", [(10.0, True), (1.0, True), (1.0, False)])
def test_mmd_matches_double_loop(sigma, unbiased):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 3, generator=g), torch.randn(7, 3, generator=g) + 0.5
    ref = mmd_loops(x, y, sigma, 1000.0, unbiased)
    assert evals.mmd(x, y, sigma=sigma, unbiased=unbiased) == pytest.approx(ref, rel=1e-9)
    assert abs(ref) > 1e-3  # a real difference, not noise around 0


def test_cmmd_defaults_are_sigma_10_scale_1000_unbiased():
    """evals.run_eval calls mmd with its defaults: they must be CMMD's (RBF sigma = 10, x 1000, unbiased)."""
    g = torch.Generator().manual_seed(2)
    x, y = (F.normalize(torch.randn(6, 4, generator=g) + shift, dim=-1) * 8 for shift in (0.0, 0.7))  # |x| ~ sigma
    ref = mmd_loops(x, y, 10.0, 1000.0, True)
    assert evals.mmd(x, y) == pytest.approx(ref, rel=1e-9)
    others = [mmd_loops(x, y, sigma, scale, unb) for sigma, scale, unb in ((5.0, 1e3, True), (20.0, 1e3, True),
                                                                           (10.0, 1.0, True), (10.0, 1e3, False))]
    assert all(abs(o - ref) > 1e-3 * abs(ref) for o in others)  # each default changes the value


def test_mmd_of_a_set_with_itself():
    x = F.normalize(torch.randn(9, 6, generator=torch.Generator().manual_seed(1)).double(), dim=-1)  # unit, like CLIP
    assert evals.mmd(x, x, unbiased=False) == 0.0  # the V-statistic of a set against itself
    # the unbiased estimator drops the i = j pairs within each set but not across, so against itself it is
    # -(2 / m) (1 - mean off-diagonal kernel) x scale: below 0, and 0 in expectation over independent sets
    m, sigma = len(x), 1.0
    kbar = sum(math.exp(-((x[i] - x[j]) ** 2).sum().item() / (2 * sigma ** 2))
               for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    assert evals.mmd(x, x, sigma=sigma) == pytest.approx(-1000 * 2 / m * (1 - kbar), rel=1e-9)
    assert evals.mmd(x[:1].expand(4, -1), x[:1].expand(4, -1)) == pytest.approx(0.0, abs=1e-9)  # one point: exactly 0


# ---------------------------------------------------------------- feature extractors, through the loading path


def _word_tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(words, trainers.WordLevelTrainer(special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>", special_tokens=[("<bos>", 1),
                                                                                                 ("<eos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>")


CAPTIONS = ["a small red circle in the center", "a large blue square in the top left",
            "a small green triangle in the bottom right and a large purple circle in the top right"]


@pytest.fixture(scope="module")
def eval_models(tmp_path_factory):
    """Tiny random CLIP, DINOv2 and timm models of the real classes, saved to folders: -> {role: folder}."""
    import timm
    from timm.models import save_for_hf
    from transformers import (CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig,
                              Dinov2WithRegistersModel)
    d = tmp_path_factory.mktemp("eval_models")
    torch.manual_seed(0)
    tok = _word_tokenizer([" ".join(CAPTIONS) + " orange yellow"])
    text = dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=24, pad_token_id=0, bos_token_id=1,
                eos_token_id=tok.eos_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=48,
                  patch_size=16)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(d / "clip")
    tok.save_pretrained(d / "clip")
    Dinov2Model(Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                             patch_size=14, image_size=224)).save_pretrained(d / "dinov2")
    Dinov2WithRegistersModel(Dinov2WithRegistersConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                       num_attention_heads=2, patch_size=14, image_size=518,
                                                       num_register_tokens=4)).save_pretrained(d / "dino_mmd")
    save_for_hf(timm.create_model("test_resnet", pretrained=False), d / "inception")
    return {k: str(d / k) for k in ("clip", "dinov2", "dino_mmd", "inception")}


def hp_with(models, **kw):
    paths = dict(eval_clip=models["clip"], eval_dino=models["dinov2"], eval_inception=models["inception"],
                 eval_dino_mmd=models["dino_mmd"])
    return dataclasses.replace(T.Hyperparameters(), **{**paths, **kw})


def images01(n, size=40, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def prep(x, size, mean, std):  # the preprocessing, written out: bicubic resize, normalise
    x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def test_clip_score_is_clipped_cosine_of_clip_embeddings(eval_models, tmp_path):
    from transformers import AutoTokenizer, CLIPModel
    fns = evals.load_eval_models(hp_with(eval_models, eval_dino="", eval_inception="", eval_dino_mmd=""), "cpu")
    assert set(fns) == {"clip", "clip_text"}
    x = images01(3)
    prompts = CAPTIONS
    out = evals.eval_features(fns, [(x, prompts)], "cpu")
    clip, tok = CLIPModel.from_pretrained(eval_models["clip"]).eval(), AutoTokenizer.from_pretrained(eval_models["clip"])
    with torch.no_grad():
        img = clip.get_image_features(pixel_values=prep(x, (48, 48), evals.CLIP_MEAN, evals.CLIP_STD)).pooler_output
        txt = clip.get_text_features(**tok(prompts, padding=True, return_tensors="pt")).pooler_output
    cos = F.cosine_similarity(img, txt, dim=-1)
    assert torch.allclose(out["clip_score"][:, 0], 100 * cos.clamp(min=0), atol=1e-4)
    assert torch.allclose(out["clip"], F.normalize(img, dim=-1), atol=1e-5)  # CMMD's unit image embeddings
    assert (cos > 0).all()
    # the same model with its text projection negated: every cosine changes sign, and the score clips them to 0
    with torch.no_grad():
        clip.text_projection.weight.neg_()
    clip.save_pretrained(tmp_path / "neg")
    tok.save_pretrained(tmp_path / "neg")
    fns = evals.load_eval_models(hp_with(eval_models, eval_clip=str(tmp_path / "neg"), eval_dino="",
                                         eval_inception="", eval_dino_mmd=""), "cpu")
    assert torch.equal(evals.eval_features(fns, [(x, prompts)], "cpu")["clip_score"], torch.zeros(3, 1))


def test_fd_dinov2_features_through_the_loading_path(eval_models):
    from transformers import Dinov2Model
    fns = evals.load_eval_models(hp_with(eval_models, eval_clip="", eval_inception="", eval_dino_mmd=""), "cpu")
    x, y = images01(6), images01(5, seed=1) * 0.5
    f = evals.eval_features(fns, [(x[:4], None), (x[4:], None)], "cpu")["dinov2"]
    dino = Dinov2Model.from_pretrained(eval_models["dinov2"]).eval()
    with torch.no_grad():
        ref = dino(pixel_values=prep(x, (224, 224), evals.IMAGENET_MEAN, evals.IMAGENET_STD)).last_hidden_state[:, 0]
    assert f.shape == (6, 32) and torch.allclose(f, ref, atol=1e-5)  # the CLS token after the final norm
    g = evals.eval_features(fns, [(y, None)], "cpu")["dinov2"]
    assert evals.frechet_distance(*evals.gaussian_stats(f), *evals.gaussian_stats(g)) > 0


def test_inception_features_through_timm_loading_path(eval_models):
    import timm
    fns = evals.load_eval_models(hp_with(eval_models, eval_clip="", eval_dino="", eval_dino_mmd=""), "cpu")
    x = images01(3)
    f = evals.eval_features(fns, [(x, None)], "cpu")["inception"]
    net = timm.create_model("local-dir:" + eval_models["inception"], pretrained=True, num_classes=0).eval()
    c = net.pretrained_cfg
    with torch.no_grad():
        ref = net(prep(x, tuple(c["input_size"][1:]), c["mean"], c["std"]))
    assert f.shape == (3, net.num_features) and torch.allclose(f, ref, atol=1e-5)


def test_dino_mmd_is_mmd_of_unit_cls_features_of_dinov2_reg_at_518(eval_models):
    """PRX's DINO-MMD: the CLS token after the final norm of DINOv2-with-registers at 518 px (bicubic), L2-normalised,
    compared by CMMD's MMD (sigma 10, scale 1000)."""
    from transformers import Dinov2WithRegistersModel
    fns = evals.load_eval_models(hp_with(eval_models, eval_clip="", eval_inception="", eval_dino=""), "cpu")
    assert set(fns) == {"dino_mmd"}
    x, y = images01(4), images01(3, seed=1) * 0.5
    f = evals.eval_features(fns, [(x, None)], "cpu")["dino_mmd"]
    reg = Dinov2WithRegistersModel.from_pretrained(eval_models["dino_mmd"]).eval()
    with torch.no_grad():
        ref = reg(pixel_values=prep(x, (518, 518), evals.IMAGENET_MEAN, evals.IMAGENET_STD)).last_hidden_state[:, 0]
    assert torch.allclose(f, F.normalize(ref, dim=-1), atol=1e-5)
    g = evals.eval_features(fns, [(y, None)], "cpu")["dino_mmd"]
    assert evals.mmd(f, g) > 0 and evals.mmd(f, g) == pytest.approx(evals.mmd(f, g, 10.0, 1000.0))


def test_validation_loss_is_the_flow_loss_at_fixed_t_and_noise(eval_models, tmp_path):
    """val_loss: reference image j (its caption) noised at t = (j + 1/2) / n by the noise of eval_seed + j, the flow
    loss of the model's x0 prediction, averaged over all and per t-bin; the same in every call."""
    write_heldout(tmp_path / "data", 6)
    hp = hp_with(eval_models, data=str(tmp_path / "data"), eval_n=6, sample_steps=1, amp=False, eval_inception="",
                 eval_dino="", eval_clip="", eval_dino_mmd="", hidden=32, depth=2, heads=2, patch=8, bottleneck=8,
                 text_dim=24, tread_start=0, tread_end=1)
    torch.manual_seed(0)
    model = T.PRXDiT(hp).eval()
    for p in model.parameters():  # the zero-initialised output layer would predict 0 everywhere
        p.data.add_(0.05 * torch.randn_like(p))
    ev = T.prepare_eval(hp, "cpu")
    got = T.evaluate(model, ToyText(), hp, ev, 16, tmp_path / "cache", "cpu", batch=4)
    ref = T.ShardDataset(tmp_path / "data" / "heldout")
    ref.set_stage(16, hp.patch, 1.0)
    losses = []
    for j in range(6):
        img, caption = ref[j][0], ref[j][1]
        x0 = (img[None].float() / 255) * 2 - 1
        t = torch.tensor([(j + 0.5) / 6])
        noise = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(hp.eval_seed + j))[None]
        x_t = (1 - t) * x0 + t * noise
        with torch.no_grad():
            pred = model(x_t, t, *ToyText()([caption]))[0]
        v = lambda x: (x_t - x) / t.clamp(min=hp.t_min_div)
        losses.append((v(pred) - v(x0)).pow(2).mean().item())
    assert got["val_loss"] == pytest.approx(np.mean(losses), rel=1e-5)
    t = (np.arange(6) + 0.5) / 6  # 0.083, 0.25 | 0.42, 0.58 | 0.75, 0.92
    for i, (lo, hi) in enumerate(((0, 0.3), (0.3, 0.6), (0.6, 1.01))):
        in_bin = [loss for loss, tt in zip(losses, t) if lo <= tt < hi]
        assert got[f"val_loss_t{i}"] == pytest.approx(np.mean(in_bin), rel=1e-5)
    again = T.evaluate(model, ToyText(), hp, ev, 16, tmp_path / "cache", "cpu", batch=5)
    assert all(again[k] == pytest.approx(got[k], rel=1e-6) for k in got if k != "eval_time_s")  # but the time


def test_missing_eval_model_is_one_line(tmp_path, capsys):
    hp = dataclasses.replace(T.Hyperparameters(), data=str(tmp_path / "data"), eval_n=3, eval_inception="",
                             eval_dino="", eval_dino_mmd="", eval_clip=str(tmp_path / "nope"))
    # the leaf module raises a one-line ValueError
    with pytest.raises(ValueError) as e:
        evals.load_eval_models(hp, "cpu")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"cannot load evaluation model {tmp_path / 'nope'}")
    # the trainer's prepare_eval turns it into its one error line, exit code 2
    write_heldout(tmp_path / "data", 3)
    with pytest.raises(SystemExit) as e:
        T.prepare_eval(hp, "cpu")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: evaluation: cannot load evaluation model")


def test_missing_heldout_split_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        T.prepare_eval(dataclasses.replace(T.Hyperparameters(), data=str(tmp_path)), "cpu")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "no parquet shards under" in err[0] and "eval_every=0" in err[0]


# ---------------------------------------------------------------- the evaluation, cached references, a run


def write_heldout(data, n, size=32, seed=5):
    from data_prep import write_shard
    from evals import render_shapes, sample_shapes_objects, shapes_caption
    rng = np.random.default_rng(seed)
    objects = [sample_shapes_objects(rng, 1 + i % 2) for i in range(n)]
    (data / "heldout").mkdir(parents=True, exist_ok=True)
    write_shard(data / "heldout" / "shard-00000.parquet", [render_shapes(o, size, rng) for o in objects],
                [shapes_caption(o) for o in objects])


def test_evaluate_caches_reference_statistics(eval_models, tmp_path, monkeypatch):
    write_heldout(tmp_path / "data", 7)
    hp = hp_with(eval_models, data=str(tmp_path / "data"), eval_n=5, sample_steps=2, cfg=2.0, amp=False,
                 hidden=32, depth=2, heads=2, patch=8, bottleneck=8, text_dim=24, tread_start=0, tread_end=1)
    model = T.PRXDiT(hp).eval()
    ev = T.prepare_eval(hp, "cpu")
    assert len(ev[2]) == 5 and ev[2][0].startswith("a ")  # the held-out captions are the prompts
    decoded = []
    orig = T.ShardDataset.__getitem__
    monkeypatch.setattr(T.ShardDataset, "__getitem__", lambda self, i: decoded.append(i) or orig(self, i))
    cache = tmp_path / "cache"
    first = T.evaluate(model, ToyText(), hp, ev, 16, cache, "cpu", batch=2)
    assert sorted(decoded) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]  # the first eval_n: statistics, validation loss
    files = sorted(cache.iterdir())
    assert [f.name.split("-")[0] for f in files] == ["clip", "dino_mmd", "dinov2", "inception"]
    assert all("res16-n5" in f.name for f in files)
    mtimes = [f.stat().st_mtime_ns for f in files]
    decoded.clear()
    second = T.evaluate(model, ToyText(), hp, ev, 16, cache, "cpu", batch=3)
    assert decoded == [0, 1, 2, 3, 4] and [f.stat().st_mtime_ns for f in files] == mtimes  # statistics reused
    assert set(first) == {"eval_n", "eval_res", "fid", "fd_dinov2", "cmmd", "dino_mmd", "clip_score", "val_loss",
                          "val_loss_t0", "val_loss_t1", "val_loss_t2", "eval_time_s"} and first["eval_time_s"] > 0
    for k in set(first) - {"eval_time_s"}:  # same seeds: same images whatever the batch, so the same metrics
        assert second[k] == pytest.approx(first[k], rel=1e-4, abs=1e-6)
    # the cached statistics are those of the reference images
    ref = T.ShardDataset(tmp_path / "data" / "heldout")
    ref.set_stage(16, hp.patch, 1.0)
    x = torch.stack([orig(ref, i)[0] for i in range(5)]) / 255
    mu, cov = torch.load(next(cache.glob("dinov2-*")), weights_only=True)
    f = ev[0]["dinov2"](x)
    assert torch.allclose(mu, f.double().mean(0), atol=1e-5) and torch.allclose(cov, torch.cov(f.double().T), atol=1e-5)
    decoded.clear()
    T.evaluate(model, ToyText(), hp, ev, 24, cache, "cpu", batch=5)  # another resolution: its own statistics
    assert len(decoded) == 10 and len(list(cache.glob("*res24-n5.pt"))) == 4


class ToyText:
    def __call__(self, captions):
        emb = torch.stack([torch.full((4, 24), len(c) / 40.0) * torch.linspace(-1, 1, 24) for c in captions])
        return emb, torch.ones(len(captions), 4, dtype=torch.bool)


def _eval_rank(rank, world, init, hp, cache, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    model = T.PRXDiT(hp).eval()
    m = T.evaluate(model, ToyText(), hp, T.prepare_eval(hp, "cpu"), 16, cache, "cpu", batch=2)
    (out / f"rank{rank}.json").write_text(json.dumps(m))
    dist.destroy_process_group()


@pytest.mark.slow
def test_eval_sharded_over_two_ranks_equals_one_process(eval_models, tmp_path):
    write_heldout(tmp_path / "data", 7)
    hp = hp_with(eval_models, data=str(tmp_path / "data"), eval_n=7, sample_steps=2, cfg=2.0, amp=False,
                 hidden=32, depth=2, heads=2, patch=8, bottleneck=8, text_dim=24, tread_start=0, tread_end=1)
    torch.manual_seed(0)
    one = T.evaluate(T.PRXDiT(hp).eval(), ToyText(), hp, T.prepare_eval(hp, "cpu"), 16, tmp_path / "c1", "cpu",
                     batch=2)
    torch.multiprocessing.spawn(_eval_rank, args=(2, f"file://{tmp_path}/rdv", hp, tmp_path / "c2", tmp_path),
                                nprocs=2)
    for r in range(2):  # 7 images: 4 on rank 0, 3 on rank 1; every rank gets the metrics of all 7
        two = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert set(two) == set(one)
        for k in set(one) - {"eval_time_s"}:
            assert two[k] == pytest.approx(one[k], rel=1e-4, abs=1e-6), k
    assert sorted(f.name for f in (tmp_path / "c1").iterdir()) == sorted(f.name for f in (tmp_path / "c2").iterdir())


@pytest.mark.slow
def test_tiny_run_writes_eval_lines_and_sample_py_agrees(eval_models, tmp_path, capsys):
    from data_prep import make_shapes
    data = make_shapes(tmp_path / "shapes", n=256, shard_rows=128)
    write_heldout(data, 8, size=64)
    run = tmp_path / "run"
    args = ["preset=cpu", f"data={data}", f"run_dir={run}", "hidden=64", "heads=2", "depth=3", "stage1.steps=3",
            "stage1.batch=4", "stage1.micro_batch=4", "stage2.steps=2", "stage2.batch=4", "stage2.micro_batch=4",
            "log_every=2", "ckpt_every=3", "sample_steps=2", "warmup=2", "eval_every=2", "eval_n=6", "cfg_lo=0.2",
            f"eval_clip={eval_models['clip']}", f"eval_dino={eval_models['dinov2']}",
            f"eval_inception={eval_models['inception']}", f"eval_dino_mmd={eval_models['dino_mmd']}"]
    # as users launch it: the trainer is __main__, and its evaluation calls the leaf module evals
    r = subprocess.run([sys.executable, str(ROOT / "train_gpt_style.py"), *args], capture_output=True, text=True,
                       cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r for r in rows if "eval_n" in r]
    assert [(r["step"], r["eval_res"]) for r in evaluated] == [(2, 32), (4, 64), (5, 64)]  # every 2 steps, the last
    for r in evaluated:
        assert r["eval_n"] == 6 and r["eval_time_s"] > 0
        assert all(math.isfinite(r[k]) for k in ("fid", "fd_dinov2", "cmmd", "dino_mmd", "clip_score", "val_loss"))
    assert evaluated[1]["fid"] != evaluated[2]["fid"]  # the model changed between evaluations
    log = (run / "log.txt").read_text()
    assert log.count("\neval step:") == 3 and "fd_dinov2:" in log
    assert len(list((run / "eval_ref").glob("*.pt"))) == 8  # 4 models x 2 resolutions, computed once each
    assert "shapes" in rows[-1]  # the demo's benchmark still ends the run
    # sample.py --eval on the final checkpoint gives the run's last evaluation, from the cache
    capsys.readouterr()
    m = S.main(["--ckpt", str(run), "--eval"])
    assert "eval: images generated 6/6\n" in capsys.readouterr().err  # progress, one line rewritten per batch
    for k in ("fid", "fd_dinov2", "cmmd", "dino_mmd", "clip_score", "val_loss", "val_loss_t2"):
        assert m[k] == pytest.approx(evaluated[-1][k], rel=1e-4, abs=1e-6)
