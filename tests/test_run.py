"""End to end: a tiny CPU run through the real code path (data, encoders, both stages, logs, samples, checkpoints)."""
import ast
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_gpt_style as T
import data_prep as dp
import evals
import support
from evals import build_demo_encoders
import conftest
from conftest import ROOT


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from data_prep import make_shapes
    return make_shapes(tmp_path_factory.mktemp("shapes"), n=512, shard_rows=256)


def test_stream_sampler_same_global_batch_for_any_world_size():
    def global_batches(world, micro, steps=5, batch=12, start=30):
        samplers = [support.StreamSampler(50, 7, start, batch, micro, r, world) for r in range(world)]
        return conftest.global_batches(samplers, world, micro, batch, steps)

    ref = global_batches(1, 12)
    for world, micro in ((1, 3), (2, 6), (4, 1), (3, 2)):
        assert [sorted(b) for b in global_batches(world, micro)] == [sorted(b) for b in ref]
    assert global_batches(1, 3) == ref  # one rank: accumulation keeps the stream order
    flat = [i for b in global_batches(1, 12, steps=25, start=0) for i in b]  # 300 = 6 epochs of 50
    for e in range(6):
        assert sorted(flat[50 * e:50 * (e + 1)]) == list(range(50))  # each epoch a permutation
    assert flat[:50] != flat[50:100]  # reshuffled per epoch
    # resuming at a position continues the same stream
    assert global_batches(1, 12, steps=2, start=30 + 3 * 12) == ref[3:5]


