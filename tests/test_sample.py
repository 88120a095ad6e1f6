"""sample.py: checkpoint loading, deterministic sampling, bad input, and export checked against diffusers."""
import dataclasses
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

import sample as S
import support
import train_gpt_style as T
from evals import build_demo_encoders
from conftest import ROOT


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder as the trainer writes it: ckpt/step*/ (ema.pt, the raw weights in torch.distributed.checkpoint
    files) and the demo's random text encoder."""
    d = tmp_path_factory.mktemp("run")
    hp = T.parse_args(["preset=cpu", "hidden=64", "depth=3", "heads=2", "text_dim=32", "text_len=12"], False)
    build_demo_encoders(d / "demo_encoders", hp, ["a small red circle in the top left", "and"])
    torch.manual_seed(0)
    model = T.PRXDiT(hp)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # leave adaLN-Zero so outputs depend on every weight
    ck = d / "ckpt" / "step0000003"
    ck.mkdir(parents=True)
    torch.save(dict(ema=model.state_dict(), config=dataclasses.asdict(hp)), ck / "ema.pt")
    raw = {f"model.{k}": v + 1 for k, v in model.state_dict().items()}  # the raw weights differ from the EMA
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process": it is
        dcp.save(dict(model=raw), checkpoint_id=ck, no_dist=True)
    return d, hp, model


@pytest.fixture(scope="module")
def bad(run, tmp_path_factory):
    """Checkpoints whose weights do not fit their config: BAD/depth (config depth 3, weights depth 2), BAD/hidden
    (config 64 wide, weights 32 wide), BAD/nostages (a config without stages), BAD/raw (no raw weights)."""
    d, hp, model = run
    root = tmp_path_factory.mktemp("bad")
    config = dataclasses.asdict(hp)
    weights = dict(depth=T.PRXDiT(dataclasses.replace(hp, depth=2, tread_end=1)).state_dict(),
                   hidden=T.PRXDiT(dataclasses.replace(hp, hidden=32)).state_dict(), nostages=model.state_dict(),
                   raw=model.state_dict())
    for name, sd in weights.items():
        (root / name).mkdir()
        cfg = {k: v for k, v in config.items() if not (name == "nostages" and k == "stages")}
        torch.save(dict(ema=sd, config=cfg), root / name / "ema.pt")
    return root


