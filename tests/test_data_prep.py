"""data_prep.py hf / encode-text / bench-decode and the trainer's bucketed loader: conversions of tiny local parquet
files with the three real schemas (counts per cause exact), bucket assignment against its closed form, resuming an
interrupted conversion, held-out rows disjoint from training, identical global batches for any world size, and
shards with random corruption."""
import ast
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import data_prep as dp
import evals
import support
import train_gpt_style as T
import conftest
from conftest import ROOT, corrupt_copy, expected_skips

RES, PATCH = 64, 8  # small buckets: 64x64, 72x56, 88x48 and transposes
GOOD_SIZES = [(96, 96), (120, 60), (60, 120), (100, 80), (80, 100), (70, 70)]


def encoded(w, h, mode="RGB", fmt="JPEG", seed=0, color=None):
    rng = np.random.default_rng(seed)
    arr = np.full((h, w, 3), color, np.uint8) if color else rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    if mode == "RGBA":  # fully transparent black: must come out white
        img = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    elif mode == "P":
        img = img.convert("P", palette=Image.Palette.ADAPTIVE)
    elif mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=90) if fmt == "JPEG" else img.save(buf, format=fmt)
    return buf.getvalue()


def bad_images():
    """(image cell, expected outcome): outcome 'kept', 'skipped:<cause>' or 'converted:<cause>'."""
    jpg = encoded(96, 96, seed=1)
    return [
        ({"bytes": b"not an image at all" * 5, "path": None}, "skipped:undecodable"),
        ({"bytes": jpg[:len(jpg) // 2], "path": None}, "skipped:truncated"),
        ({"bytes": encoded(8, 8), "path": None}, "skipped:too_small"),
        (None, "skipped:no_image"),
        ({"bytes": encoded(96, 96, "CMYK"), "path": None}, "converted:mode_CMYK"),
        ({"bytes": encoded(96, 96, "L", "PNG"), "path": None}, "converted:mode_L"),
        ({"bytes": encoded(96, 96, "RGBA", "PNG"), "path": None}, "converted:mode_RGBA"),
        ({"bytes": encoded(96, 96, "P", "PNG"), "path": None}, "converted:mode_P"),
    ]


def write_source(folder, columns, types, files=2):
    """Columns as the hub's parquet files hold them (image: the Image feature, {bytes, path}), split in files."""
    import datasets
    feats = datasets.Features({k: datasets.Image() if t == "image" else datasets.Value(t) for k, t in types.items()})
    n = len(next(iter(columns.values())))
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        part = {k: v[f * n // files:(f + 1) * n // files] for k, v in columns.items()}
        datasets.Dataset.from_dict(part, features=feats).to_parquet(str(folder / f"train-{f:05d}.parquet"))
    return folder


def make_schema(kind, folder, n_good=14):
    """A tiny copy of a real data set's schema with every kind of bad row; -> (folder, expected counts)."""
    images = [{"bytes": encoded(*GOOD_SIZES[i % len(GOOD_SIZES)], seed=i), "path": None} for i in range(n_good)]
    outcomes = ["kept"] * n_good
    for cell, outcome in bad_images():
        images.append(cell)
        outcomes.append(outcome)
    good_caps = [f"a photo of thing {i}" for i in range(len(images))]
    # rows with unusable captions (good images): the rule drops them, or falls back to the other column
    images += [{"bytes": encoded(96, 96, seed=100 + i), "path": None} for i in range(3)]
    n = len(images)
    if kind == "flux_reason":  # caption_detail always present in the real data; caption_original often null
        detail = good_caps + ["", None, "  "]
        original = [f"short {i}" for i in range(n - 3)] + [None, None, None]  # (null: fallback, at random)
        cols = dict(image=images, caption_detail=detail, caption_original=original,
                    caption_entity=[None] * n, score_aesthetics=[5.0] * n)
        types = dict(image="image", caption_detail="string", caption_original="string", caption_entity="string",
                     score_aesthetics="float32")
        outcomes += ["skipped:no_caption"] * 3
    elif kind == "flux_generated":
        cols = dict(image=images, height=[0] * n, width=[0] * n, caption_caption=good_caps + ["", None, " \n"])
        types = dict(image="image", height="int64", width="int64", caption_caption="string")
        outcomes += ["skipped:no_caption"] * 3
    else:  # midjourney: llava picked first (weight 1), prompt only as a fallback (weight 0)
        cols = dict(id=[str(i) for i in range(n)], prompt=[f"prompt {i} --ar 1:1 --v 6" for i in range(n - 3)]
                    + ["prompt x", None, ""], image=images, llava=good_caps + [None, "", None],
                    llava_status=["ok"] * n)
        types = dict(id="string", prompt="string", image="image", llava="string", llava_status="string")
        outcomes += ["converted:caption_fallback", "skipped:no_caption", "skipped:no_caption"]
    return write_source(folder, cols, types), outcomes


def expected_counts(outcomes):
    skipped, converted = {}, {}
    for o in outcomes:
        if o != "kept":
            d = skipped if o.startswith("skipped") else converted
            d[o.split(":")[1]] = d.get(o.split(":")[1], 0) + 1
    return skipped, converted


def read_table(folder):
    import pyarrow.parquet as pq
    files = sorted(folder.glob("*.parquet"))
    return [r for f in files for r in pq.read_table(f).to_pylist()]


def convert(src, out, **kw):
    kw = dict(res=RES, patch=PATCH, heldout=3, shard_rows=5, workers=2) | kw
    return dp.convert_hf(src, out, **kw)


def run_alone(code, timeout=180):
    """Run Python code in a session of its own -> (exit code, stderr); past `timeout` (a hang) its whole process
    group, workers included, is killed and the test fails."""
    p = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r})\n{code}"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        pytest.fail(f"still running after {timeout} s: it hangs")
    return p.returncode, err


def mtimes(folder, below):  # {shard file: mtime} of shards 0 .. below - 1
    return {p: p.stat().st_mtime_ns for p in sorted(folder.glob("shard-*.parquet"))[:below]}

# ---------------------------------------------------------------------------------------------
# hf conversion


@pytest.mark.parametrize("kind", ["flux_reason", "flux_generated", "midjourney"])
def test_convert_real_schemas_counts_every_cause(kind, tmp_path, capsys):
    import datasets
    from PIL import JpegImagePlugin
    src, outcomes = make_schema(kind, tmp_path / "src")
    summary = convert(src, tmp_path / "out")  # columns found from the schema, as for a downloaded copy
    shards = -(-len(outcomes) // 5)  # the progress line knows the totals of a local source
    assert f"hf: {shards}/{shards} shards, {len(outcomes)}/{len(outcomes)} rows in" in capsys.readouterr().err
    skipped, converted = expected_counts(outcomes)
    assert summary["skipped"] == skipped and summary["converted"] == converted
    n_kept = sum(not o.startswith("skipped") for o in outcomes)
    assert summary["input_rows"] == len(outcomes)
    assert summary["train_rows"] + summary["heldout_rows"] == n_kept
    assert sum(summary["buckets"].values()) == summary["train_rows"]
    buckets = support.aspect_buckets(RES, PATCH, 2.0)
    train = read_table(tmp_path / "out" / "train")
    held = read_table(tmp_path / "out" / "heldout")
    assert len(train) == summary["train_rows"] and len(held) == summary["heldout_rows"] > 0
    source = read_table(src)  # input rows in order (files sorted), as source_row counts them
    ref = io.BytesIO()  # JPEG q95 with 4:4:4 chroma: the quantisation tables depend on the quality only
    Image.new("RGB", (16, 16)).save(ref, format="JPEG", quality=95, subsampling=0)
    ref_tables = Image.open(ref).quantization
    for r in train + held:
        img = Image.open(io.BytesIO(r["image"]["bytes"]))
        assert img.format == "JPEG" and img.mode == "RGB" and img.size == (r["width"], r["height"])
        assert img.quantization == ref_tables and JpegImagePlugin.get_sampling(img) == 0
        assert (r["width"], r["height"]) in buckets and r["bucket"] == f"{r['width']}x{r['height']}"
        src_w, src_h = Image.open(io.BytesIO(source[r["source_row"]]["image"]["bytes"])).size
        assert (r["width"], r["height"]) == buckets[int(support.nearest_bucket(buckets, src_w, src_h))]
        assert r["caption"].strip() == r["caption"] and r["caption"]
        assert outcomes[r["source_row"]] != "kept" or r["caption"] in (f"a photo of thing {r['source_row']}",
                                                                       f"short {r['source_row']}")
    rgba_row = next(i for i, o in enumerate(outcomes) if o == "converted:mode_RGBA")
    rgba = next(r for r in train + held if r["source_row"] == rgba_row)
    assert np.asarray(Image.open(io.BytesIO(rgba["image"]["bytes"]))).min() >= 250  # transparent -> white
    if kind == "midjourney":
        fb = next(r for r in train + held if outcomes[r["source_row"]] == "converted:caption_fallback")
        assert fb["caption"] == "prompt x"
    # held-out split: fixed, spread over the input, disjoint from train
    rows_train, rows_held = {r["source_row"] for r in train}, {r["source_row"] for r in held}
    assert not rows_train & rows_held
    every = len(outcomes) // 3
    assert rows_held == {i for i in range(0, 3 * every, every) if not outcomes[i].startswith("skipped")}
    # the shards load as the trainer and `datasets` read them
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "out" / "train" / "*.parquet"), split="train",
                               cache_dir=str(tmp_path / "cache"))
    assert isinstance(ds.features["image"], datasets.Image) and len(ds) == len(train)
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary


def test_caption_choice_follows_the_weights_and_the_fallback_rule():
    n = 4000
    picks = [dp.pick_caption(["a", "b"], [0.7, 0.3], np.random.default_rng([0, i]))[0] for i in range(n)]
    frac = picks.count("a") / n
    assert abs(frac - 0.7) < 4 * math.sqrt(0.7 * 0.3 / n)  # binomial, 4 sigma
    rng = np.random.default_rng(0)
    assert dp.pick_caption([None, " b "], [1.0, 0.0], rng) == ("b", "caption_fallback")
    assert dp.pick_caption(["", "b", "c"], [1.0, 0.2, 0.5], rng) == ("c", "caption_fallback")  # highest weight
    assert dp.pick_caption([" ", None], [0.5, 0.5], rng) == (None, "no_caption")
    assert dp.pick_caption(["x"], [1.0], rng) == ("x", None)


@pytest.mark.parametrize("res,patch", [(512, 32), (1024, 32), (64, 8), (256, 16), (32, 8)])
def test_bucket_table_and_assignment_closed_form(res, patch):
    buckets = support.aspect_buckets(res, patch, 2.0)
    assert (res, res) in buckets and len(set(buckets)) == len(buckets)
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios)
    for w, h in buckets:
        assert w % patch == 0 and h % patch == 0 and 0.5 <= w / h <= 2
        assert abs(w * h / res ** 2 - 1) <= support.BUCKET_AREA_TOL
        assert (h, w) in buckets
    if res >= 256:
        assert min(ratios) <= 0.56 and max(ratios) >= 1.79  # the range is used, not only the square
    # each landscape bucket is the multiple-of-patch width nearest res^2 / h for its short side h
    for w, h in buckets:
        if w > h:
            best = min(range(h + patch, 2 * h + 1, patch), key=lambda x: abs(x * h - res * res))
            assert w == best
    # assignment: the bucket nearest in log aspect ratio (brute force over the table)
    rng = np.random.default_rng(0)
    W, H = rng.integers(16, 4000, 2000), rng.integers(16, 4000, 2000)
    got = support.nearest_bucket(buckets, W, H)
    d = np.abs(np.log(W / H)[:, None] - np.log(ratios)[None, :])
    assert np.all(d[np.arange(len(W)), got] <= d.min(1) + 1e-12)
    assert support.aspect_buckets(res, patch, 1.0) == [(res, res)]
    with pytest.raises(ValueError, match="aspect_max must be >= 1"):
        T.parse_args(["preset=cpu", "aspect_max=0.5"], False)


def test_interrupted_conversion_resumes_to_the_same_output(tmp_path):
    src, outcomes = make_schema("flux_generated", tmp_path / "src", n_good=20)
    ref = convert(src, tmp_path / "ref")
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="injected crash after 2 shards"):
        convert(src, out, crash_after=2)
    assert json.loads((out / "progress.json").read_text())["shards"] == 2
    (out / "train" / "shard-00004.parquet.tmp").write_bytes(b"half a shard")  # a crash in the middle of a write
    ds = T.ShardDataset(out)  # the loader reads the complete shards only
    assert len(ds) <= ref["train_rows"]
    summary = convert(src, out)
    assert summary == {**ref, "out": str(out)}
    assert read_table(out / "train") == read_table(tmp_path / "ref" / "train")
    assert read_table(out / "heldout") == read_table(tmp_path / "ref" / "heldout")
    assert not list(out.rglob("*.tmp"))  # stale temporary files are cleared on restart
    # a complete conversion is a no-op; other settings are refused
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "train").glob("*.parquet")}
    assert convert(src, out) == summary
    assert {p: p.stat().st_mtime_ns for p in (out / "train").glob("*.parquet")} == mtimes
    with pytest.raises(ValueError, match="other settings"):
        convert(src, out, res=128)