def test_dealing_by_caption_length_keeps_each_global_batch_and_each_samples_slot():
    """text_sort: every global batch holds the same rows in the same slots (the slot picks the sample's noise, t,
    routing and caption dropout) for any world size; each rank gets one stride of the length-sorted batch, so the
    ranks' token counts are within one caption of each other and, with accumulation, the micro-batches (padded to
    their longest) are shorter."""
    lengths = torch.randint(1, 257, (50,), generator=torch.Generator().manual_seed(0)).numpy()
    batch, steps, start = 16, 7, 30

    def pairs(world, micro, sort):  # per global batch: {(row, slot)}, and each micro-batch's (rank, rows)
        samplers = [support.StreamSampler(50, 7, start, batch, micro, r, world, None, 0, lengths if sort else None)
                    for r in range(world)]
        its, out, micros = [iter(s) for s in samplers], [], []
        for _ in range(steps):
            got = set()
            for r, (it, s) in enumerate(zip(its, samplers)):
                for _ in range(batch // (world * micro)):
                    rows, slots = next(it), s.slots.popleft()
                    got |= set(zip(rows, slots))
                    micros.append((r, rows))
            out.append(got)
        assert all(not s.slots for s in samplers)
        return out, micros

    ref, _ = pairs(1, 16, False)
    assert all(sorted(s for _, s in b) == list(range(batch)) for b in ref)
    for world, micro in ((1, 4), (2, 2), (4, 4), (8, 1), (2, 8), (2, 4)):
        got, micros = pairs(world, micro, True)
        assert got == ref, (world, micro)
        per_rank = [sum(int(lengths[i]) for r2, rows in micros if r2 == r for i in rows) / steps for r in range(world)]
        assert max(per_rank) - min(per_rank) <= lengths.max()
        if micro > 1 and batch // (world * micro) > 1:  # with accumulation (one micro-batch a rank: no gain)
            plain = pairs(world, micro, False)[1]
            padded = [sum(int(lengths[rows].max()) for _, rows in m) for m in (micros, plain)]
            assert padded[0] < 0.9 * padded[1], padded


@pytest.mark.slow
def test_stage_switch_policies(shapes, tmp_path, monkeypatch):
    """stage_switch: carry keeps stage 1's optimiser states (Adam's step count runs on), reset starts stage 2 with
    fresh ones, reset_ema also restarts the EMA from the live weights. ema_decay=1 makes the EMA a witness: it holds
    the initial weights, or with reset_ema the live weights at the end of stage 1 (those of a stage-1-only run)."""
    made = []  # every optimizer list build_optimizers returns, in order
    real = T.build_optimizers
    monkeypatch.setattr(T, "build_optimizers", lambda *a: made.append(real(*a)) or made[-1])
    args = ["preset=cpu", f"data={shapes}", "hidden=64", "heads=2", "stage1.steps=3", "stage1.batch=4",
            "stage1.micro_batch=4", "stage2.steps=2", "stage2.batch=4", "stage2.micro_batch=4", "stage2.res=32",
            "log_every=1", "sample_steps=1", "warmup=2", "ema_decay=1", "lpips_weight=0", "pdino_weight=0"]
    _, one = T.main(args + ["stages=1", f"run_dir={tmp_path}/one"])
    init = {k: v.clone() for k, v in one.ema.state_dict().items()}  # decay 1: the EMA never moved
    live = {k: v.clone() for k, v in one.model.state_dict().items()}
    assert any(not torch.equal(init[k], live[k]) for k in init)
    for policy, adam_steps, ema in (("carry", 5, init), ("reset", 2, init), ("reset_ema", 2, live)):
        made.clear()
        _, m = T.main(args + [f"stage_switch={policy}", f"run_dir={tmp_path}/{policy}"])
        assert len(made) == (1 if policy == "carry" else 2)
        adam = made[-1][-1]  # the optimizer of the last steps; its Adam (the REPA projector's idle in stage 2)
        assert {int(adam.state[p]["step"]) for p in m.model.parameters() if p in adam.state} == {adam_steps}, policy
        assert all(torch.equal(m.ema.state_dict()[k], ema[k]) for k in ema), policy
        assert f"stage 2/2: 32 px, batch 4 (1 x 4 x 1 accum), 2 steps, REPA off, stage_switch={policy}" in \
            (tmp_path / policy / "log.txt").read_text()


@pytest.mark.slow
def test_tiny_cpu_run_end_to_end(shapes, tmp_path):
    run = tmp_path / "run"
    args = ["preset=cpu", f"data={shapes}", f"run_dir={run}", "stage1.steps=4", "stage1.batch=8",
            "stage1.micro_batch=4", "stage2.steps=2", "stage2.batch=4", "stage2.micro_batch=4", "log_every=2",
            "ckpt_every=3", "sample_steps=2", "warmup=2"]
    _, m = T.main(args)
    log = (run / "log.txt").read_text()
    assert log.split("\n", 1)[1].startswith((ROOT / "train_gpt_style.py").read_text())  # the source comes first
    assert "torch " + torch.__version__ in log and f'"lr": {T.PRESETS["cpu"]["lr"]}' in log and "RANDOM" in log
    line = r"^step:(\d+)/6 stage:(\d) loss:([\d.]+) .*train_time:\d+ms step_avg:[\d.]+ms img/s:[\d.]+ mfu:\S+ " \
           r"eta_stage:\S+ eta_run:\S+$"
    steps = re.findall(line, log, re.M)
    assert [(int(s), int(st)) for s, st, _ in steps] == [(1, 1), (2, 1), (4, 1), (6, 2)]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 4, 6]
    for key in ("stage", "train_time_s", "loss", "flow", "repa", "lpips", "pdino", "flow_t0", "flow_t2"):
        assert key in train_rows[0]
    assert train_rows[0]["repa"] != 0 and train_rows[-1]["repa"] == 0  # REPA on in stage 1 only
    assert "shapes" in rows[-1] and set(rows[-1]["shapes"]) == {"seen", "heldout", "two"}
    # the end: the final checkpoint, each score next to its target, the next commands (which run as printed)
    assert f"final checkpoint: {run}/ckpt/step0000006\n" in log
    for name, target in support.SHAPES_TARGETS.items():
        full = rows[-1]["shapes"][name]["full"]
        assert f"shapes {name}: {full:.3f} fully right, target {target:.2f}: " \
               f"{'met' if full >= target else 'missed'}\n" in log
    nxt = [line.split("#")[0].split() for line in log.splitlines() if "python sample.py" in line]
    assert len(nxt) == 2 and nxt[0][-5:] == ["--prompts", f"{shapes}/prompts_heldout.txt", "--score", "--out",
                                               f"{run}/sampled"] and nxt[1][-2] == "--export-diffusers"
    import sample as S
    S.main(nxt[1][nxt[1].index("--ckpt"):])
    assert (run / "diffusers" / "model_index.json").is_file()
    from PIL import Image
    import numpy as np
    # each stage's grid at its resolution: the first tile, enlarged to 128 px for its caption, is made of 4x4-pixel
    # blocks at 32 px and of 2x2 ones at 64 px
    grids = [Image.open(run / "samples" / f"step000000{s}.png").convert("RGB") for s in (4, 6)]
    tiles = [np.asarray(g)[2:130, 2:130] for g in grids]
    blocks = lambda t, f: np.array_equal(t, t[::f, ::f].repeat(f, 0).repeat(f, 1))
    assert blocks(tiles[0], 4) and blocks(tiles[1], 2) and not blocks(tiles[1], 4)
    ck = torch.load(run / "ckpt" / "step0000006" / "extra.pt", weights_only=False)
    assert ck["step"] == 6 and ck["stage"] == 1 and ck["data_pos"] == 4 * 8 + 2 * 4
    assert {"rng", "config", "train_time"} <= set(ck)
    assert (run / "ckpt" / "step0000003" / ".metadata").exists() and not list((run / "ckpt").glob(".*tmp"))
    import sample as S
    raw, ema = S.load_model(run, ema=False)[1], S.load_model(run)[1]  # raw weights from the DCP files
    for (k, v), (k2, v2) in zip(m.model.state_dict().items(), raw.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    same = all(torch.equal(a, b) for a, b in zip(raw.parameters(), ema.parameters()))
    assert same == (T.PRESETS["cpu"]["ema_decay"] == 0)  # the demo: a copy of the live weights; else its own average


def test_eta_is_the_stage_time_per_step_scaled_by_flops_plus_measured_overheads(monkeypatch):
    """Stage 1: 3 timed steps in 3 s (1 s a step); 4 steps done in 10 s of wall-clock since the loop began (1.75 s of
    overheads a step); 6 steps left: 6 x 2.75 = 16.5 s. Stage 2 (20 steps, 3x the FLOPs a step): 20 x (3 + 1.75) =
    95 s more, 111.5 s for the run."""
    import time
    stages = [T.Stage(res=32, batch=4, micro_batch=4, steps=10, repa=False),
              T.Stage(res=64, batch=2, micro_batch=2, steps=20, repa=False)]
    state = T.State(step=4, train_time=3.0, timed_steps=3)
    monkeypatch.setattr(time, "monotonic", lambda: 1010.0)
    assert support.etas(stages, 0, state, (0.0, 0), (1000.0, 0.0, 0), [1.0, 3.0]) == "eta_stage:16s eta_run:0h01m"
    # stage 2 at step 14: 4 timed steps of 30 s, 1 s of overheads a step over the 14: 16 steps x 31 s = 496 s left
    state = T.State(step=14, train_time=3.0 + 4 * 30, timed_steps=7)
    monkeypatch.setattr(time, "monotonic", lambda: 1000.0 + 3 + 4 * 30 + 14 * 1.0)
    assert support.etas(stages, 1, state, (3.0, 3), (1000.0, 0.0, 0), [1.0, 3.0]) == "eta_stage:0h08m eta_run:0h08m"
    assert support.etas(stages, 1, state, (3.0 + 4 * 30, 7), (1000.0, 0.0, 0), [1.0, 3.0]) == \
        "eta_stage:n/a eta_run:n/a"  # no timed step in this stage yet


def test_missing_data_folder_is_one_clear_line(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "train_gpt_style.py"), "preset=cpu", "compile=0",
                        f"data={tmp_path}/nope", f"run_dir={tmp_path}/run"], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: data folder")