def cli(args, cwd):  # sample.py as users run it
    return subprocess.run([sys.executable, str(ROOT / "sample.py")] + args, capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def main_in_process(args, cwd, monkeypatch, capsys):
    """sample.main(args) in this process (no interpreter start: ~10 s less a call) -> (exit code, stderr). A warning
    counts as a line of stderr, as it would in a process of its own; an exception escaping main fails the test."""
    monkeypatch.chdir(cwd)
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            S.main(args)
            code = 0
        except SystemExit as e:
            code = e.code
    err = capsys.readouterr().err + "".join(f"{w.message}\n" for w in caught)
    return code, err


def test_load_model_roundtrip(run):
    d, hp, model = run
    hp2, m2, run_dir = S.load_model(d)
    assert hp2 == hp and run_dir == d
    for (k, v), (k2, v2) in zip(model.state_dict().items(), m2.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    for path in (d / "ckpt" / "step0000003", d / "ckpt" / "step0000003" / "ema.pt"):
        assert S.find_checkpoint(path) == d / "ckpt" / "step0000003"
    raw = S.load_model(d, ema=False)[1]
    for (k, v), (k2, v2) in zip(model.state_dict().items(), raw.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v + 1, v2)


def test_same_seed_same_image_whatever_the_batch(run):
    d, hp, model = run
    text = T.TextEncoder(S.text_encoder_path(hp, d), hp.text_len, torch.device("cpu"), torch.float32)
    prompts = ["a small red circle in the top left", "a large red circle in the top left", "a small red circle"]
    kw = dict(size=(16, 16), steps=3, cfg=2.0, shift=1.0, t_min_div=0.05, seed=5)
    a = T.generate(model, text, prompts, batch=3, **kw)
    b = T.generate(model, text, prompts, batch=1, **kw)
    assert torch.allclose(a, b, atol=1e-5)
    c = T.generate(model, text, prompts, batch=3, **{**kw, "seed": 6})
    assert not torch.allclose(a, c)
    kw.update(eta=(1.0, 0.5), restarts=(1, 0.2, 0.5))  # stochastic steps and a restart draw each image's own noise
    d3 = T.generate(model, text, prompts, batch=3, **kw)
    assert torch.allclose(d3, T.generate(model, text, prompts, batch=1, **kw), atol=1e-5)
    assert not torch.allclose(d3, T.generate(model, text, prompts, batch=3, **{**kw, "eta": (0.0, 0.5)}))


def test_cli_names_and_seeds_pngs_by_line_and_skips_blank_lines(run, tmp_path, capsys):
    d, hp, model = run
    lines = ["a small red circle in the top left", "", "a large red circle in the top left", "  ",
             "a small red circle in the center", "a large blue square in the bottom right", ""]
    (tmp_path / "p.txt").write_text("\n".join(lines) + "\n")
    S.main(["--ckpt", str(d), "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o"), "--steps", "2",
            "--size", "16", "--seed", "3", "--batch", "2", "--score"])  # batches: lines 0 and 2, then 4 and 5
    printed, err = capsys.readouterr()
    assert "4 images in" in printed and "3 blank lines skipped" in printed
    # progress, one line rewritten per batch (after a warning on the words this fixture's tiny vocabulary lacks)
    assert err.endswith("\rsampled 2/4 images\rsampled 4/4 images\n")
    from evals import score_shapes
    from PIL import Image
    kept = [i for i, line in enumerate(lines) if line.strip()]
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [f"{i:05d}.png" for i in kept] + ["grid.png"]
    sc = score_shapes([Image.open(tmp_path / "o" / f"{i:05d}.png") for i in kept], [lines[i] for i in kept])
    assert "shapes score: " + " ".join(f"{k}:{v:.3f}" for k, v in sc.items() if k != "per_image") in printed
    text = T.TextEncoder(S.text_encoder_path(hp, d), hp.text_len, torch.device("cpu"), torch.float32)
    refs = []
    for i in kept:  # line i alone, from the noise of seed 3 + i
        refs.append(T.generate(model, text, [lines[i]], (16, 16), 2, hp.cfg, hp.t_shift, hp.t_min_div, seed=3 + i,
                               amp=hp.amp, restarts=(hp.restarts, hp.restart_lo, hp.restart_hi),
                               grid_shift=(hp.grid_shift, hp.last_rolls), eta=(hp.eta, hp.eta_lo)))
        assert same_u8(Image.open(tmp_path / "o" / f"{i:05d}.png"), support.to_uint8(refs[-1])[0]), i
    support.save_grid(torch.cat(refs), tmp_path / "grid.png", nrow=8, captions=[lines[i] for i in kept])
    assert same_u8(Image.open(tmp_path / "o" / "grid.png"), Image.open(tmp_path / "grid.png"))


def same_u8(a, b):
    """Two 8-bit images equal up to one level: a batch of two and a batch of one round differently in fp32 on some
    CPUs (one pixel one level apart, measured on an AVX2 machine), where another line's seed differs by ~50 levels on
    average."""
    return np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1


def test_cli_restarts_grid_shift_last_rolls_and_eta_default_to_the_runs_and_are_the_samplers(run, tmp_path, capsys):
    d, hp, model = run
    text = T.TextEncoder(S.text_encoder_path(hp, d), hp.text_len, torch.device("cpu"), torch.float32)
    from PIL import Image
    prompt = "a small red circle in the top left"
    assert hp.grid_shift == T.PRESETS["cpu"]["grid_shift"] > 0 and hp.eta == T.PRESETS["cpu"]["eta"] > 0
    assert hp.last_rolls == T.PRESETS["cpu"]["last_rolls"] > 1
    g0, r0, e0, k0 = hp.grid_shift, hp.last_rolls, hp.eta, hp.restarts
    for flag, k, g, r, e in (([], k0, g0, r0, e0), (["--restarts", "0"], 0, g0, r0, e0),
                             (["--restarts", "2"], 2, g0, r0, e0), (["--last-rolls", "1"], k0, g0, 1, e0),
                             (["--restarts", "2", "--grid-shift", "0"], 2, 0, r0, e0),
                             (["--last-rolls", "3"], k0, g0, 3, e0),
                             (["--eta", "0"], k0, g0, r0, 0.0), (["--eta", "0.5"], k0, g0, r0, 0.5)):
        out = tmp_path / f"{k}_{g}_{r}_{e}"
        S.main(["--ckpt", str(d), "--prompt", prompt, "--out", str(out), "--steps", "5", "--size", "16", *flag])
        ref = T.generate(model, text, [prompt], (16, 16), 5, hp.cfg, hp.t_shift, hp.t_min_div, amp=hp.amp,
                         cfg_interval=(hp.cfg_lo, hp.cfg_hi), restarts=(k, hp.restart_lo, hp.restart_hi),
                         grid_shift=(g, r), eta=(e, hp.eta_lo))
        assert np.array_equal(np.asarray(Image.open(out / "00000.png")), support.to_uint8(ref)[0]), (k, g, r, e)
    capsys.readouterr()
    png = lambda k, g, e=e0, r=r0: np.asarray(Image.open(tmp_path / f"{k}_{g}_{r}_{e}" / "00000.png"))
    assert not np.array_equal(png(0, g0), png(2, g0))
    assert not np.array_equal(png(2, 0), png(2, g0))
    assert not np.array_equal(png(k0, g0, r=1), png(k0, g0)) and not np.array_equal(png(k0, g0, r=3), png(k0, g0))
    assert not np.array_equal(png(k0, g0, 0.0), png(k0, g0))
    assert not np.array_equal(png(k0, g0, 0.5), png(k0, g0))
    card = S.model_card(dataclasses.replace(hp, restarts=3), d / "ckpt" / "step0000003", d, False)
    assert f"3 restarts (noised back from t = {hp.restart_lo} to {hp.restart_hi}" in card
    assert "restarts" not in S.model_card(dataclasses.replace(hp, restarts=0), d / "ckpt" / "step0000003", d, False)
    card = S.model_card(dataclasses.replace(hp, grid_shift=4, last_rolls=1), d, d, False)
    assert "rolled the image by up to 4 px before each step's transformer and back (`sample.py`)" in card
    card = S.model_card(dataclasses.replace(hp, grid_shift=4, last_rolls=8), d, d, False)
    assert "and back, its last prediction the mean over 8 rolls (`sample.py`)" in card
    assert "rolled" not in S.model_card(dataclasses.replace(hp, grid_shift=0), d, d, False)
    assert f"from t = {hp.eta_lo} up redrew 0.7 of their" in S.model_card(dataclasses.replace(hp, eta=0.7), d, d, False)
    assert "redrew" not in S.model_card(dataclasses.replace(hp, eta=0.0), d, d, False)


def test_cli_without_out_writes_into_the_run_folder(run, capsys):
    import shutil
    d, hp, model = run
    S.main(["--ckpt", str(d), "--prompt", "a small red circle", "--steps", "1", "--size", "16"])
    try:
        assert f"--out not given: writing to {d / 'sampled'}" in capsys.readouterr().out
        assert sorted(p.name for p in (d / "sampled").iterdir()) == ["00000.png", "grid.png"]
    finally:
        shutil.rmtree(d / "sampled", ignore_errors=True)


def test_demo_text_encoder_warns_on_words_it_does_not_know(run, tmp_path, capsys):
    """The demo's word-level tokenizer reads unknown words as <unk>: sample.py names them, once each, in one line."""
    d, hp, model = run
    S.main(["--ckpt", str(d), "--prompt", "a violet circle in the top left, violet", "--steps", "1", "--size", "16",
            "--out", str(tmp_path / "o")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert err == ["warning: the demo's text encoder does not know 'violet' ',' (read as <unk>: its vocabulary is "
                   "the words of the shapes data)"]
    S.main(["--ckpt", str(d), "--prompt", "a small red circle in the top left", "--steps", "1", "--size", "16",
            "--out", str(tmp_path / "o")])
    assert "warning" not in capsys.readouterr().err


def test_cli_defaults_are_the_checkpoints_steps_cfg_interval_restarts_grid_shift_and_eta(run, tmp_path):
    d, hp, model = run
    hp3 = dataclasses.replace(hp, sample_steps=3, cfg=2.0, cfg_lo=0.5, restarts=1, grid_shift=2, last_rolls=3,
                              eta=0.5, eta_lo=0.6)  # the fixture's: 20, 3, [0.3, 1], 4, 4, 8, the preset's eta
    ck = tmp_path / "r" / "ckpt" / "step1"
    ck.mkdir(parents=True)
    (tmp_path / "r" / "demo_encoders").symlink_to(d / "demo_encoders")
    torch.save(dict(ema=model.state_dict(), config=dataclasses.asdict(hp3)), ck / "ema.pt")
    prompt = "a small red circle in the top left"
    S.main(["--ckpt", str(tmp_path / "r"), "--prompt", prompt, "--out", str(tmp_path / "o"), "--size", "16"])
    from PIL import Image
    text = T.TextEncoder(S.text_encoder_path(hp, d), hp.text_len, torch.device("cpu"), torch.float32)
    ref = T.generate(model, text, [prompt], (16, 16), 3, 2.0, hp.t_shift, hp.t_min_div, amp=hp.amp,
                     cfg_interval=(0.5, 1.0), restarts=(hp3.restarts, hp3.restart_lo, hp3.restart_hi),
                     grid_shift=(2, 3), eta=(0.5, 0.6))  # 2/3 guided
    assert np.array_equal(np.asarray(Image.open(tmp_path / "o" / "00000.png")), support.to_uint8(ref)[0])


def test_cli_writes_each_batch_before_sampling_the_next(run, tmp_path, monkeypatch):
    d, _, _ = run
    out, seen, generate = tmp_path / "o", [], T.generate

    def spy(*args, **kw):  # the PNGs on disk when each batch starts
        seen.append(sorted(p.name for p in out.iterdir()))
        return generate(*args, **kw)
    monkeypatch.setattr(T, "generate", spy)
    (tmp_path / "p.txt").write_text("a small red circle\n" * 5)
    S.main(["--ckpt", str(d), "--prompts", str(tmp_path / "p.txt"), "--out", str(out), "--steps", "1", "--size",
            "16", "--batch", "2"])
    assert seen == [[f"{i:05d}.png" for i in range(n)] for n in (0, 2, 4)]


@pytest.mark.parametrize("res,patch,aspect_max", [(64, 8, 2.0), (32, 8, 2.0), (1024, 32, 2.0), (64, 8, 1.0),
                                                   (96, 16, 3.0)])
def test_snap_size_is_the_trained_bucket_nearest_in_aspect_ratio(res, patch, aspect_max):
    buckets = support.aspect_buckets(res, patch, aspect_max)  # what the data loader trains on at this resolution
    dist = lambda b, w, h: abs(math.log(b[0] / b[1]) - math.log(w / h))
    for h, w in np.random.default_rng(0).integers(1, 4 * res, size=(300, 2)).tolist() + [[res, res], [7, 1000]]:
        sh, sw = S.snap_size(h, w, res, patch, aspect_max)
        assert (sw, sh) in buckets
        assert dist((sw, sh), w, h) <= min(dist(b, w, h) for b in buckets) + 1e-12  # brute force: none nearer
        # the trained token count, sides multiples of the patch, within the aspect range
        assert sh % patch == 0 and sw % patch == 0 and abs(sw * sh / res ** 2 - 1) <= support.BUCKET_AREA_TOL
        assert 1 / aspect_max <= sw / sh <= aspect_max
    assert S.snap_size(res, res, res, patch, aspect_max) == (res, res)


def test_cli_width_height_interval_and_tread_guidance(run, tmp_path, capsys):
    d, hp, _ = run
    text = T.TextEncoder(S.text_encoder_path(hp, d), hp.text_len, torch.device("cpu"), torch.float32)
    from PIL import Image
    for extra, res in (([], hp.stages[-1].res), (["--size", "32"], 32)):  # buckets of the last stage, or of --size
        S.main(["--ckpt", str(d), "--prompt", "a small red circle in the top left", "--out", str(tmp_path / "o"),
                "--steps", "3", "--width", "70", "--height", "18", "--cfg-interval", "0.2,0.9", "--tread-guidance",
                "0.5", *extra])
        h, w = S.snap_size(18, 70, res, hp.patch, hp.aspect_max)
        out = capsys.readouterr().out
        assert f"size 70x18 snapped to {w}x{h}" in out
        if not extra:  # the README's worked example, on the CPU demo's setup that this checkpoint has
            assert (res, hp.patch, hp.aspect_max) == (64, 8, 2.0), "the README's example (Sampling) needs updating"
            assert "size 70x18 snapped to 88x48" in out and (w, h) == (88, 48)
        png = np.asarray(Image.open(tmp_path / "o" / "00000.png"))
        assert png.shape == (h, w, 3) and abs(h * w / res ** 2 - 1) <= support.BUCKET_AREA_TOL
        # TREAD self-guidance in place of CFG: sample.py's wrapper of the model, sampled with cfg=1
        guided = S.tread_guided(S.load_model(d)[1], 0.5, hp.tread_frac, (0.2, 0.9))
        ref = T.generate(guided, text, ["a small red circle in the top left"], (h, w), 3, 1.0, hp.t_shift,
                         hp.t_min_div, amp=hp.amp, cfg_interval=(0.2, 0.9),
                         restarts=(hp.restarts, hp.restart_lo, hp.restart_hi),
                         grid_shift=(hp.grid_shift, hp.last_rolls), eta=(hp.eta, hp.eta_lo))
        assert np.array_equal(png, support.to_uint8(ref)[0])


@pytest.mark.parametrize("args,needle", [
    (["--ckpt", "/nonexistent/x.pt", "--prompt", "a", "--out", "o"], "does not exist"),
    (["--prompt", "a", "--out", "o", "--cfg-interval", "0.5"], "expects LO,HI"),
    (["--prompt", "a", "--out", "o", "--cfg-interval", "0.8,0.2"], "0 <= LO <= HI <= 1"),
    (["--prompt", "a", "--out", "o", "--tread-guidance", "1", "--cfg", "2"], "replaces CFG"),
    (["--prompt", "a", "--out", "o", "--size", "18"], "not divisible"),
    # with --width/--height, --size is the resolution of the buckets they snap to: it must fit the patch too
    (["--prompt", "a", "--out", "o", "--size", "33", "--width", "64", "--height", "64"], "--size 33 is not divisible"),
    (["--prompts", "EMPTY", "--out", "o"], "is empty"),
    (["--prompt", "a red thing", "--out", "o", "--score"], "a red thing"),
    (["--prompt", "a", "--out", "o", "--steps", "0"], "--steps must be >= 1"),
    (["--prompt", "a", "--out", "o", "--restarts", "-1"], "--restarts must be >= 0, got -1"),
    (["--prompt", "a", "--out", "o", "--grid-shift", "-2"], "--grid-shift must be >= 0, got -2"),
    (["--prompt", "a", "--out", "o", "--last-rolls", "0"], "--last-rolls must be >= 1, got 0"),
    (["--prompt", "a", "--out", "o", "--grid-shift", "0", "--last-rolls", "4"],
     "--last-rolls=4 needs --grid-shift > 0 (or --last-rolls=1)"),
    (["--prompt", "a", "--out", "o", "--eta", "1.5"], "--eta and eta_lo must lie in [0, 1], got 1.5, 0.5"),
    (["--prompt", "a", "--out", "o", "--eta", "nan"], "--eta must be a finite number, got nan"),
    (["--prompt", "a", "--out", "EMPTY/o"], "cannot be created"),  # a file in the way: known before sampling
    (["--eval", "--score"], "drop --score"),
    (["--eval", "--prompt", "a"], "drop --score, --width, --height, --prompt and --prompts"),
    (["--prompt", "a", "--out", "o", "--cfg", "nan"], "--cfg must be a finite number, got nan"),  # black PNGs
    (["--prompt", "a", "--out", "o", "--cfg", "inf"], "--cfg must be a finite number, got inf"),
    (["--prompt", "a", "--out", "o", "--cfg", "-3"], "--cfg must be >= 0, got -3.0"),  # the trainer refuses it too
    (["--prompt", "a", "--out", "o", "--tread-guidance", "nan"], "--tread-guidance must be a finite number"),
    (["--prompts", "nofile.txt", "--out", "o"], "--prompts nofile.txt cannot be read (No such file or directory)"
                                                "; give a text file with one prompt per line"),
    (["--prompts", "EMPTY", "--prompt", "a", "--out", "o"], "--prompts FILE or --prompt TEXT, not both"),
    (["--prompt", "a small red circle in the top left", "--out", "o", "--score", "--width", "64"],
     "--score judges square images"),
    (["--ckpt", "BAD/depth", "--prompt", "a", "--out", "o"], "does not match the architecture in its config: "),
    (["--ckpt", "BAD/hidden", "--prompt", "a", "--out", "o"], "0 missing, 0 unexpected"),
    (["--ckpt", "BAD/nostages", "--prompt", "a", "--out", "o"], "config does not fit this trainer (no 'stages')"),
    (["--ckpt", "BAD/raw", "--no-ema", "--prompt", "a", "--out", "o"], "has no raw weights"),
    (["--export-diffusers", "EMPTY"], "EMPTY is a file; give a folder"),  # diffusers only logs a warning there
    (["--export-diffusers", "EMPTY/x"], "EMPTY/x cannot be written (Not a directory); choose another folder"),
])
def test_cli_bad_input_is_one_line(run, bad, tmp_path, monkeypatch, capsys, args, needle):
    d, _, _ = run
    args = [str(bad) + a[3:] if a.startswith("BAD") else a for a in args]
    (tmp_path / "EMPTY").write_text("\n\n")
    if "--ckpt" not in args:
        args = ["--ckpt", str(d)] + args
    args = [str(tmp_path) + "/" + a if a.startswith("EMPTY") else a for a in args]
    code, err = main_in_process(args, tmp_path, monkeypatch, capsys)
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert (tmp_path / "EMPTY").read_text() == "\n\n"  # nothing written over


def test_cli_error_in_a_fresh_process_is_one_line(run, tmp_path):  # the in-process checks above, as users run it
    r = cli(["--ckpt", str(run[0]), "--prompt", "a red thing", "--out", "o", "--score"], tmp_path)  # after loading
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "a red thing" in r.stderr, r.stderr


def test_foreign_checkpoint_is_refused(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    torch.save({"weights": torch.zeros(3)}, tmp_path / "a" / "ema.pt")
    with pytest.raises(ValueError, match="not a prx-speedrun checkpoint"):
        S.load_model(tmp_path / "a")
    (tmp_path / "b" / "ema.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        S.load_model(tmp_path / "b")
    hp = T.parse_args(["preset=cpu", "hidden=64", "depth=2", "heads=2", "tread_end=1"], False)
    bad = dict(ema=T.PRXDiT(hp).state_dict(), config=dataclasses.asdict(hp))
    bad["config"]["depth"] = 3
    torch.save(bad, tmp_path / "c" / "ema.pt")
    block2 = [k for k in T.PRXDiT(dataclasses.replace(hp, depth=3)).state_dict() if k.startswith("blocks.2.")]
    with pytest.raises(ValueError, match=rf"does not match the architecture in its config: {len(block2)} missing, "
                                         rf"0 unexpected, 0 size-mismatched tensors \({block2[0]} missing\)"):
        S.load_model(tmp_path / "c")
    wide = dict(bad, ema=T.PRXDiT(dataclasses.replace(hp, hidden=32)).state_dict())
    wide["config"]["depth"] = 2
    torch.save(wide, tmp_path / "c" / "ema.pt")
    sized = [k for k, v in T.PRXDiT(hp).state_dict().items() if v.shape != wide["ema"][k].shape]
    with pytest.raises(ValueError, match=rf": 0 missing, 0 unexpected, {len(sized)} size-mismatched tensors "
                                         rf"\({sized[0]} is"):
        S.load_model(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        S.find_checkpoint(tmp_path)


def test_export_to_diffusers_gives_equal_outputs(tmp_path):
    from diffusers import PRXTransformer2DModel
    # the record architecture at reduced width and depth: patch 32, bottleneck 256, head dim 64, text 2304
    hp = T.Hyperparameters(hidden=128, depth=2, heads=2)
    torch.manual_seed(0)
    model = T.PRXDiT(hp)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    S.export_diffusers(model.eval(), hp, tmp_path / "exported")
    ref = PRXTransformer2DModel.from_pretrained(tmp_path / "exported").eval()
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 3, 64, 96, generator=g), torch.rand(2, generator=g)
    txt = torch.randn(2, 7, 2304, generator=g)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    with torch.no_grad():
        a = model(x, t, txt, mask)[0]
        b = ref(x, t, txt, attention_mask=mask).sample
    assert ((a - b).norm() / b.norm()).item() < 1e-4


def test_cli_export_loads_in_diffusers_with_equal_outputs(run, tmp_path):
    from diffusers import PRXTransformer2DModel
    d, hp, model = run
    r = cli(["--ckpt", str(d), "--export-diffusers", "exp", "--transformer-only"], tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "exported to exp", r.stderr
    written = sorted(p.name for p in (tmp_path / "exp").iterdir())
    assert written == ["config.json", "diffusion_pytorch_model.safetensors"]
    ref = PRXTransformer2DModel.from_pretrained(tmp_path / "exp").eval()
    g = torch.Generator().manual_seed(1)
    x, t, txt = torch.randn(2, 3, 16, 24, generator=g), torch.rand(2, generator=g), torch.randn(2, 5, 32, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    with torch.no_grad():  # the EMA weights of the fixture, not a fresh model
        a, b = model.eval()(x, t, txt, mask)[0], ref(x, t, txt, attention_mask=mask).sample
    assert ((a - b).norm() / b.norm()).item() < 1e-4


PIPELINE = """
import json, sys, torch
from diffusers import FlowMatchEulerDiscreteScheduler, PRXPixelPipeline
for folder, noise, timesteps, shift_one, out in json.loads(sys.argv[1]):
    pipe = PRXPixelPipeline.from_pretrained(folder)  # all it needs: the folder
    if shift_one:  # the trainer's grid comes shifted already
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.0)
    x = torch.load(noise)
    images = [pipe(p, height=x.shape[2], width=x.shape[3], timesteps=timesteps, guidance_scale=3.0,
                   latents=x[i:i + 1], output_type="pt", use_resolution_binning=False).images
              for i, p in enumerate(json.loads(sys.argv[2]))]
    torch.save(torch.cat(images), out)  # one prompt a call: diffusers 0.42.1's CFG timestep has a batch of one
"""


def test_exported_pipeline_gives_sample_py_images_in_a_fresh_process(run, tmp_path):
    """--export-diffusers writes a complete PRXPixelPipeline folder. Loaded in a fresh process with only
    PRXPixelPipeline.from_pretrained, on the trainer's grid and the same noise, it gives the images of sample.py's
    sampler in fp32 within 1e-4: CFG, captions of different lengths (padding), the run's shift (1, the demo's) and a
    shift of 3 (the record's). bf16 halves the weights."""
    import json
    from safetensors import safe_open
    d, hp, model = run
    r = cli(["--ckpt", str(d), "--export-diffusers", "exp"], tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "exported to exp", r.stderr
    exp = tmp_path / "exp"
    assert {"model_index.json", "transformer", "text_encoder", "tokenizer", "scheduler", "README.md"} <= \
        {p.name for p in exp.iterdir()}
    assert json.loads((exp / "model_index.json").read_text())["text_encoder"] == ["transformers",
                                                                                  "T5GemmaEncoderModel"]
    card = (exp / "README.md").read_text()
    grid = [round(t, 4) for t in S.pipeline_timesteps(hp.sample_steps, 1.0)]
    assert "PRXPixelPipeline.from_pretrained" in card and f"timesteps = {grid}" in card
    assert f"({'EMA' if hp.ema_decay else 'live'} weights)" in card  # the demo samples its live weights (no EMA)
    with_ema = dataclasses.replace(hp, ema_decay=0.99)
    assert "(EMA weights)" in S.model_card(with_ema, d / "ckpt" / "step0000003", d, False)
    assert "(live weights)" in S.model_card(with_ema, d / "ckpt" / "step0000003", d, False, ema=False)  # --no-ema
    shifted = dataclasses.replace(hp, t_shift=3.0)
    S.export_diffusers(model, shifted, tmp_path / "exp3", S.text_encoder_path(hp, d))
    prompts, size, steps = ["a small red circle in the top left", "a red circle"], (16, 24), 4
    text = T.TextEncoder(S.text_encoder_path(hp, d), hp.text_len, torch.device("cpu"), torch.float32)
    noise = torch.stack([torch.randn(3, *size, generator=torch.Generator().manual_seed(j)) for j in range(2)])
    torch.save(noise, tmp_path / "noise.pt")
    jobs, want = [], []
    for h, folder in ((hp, exp), (shifted, tmp_path / "exp3")):
        want.append(T.generate(model.eval(), text, prompts, size, steps, 3.0, h.t_shift, h.t_min_div, seed=0))
        jobs.append([str(folder), str(tmp_path / "noise.pt"), S.pipeline_timesteps(steps, h.t_shift),
                     h.t_shift != 1, str(tmp_path / f"out{len(jobs)}.pt")])
    r = subprocess.run([sys.executable, "-c", PIPELINE, json.dumps(jobs), json.dumps(prompts)], capture_output=True,
                       text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    for k, w in enumerate(want):
        got = torch.load(tmp_path / f"out{k}.pt").clamp(-1, 1)
        assert got.shape == w.shape and (got - w).abs().max().item() < 1e-4, (k, (got - w).abs().max())
    assert not torch.allclose(want[0], want[1], atol=1e-3)  # the shift matters: the test tells them apart
    S.export_diffusers(model, hp, tmp_path / "bf16", S.text_encoder_path(hp, d), torch.bfloat16)
    for folder, dtype in ((exp, torch.float32), (tmp_path / "bf16", torch.bfloat16)):
        for sub in ("transformer", "text_encoder"):
            with safe_open(next((folder / sub).glob("*.safetensors")), "pt") as f:
                assert {f.get_tensor(k).dtype for k in f.keys()} == {dtype}, (folder, sub)


def test_export_to_a_diffusers_that_does_not_match_is_one_line(tmp_path):
    hp = T.parse_args(["preset=cpu", "hidden=32", "heads=2", "depth=3"], False)
    model = T.PRXDiT(hp)
    model.register_parameter("extra", torch.nn.Parameter(torch.zeros(1)))  # a layout diffusers does not have
    with pytest.raises(ValueError, match="PRXTransformer2DModel does not match .*extra"):
        S.export_diffusers(model, hp, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_that_writes_nothing_is_refused(tmp_path, monkeypatch):
    from diffusers import PRXTransformer2DModel
    monkeypatch.setattr(PRXTransformer2DModel, "save_pretrained", lambda self, d: None)  # as diffusers on a file
    hp = T.parse_args(["preset=cpu", "hidden=32", "heads=2", "depth=3"], False)
    with pytest.raises(ValueError, match="wrote no config.json"):
        S.export_diffusers(T.PRXDiT(hp), hp, tmp_path / "out")


def test_init_from_an_export_starts_from_that_runs_ema_outputs(run, tmp_path, monkeypatch, capsys):
    """init=PATH reads the DiT's weights, as plain data, from a run folder, a checkpoint folder, a diffusers
    PRXTransformer2DModel folder or a pipeline folder (all the EMA weights of the run); a training run started from
    an exported pipeline has, at step 0, the run's EMA outputs in its model and its EMA, with a fresh optimizer and
    clock. A model of another architecture is refused in one line before the data is read."""
    from data_prep import make_shapes
    d, hp, model = run
    arch = {k: getattr(hp, k) for k in T.ARCH}
    assert cli(["--ckpt", str(d), "--export-diffusers", "pipe"], tmp_path).returncode == 0
    assert cli(["--ckpt", str(d), "--export-diffusers", "tr", "--transformer-only"], tmp_path).returncode == 0
    for path in (d, d / "ckpt" / "step0000003", tmp_path / "tr", tmp_path / "pipe"):
        sd = support.read_init(path, arch)
        assert sd.keys() == model.state_dict().keys()
        assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items()), path
    shapes = make_shapes(tmp_path / "shapes", n=32, size=32, shard_rows=32)
    seen = []

    def first_step(stage, batches, state, m, optimizers, *rest):  # the state at step 0, then stop
        seen.append((m.model, m.ema, state.step, state.train_time, [o.state for o in optimizers]))
        raise SystemExit(0)
    monkeypatch.setattr(T, "train_step", first_step)
    args = ["preset=cpu", "hidden=64", "depth=3", "heads=2", "text_dim=32", "text_len=12", f"data={shapes}",
            "stages=1", "stage1.batch=4", "stage1.micro_batch=4"]
    with pytest.raises(SystemExit):
        T.main(args + [f"run_dir={tmp_path}/r", f"init={tmp_path}/pipe"])
    live, ema, step, clock, states = seen[0]
    assert (step, clock) == (0, 0.0) and all(not s for s in states)
    g = torch.Generator().manual_seed(1)
    x, t, txt = torch.randn(2, 3, 16, 24, generator=g), torch.rand(2, generator=g), torch.randn(2, 5, 32, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        want = model.eval()(x, t, txt, mask)[0]
        for m in (live, ema):
            assert torch.equal(m.eval()(x, t, txt, mask)[0], want)
    assert f"init: the DiT's weights from {tmp_path}/pipe" in capsys.readouterr().out
    read = []
    monkeypatch.setattr(T, "load_data", lambda *a: read.append(1))
    with pytest.raises(SystemExit) as e:
        T.main(args + [f"run_dir={tmp_path}/r2", f"init={tmp_path}/tr", "hidden=128", "heads=4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and not read and err == [
        f"error: init {tmp_path}/tr is a model of another architecture (hidden=64, not 128; heads=2, not 4); set "
        "these constants to its values"]