def test_a_killed_worker_ends_the_conversion_in_one_line_and_a_rerun_completes_it(tmp_path):
    """The OOM killer takes a worker: the command stops with one line (exit 2) instead of waiting forever for its
    shard, keeps the shards finished before, and the same command run again completes the same output."""
    src, _ = make_schema("flux_generated", tmp_path / "src", n_good=20)  # 31 rows: 7 shards of 5
    out, args = tmp_path / "out", dict(res=64, heldout=3, shard_rows=5, workers=2)  # the trainer's patch (32)
    ref = dp.convert_hf(src, tmp_path / "ref", **args)
    code, err = run_alone(f"""
import os, signal
import data_prep as dp
convert_chunk = dp._convert_chunk
def dying(job):  # forked workers find this one in data_prep
    if job[1] == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return convert_chunk(job)
dp._convert_chunk = dying
dp.main(["hf", "--dataset", {str(src)!r}, "--out", {str(out)!r}, "--res", "64", "--heldout", "3", "--shard-rows", "5",
         "--workers", "2"])
""")
    assert code == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == f"error: {dp.WORKER_DIED}"
    done = json.loads((out / "progress.json").read_text())["shards"]
    assert 1 <= done <= 3  # shard 0 was recorded before shard 3 was handed out; shard 3 never finished
    before = mtimes(out / "train", done)
    assert dp.convert_hf(src, out, **args) == {**ref, "out": str(out)}
    assert read_table(out / "train") == read_table(tmp_path / "ref" / "train")
    assert read_table(out / "heldout") == read_table(tmp_path / "ref" / "heldout")
    assert mtimes(out / "train", done) == before  # finished shards are kept, not redone