@pytest.mark.slow
def test_each_stage_reads_its_own_data_and_resumes_across_the_switch(shapes, tmp_path, monkeypatch):
    """stage2.data: stage 2 draws its batches from its own folder (the shapes with every caption marked, some rows
    damaged), stage 1 from the run's data; the bad-row counts logged after each stage are those of the rows each
    stage drew; a run stopped in stage 2 and resumed logs every step's losses of the uninterrupted run."""
    import shutil
    import signal

    import pyarrow.parquet as pq
    marked, other = tmp_path / "marked", tmp_path / "other"
    shutil.copytree(shapes, marked)
    for shard in (marked / "train").glob("*.parquet"):
        rows = pq.read_table(shard).to_pylist()
        dp.write_rows(shard, {c: [r[c] + " at 64 px" if c == "caption" else r[c] for r in rows] for c in rows[0]})
    damage = conftest.corrupt_copy(marked, other, seed=1)
    args = ["preset=cpu", f"data={shapes}", f"stage2.data={other}", "stage1.steps=2", "stage1.batch=8",
            "stage1.micro_batch=4", "stage2.steps=3", "stage2.batch=8", "stage2.micro_batch=8", "log_every=1",
            "ckpt_every=0", "sample_steps=1", "warmup=2"]
    drawn, make_loader = [], T.make_loader

    def spy(ds, res, stage, start, hp, rank, world):  # records the captions of each batch the run takes
        for batch in make_loader(ds, res, stage, start, hp, rank, world):
            drawn.append((stage.res, batch[1]))
            yield batch
    monkeypatch.setattr(T, "make_loader", spy)
    T.main(args + [f"run_dir={tmp_path}/ref"])
    ref_drawn, log = drawn[:], (tmp_path / "ref" / "log.txt").read_text()
    assert [r for r, _ in ref_drawn] == [32] * 4 + [64] * 3
    assert not any(c.endswith(" at 64 px") for _, b in ref_drawn[:4] for c in b)
    assert all(c.endswith(" at 64 px") for _, b in ref_drawn[4:] for c in b)
    assert f"data: 512 images from {shapes} for stage 1; " in log
    assert f"data: 512 images from {other} for stage 2; " in log
    it = iter(support.StreamSampler(512, 0, 16, 8, 8, 0, 1))  # the rows stage 2 drew: its stream starts at image 16
    want = conftest.expected_skips([i for _ in range(3) for i in next(it)], damage, 512)
    bad = [line.split("(all ranks): ", 1)[1] for line in log.splitlines() if line.startswith("data: bad rows")]
    assert want and bad[0] == "none" and ast.literal_eval(bad[1]) == want and len(bad) == 2
    # stopped by a signal during step 3 (stage 2's first), then resumed with the same command
    train_step = T.train_step
    monkeypatch.setattr(T, "train_step", lambda st, b, state, *a: (state.step == 2 and os.kill(os.getpid(),
                        signal.SIGINT)) or train_step(st, b, state, *a))
    drawn.clear()
    assert T.main(args + [f"run_dir={tmp_path}/run"])[0].step == 3
    monkeypatch.setattr(T, "train_step", train_step)
    T.main(args + [f"run_dir={tmp_path}/run"])
    assert drawn == ref_drawn  # the same batches in both runs, none repeated or skipped
    a, b = dict(_logged(tmp_path / "ref")), _logged(tmp_path / "run")
    assert [s for s, _ in b] == [1, 2, 3, 4, 5] and "resumed from" in (tmp_path / "run" / "log.txt").read_text()
    for step, values in b:
        assert values == pytest.approx(a[step], rel=1e-6), step


def with_text_emb(shapes, tmp_path):
    """A copy of the shapes folder with text_emb/ written by the demo's text encoder -> (folder, hp, encoder folder,
    TextEncoder)."""
    import shutil

    import pyarrow.parquet as pq
    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    hp = T.parse_args(["preset=cpu", f"data={data}"], False)
    enc_dir = build_demo_encoders(tmp_path / "enc", hp, (data / "prompts_seen.txt").read_text().splitlines())[0]
    text = T.TextEncoder(enc_dir, hp.text_len, torch.device("cpu"), torch.float32)
    for shard in sorted((data / "train").glob("*.parquet")):
        column = pq.read_table(shard, columns=["caption"]).column("caption")
        dp.write_text_emb(data / "text_emb" / "train" / f"{shard.stem}.arrow",
                          [support.pack_text_emb(*text(column.to_pylist()))], support.text_emb_meta(column, enc_dir))
    return data, hp, enc_dir, text


def test_precomputed_text_embeddings_match_on_the_fly_encoding(shapes, tmp_path, capsys):
    import pyarrow.parquet as pq
    data, hp, enc_dir, text = with_text_emb(shapes, tmp_path)
    ds = T.ShardDataset(data)
    ds.set_stage(32, hp.patch, hp.aspect_max)
    assert ds.has_emb and len(ds) == 512
    mapped = {c["filename"] for c in ds.emb.cache_files}  # the sidecars are read where they lie, not copied
    assert {str(f) for f in (data / "text_emb").rglob("*.arrow")} <= mapped
    items = [ds[i] for i in (0, 7, 300, 511)]
    imgs, captions, (txt, mask), targets, causes = support.collate_batch(items, hp.text_len, hp.text_dim)
    ref, ref_mask = text(captions)
    assert causes == [] and imgs.shape == (4, 3, 32, 32)
    assert torch.equal(mask, ref_mask) and mask.sum(1).min() >= 8  # "a small red circle in the center" + eos
    assert txt.dtype == torch.bfloat16 and torch.equal(txt, ref.to(torch.bfloat16))  # as stored
    # embeddings of another width are refused before any model is built, naming both widths
    with pytest.raises(SystemExit) as e:
        T.main(["preset=cpu", f"data={data}", f"run_dir={tmp_path}/run", "text_dim=32"])
    assert hp.text_dim != 32  # the preset's width, which the sidecars hold
    assert e.value.code == 2 and f"text_emb holds {hp.text_dim}-d embeddings but text_dim=32" in capsys.readouterr().err
    # a mismatched sidecar, a damaged one, or a missing one (never a silent fall-back to encoding every step)
    first = sorted((data / "text_emb" / "train").glob("*.arrow"))[0]
    first.rename(first.with_suffix(".gone"))
    with pytest.raises(ValueError, match=r"1 of 2 files of .*/text_emb are missing"):
        T.ShardDataset(data)
    shard = data / "train" / f"{first.stem}.parquet"
    dp.write_text_emb(first, [[(b"", 0)]], support.text_emb_meta(pq.read_table(shard).column("caption"), enc_dir))
    with pytest.raises(ValueError, match=f"{first} does not mirror {shard} row for row"):
        T.ShardDataset(data)
    first.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="text_emb: a file is unreadable"):
        T.ShardDataset(data)


