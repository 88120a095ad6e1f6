"""Faults a long run meets: a full disk, non-finite steps, signals, a wall-clock limit, corrupt checkpoints, bad
input. Each test runs the real trainer in-process at toy size and checks what happens against what must hold."""
import errno
import json
import os
import re
import signal

import pytest
import torch

import support
import train_gpt_style as T
from conftest import few_prompts

TINY = ["preset=cpu", "stages=1", "stage1.batch=4", "stage1.micro_batch=4", "log_every=1", "sample_steps=1",
        "warmup=2", "lpips_weight=0", "pdino_weight=0"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from data_prep import make_shapes
    return few_prompts(make_shapes(tmp_path_factory.mktemp("shapes"), n=64, shard_rows=32))


def run(shapes, run_dir, *args):
    return T.main(TINY + [f"data={shapes}", f"run_dir={run_dir}", *args])


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def one_line_error(capsys, fn, *args):
    """fn(*args) must stop with exit code 2 and exactly one line on stderr: the message."""
    capsys.readouterr()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(SystemExit) as e:
        fn(*args)
    for sig, h in handlers.items():  # a run that ends the process leaves its handlers in place; this one goes on
        signal.signal(sig, h)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ---------------------------------------------------------------- checkpoints: atomic, newest K, full disk


def test_save_atomic_keeps_the_newest_k_and_survives_a_failed_write(tmp_path):
    write = lambda text: lambda tmp: tmp.write_text(text)
    for step in range(1, 6):
        assert support.save_atomic(write(f"ck{step}"), tmp_path / f"step{step:07d}.pt", keep=3) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"step{s:07d}.pt" for s in (3, 4, 5)]

    def full_disk(tmp):
        tmp.write_text("half a checkpo")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    err = support.save_atomic(full_disk, tmp_path / "step0000006.pt", keep=3)
    assert err == f"OSError: [Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"step{s:07d}.pt" for s in (3, 4, 5)]  # no temporary left
    assert [(tmp_path / f"step{s:07d}.pt").read_text() for s in (3, 4, 5)] == ["ck3", "ck4", "ck5"]
    # a folder checkpoint (as torch.distributed.checkpoint writes), a temporary left by a killed process, keep=0
    (tmp_path / ".step0000007.pt.tmp").write_text("killed while writing")
    support.save_atomic(lambda tmp: (tmp.mkdir(), (tmp / "rank0").write_text("x")), tmp_path / "step0000008", keep=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"step{s:07d}.pt" for s in (3, 4, 5)] + ["step0000008"]
    assert (tmp_path / "step0000008" / "rank0").read_text() == "x"
    # a run restarted with resume=off writes older step numbers: the new checkpoint is never the one removed
    support.save_atomic(write("new"), tmp_path / "step0000001.pt", keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step0000001.pt", "step0000008"]


def test_full_disk_mid_run_continues_and_at_the_end_stops_naming_the_last_good_checkpoint(shapes, tmp_path,
                                                                                           monkeypatch, capsys):
    save = torch.save

    def flaky_save(obj, f, *a, **k):  # checkpoints 2 and 3 (the final one) hit a full disk half-way
        if (tmp_path / "ckpt" / "step0000001").exists():  # the disk is full once the first checkpoint is written
            if isinstance(f, (str, os.PathLike)):  # ema.pt, extra.pt (DCP serialises into memory first)
                open(f, "wb").write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(obj, f, *a, **k)
    monkeypatch.setattr(T.torch, "save", flaky_save)
    msg = one_line_error(capsys, run, shapes, tmp_path, "stage1.steps=3", "ckpt_every=1")
    good = tmp_path / "ckpt" / "step0000001"
    assert msg == (f"error: checkpoint {tmp_path}/ckpt/step0000003 not written (OSError: [Errno 28] No space left "
                   f"on device); the last good one is {good}")
    log = (tmp_path / "log.txt").read_text()
    assert (f"checkpoint {tmp_path}/ckpt/step0000002 not written (OSError: [Errno 28] No space left on device); "
            f"the last good one is {good}; training continues") in log
    assert [r["step"] for r in metrics(tmp_path) if "loss" in r] == [1, 2, 3]  # it went on after the failure
    assert os.listdir(tmp_path / "ckpt") == ["step0000001"]  # the temporaries are gone
    monkeypatch.undo()
    assert torch.load(good / "extra.pt", weights_only=False)["step"] == 1


def test_full_disk_costs_log_lines_and_pictures_never_the_run(shapes, tmp_path, monkeypatch, capsys):
    full = lambda: (tmp_path / "ckpt" / "step0000001").exists()  # the disk fills after the first checkpoint
    enospc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    class File:  # log.txt and metrics.jsonl, on that disk
        def __init__(self, path, mode):
            self.f, self.name = open(path, mode), str(path)

        def write(self, text):
            if full():
                raise enospc
            return self.f.write(text)

        def flush(self):
            self.f.flush()
    grid = support.save_grid
    monkeypatch.setattr(support, "open", File, raising=False)
    monkeypatch.setattr(support, "save_grid", lambda *a: (_ for _ in ()).throw(enospc) if full() else grid(*a))
    capsys.readouterr()
    run(shapes, tmp_path, "stage1.steps=3", "ckpt_every=1")  # checkpoints still have space here
    out = capsys.readouterr()
    warnings = [line for line in out.err.splitlines() if line.startswith("warning: cannot write")]
    assert len(warnings) == 1 and f"{tmp_path}/log.txt (No space left on device)" in warnings[0]
    assert "done: 3 steps" in out.out and "shapes score" in out.out  # the console has every line
    assert f"samples: {tmp_path}/samples/step0000003.png not written (No space left on device)" in out.out
    assert [r["step"] for r in metrics(tmp_path) if "loss" in r] == [1]  # written before the disk filled
    assert "step:1/3" in (tmp_path / "log.txt").read_text()
    assert sorted(os.listdir(tmp_path / "ckpt")) == [f"step{s:07d}" for s in (1, 2, 3)]


def test_the_training_loss_clamps_t_at_loss_t_min(shapes, tmp_path, monkeypatch):
    seen, flow_loss = [], T.flow_loss

    def spy(x0_pred, x0, x_t, t, t_min):  # the x0 error weighs 1 / max(t, t_min)^2 (test_trainer: closed form)
        loss = flow_loss(x0_pred, x0, x_t, t, t_min)
        seen.append((t_min, loss.mean().item()))
        return loss
    monkeypatch.setattr(T, "flow_loss", spy)
    run(shapes, tmp_path, "stage1.steps=2", "ckpt_every=0", "loss_t_min=0.3", "t_min_div=0.07")
    assert [c for c, _ in seen] == [0.3, 0.3]  # not the sampler's t_min_div
    flows = [r["flow"] for r in metrics(tmp_path) if "flow" in r]
    assert flows == pytest.approx([f for _, f in seen], rel=1e-5)  # what is logged (and trained) is that loss


# ---------------------------------------------------------------- non-finite steps


def test_non_finite_steps_are_skipped_on_device_and_k_in_a_row_stop_the_run(shapes, tmp_path, monkeypatch, capsys):
    bad_steps, calls = {2, 4, 5}, []
    flow_loss = T.flow_loss

    def nan_flow_loss(*args):  # one call per step (one micro-batch per step)
        calls.append(1)
        loss = flow_loss(*args)
        return loss * float("nan") if len(calls) in bad_steps else loss
    monkeypatch.setattr(T, "flow_loss", nan_flow_loss)
    snaps, train_step = [], T.train_step

    def snapshot(m, optimizers):  # weights, EMA aside, and every optimizer state tensor
        opt = [t.clone() for o in optimizers for s in o.state.values() for t in s.values()]
        return [p.detach().clone() for p in m.model.parameters()], opt

    def recording_step(stage, batches, state, m, optimizers, *rest):
        before = snapshot(m, optimizers)
        out = train_step(stage, batches, state, m, optimizers, *rest)
        snaps.append((before, snapshot(m, optimizers)))
        return out
    monkeypatch.setattr(T, "train_step", recording_step)
    msg = one_line_error(capsys, run, shapes, tmp_path, "stage1.steps=8", "ckpt_every=2", "max_bad_steps=2")
    assert msg == (f"error: 2 non-finite steps in a row (skipped) by step 5; the last good checkpoint is "
                   f"{tmp_path}/ckpt/step0000004; lower lr or check the data, then resume")
    same = lambda a, b: len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    assert len(snaps) == 5
    for step, ((p0, o0), (p1, o1)) in enumerate(snaps, 1):
        if step in bad_steps:  # weights, Adam moments and step count, Muon momentum: exactly as before
            assert same(p0, p1) and same(o0, o1), step
        else:
            assert not same(p0, p1), step
    assert all(torch.isfinite(p).all() for p in snaps[-1][1][0])
    rows = {r["step"]: r for r in metrics(tmp_path) if "loss" in r}
    assert [rows[s]["skipped"] for s in range(1, 6)] == [0, 1, 1, 2, 3]
    assert [rows[s]["loss"] != rows[s]["loss"] for s in range(1, 6)] == [s in bad_steps for s in range(1, 6)]
    assert "skipped:3" in (tmp_path / "log.txt").read_text().splitlines()[-2]


# ---------------------------------------------------------------- signals and the time limit


def test_sigint_finishes_the_step_checkpoints_and_returns(shapes, tmp_path, monkeypatch):
    train_step = T.train_step

    def interrupted_step(stage, batches, state, *rest):
        if state.step == 1:  # arrives during step 2
            os.kill(os.getpid(), signal.SIGINT)
        return train_step(stage, batches, state, *rest)
    monkeypatch.setattr(T, "train_step", interrupted_step)
    before = signal.getsignal(signal.SIGINT)
    state, _ = run(shapes, tmp_path, "stage1.steps=5", "ckpt_every=0")
    assert state.step == 2 and signal.getsignal(signal.SIGINT) is before  # handlers given back
    assert os.listdir(tmp_path / "ckpt") == ["step0000002"]
    assert f"stopped after step 2/5 (SIGINT); the checkpoint is {tmp_path}/ckpt/step0000002; run the same " \
           "command to resume" in (tmp_path / "log.txt").read_text()
    assert [r["step"] for r in metrics(tmp_path) if "loss" in r] == [1, 2]


def test_signal_during_setup_or_the_final_scoring_stops_cleanly(shapes, tmp_path, monkeypatch, capsys):
    """SIGTERM while the run loads data and builds models: no step, no traceback, one message. SIGINT during the
    final scoring (training done and saved): the scoring ends there, one message. The test's own handlers stand in
    for the default ones (which would end the test process): the run must take the signals from them."""
    got = []
    mine = lambda signum, frame: got.append(signum)
    old = {sig: signal.signal(sig, mine) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        build_models = T.build_models
        monkeypatch.setattr(T, "build_models", lambda *a: os.kill(os.getpid(), signal.SIGTERM) or build_models(*a))
        capsys.readouterr()
        state, _ = run(shapes, tmp_path / "a", "stage1.steps=3")
        out = capsys.readouterr()
        assert state.step == 0 and got == [] and out.err == ""
        assert out.out.splitlines()[-1] == "stopped after step 0/3 (SIGTERM); the checkpoint is none; run the same " \
                                           "command to resume"
        assert not (tmp_path / "a" / "metrics.jsonl").read_text() and not os.listdir(tmp_path / "a" / "ckpt")
        monkeypatch.setattr(T, "build_models", build_models)
        score_demo = T.score_demo
        monkeypatch.setattr(T, "score_demo", lambda *a: os.kill(os.getpid(), signal.SIGINT) or score_demo(*a))
        state, _ = run(shapes, tmp_path / "b", "stage1.steps=1")
        out = capsys.readouterr()
        assert state.step == 1 and got == [] and out.err == "" and "shapes score" not in out.out
        assert out.out.splitlines()[-1] == f"scoring stopped (SIGINT); the checkpoint is {tmp_path}/b/ckpt/step0000001"
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGINT) is mine  # given back
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def test_time_limit_stops_with_a_checkpoint_before_the_deadline(shapes, tmp_path, monkeypatch):
    """A fake clock: each step takes 10 s, nothing else takes time. With time_limit=50 the checkpoint reserve is
    50 / 10 = 5 s until one is measured; after step k the run goes on while 10 k + 2 * 10 + 5 <= 50, so it stops
    after step 3, and its checkpoint is done at t = 30, before the deadline."""
    now = [0.0]
    monkeypatch.setattr(T.time, "monotonic", lambda: now[0])
    train_step = T.train_step

    def ten_second_step(*args):
        now[0] += 10
        return train_step(*args)
    monkeypatch.setattr(T, "train_step", ten_second_step)
    state, _ = run(shapes, tmp_path, "stage1.steps=8", "ckpt_every=0", "time_limit=50")
    assert state.step == 3 and now[0] == 30 <= 50
    assert os.listdir(tmp_path / "ckpt") == ["step0000003"]
    assert "stopped after step 3/8 (time_limit)" in (tmp_path / "log.txt").read_text()


def test_time_limit_step_time_leaves_out_sampling(shapes, tmp_path, monkeypatch):
    """Fake clock again: steps take 10 s, the sample grid after step 1 takes 15 s. The step time that time_limit
    projects from is 10 s after it, not 25: with time_limit=65 (reserve 6.5 s) the run stops after step 3
    (45 + 20 + 6.5 > 65), not after step 2 (35 + 2 * 25 + 6.5)."""
    now = [0.0]
    monkeypatch.setattr(T.time, "monotonic", lambda: now[0])
    train_step, sample, steps = T.train_step, T.sample, []
    monkeypatch.setattr(T, "train_step", lambda *a: now.__setitem__(0, now[0] + 10) or steps.append(1) or train_step(*a))
    monkeypatch.setattr(T, "sample", lambda *a, **k: now.__setitem__(0, now[0] + 15 * (len(steps) == 1))
                        or sample(*a, **k))
    state, _ = run(shapes, tmp_path, "stage1.steps=8", "ckpt_every=0", "sample_every=1", "time_limit=65")
    assert state.step == 3 and now[0] == 45


# ---------------------------------------------------------------- bad input: one line, before any model


def test_new_constants_are_checked():
    for bad in (["keep_ckpts=-1"], ["time_limit=-5"], ["max_bad_steps=0"], ["lr=0"], ["grad_clip=-1"],
                ["ema_decay=1.5"], ["t_min_div=0"], ["lpips_weight=-0.1"], ["time_limit=soon"],
                # not a number, or infinite, where a range check alone lets it through
                ["aspect_max=nan"], ["aspect_max=inf"], ["repa_weight=nan"], ["lpips_weight=nan"], ["pdino_weight=inf"],
                ["time_limit=nan"], ["time_limit=inf"], ["lr=inf"], ["lr=nan"], ["grad_clip=nan"], ["grad_clip=-inf"],
                ["cfg=nan"], ["t_shift=inf"], ["ema_decay=nan"], ["mem_budget=inf"], ["peak_tflops=nan"],
                # out of range
                ["cfg=-3"], ["t_min_div=5"], ["t_min_div=1"], ["loss_t_min=0"], ["loss_t_min=1.5"], ["restarts=-1"],
                ["restart_lo=0.5", "restart_hi=0.4"], ["mem_budget=-1"], ["mem_budget=0"], ["last_rolls=0"],
                ["last_rolls=4", "grid_shift=0"], ["text_keep=-1"],  # rolls of 0 px: the same prediction four times
                # impossible combinations: P-DINO below one 14-px patch, LPIPS below 32 px a side (stage 1 of the CPU
                # preset is 32 px, and its aspect buckets at aspect_max=2 include 40 x 24)
                ["pdino_res=13", "pdino_weight=0.01"], ["lpips_weight=0.1", "aspect_max=1", "stage1.res=24"],
                ["lpips_weight=0.1", "aspect_max=2"]):
        with pytest.raises(ValueError, match=bad[0].split("=")[0]):  # the message names the constant
            T.parse_args(["preset=cpu"] + bad, cuda_available=False)
    hp = T.parse_args(["keep_ckpts=0", "time_limit=3600", "max_bad_steps=1", "grad_clip=inf", "cfg=0",
                       "pdino_res=14", "lpips_weight=0.1", "aspect_max=1"], cuda_available=False)
    assert (hp.keep_ckpts, hp.time_limit, hp.max_bad_steps, hp.grad_clip) == (0, 3600.0, 1, float("inf"))


def test_help_lists_every_constant_with_its_default_and_comment():
    """--help prints, for every constant of the dataclasses, name=default (the dataclass's own value) and the
    comment written beside it in the file; each preset's changes and stages; exit code 0, nothing run."""
    import dataclasses
    import inspect
    import subprocess
    import sys
    from conftest import ROOT
    r = subprocess.run([sys.executable, str(ROOT / "train_gpt_style.py"), "--help"], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr[-2000:]
    lines, hp = r.stdout.splitlines(), T.Hyperparameters()
    for cls, prefix in ((T.Hyperparameters, ""), (T.Stage, "stageK.")):
        source = inspect.getsource(cls).splitlines()
        comments = {line.split(":")[0].strip(): line.partition("  # ")[2] for line in source}
        for f in dataclasses.fields(cls):
            if f.name == "stages":
                continue
            value = repr(getattr(hp, f.name)) if cls is T.Hyperparameters else "(per stage)"
            (line,) = [x for x in lines if x.startswith(f"  {prefix}{f.name}=")]
            assert line.split("  # ")[0].strip() == f"{prefix}{f.name}={value}", line
            assert line.endswith(f"# {comments[f.name]}" if comments[f.name] else value), line
    st = hp.stages[1]
    assert f"stage2: res={st.res} batch={st.batch} micro_batch={st.micro_batch} steps={st.steps}" in r.stdout
    assert "preset=cpu: " in r.stdout and "hidden=128" in r.stdout


def test_micro_batch_is_lowered_to_a_devices_share_and_the_global_batch_stays():
    """torchrun --nproc_per_node=2 on the CPU demo: batch 64, micro-batch 64 -> 32 a device, accumulation 1, the
    same 64 images a step; a share that still fits is left alone; a batch the devices cannot split is one line."""
    stages = T.parse_args(["preset=cpu"], False).stages
    notes = support.fit_micro_batches(stages, 2)
    assert [(st.batch, st.micro_batch) for st in stages] == [(64, 32), (64, 32)] and notes == [
        f"stage{i}.micro_batch 64 lowered to 32: a batch of 64 gives each of 2 devices 32 images (the same global "
        "batch)" for i in (1, 2)]
    assert support.fit_micro_batches(stages, 1) == [] and stages[0].micro_batch == 32  # fits: unchanged
    odd = [T.Stage(res=32, batch=12, micro_batch=4, steps=1, repa=False)]
    with pytest.raises(ValueError, match=r"stage1.batch=12 is not divisible by world size 8 x micro_batch 4"):
        support.fit_micro_batches(odd, 8)


def test_lpips_minimum_side_is_what_lpips_can_run():
    """check_config refuses lpips_weight > 0 exactly when some aspect bucket of a stage is too small for LPIPS."""
    lp = T.load_lpips("cpu", pretrained=False)
    patch = T.parse_args(["preset=cpu"], cuda_available=False).patch  # the patch check_config sees below
    for res in (2 * patch, 3 * patch, 4 * patch, 5 * patch, 8 * patch):  # 16, 24, 32, 40, 64 at patch 8
        for aspect_max in (1.0, 2.0):
            args = ["preset=cpu", "stages=1", f"stage1.res={res}", f"aspect_max={aspect_max}", "lpips_weight=0.1"]
            try:
                T.parse_args(args, cuda_available=False)
                accepted = True
            except ValueError as e:
                assert str(e).startswith("lpips_weight>0 needs"), e
                accepted = False
            runs = True
            for w, h in support.aspect_buckets(res, patch, aspect_max):
                try:
                    T.lpips_loss(lp, torch.zeros(1, 3, h, w), torch.zeros(1, 3, h, w))
                except RuntimeError:
                    runs = False
            assert accepted == runs, (res, aspect_max)


def test_missing_encoder_folders_are_one_line_before_anything_is_written(shapes, tmp_path, capsys):
    for name in ("text_encoder", "repa_encoder", "pdino_encoder"):
        msg = one_line_error(capsys, run, shapes, tmp_path / "r", f"{name}=./no/such/folder")
        assert msg == f"error: {name}=./no/such/folder is neither a local folder nor a hub id (org/name); " \
                      f"set {name}=PATH or ID"
    assert one_line_error(capsys, run, tmp_path / "nope", tmp_path / "r").startswith(
        f"error: data folder {tmp_path}/nope does not exist")
    assert one_line_error(capsys, run, shapes, tmp_path / "r", f"stage1.data={tmp_path}/nope") == \
        f"error: stage1.data folder {tmp_path}/nope does not exist; create it with data_prep.py or set stage1.data=PATH"
    assert not (tmp_path / "r").exists()
    # a hub id that cannot be downloaded here (offline), and a folder that holds no model
    (tmp_path / "empty").mkdir()
    for value in ("nobody-here/no-model", tmp_path / "empty"):
        msg = one_line_error(capsys, run, shapes, tmp_path / "r", f"text_encoder={value}")
        assert msg.startswith(f"error: cannot load text_encoder {value} (") and msg.endswith(
            "set text_encoder to a folder holding the model or a hub id that can be downloaded")


def test_a_stage_folder_without_shards_is_one_line_before_any_model(shapes, tmp_path, capsys, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(T, "PRXDiT", None)  # never reached
    msg = one_line_error(capsys, run, shapes, tmp_path / "r", f"stage1.data={tmp_path}/empty")
    assert msg == f"error: no parquet shards under {tmp_path}/empty; run data_prep.py first"


def damaged_copy(shapes, dst, change, shards=None):
    """A copy of the shapes data whose shards (all, or those numbered in `shards`) are rewritten by change(table)."""
    import shutil

    import pyarrow.parquet as pq
    shutil.copytree(shapes, dst)
    files = sorted((dst / "train").glob("*.parquet"))
    for k, f in enumerate(files):
        if shards is None or k in shards:
            pq.write_table(change(pq.read_table(f)), f)
    return [str(f) for f in files]


def set_col(name, values, typ=None):  # -> change(table): column `name` replaced by values(table)
    import pyarrow as pa
    return lambda t: t.set_column(t.schema.get_field_index(name), name, pa.array(values(t), typ))


def rows_changed(fn):  # -> change(table): fn(row) applied to every row
    import pyarrow as pa
    return lambda t: pa.Table.from_pylist([fn(r) or r for r in t.to_pylist()], schema=t.schema)


WRONG_COLUMNS = {  # name: (change, shards changed, the message with {0}, {1}: the first and second shard)
    "caption int, every shard": (set_col("caption", lambda t: list(range(len(t)))), None,
                                 "{0}: column caption holds int64, not text"),
    "caption int, second shard": (set_col("caption", lambda t: list(range(len(t)))), [1],
                                  "{1}: column caption holds int64, not text"),
    "image int": (set_col("image", lambda t: list(range(len(t)))), None, "{0}: column image holds int64, not image "),
    "image paths as strings": (set_col("image", lambda t: [f"/x/{i}.png" for i in range(len(t))]), None,
                               "{0}: column image holds string, not image bytes"),
    "image struct without bytes": (set_col("image", lambda t: [{"path": "/x.png"}] * len(t)), None,
                                   "{0}: column image holds struct<path: string>, not image bytes"),
    "width float": (set_col("width", lambda t: [32.0] * len(t)), None, "{0}: column width holds double, not integers"),
    "no width/height in one shard": (lambda t: t.drop(["width", "height"]), [0], "{1} has columns {{'image': "
                                     "'struct<bytes: binary, path: string>', 'caption': 'string', 'width': 'int32', "
                                     "'height': 'int32'}}, but {0} has {{'image': 'struct<bytes: binary, path: "
                                     "string>', 'caption': 'string'}}; re-create it with data_prep.py or delete it"),
}


@pytest.mark.parametrize("case", WRONG_COLUMNS)
def test_shard_columns_of_the_wrong_type_are_one_line_naming_the_file(shapes, tmp_path, capsys, monkeypatch, case):
    change, shards, want = WRONG_COLUMNS[case]
    files = damaged_copy(shapes, tmp_path / "data", change, shards)
    monkeypatch.setattr(T, "PRXDiT", None)  # never reached: found in the shard footers
    msg = one_line_error(capsys, run, tmp_path / "data", tmp_path / "r")
    assert msg.startswith("error: " + want.format(*files)) and msg.endswith("with data_prep.py or delete it"), msg


def test_raw_binary_image_column_is_accepted(shapes, tmp_path):
    files = damaged_copy(shapes, tmp_path / "data", set_col("image", lambda t: [
        r["bytes"] for r in t.column("image").to_pylist()], "binary"))
    ds = T.ShardDataset(tmp_path / "data")
    ds.set_stage(32, 8, 2.0)
    assert len(files) == 2 and len(ds) == 64 and ds[5][4] == [] and ds[5][0].shape == (3, 32, 32)


@pytest.mark.parametrize("change, cause, workers", [
    (rows_changed(lambda r: r.update(caption="  ")), "empty_caption", 0),
    (rows_changed(lambda r: r["image"].update(bytes=b"garbage")), "undecodable", 2),  # raised in a loader worker
    (rows_changed(lambda r: r["image"].update(bytes=None, path="/x.png")), "undecodable", 0)],  # paths, no bytes
    ids=["blank captions", "garbage images in a worker", "image paths only"])
def test_a_bucket_without_a_usable_row_is_one_line_with_the_causes(shapes, tmp_path, capsys, change, cause, workers):
    damaged_copy(shapes, tmp_path / "data", change)
    msg = one_line_error(capsys, run, tmp_path / "data", tmp_path / "r", "stage1.steps=2", f"num_workers={workers}")
    # the 64 rows all fall in the 32x32 bucket: each is tried once, and counted once
    assert msg == f"error: no row of the 32x32 bucket of {tmp_path}/data has a decodable image and a caption " \
                  f"({cause}: 64); check the shards with data_prep.py or remove them"


def test_cpu_preset_needs_the_shapes_prompt_files(shapes, tmp_path, capsys):
    import shutil
    shutil.copytree(shapes / "train", tmp_path / "data" / "train")  # shards as data_prep.py writes from the hub
    msg = one_line_error(capsys, run, tmp_path / "data", tmp_path / "r", "stage1.steps=1")
    assert msg == f"error: {tmp_path}/data/prompts_seen.txt is missing: preset=cpu (the shapes demo) needs the " \
                  "prompt files of data_prep.py's shapes data; set data to such a folder, or preset=record"
    assert not (tmp_path / "r").exists()


def test_16_and_32_bit_grey_images_become_their_8_bit_version():
    """A grey ramp stored as 16-bit PNG (I;16), 32-bit integer TIFF (I) at 8-, 16- and 20-bit range, and float TIFF
    (F) in [0, 1] and [0, 255] decodes to the 8-bit ramp (to 1 level), counted as a converted mode."""
    import io

    import numpy as np
    from PIL import Image
    ramp = np.tile(np.arange(256, dtype=np.uint8), (4, 1))  # (4, 256)
    for arr, fmt, mode in ((ramp.astype(np.uint16) * 257, "PNG", "I;16"), (ramp.astype(np.uint16) << 8, "PNG", "I;16"),
                           (ramp.astype(np.int32), "TIFF", "I"), (ramp.astype(np.int32) * 257, "TIFF", "I"),
                           (ramp.astype(np.int32) << 12, "TIFF", "I"), (ramp / np.float32(255), "TIFF", "F"),
                           (ramp.astype(np.float32), "TIFF", "F")):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format=fmt)
        img, cause = support.decode_image(buf.getvalue())
        assert cause == f"mode_{mode}" and img.mode == "RGB", (mode, cause)
        got = np.asarray(img).astype(int)
        assert (got == got[..., :1]).all() and np.abs(got[..., 0] - ramp).max() <= 1, (mode, arr.max())


def test_run_dir_that_is_not_writable_is_one_line(shapes, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("")
    msg = one_line_error(capsys, run, shapes, tmp_path / "file" / "run")
    assert msg == f"error: run_dir {tmp_path}/file/run is not writable (Not a directory: {tmp_path}/file/run); " \
                  "set run_dir to another folder"
    # ckpt/ not writable (root ignores permissions: the probe file in ckpt/ is refused instead)
    touch = T.Path.touch

    def read_only(path, *a, **k):
        if path.parent.name == "ckpt":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return touch(path, *a, **k)
    monkeypatch.setattr(T.Path, "touch", read_only)
    msg = one_line_error(capsys, run, shapes, tmp_path / "ro", "stage1.steps=1")
    assert re.fullmatch(rf"error: run_dir {tmp_path}/ro is not writable \(Permission denied: {tmp_path}/ro/ckpt/"
                        r"\.probe[0-9a-f]{16}\.tmp\); set run_dir to another folder", msg), msg
    assert "model:" not in (tmp_path / "ro" / "log.txt").read_text()


def test_run_dir_that_other_nodes_cannot_see_is_one_line(shapes, tmp_path, capsys, monkeypatch):
    """Multi-node with run_dir on a node-local disk: a rank that does not see rank 0's probe file stops the run before
    any checkpoint (rank 0 would rename checkpoint folders lacking the other nodes' shards). A 1-process group where
    the probe vanishes at the barrier, as it would for a rank on another node."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(k, v)
    barrier = T.dist.barrier

    def other_node(*a, **k):
        for p in (tmp_path / "ckpt").glob(".probe*"):
            p.unlink()
        return barrier(*a, **k)
    monkeypatch.setattr(T.dist, "barrier", other_node)
    try:
        msg = one_line_error(capsys, run, shapes, tmp_path, "stage1.steps=1")
    finally:
        T.dist.destroy_process_group()
    assert msg == f"error: run_dir {tmp_path} must be on a file system every node sees (a rank does not see rank " \
                  "0's files); put it on shared storage"


@pytest.mark.parametrize("damaged", ["extra.pt", "__0_0.distcp", "ema.pt"])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(shapes, tmp_path, capsys, damaged):
    """Any damaged file of the newest checkpoint (step, RNG and data position; the DCP weights and optimizer
    states; the EMA): the run resumes from the one before, and redoes the step with the same loss and grad norm."""
    args = ["stage1.steps=2", "ckpt_every=1"]
    run(shapes, tmp_path, *args)
    first = {r["step"]: r for r in metrics(tmp_path) if "loss" in r}
    newest = tmp_path / "ckpt" / "step0000002"
    raw = (newest / damaged).read_bytes()  # truncated, as by a crash of the file system, or garbage
    (newest / damaged).write_bytes(raw[:len(raw) // 2] if damaged != "ema.pt" else os.urandom(len(raw)))
    capsys.readouterr()
    run(shapes, tmp_path, *args)
    out = capsys.readouterr().out
    assert f"warning: checkpoint {newest} is unreadable (" in out and "trying the one before" in out
    assert f"resumed from {tmp_path}/ckpt/step0000001 at step 1" in out
    redone = [r for r in metrics(tmp_path) if "loss" in r][-1]
    assert redone["step"] == 2
    for key in ("loss", "grad_norm"):
        assert redone[key] == pytest.approx(first[2][key], rel=1e-6)
    assert torch.load(newest / "extra.pt", weights_only=False)["step"] == 2  # written again, complete
    if damaged != "extra.pt":
        return
    # nothing readable at all: refuse rather than start over on top of them
    for p in (tmp_path / "ckpt").iterdir():
        (p / "extra.pt").write_bytes(b"garbage")
    msg = one_line_error(capsys, run, shapes, tmp_path, *args)
    assert msg == f"error: no checkpoint in {tmp_path}/ckpt can be loaded: their files are damaged, or a constant " \
                  "that changes the trainable parameters or optimizer states (e.g. repa_weight, normuon) differs; " \
                  "use a new run_dir or move them away"


def test_resume_off_refuses_an_earlier_runs_checkpoints(shapes, tmp_path, capsys):
    run(shapes, tmp_path, "stage1.steps=1")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt" / "step0000001").iterdir()}
    msg = one_line_error(capsys, run, shapes, tmp_path, "stage1.steps=1", "resume=off")
    assert msg == f"error: run_dir {tmp_path} holds checkpoints of an earlier run; use a new run_dir, or resume=auto " \
                  "to continue it"
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt" / "step0000001").iterdir()} == before


def test_checkpoint_of_another_architecture_is_refused_before_any_model(shapes, tmp_path, capsys):
    import dataclasses
    ck = tmp_path / "ckpt" / "step0000002"
    ck.mkdir(parents=True)
    other = T.parse_args(["preset=cpu", "hidden=64", "heads=2"], False)
    torch.save(dict(config=dataclasses.asdict(other)), ck / "extra.pt")
    msg = one_line_error(capsys, run, shapes, tmp_path, "stage1.steps=1")
    assert msg == f"error: {ck} is a checkpoint of another architecture (hidden=64, not 128; heads=2, not 4); " \
                  "use a new run_dir"
    assert (tmp_path / "log.txt").read_text() == ""  # no data loaded, no encoder or model built


def test_checkpoint_folder_that_cannot_be_made_costs_that_checkpoint_only(shapes, tmp_path, monkeypatch):
    """The first checkpoint's temporary folder cannot be made (no permission, full disk): one log line, and the run
    goes on to write the next one. ema.pt, extra.pt and the folder reach the disk before the rename."""
    mkdir, fsync, synced = T.Path.mkdir, os.fsync, []

    def refused(path, *a, **k):
        if path.name == ".step0000001.tmp":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return mkdir(path, *a, **k)
    monkeypatch.setattr(T.Path, "mkdir", refused)
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or fsync(fd))
    state, _ = run(shapes, tmp_path, "stage1.steps=2", "ckpt_every=1")
    assert state.step == 2 and os.listdir(tmp_path / "ckpt") == ["step0000002"]
    assert f"checkpoint {tmp_path}/ckpt/step0000001 not written (PermissionError: [Errno 13] Permission denied: " \
           f"'{tmp_path}/ckpt/.step0000001.tmp'); the last good one is none; training continues" in \
           (tmp_path / "log.txt").read_text()
    tmp = f"{tmp_path}/ckpt/.step0000002.tmp"  # the paths of the synced descriptors: before the rename
    assert {f"{tmp}/ema.pt", f"{tmp}/extra.pt", tmp} <= set(synced)


def test_bad_row_counts_survive_a_resume(shapes, tmp_path, monkeypatch):
    """The bad-row summary of a run stopped (SIGINT after step 2) and resumed equals the uninterrupted run's: the
    counts of the first part are saved with the checkpoint."""
    from conftest import corrupt_copy
    data = tmp_path / "data"
    corrupt_copy(shapes, data, seed=0)
    bad_rows = lambda d: [line for line in (d / "log.txt").read_text().splitlines() if line.startswith("data: bad")]
    T.main(TINY + [f"data={data}", f"run_dir={tmp_path}/a", "stage1.steps=4"])
    train_step = T.train_step

    def interrupted_step(stage, batches, state, *rest):
        if state.step == 1:  # during step 2 (the resumed part starts at step 2)
            os.kill(os.getpid(), signal.SIGINT)
        return train_step(stage, batches, state, *rest)
    monkeypatch.setattr(T, "train_step", interrupted_step)
    for _ in range(2):
        T.main(TINY + [f"data={data}", f"run_dir={tmp_path}/b", "stage1.steps=4"])
    first, final = bad_rows(tmp_path / "b")
    assert first != "data: bad rows replaced or converted so far (all ranks): none"  # some before the stop
    assert final == bad_rows(tmp_path / "a")[0] != first  # and some after it


# ---------------------------------------------------------------- one run per run_dir; checkpoints are data

class Trap:  # unpickled by a loader that runs code, it creates the file `path`
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def index_trap(path):
    """A DCP index (.metadata) pickle whose global is os.system reached through DCP's own metadata module (an
    allowlist by module alone would let it through): unpickled, it runs `touch path`."""
    import pickle
    module, name, arg = "torch.distributed.checkpoint.metadata", "os.system", f"touch {path}"

    def short(s):
        return pickle.SHORT_BINUNICODE + bytes([len(s.encode())]) + s.encode()
    return pickle.PROTO + b"\x04" + short(module) + short(name) + pickle.STACK_GLOBAL + short(arg) + pickle.TUPLE1 + \
        pickle.REDUCE + pickle.STOP


def test_checkpoint_files_that_are_not_plain_data_are_refused_and_run_nothing(shapes, tmp_path, capsys):
    """ema.pt, extra.pt and DCP's index whose pickles would create a file when loaded (checked: a loader that runs
    code does create it): the trainer's resume and sample.py refuse them in one line naming the file, the file is
    never created, and the checkpoint is left as it was."""
    import pickle
    import shutil
    import sample
    run(shapes, tmp_path / "a", "stage1.steps=1")
    hp_config = torch.load(tmp_path / "a" / "ckpt" / "step0000001" / "extra.pt", weights_only=False)["config"]
    control = tmp_path / "control"
    traps = {"extra.pt": lambda m, f: torch.save(dict(config=hp_config, rng=Trap(m)), f),
             "ema.pt": lambda m, f: torch.save(dict(ema=Trap(m), config=hp_config), f),
             ".metadata": lambda m, f: f.write_bytes(index_trap(m))}
    for name, write in traps.items():
        write(control, tmp_path / "c")  # the control: the same trap, read by a loader that runs code, does its work
        (pickle.loads if name == ".metadata" else lambda raw: torch.load(tmp_path / "c", weights_only=False))(
            (tmp_path / "c").read_bytes())
        assert control.exists()
        control.unlink()
        d = tmp_path / name.strip(".")
        shutil.copytree(tmp_path / "a", d)
        ck, marker = d / "ckpt" / "step0000001", d / "marker"
        write(marker, ck / name)
        before = {p.name: p.read_bytes() for p in ck.iterdir()}
        msg = one_line_error(capsys, run, shapes, d, "stage1.steps=2")
        called = "torch.distributed.checkpoint.metadata.os.system" if name == ".metadata" else "io.open"
        assert msg == f"error: {ck / name} is not plain data: loading it would call {called}; refused (load only " \
                      "checkpoints from a source you trust, or move this one away)"
        assert not marker.exists() and {p.name: p.read_bytes() for p in ck.iterdir()} == before
        if name != "extra.pt":  # sample.py reads ema.pt, and the index for the raw weights
            with pytest.raises(support.NotPlainData, match=re.escape(f"{ck / name} is not plain data")):
                sample.load_model(ck, ema=name == "ema.pt")
            assert not marker.exists()


def test_dcp_items_that_are_not_plain_data_are_refused(tmp_path):
    """A non-tensor item of DCP's shards (an optimizer setting) whose pickle would create a file: refused naming the
    item and the checkpoint, the file never created; the plain items of the same kind load."""
    model = torch.nn.ModuleDict(dict(a=torch.nn.Linear(3, 4)))
    opt = torch.optim.AdamW(model.parameters(), lr=0.5)
    model["a"](torch.randn(2, 3)).sum().backward()
    opt.step()
    assert support.write_checkpoint(tmp_path / "step0000001", model, [opt], {}, 0) is None
    opt.param_groups[0]["lr"] = 0.1
    assert support.read_checkpoint([tmp_path / "step0000001"], model, [opt], lambda f: None, print)[0] is not None
    assert opt.param_groups[0]["lr"] == 0.5  # a plain item, read back
    opt.param_groups[0]["lr"] = Trap(tmp_path / "marker")
    assert support.write_checkpoint(tmp_path / "step0000002", model, [opt], {}, 0) is None
    with pytest.raises(support.NotPlainData) as e:
        support.read_checkpoint([tmp_path / "step0000002"], model, [opt], lambda f: None, print)
    assert str(e.value).startswith(f"optim.param_groups.0.lr of {tmp_path / 'step0000002'} is not plain data: "
                                   "loading it would call io.open; refused")
    assert not (tmp_path / "marker").exists()


def test_rng_states_survive_a_plain_data_checkpoint(tmp_path):
    """The RNG states go into extra.pt as tensors and plain values, and set back they give the same draws."""
    import random
    import numpy as np
    torch.save(support.rng_states(torch.device("cpu")), tmp_path / "rng.pt")
    want = torch.rand(3), np.random.rand(3), random.random()
    support.set_rng_states(support.load_plain(tmp_path / "rng.pt"), torch.device("cpu"))
    got = torch.rand(3), np.random.rand(3), random.random()
    assert torch.equal(want[0], got[0]) and (want[1] == got[1]).all() and want[2] == got[2]


def test_read_metrics_drops_the_rows_a_resume_supersedes(tmp_path):
    rows = [dict(step=1, loss=1.0), dict(step=2, loss=2.0), dict(step=3, loss=3.0), dict(step=3, fid=9.0),
            dict(resumed_from=2, checkpoint="c2"), dict(step=3, loss=3.5), dict(step=4, loss=4.0),
            dict(resumed_from=4, checkpoint="c4"), dict(step=5, loss=5.0)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "metrics.jsonl").write_text(text + '{"step": 6, "lo')  # the last line cut by a kill
    assert support.read_metrics(tmp_path) == [rows[0], rows[1], rows[5], rows[6], rows[8]]


def test_one_run_per_run_dir_and_a_killed_holder_leaves_no_lock(shapes, tmp_path):
    """A second trainer on a run_dir that a live run holds stops with exit code 2 and one line naming the holder,
    and leaves every file of the first run as it was (the first is paused meanwhile, so nothing else changes them);
    sample.py reads the held run. SIGKILL the holder: the next start takes the lock, resumes from the newest
    checkpoint, and metrics.jsonl says where, so that read_metrics keeps each step once."""
    import platform
    import subprocess
    import sys
    import time
    import sample
    from conftest import ROOT
    run_dir = tmp_path / "r"
    cmd = [sys.executable, str(ROOT / "train_gpt_style.py")] + TINY + [f"data={shapes}", f"run_dir={run_dir}",
                                                                       "ckpt_every=2", "sample_every=1000"]
    first = subprocess.Popen(cmd + ["stage1.steps=1000"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             cwd=ROOT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not list(run_dir.glob("ckpt/step0000002/extra.pt")) and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        os.killpg(first.pid, signal.SIGSTOP)
        assert first.poll() is None, first.stderr.read()[-2000:]

        def files():
            return {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
        before = files()
        second = subprocess.run(cmd + ["stage1.steps=3"], capture_output=True, text=True, timeout=300, cwd=ROOT)
        err = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(err) == 1, second.stderr[-2000:]
        assert re.fullmatch(rf"error: run_dir {run_dir} is in use by another run \(host {platform.node()}, pid "
                            rf"{first.pid}, since [^)]+\); wait for it to end or stop it, or set run_dir to another "
                            r"folder", err[0]), err[0]
        assert files() == before
        assert sample.load_model(run_dir)[0].hidden > 0  # complete checkpoints of a run being written: readable
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    newest = int(sorted(run_dir.glob("ckpt/step*"))[-1].name[4:])
    third = subprocess.run(cmd + [f"stage1.steps={newest + 1}"], capture_output=True, text=True, timeout=300,
                           cwd=ROOT)
    assert third.returncode == 0, third.stderr[-2000:]
    assert f"resumed from {run_dir}/ckpt/step{newest:07d} at step {newest}" in third.stdout
    raw = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert dict(resumed_from=newest, checkpoint=f"{run_dir}/ckpt/step{newest:07d}") in raw
    assert [r["step"] for r in support.read_metrics(run_dir) if "loss" in r] == list(range(1, newest + 2))