def test_a_crash_inside_a_shard_write_leaves_no_shard_the_loader_reads(tmp_path):
    """The machine goes down halfway through writing shard 3 (its parquet writer has written half its bytes): no
    shard-00003.parquet exists, the loader reads the folder, and a rerun completes the same output, keeping the
    shards finished before the crash."""
    src, _ = make_schema("flux_generated", tmp_path / "src", n_good=20)
    out = tmp_path / "out"
    ref = convert(src, tmp_path / "ref", workers=1)
    code, _ = run_alone(f"""
import os, signal
import datasets
import data_prep as dp
assert os.getpgrp() == os.getpid()  # a session of its own: the crash below takes only this conversion
to_parquet = datasets.Dataset.to_parquet
def crashing(self, path, *args, **kw):
    if "shard-00003" in str(path):
        to_parquet(self, path, *args, **kw)
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[:len(data) // 2])
        os.killpg(os.getpgrp(), signal.SIGKILL)  # the parent and its workers, at once
    return to_parquet(self, path, *args, **kw)
datasets.Dataset.to_parquet = crashing
dp.convert_hf({str(src)!r}, {str(out)!r}, res={RES}, patch={PATCH}, heldout=3, shard_rows=5, workers=1)
""")
    assert code == -signal.SIGKILL
    assert not (out / "train" / "shard-00003.parquet").exists()
    done = json.loads((out / "progress.json").read_text())["shards"]
    assert done >= 2  # one worker: shards 0 and 1 were recorded before shard 3 began
    assert 0 < len(T.ShardDataset(out)) < ref["train_rows"]  # the finished shards only
    before = mtimes(out / "train", done)
    assert convert(src, out, workers=1) == {**ref, "out": str(out)}
    assert read_table(out / "train") == read_table(tmp_path / "ref" / "train")
    assert read_table(out / "heldout") == read_table(tmp_path / "ref" / "heldout")
    assert mtimes(out / "train", done) == before


def test_a_conversion_that_keeps_no_training_rows_is_one_line(tmp_path):
    """Every image smaller than the buckets of --res, or a caption column all null: stopped after the first shard
    (not at the end of millions of rows) with the cause and the fix; and at the end when only held-out rows remain."""
    small = [{"bytes": encoded(96, 96, seed=i), "path": None} for i in range(12)]
    src = write_source(tmp_path / "small", dict(image=small, caption=[f"c {i}" for i in range(12)]),
                       dict(image="image", caption="string"))
    with pytest.raises(ValueError, match=r"^[^\n]*no training rows kept from 4 input rows \(4 skipped as too_small\); "
                                         r"the images are too small for --res 512: pass a lower --res and a new --out"):
        convert(src, tmp_path / "o1", res=512, patch=32, shard_rows=4, workers=1)
    assert json.loads((tmp_path / "o1" / "progress.json").read_text())["shards"] == 1  # stopped at the first shard
    null = write_source(tmp_path / "null", dict(image=small, caption_caption=[None] * 12),
                        dict(image="image", caption_caption="string"))
    with pytest.raises(ValueError, match=r"\(4 skipped as no_caption\); the caption columns caption_caption are "
                                         "empty: pass other --caption-cols"):
        convert(null, tmp_path / "o2", shard_rows=4, workers=1)
    tiny = [small[0]] + [{"bytes": encoded(8, 8), "path": None}] * 5  # row 0 (held out) is the only usable one
    src = write_source(tmp_path / "tiny", dict(image=tiny, caption=["c"] * 6), dict(image="image", caption="string"))
    with pytest.raises(ValueError, match=r"from 6 input rows \(5 skipped as too_small\)"):
        convert(src, tmp_path / "o3", heldout=1, shard_rows=6, workers=1)


def hf_cli_error(capsys, src, out, *args):
    """data_prep.py hf as users run it -> its error line, after exit code 2; before it on stderr only the \\r progress
    line (empty when the first shard stops it), ended by a newline."""
    capsys.readouterr()  # not what came before (the source's writing)
    with pytest.raises(SystemExit) as e:
        dp.main(["hf", "--dataset", str(src), "--out", str(out), "--res", str(RES), "--workers", "1", *args])
    err = capsys.readouterr().err
    progress, _, line = err.removesuffix("\n").rpartition("\n")
    assert e.value.code == 2 and err.endswith("\n") and "\n" not in progress, err
    return line


