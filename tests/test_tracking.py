"""Experiment tracking (tracker=tensorboard, tracker=wandb) read back from the files each tracker writes, and the sample
grids: their prompts (sample_prompts=FILE), captions and tile borders."""
import glob
import signal
import struct
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageFont

import support
import train_gpt_style as T

TINY = ["preset=cpu", "stages=1", "stage1.batch=4", "stage1.micro_batch=4", "log_every=1", "sample_steps=1",
        "warmup=2", "lpips_weight=0", "pdino_weight=0", "stage1.steps=4", "sample_every=2"]
PROMPTS = ["a small red circle in the top left", "", "a large blue square in the center",
           "a small green triangle in the bottom right and a large yellow circle in the top left"]
GRID = [p for p in PROMPTS if p]  # blank lines skipped


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from data_prep import make_shapes
    d = make_shapes(tmp_path_factory.mktemp("shapes"), n=64, shard_rows=32)
    (d / "grid_prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return d


def train(shapes, run_dir, *args):
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return T.main(TINY + [f"data={shapes}", f"run_dir={run_dir}", f"sample_prompts={shapes}/grid_prompts.txt",
                              *args])
    finally:
        for sig, h in handlers.items():
            signal.signal(sig, h)


def one_line_error(capsys, args):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        T.main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    return err


def grid_pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


# ---------------------------------------------------------------- tensorboard


def test_tensorboard_gets_every_metrics_row_and_grid_and_a_resume_hides_the_rows_it_rewrites(shapes, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = tmp_path / "run"
    train(shapes, run, "tracker=tensorboard", "ckpt_every=2", "keep_ckpts=0")
    # the newest checkpoint lost: the same command resumes from step 2 and logs steps 3 and 4 again
    import shutil
    shutil.rmtree(run / "ckpt" / "step0000004")
    train(shapes, run, "tracker=tensorboard", "ckpt_every=2", "keep_ckpts=0")
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    rows = support.read_metrics(run)
    want = {}  # tag -> [(step, value)] of the history that metrics.jsonl keeps
    for r in rows:
        for k, v in support.numbers({k: v for k, v in r.items() if k != "step"}).items():
            want.setdefault(k, []).append((r["step"], float(v)))
    assert "loss" in want and "shapes/two/full" in want and "resumed_from" not in want
    assert set(acc.Tags()["scalars"]) == set(want)  # the resume's marker row is no figure
    for tag, pts in want.items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in pts], tag  # each step once: the rewritten ones hidden
        assert np.allclose([v for _, v in got], [v for _, v in pts], equal_nan=True, rtol=1e-6), tag
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4]
    # the grids: the PNGs that samples/ holds, at their steps; the captions as text
    imgs = {e.step: e for e in acc.Images("samples")}
    assert sorted(imgs) == [2, 4]
    for step, e in imgs.items():
        png = np.asarray(Image.open(__import__("io").BytesIO(e.encoded_image_string)).convert("RGB"))
        assert np.array_equal(png, grid_pixels(run / "samples" / f"step{step:07d}.png"))
    assert {e.step for e in acc.Images("eval_seen")} == {4}
    text = acc.Tensors("samples/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert text == "\n\n".join(f"{i}: {p}" for i, p in enumerate(GRID))


# ---------------------------------------------------------------- wandb


def wandb_records(run_dir):
    """The records of wandb's offline run file(s) under run_dir (its append-only log: a 7-byte header, then 32 KiB
    blocks of records, each with a 7-byte header: crc32, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb
    out = []
    for f in sorted(glob.glob(f"{run_dir}/wandb/offline-run-*/run-*.wandb")):
        data, pos, part = open(f, "rb").read(), 7, b""
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            _, n, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
            if kind == 0:  # the padding at a block's end
                pos += left
                continue
            part += data[pos + 7:pos + 7 + n]
            pos += 7 + n
            if kind in (1, 4):
                r = pb.Record()
                r.ParseFromString(part)
                out.append(r)
                part = b""
    return out


def test_wandb_offline_run_holds_every_metrics_row_and_the_grids_with_captions(shapes, tmp_path, monkeypatch):
    import json
    for k, v in dict(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_CONSOLE="off").items():
        monkeypatch.setenv(k, v)
    run = tmp_path / "run"
    train(shapes, run, "tracker=wandb")
    rows = support.read_metrics(run)
    for _ in range(60):  # wandb's service process writes the file; under load its last records can lag finish()
        history = {}  # step -> {key: value}
        for r in wandb_records(run):
            if r.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                history.setdefault(items["_step"], {}).update(items)
        if rows[-1]["step"] in history:
            break
        time.sleep(1)
    assert rows and any("shapes" in r for r in rows)
    for r in rows:
        for k, v in support.numbers({k: v for k, v in r.items() if k != "step"}).items():
            got = history[r["step"]][k]
            assert got == pytest.approx(v, rel=1e-6, nan_ok=True) or (v != v and got in ("NaN", None)), k
    for step in (2, 4):  # the grid prompts, each image with its caption
        assert history[step]["samples/captions"] == GRID and history[step]["samples/count"] == len(GRID)
    assert len(history[4]["eval_two/captions"]) == 32
    run_id = (run / "wandb_id").read_text()
    assert glob.glob(f"{run}/wandb/offline-run-*-{run_id}")


# ---------------------------------------------------------------- one-line refusals


@pytest.mark.parametrize("kind", ["tensorboard", "wandb"])
def test_a_missing_tracker_package_is_one_line(shapes, tmp_path, capsys, monkeypatch, kind):
    monkeypatch.setitem(sys.modules, "wandb" if kind == "wandb" else "torch.utils.tensorboard", None)
    err = one_line_error(capsys, TINY + [f"data={shapes}", f"run_dir={tmp_path}/r", f"tracker={kind}"])
    assert err == f"error: tracker={kind} needs the {kind} package: pip install {kind}, or tracker=none\n"
    assert not (tmp_path / "r" / "metrics.jsonl").read_text()  # nothing trained


def test_bad_tracker_and_sample_prompts_are_one_line(shapes, tmp_path, capsys):
    base = TINY + [f"data={shapes}", f"run_dir={tmp_path}/r"]
    err = one_line_error(capsys, base + ["tracker=mlflow"])
    assert err == "error: tracker must be none, tensorboard or wandb, got 'mlflow'\n"
    (tmp_path / "blank.txt").write_text("\n \n")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00\x81")
    for bad in (tmp_path / "nope.txt", tmp_path / "blank.txt", tmp_path / "bin.txt", tmp_path):
        err = one_line_error(capsys, base + [f"sample_prompts={bad}"])
        assert err.startswith(f"error: sample_prompts={bad} is not a file of prompts (one per line)"), err
    assert not (tmp_path / "r").exists()  # refused before the run folder is made


# ---------------------------------------------------------------- grids


def test_grid_tiles_borders_and_captions(tmp_path):
    torch.manual_seed(0)
    imgs = torch.rand(5, 3, 16, 24) * 2 - 1
    u8 = support.to_uint8(imgs)
    caps = ["a small red circle in the top left and a large blue square in the bottom right", "",
            "x" * 200, "one", "two words"]
    support.save_grid(imgs, tmp_path / "plain.png", 2)
    g = grid_pixels(tmp_path / "plain.png")
    assert g.shape == (3 * 18 + 2, 2 * 26 + 2, 3)
    border = np.ones(g.shape[:2], bool)
    for i in range(5):
        r, c = divmod(i, 2)
        assert np.array_equal(g[2 + 18 * r:2 + 18 * r + 16, 2 + 26 * c:2 + 26 * c + 24], u8[i])
        border[2 + 18 * r:2 + 18 * r + 16, 2 + 26 * c:2 + 26 * c + 24] = False
    border[2 + 36:, 2 + 26:] = False  # the empty sixth cell
    assert (g[border] == support.GRID_BORDER).all()
    # with captions: tiles enlarged by the nearest integer factor to >= CAPTION_MIN_W, each caption under its tile
    support.save_grid(imgs, tmp_path / "cap.png", 2, caps)
    g = grid_pixels(tmp_path / "cap.png")
    f = -(-support.CAPTION_MIN_W // 24)
    H, W = 16 * f, 24 * f
    font = ImageFont.load_default()
    strip = support.CAPTION_LINES * (font.getbbox("Ag")[3] + 2) + 4
    assert g.shape == (3 * (H + strip + 2) + 2, 2 * (W + 2) + 2, 3)
    for i in range(5):
        r, c = divmod(i, 2)
        top, left = 2 + r * (H + strip + 2), 2 + c * (W + 2)
        big = u8[i].repeat(f, 0).repeat(f, 1)
        assert np.array_equal(g[top:top + H, left:left + W], big)
        text = g[top + H:top + H + strip, left:left + W]
        assert (text < 128).any() == bool(caps[i]), i  # dark text in the white strip iff there is a caption
        assert (g[top - 2:top, left:left + W] == support.GRID_BORDER).all()
    # the wrapping: lines fit the tile, words kept whole and in order, a long caption cut to CAPTION_LINES with "..."
    lines = support.wrap(caps[0], font, W - 4, 3)
    assert " ".join(lines) == caps[0] and all(font.getlength(x) <= W - 4 for x in lines)
    long = support.wrap(caps[2], font, W - 4, 3)
    assert len(long) == 3 and long[-1].endswith("...") and all(font.getlength(x) <= W - 4 for x in long)
    assert "".join(long).rstrip(".") == caps[2][:len("".join(long).rstrip("."))]