def with_repa(src, tmp_path):
    """A copy of a shapes folder with repa/ written by data_prep.py encode-repa (the CLI) with the demo's DINOv3 at
    the demo's first REPA stage (32 px) -> (folder, hp, DINOv3 folder, the model)."""
    import shutil
    data = tmp_path / "data"
    shutil.copytree(src, data)
    hp = T.parse_args(["preset=cpu", f"data={data}"], False)
    dino_dir = build_demo_encoders(tmp_path / "enc", hp, (data / "prompts_seen.txt").read_text().splitlines())[1]
    dp.main(["encode-repa", "--shards", str(data), "preset=cpu", f"repa_encoder={dino_dir}", "--workers", "0"])
    return data, hp, dino_dir, T.load_vit(dino_dir, torch.device("cpu"), torch.float32)


def test_precomputed_repa_targets_match_the_online_ones(shapes, tmp_path, capsys):
    """encode-repa stores, per row, the DINOv3 targets REPA computes online from the image as the loader crops it,
    rounded to bf16 (relative error <= 2^-8 of the largest feature), also for bad rows (those of the row that
    replaces them); REPA's loss from them equals the online loss within 2e-3 (bf16 rounding of the targets)."""
    damaged = tmp_path / "damaged"
    damage = conftest.corrupt_copy(shapes, damaged, seed=5)
    data, hp, dino_dir, dino = with_repa(damaged, tmp_path)
    assert "encode-repa rank 0/1: 512 images at 32 px, 2 KiB per image stored" in capsys.readouterr().out
    files = sorted((data / "repa" / "train").glob("*.arrow"))
    assert [f.stem for f in files] == [f.stem for f in sorted((data / "train").glob("*.parquet"))]
    ds = T.ShardDataset(data, repa_encoder=dino_dir)
    assert ds.repa_grid == f"32:{hp.patch}:{float(hp.aspect_max)}" and len(ds.repa) == len(ds) == 512
    assert {c["filename"] for c in ds.repa.cache_files} == {str(f) for f in files}  # read where they lie
    ds.set_stage(32, hp.patch, hp.aspect_max, repa=True)
    bad = sorted(i for i, c in damage.items() if not c[0].startswith("mode_"))[:3]  # replaced by their next row
    items = [ds[i] for i in [0, 7, 300, 511] + bad]
    imgs, _, _, targets, causes = support.collate_batch(items, hp.text_len, hp.text_dim)
    assert len(causes) >= len(bad) and targets.dtype == torch.bfloat16
    x0 = imgs.float() / 127.5 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=hp.amp):  # as train_step computes them (amp: bf16 CPUs)
        online = T.repa_targets(dino, x0, hp.patch)  # (B, 16, E): 32 px, patch 8
    stored = targets.float().view_as(online)
    assert (stored - online).abs().max() <= online.abs().max() * 2 ** -8
    assert not torch.equal(stored, online)  # rounded: the comparison can tell
    repa = T.REPA(hp, dino)
    tokens = torch.randn(len(items), online.shape[1], hp.hidden)
    with torch.no_grad():
        losses = [repa((tokens, None), x0, hp.patch, t) for t in (None, targets)]
    assert losses[0].shape == (len(items),) and (losses[0] - losses[1]).abs().max() < 2e-3
    # only the stage whose crops they are gets them: another resolution, or a stage without REPA, computes online
    for res, on in ((64, True), (32, False)):
        ds.set_stage(res, hp.patch, hp.aspect_max, repa=on)
        assert ds[0][3] is None
    # done files are not redone; a partial, mismatched or foreign repa/ is refused, never silently half-used
    dp.main(["encode-repa", "--shards", str(data), "preset=cpu", f"repa_encoder={dino_dir}"])
    assert "encode-repa" not in capsys.readouterr().out
    with pytest.raises(ValueError, match=f"holds targets of {dino_dir}, not of repa_encoder=other/dino"):
        T.ShardDataset(data, repa_encoder="other/dino")
    files[0].rename(files[0].with_suffix(".gone"))
    with pytest.raises(ValueError, match=r"1 of 2 files of .*/repa are missing.*encode-repa again"):
        T.ShardDataset(data)
    files[0].write_bytes(files[1].read_bytes())  # the other shard's targets
    with pytest.raises(ValueError, match=f"{files[0]} does not mirror .* row for row"):
        T.ShardDataset(data)


def test_the_record_refuses_a_repa_stage_without_its_targets(shapes, tmp_path, capsys):
    """The record computes the REPA targets once (encode-repa); without them, or with targets of other crops, it stops
    in one line before any model is built, unless repa_online=1; the demo computes them online."""
    data, hp, dino_dir, _ = with_repa(shapes, tmp_path)
    capsys.readouterr()
    record = ["preset=record", f"data={data}", "text_online=1", "stage1.res=32", "patch=8", "stage2.res=64",
              "lpips_weight=0", f"repa_encoder={dino_dir}"]
    for extra, ok in (([], True), (["aspect_max=1"], False), (["stage1.res=64"], False),
                      (["stage1.res=64", "repa_online=1"], True), (["stage1.res=64", "repa_weight=0"], True)):
        hp = T.parse_args(record + extra, False)
        lines = []
        if ok:
            T.load_data(hp, lines.append)
            assert f"REPA targets of the crops 32:8:2.0 (repa/)" in lines[0]
            continue
        with pytest.raises(SystemExit):
            T.load_data(hp, lines.append)
        grid = support.repa_grid(hp.stages[0].res, 8, hp.aspect_max)
        assert capsys.readouterr().err == f"error: {data} has no REPA targets of stage1's crops {grid} (repa/: " \
            f"32:8:2.0): the record computes them once (data_prep.py encode-repa --shards {data}), not every step; " \
            "or set repa_online=1 (the cost: data_prep.py budget repa_online=1)\n"
    (data / "repa").rename(tmp_path / "repa.moved")
    with pytest.raises(SystemExit):
        T.load_data(T.parse_args(record, False), [].append)
    assert "(repa/: none)" in capsys.readouterr().err