def test_no_training_rows_from_garbage_images_or_only_held_out_rows_are_one_line(tmp_path, capsys, monkeypatch):
    """The other two causes of no training rows, as the CLI reports them: an image column of garbage bytes (stopped
    after the first shard, or at the end when only the held-out row was usable), and a source whose only kept rows
    are held out (a hub stream of unknown length, so every 100th row is held out, shorter than 100 rows)."""
    good, junk = {"bytes": encoded(96, 96), "path": None}, {"bytes": b"not an image at all" * 5, "path": None}
    fix = "column image holds no usable images: pass another --image-col and a new --out"
    src = write_source(tmp_path / "junk", dict(image=[junk] * 6, caption=["c"] * 6),
                       dict(image="image", caption="string"), files=1)
    err = hf_cli_error(capsys, src, tmp_path / "o1", "--heldout", "0", "--shard-rows", "4")
    assert err == (f"error: {src}: no training rows kept from 4 input rows (4 skipped as undecodable); {fix} "
                   f"({tmp_path / 'o1'} holds these settings)")
    assert json.loads((tmp_path / "o1" / "progress.json").read_text())["shards"] == 1  # stopped at the first shard
    src = write_source(tmp_path / "junk_but_0", dict(image=[good] + [junk] * 5, caption=["c"] * 6),
                       dict(image="image", caption="string"), files=1)  # row 0, held out, is the only usable one
    err = hf_cli_error(capsys, src, tmp_path / "o2", "--heldout", "1", "--shard-rows", "4")
    assert err == (f"error: {src}: no training rows kept from 6 input rows (5 skipped as undecodable); {fix} "
                   f"({tmp_path / 'o2'} holds these settings)")
    assert json.loads((tmp_path / "o2" / "progress.json").read_text())["shards"] == 2  # found at the end
    real = dp.open_source

    def unknown_length(*args):  # a hub stream whose split has no row count
        stream, _, columns = real(*args)
        return stream, None, columns
    monkeypatch.setattr(dp, "open_source", unknown_length)
    src = write_source(tmp_path / "one", dict(image=[good], caption=["c"]), dict(image="image", caption="string"),
                       files=1)
    err = hf_cli_error(capsys, src, tmp_path / "o3", "--heldout", "5")
    assert err == (f"error: {src}: no training rows kept from 1 input rows; every kept row is held out: pass a "
                   f"smaller --heldout and a new --out ({tmp_path / 'o3'} holds these settings)")
    assert json.loads((tmp_path / "o3" / "progress.json").read_text())["counts"] == dict(rows_in=1, heldout=1)