def test_training_on_precomputed_repa_targets_matches_the_online_run(shapes, tmp_path):
    """Three demo steps with REPA on repa/'s targets and with DINOv3 in the step: the same REPA loss within 1e-3 (the
    targets' bf16 rounding: measured <= 2e-4 with and without amp; the rows' targets in reverse order: 4e-3), flow
    loss and gradient norm (1e-3 relative)."""
    data, hp, dino_dir, _ = with_repa(shapes, tmp_path)
    conftest.few_prompts(data)
    rows = {}
    for name in ("stored", "online"):
        if name == "online":
            (data / "repa").rename(tmp_path / "repa.moved")
        T.main(["preset=cpu", f"data={data}", f"run_dir={tmp_path}/{name}", f"repa_encoder={dino_dir}", "stages=1",
                "stage1.steps=3", "stage1.batch=16", "stage1.micro_batch=16", "log_every=1", "ckpt_every=0",
                "sample_steps=1", "restarts=0"])
        log = (tmp_path / name / "log.txt").read_text()
        assert ("REPA targets of the crops 32:8:2.0 (repa/)" in log) == (name == "stored")
        rows[name] = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        rows[name] = [(r["repa"], r["flow"], r["grad_norm"]) for r in rows[name] if "repa" in r]
    assert len(rows["stored"]) == 3 and all(r[0] != 0 for r in rows["stored"])  # REPA on: -cosine, either sign
    for a, b in zip(rows["stored"], rows["online"], strict=True):
        assert a[0] == pytest.approx(b[0], abs=1e-3) and a[1:] == pytest.approx(b[1:], rel=1e-3)
        assert a[0] != b[0]  # the stored targets were used: rounded, not recomputed


def test_demo_encoders_are_drawn_from_the_run_seed_and_leave_its_random_stream(tmp_path):
    """Two seeds of the demo are two draws of its random encoders too; one seed always the same draw, and building
    them does not move the run's own random stream."""
    from safetensors.torch import load_file
    vocab = ["a small red circle in the top left", "and"]
    weights = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        hp = T.parse_args(["preset=cpu", f"seed={seed}"], False)
        torch.manual_seed(123)
        paths = build_demo_encoders(tmp_path / name, hp, vocab)
        after = torch.rand(4)
        torch.manual_seed(123)
        assert torch.equal(after, torch.rand(4))  # the run's stream as it was
        weights[name] = [load_file(Path(p) / "model.safetensors") for p in paths]
    for a, b in zip(weights["a"], weights["b"]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for a, c in zip(weights["a"], weights["c"]):
        assert a.keys() == c.keys() and not any(torch.equal(a[k], c[k]) for k in a if a[k].std() > 0)


def test_demo_text_encoder_keeps_each_words_identity_and_its_objects_place(tmp_path):
    """The demo's random text encoder, as a trained one: over the one-object captions, a colour word's output is
    mostly its colour and a shape word's mostly its shape (a random Gemma alone gives each ~0.3); in two-object
    captions a colour word's output still tells its object's corner (a ridge probe on held-back captions)."""
    import itertools
    import random
    hp = T.parse_args(["preset=cpu"], False)
    ones = list(itertools.product(evals.SHAPES_SIZES, evals.SHAPES_COLORS, evals.SHAPES_SHAPES, evals.SHAPES_POSITIONS))
    rng, twos = random.Random(0), []
    for _ in range(400):
        (c1, s1), (c2, s2) = rng.sample(evals.SHAPES_SEEN, 2)
        p1, p2 = rng.sample(evals.SHAPES_CORNERS, 2)
        twos.append(((rng.choice(list(evals.SHAPES_SIZES)), c1, s1, p1), ("small", c2, s2, p2)))
    captions = [evals.shapes_caption([o]) for o in ones]
    enc = build_demo_encoders(tmp_path / "enc", hp, captions + ["and"])[0]
    text = T.TextEncoder(enc, hp.text_len, torch.device("cpu"), torch.float32)
    h, _ = text(captions)

    def share(x, labels):  # the fraction of x's variance over the captions that the labels' means explain
        x = x - x.mean(0)
        means = {k: x[[i for i, lab in enumerate(labels) if lab == k]].mean(0) for k in set(labels)}
        return float(sum(means[k].pow(2).sum() for k in labels) / x.pow(2).sum())

    assert all(c.split()[2:4] == [o[1], o[2]] for c, o in zip(captions, ones))  # "a small red circle ..."
    assert share(h[:, 2], [o[1] for o in ones]) > 0.8 and share(h[:, 3], [o[2] for o in ones]) > 0.8
    assert share(h[:, 2], [o[2] for o in ones]) < 0.1 and share(h[:, 3], [o[1] for o in ones]) < 0.1
    h2, _ = text([evals.shapes_caption(list(t)) for t in twos])
    second = len(evals.shapes_caption([twos[0][0]]).split()) + 3  # "... and a small <colour>"
    x = torch.cat([h2[:, 2], h2[:, second]]).double()  # the colour words' outputs of the 400 captions' 800 objects
    y = torch.tensor([evals.SHAPES_CORNERS.index(o[3]) for k in (0, 1) for o in (t[k] for t in twos)])
    fit = torch.cat([torch.arange(300), torch.arange(400, 700)])
    test = torch.cat([torch.arange(300, 400), torch.arange(700, 800)])
    onehot = torch.nn.functional.one_hot(y, 4).double()
    w = torch.linalg.solve(x[fit].T @ x[fit] + 1e-2 * torch.eye(x.shape[1], dtype=x.dtype), x[fit].T @ onehot[fit])
    assert ((x[test] @ w).argmax(1) == y[test]).double().mean() > 0.9


def test_text_encoder_pads_right_and_packing_keeps_the_real_tokens(tmp_path):
    """Gemma's tokenizer pads on the left; the encoder must see real tokens first (positions from 0), and packing
    must keep the real tokens wherever the padding is (a left-padded batch once packed all-zero embeddings)."""
    from transformers import AutoTokenizer
    hp = T.parse_args(["preset=cpu"], False)
    enc = build_demo_encoders(tmp_path / "enc", hp, ["a small red circle in the top left", "and"])[0]
    tok = AutoTokenizer.from_pretrained(enc)
    tok.padding_side = "left"  # as the real tokenizer is saved
    tok.save_pretrained(enc)
    h, mask = T.TextEncoder(enc, 12, torch.device("cpu"), torch.float32)(["a small red circle in the top left", "a"])
    n = mask.sum(1)
    assert n.tolist()[1] < 12 and all(mask[i, :n[i]].all() for i in range(2))  # right padding
    left = torch.stack([h[i].roll(int(12 - n[i]), 0) for i in range(2)])  # the same rows, padded on the left
    left_mask = torch.stack([mask[i].roll(int(12 - n[i]), 0) for i in range(2)])
    assert not left_mask[1, 0] and support.pack_text_emb(left, left_mask) == support.pack_text_emb(h, mask)
    assert all(sum(raw) != 0 for raw, _ in support.pack_text_emb(left, left_mask))
    # a batch is padded to its longest caption rounded up to TEXT_MULTIPLE, not to max_len: the same embeddings
    h64, mask64 = T.TextEncoder(enc, 64, torch.device("cpu"), torch.float32)(["a small red circle in the top left",
                                                                              "a"])
    assert h64.shape[1] == support.TEXT_MULTIPLE == 32 and torch.equal(mask64[:, :12], mask)
    assert not mask64[:, 12:].any()
    assert torch.allclose(h64[:, :12], h, atol=1e-5)


def test_kept_captions_give_the_encoders_own_outputs_without_running_it(tmp_path):
    """TextEncoder.keep: a batch of kept captions comes back as the encoder itself gives it (the same padded length and
    mask, the outputs to rounding), without a forward pass; a batch with one caption not kept runs the encoder."""
    hp = T.parse_args(["preset=cpu"], False)
    captions = ["a small red circle in the top left", "a large blue square in the top right and a small yellow "
                "triangle in the bottom left", "a large green triangle in the center"]
    enc = build_demo_encoders(tmp_path / "enc", hp, captions + ["and"])[0]
    text = T.TextEncoder(enc, hp.text_len, torch.device("cpu"), torch.float32)
    batch = [captions[2], captions[0], captions[2], captions[1]]  # repeats, lengths 7 to 17 words
    ref, ref_mask = text(batch)
    text.keep(sorted(set(captions)), batch=2)
    assert len(text.kept) == 3 and all(len(v) == int(m.sum()) for v, m in zip(map(text.kept.get, batch), ref_mask))
    model, text.model = text.model, None  # kept captions must not reach the encoder
    h, mask = text(batch)
    assert h.shape == ref.shape and torch.equal(mask, ref_mask) and ref_mask.sum(1).unique().numel() == 3
    assert torch.allclose(h, ref, atol=1e-5) and not h[~mask].any()
    with pytest.raises(TypeError):  # one caption not kept: the whole batch goes through the (here missing) encoder
        text(batch + ["a small red circle"])
    text.model = model
    h2, mask2 = text(batch[:2] + ["a small red circle"])
    assert torch.equal(mask2[:2], ref_mask[:2, :mask2.shape[1]]) and torch.allclose(h2[:2], ref[:2, :mask2.shape[1]],
                                                                                   atol=1e-5)


def test_a_run_that_keeps_its_captions_trains_as_one_that_encodes_every_step(shapes, tmp_path):
    """text_keep (the demo's): the data's distinct captions encoded once at the start, the same losses and weights as
    encoding every step (text_keep=0); fewer distinct captions allowed than there are: every step, said once."""
    import shutil
    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    conftest.few_prompts(data)  # a twentieth of the end-of-run scoring
    runs = {}
    for keep in (0, 20_000, 10):
        _, m = T.main(["preset=cpu", f"data={data}", f"run_dir={tmp_path}/run{keep}", f"text_keep={keep}",
                       "stages=1", "stage1.steps=3", "stage1.batch=8", "stage1.micro_batch=8", "log_every=1",
                       "ckpt_every=0", "sample_steps=1", "restarts=0", "warmup=1", "amp=0"])
        runs[keep] = _logged(tmp_path / f"run{keep}"), m.model.state_dict(), len(m.text.kept)
    import pyarrow.parquet as pq
    n = len({c for f in (shapes / "train").glob("*.parquet") for c in pq.read_table(f).column("caption").to_pylist()})
    assert (runs[0][2], runs[20_000][2], runs[10][2]) == (0, n, 0) and n > 10
    logs = {k: (tmp_path / f"run{k}" / "log.txt").read_text() for k in runs}
    assert f"text: the data's {n} distinct captions encoded once" in logs[20_000]
    assert f"text: {n} distinct captions, more than text_keep=10: encoded every step" in logs[10]
    assert not re.search(r"^text: ", logs[0], re.M)  # nothing said where nothing is kept
    for k in (20_000, 10):
        assert [s for s, _ in runs[k][0]] == [1, 2, 3]
        for (s0, v0), (s1, v1) in zip(runs[0][0], runs[k][0], strict=True):
            assert v0 == pytest.approx(v1, rel=1e-5), (k, s0)
        for name, w in runs[0][1].items():
            assert torch.allclose(w, runs[k][1][name], atol=1e-6), (k, name)


def test_captions_are_cleaned_as_diffusers_prx_pixel_pipeline_cleans_prompts(tmp_path):
    """clean_caption equals the cleaning of diffusers' PRXPixelPipeline (the reference) on mis-decoded text, nested
    HTML entities and outer whitespace, and the text encoder (training, encode-text, sampling) encodes the cleaned
    caption: what an exported pipeline encodes for the same prompt."""
    from diffusers.pipelines.prx.pipeline_prx_pixel import _basic_clean
    dirty = ["  a small red circle &amp;amp; a blue square\n", "cafÃ© &lt;b&gt; lounge",
             "\u201cquoted\u201d &#39;x&#39;", "a large green triangle", "", "   "]
    assert [support.clean_caption(c) for c in dirty] == [_basic_clean(c) for c in dirty]
    assert support.clean_caption(dirty[0]) == "a small red circle & a blue square"
    hp = T.parse_args(["preset=cpu"], False)
    enc = build_demo_encoders(tmp_path / "enc", hp, ["a small red circle & a blue square"])[0]
    text = T.TextEncoder(enc, 16, torch.device("cpu"), torch.float32)
    h, mask = text(dirty[:1])
    h2, mask2 = text([_basic_clean(dirty[0])])
    assert torch.equal(mask, mask2) and torch.equal(h, h2)
    raw = text.tok(dirty[:1], padding="max_length", max_length=16).input_ids
    assert raw != text.tok([_basic_clean(dirty[0])], padding="max_length", max_length=16).input_ids  # it matters


@pytest.mark.slow
def test_bench_prints_every_figure(tmp_path):
    small = ["stage1.batch=16", "stage1.micro_batch=16", "stage2.batch=16", "stage2.micro_batch=16"]  # 4x faster
    r = subprocess.run([sys.executable, str(ROOT / "train_gpt_style.py"), "preset=cpu", "bench=2",
                        f"run_dir={tmp_path}/b", "tread_frac=0.5", *small], capture_output=True, text=True,
                       timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith("bench stage:")]
    assert len(lines) == 2
    for line in lines:
        for key in ("step:", "img/s/device:", "dit_tflops/device:", "mfu:", "peak_mem:", "stage_hours@8:"):
            assert key in line  # the analytic memory plan is data_prep.py memory's (tests/test_memory.py)
    assert "bench projected schedule:" in r.stdout
    # the projection is the schedule's images over the measured rate
    hp = T.parse_args(["preset=cpu", *small], False)
    ips = [float(re.search(r"img/s/device:([\d.]+)", line).group(1)) for line in lines]
    hours = sum(st.steps * st.batch / i for st, i in zip(hp.stages, ips)) / 3600 / 8
    assert float(re.search(r"projected schedule: ([\d.]+) h on 8", r.stdout).group(1)) == pytest.approx(hours,
                                                                                                          abs=0.01)


def _logged(run):
    """Every logged training step of a run folder, in order, including steps logged again after a resume:
    [(step, (loss, flow, grad_norm))]."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], (r["loss"], r["flow"], r["grad_norm"])) for r in rows if "loss" in r]


@pytest.mark.slow
def test_resume_after_kills_and_sigterm_gives_the_same_losses(shapes, tmp_path):
    """A run killed with SIGKILL at three seeded random steps (one after the stage switch at step 4), then stopped
    with SIGTERM, then finished: every step it logs, first time or again after a resume, equals the uninterrupted
    run's to 1e-6, and so do the final EMA weights and data position. The interrupted run loads data with two
    workers and each signal goes to its process group, as Ctrl-C or `kill -- -PGID` sends it (SIGTERM to the workers
    too); the reference loads data in the main process."""
    import random
    import signal
    import time
    args = ["preset=cpu", f"data={shapes}", "stage1.steps=4", "stage1.batch=8", "stage1.micro_batch=4",
            "stage2.steps=6", "stage2.batch=4", "stage2.micro_batch=4", "log_every=1", "ckpt_every=2",
            "sample_steps=1", "warmup=3", "keep_ckpts=2"]
    cmd = [sys.executable, str(ROOT / "train_gpt_style.py")] + args
    env = dict(os.environ, OMP_NUM_THREADS="1")  # the reference runs beside the interrupted one, a core each
    ref = subprocess.Popen(cmd + [f"run_dir={tmp_path}/a"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           cwd=ROOT, env=env)
    run = tmp_path / "b"
    rng = random.Random(0)
    kills = sorted(rng.sample(range(1, 7), 3))
    assert kills[-1] > 4  # after the stage switch
    # a signal goes once the step is logged; SIGTERM by step 7, so that it stops before the last step, 10
    plan = [(signal.SIGKILL, k) for k in kills] + [(signal.SIGTERM, rng.randint(kills[-1], 7)), (None, None)]
    for sig, step in plan:
        seen = len(_logged(run)) if (run / "metrics.jsonl").exists() else 0
        logs = [open(tmp_path / name, "w+") for name in ("out.txt", "err.txt")]  # files: orphaned workers of a
        p = subprocess.Popen(cmd + [f"run_dir={run}", "num_workers=2"], stdout=logs[0],  # killed run may hold them
                             stderr=logs[1], text=True, cwd=ROOT, env=env, start_new_session=True)
        if sig is not None:  # wait until this process has logged step `step`, then signal it
            deadline = time.time() + 300
            while time.time() < deadline and p.poll() is None and not (
                    (run / "metrics.jsonl").exists() and any(s >= step for s, _ in _logged(run)[seen:])):
                time.sleep(0.02)
            # SIGTERM also goes to each loading worker, as a scheduler (SLURM) signals every process of a job
            kids = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split() if sig == signal.SIGTERM else []
            os.killpg(p.pid, sig)
            for k in kids:
                os.kill(int(k), sig)
        p.wait(timeout=300)
        out, err = [f.seek(0) or f.read() for f in logs]
        [f.close() for f in logs]
        if sig == signal.SIGKILL:
            assert p.returncode == -signal.SIGKILL, err[-2000:]
        else:
            assert p.returncode == 0, err[-2000:]
        if sig == signal.SIGTERM:
            stopped = int(re.search(r"stopped after step (\d+)/10 \(SIGTERM\)", out).group(1))
            assert stopped < 10 and (run / "ckpt" / f"step{stopped:07d}" / "extra.pt").exists()
        if sig is None:
            assert "resumed from" in out and "done: 10 steps" in out
    assert ref.wait(timeout=600) == 0, ref.stderr.read()[-2000:]
    a, b = dict(_logged(tmp_path / "a")), _logged(run)
    assert sorted(a) == sorted(dict(b)) == list(range(1, 11))
    for step, values in b:
        for x, y in zip(a[step], values):
            assert y == pytest.approx(x, rel=1e-6), (step, a[step], values)
    assert len(list((run / "ckpt").glob("step*"))) == 2 and not list((run / "ckpt").glob(".*"))
    ca, cb = (torch.load(r / "ckpt" / "step0000010" / "extra.pt", weights_only=False) for r in (tmp_path / "a", run))
    assert ca["data_pos"] == cb["data_pos"] == 4 * 8 + 6 * 4
    ea, eb = (torch.load(r / "ckpt" / "step0000010" / "ema.pt")["ema"] for r in (tmp_path / "a", run))
    for k in ea:
        assert torch.allclose(ea[k], eb[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("arch,needle", [(["hidden=64", "heads=2"], "another architecture"),
                                          ([], "can be loaded: their files are damaged")])
def test_resume_refuses_another_architecture_or_damaged_files(shapes, tmp_path, arch, needle):
    run = tmp_path / "r"
    (run / "ckpt" / "step0000002").mkdir(parents=True)
    hp = T.parse_args(["preset=cpu"] + arch, False)
    torch.save(dict(config=dataclasses.asdict(hp)), run / "ckpt" / "step0000002" / "extra.pt")
    (run / "ckpt" / "step0000002" / ".metadata").write_bytes(b"not a DCP index")
    r = subprocess.run([sys.executable, str(ROOT / "train_gpt_style.py"), "preset=cpu", f"data={shapes}",
                        f"run_dir={run}"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


PROJECT = {"train_gpt_style", "data_prep", "sample", "evals", "support"}
LEAVES = {"evals", "support"}  # modules that import nothing of the project


def _project_imports(path):
    import ast
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names & PROJECT


def test_imports_flow_one_way_trainer_to_leaves_only():
    """The helpers import the trainer; the trainer imports only the leaf modules; the leaves import nothing of the
    project. So no file of the project can be executed twice in one process."""
    assert _project_imports(ROOT / "train_gpt_style.py") <= LEAVES
    for leaf in LEAVES:
        assert _project_imports(ROOT / f"{leaf}.py") == set(), leaf
    assert "train_gpt_style" in _project_imports(ROOT / "data_prep.py") & _project_imports(ROOT / "sample.py")


@pytest.mark.slow
def test_the_demo_path_executes_the_trainer_once(shapes, tmp_path):
    """`python train_gpt_style.py` on the demo's path (tiny random encoders built, training, the shapes score at the
    end): at exit one module object holds the trainer's code (__main__), one PRXDiT class and one Hyperparameters
    class exist, and neither helper was imported. A site hook records it from inside the process. (The trainer
    of the first layout, which imported data_prep and sample, gave two modules and two of each class.)"""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(f'''
import atexit, gc, json, sys, types
def report():  # every module object that holds the trainer's code, wherever it is referenced
    mods = sorted(o.__name__ for o in gc.get_objects() if isinstance(o, types.ModuleType) and "PRXDiT" in vars(o))
    classes = {{c: sum(isinstance(o, type) and o.__name__ == c for o in gc.get_objects())
               for c in ("PRXDiT", "Hyperparameters", "Stage")}}
    json.dump(dict(modules=mods, classes=classes, helpers=sorted({{"data_prep", "sample"}} & set(sys.modules))),
              open({str(tmp_path / "report.json")!r}, "w"))
atexit.register(report)
''')
    env = dict(os.environ, PYTHONPATH=str(hook))
    r = subprocess.run([sys.executable, str(ROOT / "train_gpt_style.py"), "preset=cpu", f"data={shapes}",
                        f"run_dir={tmp_path}/run", "stage1.steps=1", "stage2.steps=1", "stage1.batch=4",
                        "stage1.micro_batch=4", "stage2.batch=4", "stage2.micro_batch=4", "sample_steps=1"],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "shapes score two:" in r.stdout and (tmp_path / "run" / "demo_encoders" / "text_encoder").is_dir()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report == dict(modules=["__main__"], classes=dict(PRXDiT=1, Hyperparameters=1, Stage=1), helpers=[])


@pytest.mark.slow
def test_text_sort_trains_on_the_same_samples_with_the_same_draws(shapes, tmp_path, monkeypatch):
    """With text_emb/, micro-batches dealt by caption length (text_sort=1, the default) or taken in stream order
    (text_sort=0) train on the same samples with the same noise, t, routing and caption dropout: 4 micro-batches
    per step, other micro-batches, the same losses and weights."""
    data, *_ = with_text_emb(shapes, tmp_path)
    conftest.few_prompts(data)
    drawn, make_loader = [], T.make_loader

    def spy(*a):  # the captions of each micro-batch
        for batch in make_loader(*a):
            drawn.append(batch[1])
            yield batch
    monkeypatch.setattr(T, "make_loader", spy)
    runs = {}
    for sort in (0, 1):
        drawn.clear()
        _, m = T.main(["preset=cpu", f"data={data}", f"run_dir={tmp_path}/run{sort}", f"text_sort={sort}", "stages=1",
                       "stage1.steps=3", "stage1.batch=8", "stage1.micro_batch=2", "log_every=1", "ckpt_every=0",
                       "sample_steps=1", "restarts=0", "warmup=1", "amp=0"])  # fp32 on bf16 CPUs too: 1e-5 below
        runs[sort] = drawn[:], _logged(tmp_path / f"run{sort}"), m.model.state_dict()
    (plain, logged0, w0), (dealt, logged1, w1) = runs[0], runs[1]
    steps = [sorted(c for b in d[4 * s:4 * s + 4] for c in b) for d in (plain, dealt) for s in range(3)]
    assert steps[:3] == steps[3:] and plain != dealt  # the same samples per step, in other micro-batches
    words = [[len(c.split()) for b in dealt[4 * s:4 * s + 4] for c in b] for s in range(3)]
    assert all(w == sorted(w) for w in words) and len({n for w in words for n in w}) > 1  # shorter captions first
    assert [s for s, _ in logged0] == [1, 2, 3]
    for (s0, v0), (s1, v1) in zip(logged0, logged1, strict=True):
        assert s0 == s1 and v0 == pytest.approx(v1, rel=1e-5), s0
    for k in w0:
        assert torch.allclose(w0[k], w1[k], atol=1e-6), k