def test_local_parquet_files_of_other_columns_are_named_before_anything_is_written(tmp_path):
    src, _ = make_schema("flux_generated", tmp_path / "src", n_good=4)
    odd = src / "train-00001.parquet"
    import pyarrow.parquet as pq
    pq.write_table(pq.read_table(odd).drop_columns(["height"]), odd)
    with pytest.raises(ValueError, match=rf"^{odd} has columns \['caption_caption', 'image', 'width'\], but "
                                         rf"{src / 'train-00000.parquet'} has .*; pass a folder whose parquet"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no parquet files under .*; pass a folder of \\*.parquet files or a hub id"):
        convert(tmp_path / "empty", tmp_path / "out")


def test_hf_bad_input_is_one_clear_line_and_writes_nothing(tmp_path):
    src, _ = make_schema("flux_generated", tmp_path / "src", n_good=2)
    for kw, needle in [(dict(caption_cols=["nope"]), "has no column nope"),
                       (dict(caption_cols=["caption_caption"], caption_weights=[1, 2]), "--caption-weights"),
                       (dict(caption_weights=[-1]), "--caption-weights"), (dict(res=60), "multiple of the patch"),
                       (dict(heldout=-1), "--heldout"), (dict(heldout=7), "more than half")]:
        with pytest.raises(ValueError, match=needle):
            convert(src, tmp_path / "out", **kw)
    with pytest.raises(ValueError, match="cannot open"):
        dp.convert_hf(str(tmp_path / "missing"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    r = subprocess.run([sys.executable, str(ROOT / "data_prep.py"), "hf", "--dataset", str(src), "--out",
                        str(tmp_path / "out"), "--caption-cols", "nope"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "has no column nope" in r.stderr, r.stderr
    blocked = tmp_path / "a_file"  # an output folder that cannot be made: one line, no traceback
    blocked.write_text("x")
    r = subprocess.run([sys.executable, str(ROOT / "data_prep.py"), "hf", "--dataset", str(src), "--out",
                        str(blocked / "out"), "--heldout", "0"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and f"({blocked / 'out'})" in r.stderr, r.stderr


def test_hf_unknown_schema_and_truncated_source_are_named(tmp_path):
    src = write_source(tmp_path / "src", dict(image=[{"bytes": encoded(96, 96), "path": None}], txt=["a"]),
                       dict(image="image", txt="string"), files=1)
    with pytest.raises(ValueError, match="which caption column"):
        convert(src, tmp_path / "o1")
    assert convert(src, tmp_path / "o2", caption_cols=["txt"], heldout=0)["train_rows"] == 1
    f = src / "train-00000.parquet"
    f.write_bytes(f.read_bytes()[:-30])
    with pytest.raises(ValueError, match=f"{f} is not a readable parquet file"):
        convert(src, tmp_path / "o3", caption_cols=["txt"])

# ---------------------------------------------------------------------------------------------
# the trainer's loader on bucketed shards


@pytest.fixture(scope="module")
def bucketed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bucketed")
    src, _ = make_schema("flux_generated", tmp / "src", n_good=60)
    convert(src, tmp / "out", heldout=0, shard_rows=20)
    return tmp / "out"


def global_batches(ds, world, micro, batch=6, steps=12, start=0, first=0):
    groups = ds.set_stage(RES, PATCH, 2.0)
    samplers = [support.StreamSampler(len(ds), 3, start, batch, micro, r, world, groups, first) for r in range(world)]
    return conftest.global_batches(samplers, world, micro, batch, steps)


@pytest.mark.slow
def test_tread_and_repa_train_on_every_aspect_bucket(bucketed, tmp_path, monkeypatch):
    """Non-square buckets hold other token counts (72x56 at patch 8: 63, not 64): TREAD's routing and REPA's target
    grid follow each global batch's bucket, with DINOv3 in the step (repa_online=1) and with encode-repa's targets
    (the same REPA losses within 1e-3: their bf16 rounding)."""
    draws, batch_draws = [], T.batch_draws
    monkeypatch.setattr(T, "batch_draws", lambda hp, b, n_tok, *a: draws.append(n_tok) or batch_draws(hp, b, n_tok, *a))
    hp0 = T.parse_args(["preset=cpu", "text_dim=32", "text_len=16"], False)
    enc = evals.build_demo_encoders(tmp_path / "enc", hp0, ["a b c"])
    steps, batch = 8, 6
    args = [f"text_encoder={enc[0]}", "text_online=1", f"repa_encoder={enc[1]}", "text_dim=32", "text_len=16",
            "hidden=32", "depth=3", "heads=2", "patch=8", "bottleneck=16", "tread_frac=0.5", "tread_start=0",
            "tread_end=1", "repa_block=1", "lpips_weight=0", "pdino_weight=0", "compile=0", "amp=0", "num_workers=0",
            "sample_steps=1", "log_every=1", "ckpt_every=0", "warmup=1", "eval_every=0", "stages=1",
            f"stage1.res={RES}", f"stage1.batch={batch}", f"stage1.micro_batch={batch}", f"stage1.steps={steps}",
            "stage1.repa=1", "sample_every=0"]
    stored = tmp_path / "stored"
    shutil.copytree(bucketed, stored)
    dp.main(["encode-repa", "--shards", str(stored), "preset=record", *args, "--workers", "0"])
    repa = {}
    for name, data, extra in (("online", bucketed, ["repa_online=1"]), ("stored", stored, [])):
        T.main(["preset=record", f"data={data}", f"run_dir={tmp_path}/{name}", *args, *extra])
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "loss" in r] == list(range(1, steps + 1))
        assert all(math.isfinite(r["loss"]) and -1 <= r["repa"] <= 1 and r["repa"] != 0 for r in rows if "loss" in r)
        repa[name] = [r["repa"] for r in rows if "loss" in r]
    assert repa["stored"] == pytest.approx(repa["online"], abs=1e-3) and repa["stored"] != repa["online"]
    draws = draws[:steps]  # the online run's
    ds = T.ShardDataset(bucketed)  # the global batches of the run (seed 0)
    it = iter(support.StreamSampler(len(ds), 0, 0, batch, batch, 0, 1, ds.set_stage(RES, PATCH, 2.0)))
    used = [ds.buckets[ds.bucket_of[next(it)[0]]] for _ in range(steps)]
    assert draws == [(w // PATCH) * (h // PATCH) for w, h in used]  # each step's routing: its bucket's tokens
    assert set(draws) - {(RES // PATCH) ** 2}  # other token counts met


def test_loader_buckets_same_global_batches_for_world_sizes_1_and_2(bucketed):
    ds = T.ShardDataset(bucketed)
    ref = global_batches(ds, 1, 6)
    assert global_batches(ds, 2, 3) == ref and global_batches(ds, 2, 1) == ref and global_batches(ds, 1, 2) == ref
    assert len({int(ds.bucket_of[b[0]]) for b in ref}) > 1  # several buckets in use
    for b in ref:
        assert len({int(ds.bucket_of[i]) for i in b}) == 1  # one bucket per global batch
    # resuming at a batch boundary continues the same stream (the replay of bucket choices), also in a later
    # stage (which began at image `first`)
    assert global_batches(ds, 2, 3, steps=4, start=5 * 6) == ref[5:9]
    later = global_batches(ds, 1, 6, steps=9, start=100, first=100)
    assert global_batches(ds, 2, 3, steps=4, start=100 + 5 * 6, first=100) == later[5:9] and later != ref[:9]
    assert later != global_batches(ds, 1, 6, steps=9, start=100, first=0)  # a stage's stream starts at its first
    # each bucket's stream is a permutation of its rows per epoch
    flat = global_batches(ds, 1, 6, steps=60)
    for g, rows in enumerate(ds.groups):
        drawn = [i for b in flat for i in b if ds.bucket_of[i] == g]
        full = len(drawn) // len(rows) * len(rows)
        for e in range(0, full, len(rows)):
            assert sorted(drawn[e:e + len(rows)]) == sorted(rows.tolist())
    # through make_loader: every micro-batch is one tensor of its bucket's size
    hp = T.Hyperparameters(seed=3, patch=PATCH, num_workers=0, stages=[T.Stage(RES, 6, 3, 12, False)])
    loader = T.make_loader(ds, RES, hp.stages[0], 0, hp, 0, 1)
    for step in range(12):
        for half in range(2):
            imgs, caps, emb, targets, slots = next(loader)
            w, h = ds.buckets[ds.bucket_of[ref[step][3 * half]]]
            assert imgs.shape == (3, 3, h, w) and imgs.dtype == torch.uint8 and len(caps) == 3 and emb is None
            assert slots.tolist() == [3 * half, 3 * half + 1, 3 * half + 2]  # no text_emb/: in stream order
    assert ds.skipped == {}
    # make_loader finds where its stage began: resuming in stage 2 continues stage 2's stream
    hp2 = T.Hyperparameters(seed=3, patch=PATCH, num_workers=0, stages=[T.Stage(RES, 4, 4, 5, False),
                                                                         T.Stage(RES, 6, 6, 8, False)])
    fresh = T.make_loader(ds, RES, hp2.stages[1], 20, hp2, 0, 1)
    captions = [next(fresh)[1] for _ in range(5)]
    resumed = T.make_loader(ds, RES, hp2.stages[1], 20 + 3 * 6, hp2, 0, 1)
    assert [next(resumed)[1] for _ in range(2)] == captions[3:5]
    stage2 = global_batches(ds, 1, 6, steps=5, start=20, first=20)  # stage 2 began at image 4 x 5 = 20
    assert captions == [[ds[i][1] for i in b] for b in stage2]
    assert stage2 != global_batches(ds, 1, 6, steps=5, start=20, first=0)


def test_square_data_keeps_one_permutation_stream():
    """One group (square data) is exactly the former stream: one seeded permutation of all rows per epoch."""
    s = support.StreamSampler(20, 5, 0, 4, 4, 0, 1)
    got = [i for _, b in zip(range(15), iter(s)) for i in b]
    perm = lambda e: torch.randperm(20, generator=torch.Generator().manual_seed(5 * 1_000_003 + e)).tolist()  # noqa
    assert got == perm(0) + perm(1) + perm(2)

# ---------------------------------------------------------------------------------------------
# text embeddings


def test_a_stage_on_data_converted_at_a_lower_resolution_is_refused_before_any_model(bucketed, tmp_path, capsys,
                                                                                     monkeypatch):
    """data converted at 64 px for a 128-px stage would train on upscaled images: one line naming the stage, the
    folder and its resolution, before any model is built; at the conversion's resolution the same data is taken."""
    built = []
    monkeypatch.setattr(T, "build_models", lambda *a: built.append(1) or (_ for _ in ()).throw(SystemExit(0)))
    args = ["preset=record", f"data={bucketed}", f"run_dir={tmp_path}/run", "text_encoder=x/y", "stages=1",
            "stage1.batch=6", "stage1.micro_batch=3", "hidden=64", "heads=2"]  # a CPU-sized record model
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # the record encodes its captions once: a folder without them is refused
        T.main(args + [f"stage1.res={RES}"])
    assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [
        f"error: {bucketed} has no text_emb/: the record encodes its captions once (data_prep.py encode-text --shards "
        f"{bucketed}), not every step; or set text_online=1 (the cost: data_prep.py budget text_online=1)"]
    args += ["text_online=1", "repa_online=1"]  # and computes its REPA targets once (test_run's REPA tests)
    with pytest.raises(SystemExit) as e:
        T.main(args + [f"stage1.res={2 * RES}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == [
        f"error: stage1 trains at {2 * RES} px but {bucketed} was converted at {RES} px (its meta.json): its images "
        f"would be upscaled; convert the data at {2 * RES} px (data_prep.py hf --res {2 * RES}) and set stage1.data"]
    assert not built
    with pytest.raises(SystemExit) as e:  # at its own resolution (or below) the folder is taken: on to the models
        T.main(args + [f"stage1.res={RES}", f"run_dir={tmp_path}/run2"])
    assert e.value.code == 0 and built


def test_encode_text_ranks_split_the_files_and_match_on_the_fly(bucketed, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(bucketed, data)
    hp = T.Hyperparameters(text_len=16, text_dim=32)
    captions = [r["caption"] for r in read_table(data / "train")]
    enc_dir = evals.build_demo_encoders(tmp_path / "enc", hp, captions)[0]
    stats = [dp.encode_text(data, enc_dir, 16, batch=7, rank=r, world=2) for r in (0, 1)]
    files = sorted((data / "train").glob("*.parquet"))
    assert [s["files"] for s in stats] == [len(files[0::2]), len(files[1::2])]
    assert sum(s["captions"] for s in stats) == len(captions)
    assert dp.encode_text(data, enc_dir, 16, rank=0, world=1)["files"] == 0  # done files are skipped
    ds = T.ShardDataset(data)
    ds.set_stage(RES, PATCH, 2.0)
    assert ds.has_emb
    text = T.TextEncoder(enc_dir, 16, torch.device("cpu"), torch.float32)
    items = [ds[i] for i in range(0, len(ds), 7)]
    _, caps, (txt, mask), _, causes = support.collate_batch([it for it in items if it[0].shape == items[0][0].shape], 16, 32)
    ref, ref_mask = text(caps)
    assert causes == [] and torch.equal(mask, ref_mask)
    assert txt.dtype == torch.bfloat16 and torch.equal(txt, ref.to(torch.bfloat16))  # as stored, trimmed
    import pyarrow as pa
    rows = [r for f in sorted((data / "text_emb" / "train").glob("*.arrow"))
            for r in pa.ipc.open_stream(pa.memory_map(str(f))).read_all().to_pylist()]
    assert len(rows) == len(ds) and sum(len(r["text_emb"]) for r in rows) == 2 * 32 * sum(
        r["n_tokens"] for r in rows)  # bytes = 2 x dim x tokens
    # and a run trains on them (bf16 from the loader, aspect buckets, TREAD, two loading workers)
    run = tmp_path / "run"
    T.main(["preset=record", f"data={data}", f"run_dir={run}", f"text_encoder={enc_dir}", "text_dim=32",
            "text_len=16", "hidden=32", "depth=3", "heads=2", f"patch={PATCH}", "bottleneck=16", "tread_start=0",
            "tread_end=1", "repa_weight=0", "lpips_weight=0", "pdino_weight=0", "compile=0", "num_workers=2",
            "sample_steps=1", "log_every=1", "ckpt_every=0", "warmup=1", "eval_every=0", "stages=1",
            f"stage1.res={RES}", "stage1.batch=6", "stage1.micro_batch=3", "stage1.steps=3", "stage1.repa=0"])
    log = (run / "log.txt").read_text()
    assert "text embeddings precomputed (text_emb/)" in log and "step:3/3" in log


def test_text_emb_digest_sees_other_captions_of_the_same_row_count():
    import pyarrow as pa
    caps = [f"caption {i}" for i in range(200)]
    probed = set(np.linspace(0, 199, 64).astype(int))
    digest = lambda c: support.text_emb_meta(pa.chunked_array([c]), "enc")["captions"]  # noqa: E731
    assert digest(caps) == digest(list(caps)) and digest(caps).startswith(f"200:{sum(map(len, caps))}:")
    assert 1 not in probed and 3 in probed
    assert digest(caps[:1] + ["caption 1!"] + caps[2:]) != digest(caps)  # not probed: the byte total sees it
    assert digest(caps[:3] + ["caption 9"] + caps[4:]) != digest(caps)  # same length, probed: the hash sees it


def test_stale_text_emb_sidecars_are_one_line_before_training(tmp_path, capsys):
    """Sidecars written for a shard that was converted again with another seed (same row count, other captions),
    by an older encode-text (no record), or by another text encoder: refused by name, before any model."""
    import pyarrow as pa
    data = dp.make_shapes(tmp_path / "data", n=64, size=32, shard_rows=32)
    other = dp.make_shapes(tmp_path / "seed1", n=64, size=32, shard_rows=32, seed=1)  # the same rows, re-drawn
    hp = T.Hyperparameters(text_len=16, text_dim=32)
    enc_dir = evals.build_demo_encoders(tmp_path / "enc", hp, (data / "prompts_seen.txt").read_text().splitlines())[0]
    dp.encode_text(data, enc_dir, 16)
    assert T.ShardDataset(data, str(enc_dir)).has_emb
    shard, sidecar = data / "train" / "shard-00001.parquet", data / "text_emb" / "train" / "shard-00001.arrow"
    kept = tmp_path / "kept.parquet"
    shutil.copy(shard, kept)
    shutil.copy(other / "train" / shard.name, shard)
    redo = f"delete {data}/text_emb/ and run data_prep.py encode-text --shards {data} again"
    with pytest.raises(ValueError) as e:
        T.ShardDataset(data, str(enc_dir))
    assert str(e.value) == f"{sidecar} does not mirror {shard} row for row (other captions: re-converted?); {redo}"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # the trainer: one line, exit code 2
        T.main(["preset=cpu", f"data={data}", f"run_dir={tmp_path}/run", "text_dim=32", "text_len=16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == [f"error: {sidecar} does not mirror {shard} row for row (other captions: "
                                         f"re-converted?); {redo}"]
    shutil.copy(kept, shard)
    with pytest.raises(ValueError) as e:
        T.ShardDataset(data, "google/another-encoder")
    assert str(e.value) == (f"{data}/text_emb/train/shard-00000.arrow holds embeddings of text encoder {enc_dir}, "
                            f"not of text_encoder=google/another-encoder; set text_encoder to that one, or {redo}")
    table = pa.ipc.open_stream(pa.memory_map(str(sidecar))).read_all()
    dp.write_text_emb(sidecar, [list(zip(table["text_emb"].to_pylist(), table["n_tokens"].to_pylist()))], None)
    with pytest.raises(ValueError) as e:
        T.ShardDataset(data, str(enc_dir))
    assert str(e.value) == f"{sidecar} does not record which captions it belongs to (an older encode-text); {redo}"
    import pyarrow.parquet as pq
    meta = support.text_emb_meta(pq.read_table(shard).column("caption"), enc_dir)  # all but the cleaning
    dp.write_text_emb(sidecar, [list(zip(table["text_emb"].to_pylist(), table["n_tokens"].to_pylist()))],
                      {k: v for k, v in meta.items() if k != "cleaning"})
    with pytest.raises(ValueError) as e:
        T.ShardDataset(data, str(enc_dir))
    assert str(e.value) == f"{sidecar} holds captions encoded without this trainer's cleaning ({support.CLEANING}); " \
                           f"{redo}"

# ---------------------------------------------------------------------------------------------
# decode benchmark


def test_bench_decode_reports_rates_and_cores(tmp_path, capsys, monkeypatch):
    import re
    shards, returned, real = tmp_path / "bench", [], dp.bench_decode
    monkeypatch.setattr(dp, "bench_decode", lambda *a: returned.append(real(*a)) or returned[-1])  # what main gets
    dp.main(["bench-decode", "--shards", str(shards), "--synthetic", "3", "--res", "128", "--workers", "1", "--n", "4",
             "--steps-per-s", "0.5"])
    src = dp.synthetic_source_path(shards)  # beside the shards: the trainer pointed at them never reads it
    assert src.parent == tmp_path / "bench.source" and not [p for p in shards.rglob("*.parquet") if "128" not in p.parts]
    img = Image.open(io.BytesIO(read_table(src.parent)[0]["image"]["bytes"]))
    assert img.size == dp.SYNTH_SIZES[0] and np.asarray(img).std() > 20  # textured, not flat
    assert len(T.ShardDataset(shards)) == 3  # the converted rows only
    line = capsys.readouterr().out.strip().splitlines()[-1]
    m = re.fullmatch(r"bench-decode res:128 workers:1 img/s/worker:([\d.]+) \(.*\) cores_for_8_gpus@1024x0\.5steps/s:"
                     r"([\d.]+) \(([\d.]+) per GPU\)", line)
    # the returned figures: need = batch_per_step x steps_per_s = 1024 x 0.5 images/s, one core per rate of a worker
    (got,) = returned
    assert list(got) == [128]
    rate, cores = got[128]
    assert rate > 0.05 and cores == 512 / rate
    # and the printed line shows exactly those, rounded
    assert m.groups() == (f"{rate:.1f}", f"{cores:.1f}", f"{512 / 8 / rate:.2f}"), line


def test_bench_decode_bad_input_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for args, needle in [(["--shards", str(tmp_path / "empty")], f"no parquet shards under {tmp_path / 'empty'}; "
                          "pass --shards with a folder written by data_prep.py hf"),
                         (["--shards", str(tmp_path / "s"), "--res", "500", "--synthetic", "2"],
                          "--res 500 must be a positive multiple of the patch 32")]:
        with pytest.raises(SystemExit) as e:
            dp.main(["bench-decode", *args, "--workers", "1"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f"error: {needle}") and err.count("\n") == 1, err
    assert not dp.synthetic_source_path(tmp_path / "s").exists()  # refused before minutes of synthetic images

def test_shards_are_read_in_place_in_row_groups_of_about_a_mebibyte(tmp_path, monkeypatch, capsys):
    import datasets
    import pyarrow.parquet as pq
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("a copy of the shards was loaded"))
    src = tmp_path / "d" / "train" / "a.parquet"
    dp.make_synthetic_source(src, 24)  # JPEGs of ~0.3 MiB: write_rows groups them by bytes
    meta = pq.read_metadata(src)
    groups = [meta.row_group(j) for j in range(meta.num_row_groups)]
    assert len(groups) > 1 and sum(g.num_rows for g in groups) == 24
    assert all(support.ROW_GROUP_BYTES / 2 <= g.total_byte_size <= 2 * support.ROW_GROUP_BYTES for g in groups[:-1])
    big = src.with_name("b.parquet")  # as written before: all rows in one group, read whole for each image
    pq.write_table(pq.read_table(src).slice(4, 16), big)
    ds = T.ShardDataset(tmp_path / "d")
    assert f"data_prep.py regroup --shards {tmp_path / 'd'}" in ds.table.note(tmp_path / "d")
    ref = pq.read_table(src).to_pylist() + pq.read_table(big).to_pylist()
    assert len(ds) == len(ref) == 40
    digests = [support.caption_digest(ds.table.column("caption", k)) for k in range(2)]
    for i in np.random.default_rng(0).permutation(len(ref)):  # random order: another group each time
        assert ds.table[int(i)] == {"image": ref[i]["image"]["bytes"], "caption": ref[i]["caption"]}
    assert dp.regroup(tmp_path / "d") == 1  # only b.parquet: its rows, order, schema and captions unchanged
    again = T.ShardDataset(tmp_path / "d")
    assert again.table.note(tmp_path / "d") == "" and pq.read_metadata(big).num_row_groups > 1
    assert pq.read_table(big).to_pylist() == ref[24:] and pq.read_schema(big).metadata == pq.read_schema(src).metadata
    assert [support.caption_digest(again.table.column("caption", k)) for k in range(2)] == digests  # sidecars hold
    assert [again.table[i] for i in range(len(ref))] == [{"image": r["image"]["bytes"], "caption": r["caption"]}
                                                         for r in ref]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        dp.main(["regroup", "--shards", str(tmp_path / "none")])
    assert e.value.code == 2 and capsys.readouterr().err == f"error: no parquet files under {tmp_path / 'none'}\n"


# ---------------------------------------------------------------------------------------------
# fuzz: corrupt shards


def test_fuzz_truncated_and_foreign_shards_are_named(tmp_path):
    from data_prep import make_shapes
    data = make_shapes(tmp_path / "shapes", n=64, size=32, shard_rows=32)
    second = data / "train" / "shard-00001.parquet"
    raw = second.read_bytes()
    for cut in (len(raw) // 2, len(raw) - 5, 3):
        second.write_bytes(raw[:cut])
        with pytest.raises(ValueError, match=f"{second} is not a readable parquet file"):
            T.ShardDataset(data)
    r = subprocess.run([sys.executable, str(ROOT / "train_gpt_style.py"), "preset=cpu", f"data={data}",
                        f"run_dir={tmp_path}/run"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: {second} is not a readable parquet file")
    import pyarrow.parquet as pq
    pq.write_table(pq.read_table(data / "train" / "shard-00000.parquet"), second, row_group_size=8)  # 4 groups
    raw, meta = second.read_bytes(), pq.read_metadata(second)
    leaf = {meta.schema.column(c).path: c for c in range(meta.num_columns)}

    def garble(group, column):  # garbage over a data page header behind a valid footer
        at = meta.row_group(group).column(leaf[column]).data_page_offset
        bad = bytearray(raw)
        bad[at:at + 64] = np.random.default_rng(0).integers(0, 256, 64, np.uint8).tobytes()
        second.write_bytes(bad)
    garble(1, "image.bytes")  # found where it is read: its rows replaced as bad images are, counted by file
    ds = T.ShardDataset(data)
    ds.set_stage(32, 8, 1.0)
    out = [ds[i] for i in range(len(ds))]
    for i, (img, caption, _, _, causes) in enumerate(out):
        if 40 <= i < 48:  # the 8 rows of the second shard's row group 1: each replaced by the next readable row, 48
            assert causes == [f"unreadable:{second}"] * (48 - i) and torch.equal(img, out[48][0])
            assert caption == out[48][1]
        else:
            assert causes == []
    with pytest.raises(support.UnreadableGroup, match=f"{second}: row group 1 is unreadable"):
        ds.table[41]
    garble(2, "width")  # a column read at start: refused there, naming the file
    with pytest.raises(ValueError, match=f"{second} is corrupt"):
        T.ShardDataset(data)
    import datasets
    datasets.Dataset.from_dict({"img": [b"x"], "text": ["a"]}).to_parquet(str(second))
    with pytest.raises(ValueError, match=r"has columns \['img', 'text'\], not image and caption"):
        T.ShardDataset(data)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [3, 11, 29])
def test_fuzz_training_continues_and_counts_every_bad_row(tmp_path, seed):
    from data_prep import make_shapes
    clean = make_shapes(tmp_path / "shapes", n=96, size=32, shard_rows=48)
    data = tmp_path / "data"
    damage = corrupt_copy(clean, data, seed=seed, every_shard=True)
    assert {c for cs in damage.values() for c in cs} >= {"undecodable", "truncated", "empty_caption"}
    assert min(damage) < 48 <= max(damage)  # rows of both shards damaged
    vocab = (clean / "prompts_seen.txt").read_text().splitlines() + ["and"]
    hp0 = T.parse_args(["preset=cpu", "text_dim=32", "text_len=16"], False)
    enc = evals.build_demo_encoders(tmp_path / "enc", hp0, vocab)[0]
    run = tmp_path / "run"
    steps = [(32, 8, 4, 5), (32, 4, 2, 3)]  # (res, batch, micro, steps): two stages
    args = ["preset=record", f"data={data}", f"run_dir={run}", f"text_encoder={enc}", "text_dim=32", "text_len=16",
            "text_online=1",
            "hidden=32", "depth=2", "heads=2", "patch=8", "bottleneck=16", "tread_frac=0", "repa_weight=0",
            "lpips_weight=0", "pdino_weight=0", "compile=0", "amp=0", "num_workers=2", "sample_steps=1",
            "log_every=1", "ckpt_every=0", "warmup=1", "eval_every=0"]
    for k, (res, batch, micro, n) in enumerate(steps, 1):
        args += [f"stage{k}.res={res}", f"stage{k}.batch={batch}", f"stage{k}.micro_batch={micro}",
                 f"stage{k}.steps={n}", f"stage{k}.repa=0"]
    T.main(args)
    log = (run / "log.txt").read_text()
    assert f"step:{sum(s[3] for s in steps)}/{sum(s[3] for s in steps)}" in log  # it ran to the end
    lines = [line for line in log.splitlines() if line.startswith("data: bad rows")]
    assert len(lines) == 2
    # the reference: the rows the sampler drew, each walked forward past the damaged ones
    drawn, pos = [], 0
    for (res, batch, micro, n), line in zip(steps, lines):
        it = iter(support.StreamSampler(96, 0, pos, batch, batch, 0, 1, None, pos))
        drawn += [i for _ in range(n) for i in next(it)]
        pos += batch * n
        want = expected_skips(drawn, damage, 96)
        assert ast.literal_eval(line.split("(all ranks): ", 1)[1]) == want
    assert any(i in damage for i in drawn if i < 48) and any(i in damage for i in drawn if i >= 48)  # of both shards


def test_hub_config_name_reaches_load_dataset(monkeypatch):
    import datasets
    seen = {}

    def offline(*args, **kw):  # no hub here: record the call
        seen.update(args=args, kw=kw)
        raise ConnectionError("offline")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match=r"cannot open org/name \(.*offline\); pass a hub id \(and --config"):
        dp.open_source("org/name", "train", "Aesthetics-Part01")
    assert seen["args"] == ("org/name", "Aesthetics-Part01") and seen["kw"] == dict(split="train", streaming=True)



def test_hf_refuses_columns_of_the_wrong_type_before_reading_rows(tmp_path):
    import datasets
    good = {"bytes": encoded(96, 96), "path": None}
    src = write_source(tmp_path / "a", dict(image=["/some/path.jpg"], caption=["a"]),
                       dict(image="string", caption="string"), files=1)  # image paths, not bytes
    with pytest.raises(ValueError, match="column image holds .*string.*, not image bytes"):
        convert(src, tmp_path / "o1", heldout=0)
    src = tmp_path / "b"  # a caption column that is a list of strings
    src.mkdir()
    datasets.Dataset.from_dict(dict(image=[good], caption=[["a", "b"]]), features=datasets.Features(
        image=datasets.Image(), caption=datasets.List(datasets.Value("string")))).to_parquet(str(src / "t.parquet"))
    with pytest.raises(ValueError, match="column caption holds list<.*string>, not text; pass .*--caption-cols"):
        convert(src, tmp_path / "o2", heldout=0)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def _hold_tqdm_lock(seconds):  # a worker busy inside a progress bar
    from tqdm import tqdm
    with tqdm.get_lock():
        time.sleep(seconds)


def _die_after(seconds):  # the OOM killer takes a worker
    time.sleep(seconds)
    os.kill(os.getpid(), signal.SIGKILL)


def test_pool_workers_killed_inside_a_progress_bar_leave_the_parent_free():
    """When one worker dies, the pool terminates the others: each has a progress-bar lock of its own, so one
    terminated while holding it cannot leave the parent waiting forever at its next progress bar (it hung a CI run).
    And the death is an error in the parent (BrokenProcessPool), not a wait for a result that never comes."""
    from concurrent.futures.process import BrokenProcessPool

    from tqdm import tqdm
    tqdm.get_lock()  # the shared lock exists before the fork, as in a process that has shown progress bars
    with pytest.raises(BrokenProcessPool), dp.worker_pool(2) as pool:
        busy = pool.submit(_hold_tqdm_lock, 60)
        pool.submit(_die_after, 2).result()  # the other worker is inside its lock by then
    assert isinstance(busy.exception(), BrokenProcessPool)  # terminated mid-sleep
    from tqdm.std import TqdmDefaultWriteLock
    shared = TqdmDefaultWriteLock.mp_lock  # the lock tqdm shares with forked processes
    free = shared.acquire(timeout=5)
    if free:
        shared.release()
    else:  # held by a dead worker: give this session a new one before failing, so later tests do not hang
        del TqdmDefaultWriteLock.mp_lock
        TqdmDefaultWriteLock.create_mp_lock()
        tqdm.set_lock(TqdmDefaultWriteLock())
    assert free
