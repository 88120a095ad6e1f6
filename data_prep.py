"""Data preparation for prx-speedrun: writes parquet shards the trainer reads.

    python data_prep.py shapes --out data/shapes [--n 50000] [--size 64] [--seed 0]
    python data_prep.py hf --dataset LucasFang/FLUX-Reason-6M --out data/flux512 [--res 512] [--workers N]
    torchrun --nproc_per_node=8 data_prep.py encode-text --shards data/flux512
    torchrun --nproc_per_node=8 data_prep.py encode-repa --shards data/flux512 [name=value ...]
    python data_prep.py bench-decode --shards data/flux512 [--res 512,1024] [--workers N]
    python data_prep.py regroup --shards data/flux512

`shapes` renders a synthetic captioned data set ("a small red circle in the top left") with a
closed grammar, held-out colour/shape combinations and an exact scorer (`score_shapes`), so a run
can be judged on compositional generalisation in minutes on one GPU.

`hf` converts a hub data set (streamed) or local parquet files with an image column and caption
columns into aspect-bucketed JPEG shards plus a held-out split; resumable, parallel over processes.
`encode-text` stores the frozen text encoder's output for every caption next to the shards, `encode-repa` the
REPA encoder's targets for every training image at the first REPA stage's crops.
`bench-decode` measures the loader's decode + resize throughput per worker process. `regroup` rewrites shards of
earlier versions in the ~1 MiB row groups that the trainer's in-place reads want.

Shard format (shared with the real data): DIR/train/shard-00000.parquet, ... with columns
image (datasets Image feature: {bytes, path}; PNG for shapes, JPEG q95 for hf), caption (string),
width, height (int32); hf shards add bucket ("WxH") and source_row (input row index). DIR/meta.json
holds the settings. Shards appear atomically (temp file + os.replace) and are never half-written.
Held-out rows: DIR/heldout/heldout.parquet. Text embeddings: DIR/text_emb/<same path>.arrow; REPA targets:
DIR/repa/<same path>.arrow.
"""
import argparse
import collections
import contextlib
import copy
import dataclasses
import datetime
import io
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
from PIL import Image

import support
from evals import MIN_SIZE, SHAPES_HELDOUT, render_shapes, sample_shapes_objects, shapes_caption, shapes_prompts

SHARD_ROWS = 10_000  # images per parquet shard

# ----------------------------------------------------------------------------------------------
# Shards

def _own_tqdm_lock():
    """Pool initializer: a worker's progress bars (datasets makes them, even disabled) take a lock of its own, not
    the one tqdm shares across fork: a worker terminated while holding that one (the pool ends its workers when one
    of them dies) would leave the parent waiting forever at its next progress bar."""
    import threading

    from tqdm import tqdm
    tqdm.set_lock(threading.RLock())


WORKER_DIED = ("a conversion worker died (killed: out of memory?); lower --workers and run the same command again: "
               "it continues from the last finished shard")


@contextlib.contextmanager
def worker_pool(workers):
    """Forked worker processes, all started now (before the caller opens files or sockets they need not inherit).
    A worker that dies (the OOM killer) raises BrokenProcessPool in the parent at its next result, where
    multiprocessing.Pool would wait forever. On an error, queued jobs are cancelled and running ones finish."""
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=_own_tqdm_lock)
    try:
        pool.submit(int).result()  # with fork, the first job starts every worker
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def _end_progress_line():  # a \r progress line ends with a newline, also when an error ends it (its line comes next)
    try:
        yield
    finally:
        print(file=sys.stderr)


def write_rows(path, columns, extra=()):
    """Write columns {image: [{bytes, path}], caption, width, height, *extra} as one parquet shard, atomically
    (temp name without the .parquet suffix, then os.replace): a reader never sees a half-written shard."""
    import datasets  # here, not at the top: importing it costs seconds that scoring doesn't need
    datasets.disable_progress_bars()  # our own progress line says how far the shards are
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string"),
                                  "width": datasets.Value("int32"), "height": datasets.Value("int32"),
                                  **{name: datasets.Value(dtype) for name, dtype in extra}})
    ds = datasets.Dataset.from_dict(columns, features=features)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    ds.to_parquet(str(tmp), batch_size=group_rows(sum(len((im or {}).get("bytes") or b"") for im in columns["image"]),
                                                          len(ds)))
    os.replace(tmp, path)


def group_rows(nbytes, rows):  # rows per parquet row group for rows of nbytes of images in all: ~ROW_GROUP_BYTES
    return max(1, min(rows, round(support.ROW_GROUP_BYTES * rows / max(1, nbytes))))


def regroup(folder):
    """Rewrite the parquet files under folder (training shards and held-out images) where a random row's group holds
    more than twice support.ROW_GROUP_BYTES on average, in groups of about that size, each atomically; rows, their order and
    the schema (with its metadata) unchanged, so the sidecars stay valid. The trainer reads a random image by reading
    its whole row group. -> files rewritten."""
    import pyarrow.parquet as pq
    root = Path(folder)
    sidecars = support.SKIP - {"heldout"}  # the held-out images are read by row too
    files = sorted(p for p in root.rglob("*.parquet") if not sidecars & set(p.relative_to(root).parts))
    if not files:
        raise ValueError(f"no parquet files under {folder}")
    done = 0
    for n, f in enumerate(files, 1):
        meta = pq.read_metadata(f)
        groups = [meta.row_group(j) for j in range(meta.num_row_groups)]
        if sum(g.num_rows * g.total_byte_size for g in groups) <= 2 * support.ROW_GROUP_BYTES * meta.num_rows:
            continue  # a random row costs at most twice the target on average: ShardRows.note's measure
        table = pq.read_table(f)
        images = table.column("image")
        nbytes = sum(len(b or b"") for b in (images.combine_chunks().field("bytes") if images.type.num_fields
                                              else images).to_pylist())
        tmp = f.with_name(f.name + ".tmp")
        pq.write_table(table, tmp, row_group_size=group_rows(nbytes, len(table)), write_statistics=False)
        os.replace(tmp, f)
        done += 1
        print(f"\rregroup: {n}/{len(files)} files read, {done} rewritten", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    print(f"regroup: {done} of {len(files)} files rewritten in row groups of ~{support.ROW_GROUP_BYTES >> 20} MiB")
    return done


def write_shard(path, images, captions):
    """Write PIL images (as PNG) + captions as one parquet shard, atomically."""
    pngs = []
    for img in images:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        pngs.append({"bytes": buf.getvalue(), "path": None})
    write_rows(path, {"image": pngs, "caption": captions, "width": [im.width for im in images],
                      "height": [im.height for im in images]})


def _make_shapes_shard(args):
    """Render rows [i * shard_rows, ...) of the training split; seeded by (seed, i) only."""
    path, i, n, size, seed, shard_rows = args
    rng = np.random.default_rng([seed, i])
    rows = range(i * shard_rows, min(n, (i + 1) * shard_rows))
    objects = [sample_shapes_objects(rng, 1 + r % 2) for r in rows]  # even rows: 1 object, odd: 2
    write_shard(path, [render_shapes(o, size, rng) for o in objects], [shapes_caption(o) for o in objects])
    return len(rows)


def make_shapes(out_dir, n=50000, size=64, seed=0, workers=None, shard_rows=SHARD_ROWS):
    """Write the shapes training split, prompt files and meta.json into out_dir; resumes an
    interrupted run and is a no-op when complete. Returns out_dir as a Path."""
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if size < MIN_SIZE:
        raise ValueError(f"--size must be >= {MIN_SIZE}, got {size}")
    out = Path(out_dir)
    meta = {"dataset": "shapes", "n": n, "size": size, "seed": seed, "shard_rows": shard_rows,
            "heldout": sorted(f"{c} {s}" for c, s in SHAPES_HELDOUT)}
    meta_path = out / "meta.json"
    if meta_path.exists():
        if json.loads(meta_path.read_text()) != meta:
            raise ValueError(f"{out} already holds a different shapes set ({meta_path}); use another --out")
    else:
        (out / "train").mkdir(parents=True, exist_ok=True)
        meta_path.write_text(json.dumps(meta) + "\n")

    n_shards = -(-n // shard_rows)  # ceil
    shards = [out / "train" / f"shard-{i:05d}.parquet" for i in range(n_shards)]
    todo = [(path, i, n, size, seed, shard_rows) for i, path in enumerate(shards) if not path.exists()]
    if todo:
        t0, done = time.time(), 0
        with worker_pool(min(workers or os.cpu_count(), len(todo))) as pool, _end_progress_line():
            jobs = [pool.submit(_make_shapes_shard, job) for job in todo]
            for k, job in enumerate(as_completed(jobs), 1):
                done += job.result()
                print(f"\rshapes: {k}/{len(todo)} shards, {done} images, {time.time() - t0:.1f}s",
                      end="", file=sys.stderr, flush=True)
    for name, lines in shapes_prompts().items():
        if not (path := out / f"prompts_{name}.txt").exists():
            path.write_text("\n".join(lines) + "\n")
    return out

# ----------------------------------------------------------------------------------------------
# Real data sets -> aspect-bucketed JPEG shards (`hf`)

KNOWN_DATASETS = {  # hub id -> (image column, caption columns, sampling weights); weight 0: only a fallback
    # caption_detail is always present; caption_original (the short source prompt, often null) mixes in short
    # prompts and falls back to caption_detail when missing
    "LucasFang/FLUX-Reason-6M": ("image", ("caption_detail", "caption_original"), (0.8, 0.2)),
    "lehduong/flux_generated": ("image", ("caption_caption",), (1.0,)),
    # llava: a description of the image; prompt: the Midjourney prompt (with --ar/--v flags), fallback only
    "brivangl/midjourney-v6-llava": ("image", ("llava", "prompt"), (1.0, 0.0)),
}
HF_SHARD_ROWS = 2000  # input rows per shard: ~0.3 GB of 512-px JPEGs (README: shard sizes)
JPEG_QUALITY = 95  # re-encoded once, 4:4:4 chroma (no subsampling): the model learns pixels
MAX_UPSCALE = 2.0  # an image needing more than 2x upscaling to cover its bucket is skipped as too small
HELDOUT_EVERY_UNKNOWN = 100  # when the row count is unknown, every 100th row is held out (up to --heldout)


def pick_caption(texts, weights, rng):
    """One caption among a row's caption columns: column j with probability weights[j]; an empty or missing
    pick falls back to the non-empty column of highest weight. -> (caption, None or 'caption_fallback'), or
    (None, 'no_caption') when every column is empty."""
    texts = [t.strip() if isinstance(t, str) else "" for t in texts]
    w = np.asarray(weights, dtype=np.float64)
    j = rng.choice(len(texts), p=w / w.sum())
    if texts[j]:
        return texts[j], None
    for j in np.argsort(-w, kind="stable"):
        if texts[j]:
            return texts[j], "caption_fallback"
    return None, "no_caption"


def bucket_crop(img, buckets, resample=Image.Resampling.LANCZOS):
    """Resize a PIL image to cover its nearest aspect bucket (log ratio) and crop the centre.
    -> (image of the bucket's size, scale factor applied)."""
    from support import nearest_bucket
    W, H = img.size
    w, h = buckets[int(nearest_bucket(buckets, W, H))]
    s = min(W / w, H / h)  # source pixels per output pixel in the centred crop box
    box = ((W - w * s) / 2, (H - h * s) / 2, (W + w * s) / 2, (H + h * s) / 2)
    return img.resize((w, h), resample, box=box), 1 / s


def convert_row(raw, texts, weights, seed, row, buckets):
    """One input row -> (record, [conversions]) or (None, [cause of the drop]). Checks in order: caption,
    image present, decodable (mode converted to RGB), large enough for its bucket."""
    caption, cause = pick_caption(texts, weights, np.random.default_rng([seed, row]))
    if caption is None:
        return None, [cause]
    if raw is None:
        return None, ["no_image"]
    img, mode = support.decode_image(raw)
    if img is None:
        return None, [mode]
    img, scale = bucket_crop(img, buckets)
    if scale > MAX_UPSCALE:
        return None, ["too_small"]
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    rec = dict(image={"bytes": buf.getvalue(), "path": None}, caption=caption, width=img.width,
               height=img.height, bucket=f"{img.width}x{img.height}", source_row=row)
    return rec, [c for c in (cause, mode) if c]


def is_heldout(row, every, heldout):  # fixed held-out rows: every `every`-th input row, `heldout` of them
    return heldout > 0 and row % every == 0 and row // every < heldout


def _convert_chunk(job):
    """Input rows of shard k -> DIR/train/shard-k.parquet and DIR/heldout/parts/part-k.parquet; -> counts."""
    out, k, rows, cfg = job
    buckets = [tuple(b) for b in cfg["buckets"]]
    counts, recs = collections.Counter(rows_in=len(rows)), {"train": [], "heldout": []}
    for row, raw, texts in rows:
        rec, causes = convert_row(raw, texts, cfg["caption_weights"], cfg["seed"], row, buckets)
        if rec is None:
            counts["skipped:" + causes[0]] += 1
            continue
        counts.update("converted:" + c for c in causes)
        split = "heldout" if is_heldout(row, cfg["heldout_every"], cfg["heldout"]) else "train"
        recs[split].append(rec)
        counts[split] += 1
        if split == "train":
            counts[f"bucket:{rec['bucket']}"] += 1
    paths = {"train": out / "train" / f"shard-{k:05d}.parquet",
             "heldout": out / "heldout" / "parts" / f"part-{k:05d}.parquet"}
    for split, rs in recs.items():
        if rs:
            write_rows(paths[split], {c: [r[c] for r in rs] for c in rs[0]},
                       extra=[("bucket", "string"), ("source_row", "int64")])
    return counts


def _nothing_kept(dataset, out, counts, res, image_col, caption_cols):
    """The one-line error of a conversion that keeps no training rows: its most frequent skip cause and the fix."""
    skips = {k.split(":", 1)[1]: n for k, n in counts.items() if k.startswith("skipped:")}
    cause = max(skips, key=skips.get, default=None)
    fix = ("every kept row is held out: pass a smaller --heldout" if cause is None else
           f"the images are too small for --res {res}: pass a lower --res" if cause == "too_small" else
           f"the caption columns {','.join(caption_cols)} are empty: pass other --caption-cols" if cause == "no_caption"
           else f"column {image_col} holds no usable images: pass another --image-col")
    why = f" ({skips[cause]} skipped as {cause})" if cause else ""
    return (f"{dataset}: no training rows kept from {counts['rows_in']} input rows{why}; {fix} and a new --out "
            f"({out} holds these settings)")


def _write_json(path, obj):  # atomically
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def open_source(dataset, split="train", config=None):
    """Hub id (with its config name, if it has several) or local parquet folder/file -> (streaming IterableDataset,
    row count or None, column names)."""
    import datasets

    from support import brief, parquet_footers
    datasets.disable_progress_bars()
    path = Path(dataset)
    try:
        if path.exists():
            files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
            if not files:
                raise ValueError(f"no parquet files under {path}; pass a folder of *.parquet files or a hub id")
            # footers: a truncated file, or one of other columns, is named here, not in a worker
            n = sum(rows for _, _, rows, _ in parquet_footers(
                files, lambda f, schema: None, "pass a folder whose parquet files have the same columns", types=False))
            ds = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train", streaming=True)
        else:
            ds = datasets.load_dataset(dataset, config, split=split, streaming=True)
            splits = ds.info.splits or {}
            n = splits[split].num_examples if split in splits and splits[split].num_examples else None
        columns = list(ds.features) if ds.features else list(next(iter(ds)))
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"cannot open {dataset} ({brief(e)}); pass a hub id (and --config if it names "
                         "several) or a local parquet folder/file") from None
    return ds, n, columns


def resolve_columns(dataset, columns, image_col=None, caption_cols=None, weights=None):
    """The image column, caption columns and weights: flags first, then the known data sets (by hub id, or by
    schema for local copies), then image/caption. Every bad combination is one clear ValueError."""
    known = KNOWN_DATASETS.get(dataset) or next(
        (v for v in KNOWN_DATASETS.values() if {v[0], *v[1]} <= set(columns)), None)
    if caption_cols is None:
        if known is not None:
            image_col, caption_cols, weights = image_col or known[0], list(known[1]), weights or list(known[2])
        elif "caption" in columns:
            caption_cols = ["caption"]
        else:
            raise ValueError(f"{dataset}: which caption column? pass --caption-cols (its columns: {columns})")
    image_col = image_col or "image"
    weights = list(weights) if weights else [1.0] * len(caption_cols)
    missing = [c for c in [image_col, *caption_cols] if c not in columns]
    if missing:
        raise ValueError(f"{dataset} has no column {', '.join(missing)} (its columns: {columns}); "
                         "pass --image-col / --caption-cols")
    if len(weights) != len(caption_cols) or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"--caption-weights {weights} must be one non-negative number per caption column "
                         f"({caption_cols}) with a positive sum")
    return image_col, list(caption_cols), [float(w) for w in weights]


def check_column_types(dataset, features, image_col, caption_cols):
    """Before any row is read: an image column that holds no bytes (paths, URLs) or a caption column that is not
    text would otherwise drop every row, found out only at the end."""
    import datasets

    from support import column_type_error
    keep = [c for c in (image_col, *caption_cols) if c in features]
    err = column_type_error(datasets.Features({c: features[c] for c in keep}).arrow_schema, image_col,
                              caption_cols, sizes=())
    if err:
        raise ValueError(f"{dataset}: {err}; pass --image-col with an image column and --caption-cols with text "
                         "columns")


def _raw_bytes(cell):  # an image cell: {bytes, path} (the Image feature) or raw bytes -> bytes or None
    return cell.get("bytes") if isinstance(cell, dict) else cell if isinstance(cell, (bytes, bytearray)) else None


def check_res(res, patch):
    if res < patch or res % patch:
        raise ValueError(f"--res {res} must be a positive multiple of the patch {patch}")


def convert_hf(dataset, out, image_col=None, caption_cols=None, caption_weights=None, res=512, heldout=10000,
               shard_rows=HF_SHARD_ROWS, max_rows=None, workers=None, seed=0, split="train", patch=None,
               aspect_max=None, crash_after=None, config=None):
    """Convert `dataset` (hub id, streamed, or local parquet) into DIR/train shards of aspect-bucketed JPEGs,
    DIR/heldout/heldout.parquet, DIR/meta.json and DIR/summary.json. Input rows [k * shard_rows, ...) become
    shard k; DIR/progress.json records the shards done and the stream position after them, so a restarted
    conversion continues there (crash_after=K: raise after K more shards, to test exactly that).
    Returns the summary dict."""
    import datasets
    import pyarrow.parquet as pq

    from support import aspect_buckets
    from train_gpt_style import Hyperparameters
    hp = Hyperparameters()
    patch, aspect_max = patch or hp.patch, aspect_max or hp.aspect_max
    check_res(res, patch)
    if heldout < 0 or shard_rows < 1 or (max_rows is not None and max_rows < 1):
        raise ValueError("--heldout must be >= 0, --shard-rows and --max-rows >= 1")
    stream, n_rows, columns = open_source(dataset, split, config)
    image_col, caption_cols, weights = resolve_columns(dataset, columns, image_col, caption_cols, caption_weights)
    check_column_types(dataset, stream.features or {}, image_col, caption_cols)
    if max_rows:
        n_rows = min(n_rows, max_rows) if n_rows else max_rows
    if n_rows and 2 * heldout > n_rows:
        raise ValueError(f"--heldout {heldout} would take more than half of the {n_rows} input rows; pass a "
                         "smaller --heldout")
    every = max(1, n_rows // heldout) if heldout and n_rows else HELDOUT_EVERY_UNKNOWN
    out = Path(out)
    meta = dict(dataset=str(dataset), split=split, image_col=image_col, caption_cols=caption_cols,
                caption_weights=weights, res=res, patch=patch, aspect_max=aspect_max,
                buckets=[list(b) for b in aspect_buckets(res, patch, aspect_max)], heldout=heldout,
                heldout_every=every, shard_rows=shard_rows, max_rows=max_rows, seed=seed, jpeg_quality=JPEG_QUALITY,
                **({"config": config} if config else {}))
    if (out / "meta.json").exists():
        if json.loads((out / "meta.json").read_text()) != meta:
            raise ValueError(f"{out} already holds a conversion with other settings ({out / 'meta.json'}); "
                             "use another --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "meta.json", meta)
    for stale in out.rglob("*.tmp"):  # left by a crash in the middle of a write; never read by the loader
        stale.unlink()
    progress_path = out / "progress.json"
    progress = json.loads(progress_path.read_text()) if progress_path.exists() else dict(shards=0, state=None)
    counts = collections.Counter(progress.get("counts", {}))
    if isinstance(stream.features.get(image_col) if stream.features else None, datasets.Image):
        stream = stream.cast_column(image_col, datasets.Image(decode=False))  # bytes to the workers, not pixels
    stream = stream.select_columns([image_col, *caption_cols])
    if progress["state"] is not None:
        stream.load_state_dict(progress["state"])
    # each worker holds a shard of raw images (~280 MB at 2,000 rows) and workers + 1 shards wait: 32 keeps that
    # near 9 GB on a many-core node
    workers = max(1, workers or min(os.cpu_count(), 32))
    done0, t0, pending = progress["shards"], time.time(), collections.deque()
    total = (f"/{-(-n_rows // shard_rows)}", f"/{n_rows}") if n_rows else ("", "")  # when the row count is known
    with worker_pool(workers) as pool, _end_progress_line():  # before the stream opens: no files, sockets in workers
        rows_iter, k = iter(stream), done0
        while True:
            first = k * shard_rows
            take = shard_rows if max_rows is None else max(0, min(shard_rows, max_rows - first))
            rows = [(first + j, _raw_bytes(r[image_col]), [r[c] for c in caption_cols])
                    for j, r in zip(range(take), rows_iter)]
            if rows:
                job = (out, k, rows, meta)
                pending.append((k, pool.submit(_convert_chunk, job), copy.deepcopy(stream.state_dict())))
                k += 1
            # in order; at most workers + 1 shards of raw images in memory
            while pending and (len(pending) > workers or len(rows) < shard_rows):
                kk, result, state = pending.popleft()
                counts.update(result.result())  # BrokenProcessPool when a worker died
                _write_json(progress_path, dict(shards=kk + 1, state=state, counts=dict(counts)))
                if counts["train"] + counts["heldout"] == 0:  # nothing kept from the first shard: a wrong setting
                    raise ValueError(_nothing_kept(dataset, out, counts, res, image_col, caption_cols))
                rate = (counts["rows_in"] - progress.get("counts", {}).get("rows_in", 0)) / (time.time() - t0)
                left = datetime.timedelta(seconds=round(((n_rows or 0) - counts["rows_in"]) / rate))
                print(f"\rhf: {kk + 1}{total[0]} shards, {counts['rows_in']}{total[1]} rows in, {counts['train']} "
                      f"train, {counts['heldout']} held out, {rate:.1f} rows/s" + (f", ETA {left}" if n_rows else ""),
                      end="", file=sys.stderr, flush=True)
                if crash_after is not None and kk + 1 - done0 >= crash_after:
                    raise RuntimeError(f"injected crash after {crash_after} shards")
            if len(rows) < shard_rows:
                break
    if counts["train"] == 0:
        raise ValueError(_nothing_kept(dataset, out, counts, res, image_col, caption_cols))
    parts, merged = out / "heldout" / "parts", out / "heldout" / "heldout.parquet"
    files, tmp = sorted(parts.glob("part-*.parquet")), merged.with_name(merged.name + ".tmp")
    if files and not json.loads(progress_path.read_text()).get("heldout_merged"):
        with pq.ParquetWriter(tmp, pq.read_schema(files[0])) as w:  # streamed: never all held-out images in memory
            for f in files:  # row groups as write_rows writes them
                w.write_table(pq.read_table(f), row_group_size=pq.read_metadata(f).row_group(0).num_rows)
        os.replace(tmp, merged)
        _write_json(progress_path, {**json.loads(progress_path.read_text()), "heldout_merged": True})
    shutil.rmtree(parts, ignore_errors=True)
    train_bytes = sum(f.stat().st_size for f in (out / "train").glob("*.parquet"))
    by = {p: {k.split(":", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith(p + ":")}
          for p in ("skipped", "converted", "bucket")}
    summary = dict(dataset=str(dataset), out=str(out), input_rows=counts["rows_in"], train_rows=counts["train"],
                   heldout_rows=counts["heldout"], skipped=by["skipped"], converted=by["converted"],
                   buckets=by["bucket"], train_bytes=train_bytes,
                   gb_per_million_images=train_bytes / max(1, counts["train"]) * 1e6 / 1e9)
    _write_json(out / "summary.json", summary)
    print(f"hf: {dataset} -> {out}: {summary['input_rows']} rows in, {summary['train_rows']} train, "
          f"{summary['heldout_rows']} held out, {summary['gb_per_million_images']:.1f} GB per million images")
    for section in ("skipped", "converted", "buckets"):
        for name, n in summary[section].items():
            print(f"  {section:<10} {name:<18} {n:>10}")
    return summary

# ----------------------------------------------------------------------------------------------
# Text embeddings, precomputed (`encode-text`): one process per GPU, disjoint shard files

def write_sidecar(path, fields, batches, meta):
    """Record batches (lists of columns for the pyarrow `fields`) -> one Arrow IPC stream file, the format that
    datasets.Dataset.from_file memory-maps where it lies (the trainer reads it with no copy), written atomically;
    meta (support.text_emb_meta or repa_meta: what it holds, and its shard's caption digest) goes into its schema
    metadata, which the trainer checks. -> its size in bytes."""
    import pyarrow as pa
    schema = pa.schema(fields, metadata=meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # two writers of one file never share a temporary
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as w:
        for columns in batches:
            w.write_batch(pa.record_batch(columns, schema=schema))
    os.replace(tmp, path)
    return path.stat().st_size


def write_text_emb(path, batches, meta):  # batches of packed embeddings [(bf16 bytes, n_tokens)] -> (bytes, tokens)
    import pyarrow as pa
    tokens = 0

    def columns():
        nonlocal tokens
        for packed in batches:
            tokens += sum(p[1] for p in packed)
            yield [[p[0] for p in packed], [p[1] for p in packed]]
    size = write_sidecar(path, [("text_emb", pa.binary()), ("n_tokens", pa.int32())], columns(), meta)
    return size, tokens


def local_device():  # this torchrun process's GPU (LOCAL_RANK), made current: one CUDA context per rank; or the CPU
    import torch
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    return device


def encode_text(shards, text_encoder=None, text_len=None, batch=64, rank=None, world=None):
    """Run the trainer's TextEncoder over every caption of DIR's shards (train and held-out) and write
    DIR/text_emb/<same path>.arrow (text_emb: bf16 bytes of the real tokens, n_tokens) row for row, atomically,
    recording the encoder and the shard's caption digest (text_emb_meta).
    Rank r of `world` (torchrun's RANK / WORLD_SIZE by default) takes files r, r + world, ...; files already
    done are skipped. Returns this rank's {files, captions, tokens, bytes}."""
    import pyarrow.parquet as pq
    import torch

    from support import brief, pack_text_emb, quiet_transformers, sidecar_path, text_emb_meta
    from train_gpt_style import Hyperparameters, TextEncoder
    hp = Hyperparameters()
    text_encoder, text_len = text_encoder or hp.text_encoder, text_len or hp.text_len
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", 1)) if world is None else world
    root = Path(shards)
    files = sorted(p for p in root.rglob("*.parquet") if not {"text_emb", "parts"} & set(p.relative_to(root).parts))
    if not files:
        raise ValueError(f"no parquet shards under {root}; run data_prep.py hf first")
    todo = [f for f in files[rank::world] if not sidecar_path(root, f).exists()]
    stats = dict(files=len(todo), captions=0, tokens=0, bytes=0)
    if not todo:
        return stats
    device = local_device()
    quiet_transformers()
    try:
        enc = TextEncoder(text_encoder, text_len, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    except Exception as e:
        raise ValueError(f"cannot load the text encoder {text_encoder} ({brief(e)}); pass --text-encoder "
                         "with a hub id or a local folder") from None
    t0 = time.time()
    for i, f in enumerate(todo):
        column = pq.read_table(f, columns=["caption"]).column("caption")
        captions = column.to_pylist()
        packed = (pack_text_emb(*(t.cpu() for t in enc([c or "" for c in captions[j:j + batch]])))
                  for j in range(0, len(captions), batch))
        size, tokens = write_text_emb(sidecar_path(root, f), packed, text_emb_meta(column, text_encoder))
        stats["bytes"] += size
        stats["tokens"] += tokens
        stats["captions"] += len(captions)
        print(f"\rencode-text rank {rank}/{world}: {i + 1}/{len(todo)} files, {stats['captions']} captions, "
              f"{stats['captions'] / (time.time() - t0):.1f} captions/s", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    n = max(1, stats["captions"])
    print(f"encode-text rank {rank}/{world}: {stats['captions']} captions, {stats['tokens'] / n:.1f} tokens per "
          f"caption, {stats['bytes'] / n / 1e3:.1f} kB per caption stored, {stats['bytes'] / n / 1e3:.0f} GB per "
          "million captions")
    return stats

# ----------------------------------------------------------------------------------------------
# REPA targets, precomputed (`encode-repa`): one process per GPU, disjoint shard files

def encode_repa(shards, constants=(), batch=64, workers=None, rank=None, world=None):
    """The DINOv3 targets of REPA, computed once instead of every step: for each training image of DIR, repa_targets
    of the image as the trainer's loader crops it in the first REPA stage (its res, patch, aspect_max and repa_encoder
    from the trainer's constants, name=value; default the record preset's). Written as DIR/repa/<same path>.arrow
    (repa: bf16 bytes of the (tokens, width) features) row for row, atomically, recording the encoder, the grid
    (res:patch:aspect_max) and the shard's caption digest, which the trainer checks. A bad row gets the features of
    the row that replaces it in training. Rank r of `world` (torchrun's RANK / WORLD_SIZE by default) takes files r,
    r + world, ...; files already done are skipped. Returns this rank's {files, images, bytes}."""
    import functools

    import pyarrow as pa
    import torch

    from support import NoUsableRow, brief, collate_batch, quiet_transformers, repa_meta, sidecar_path
    from train_gpt_style import ShardDataset, load_vit, parse_args, repa_targets
    hp = parse_args(["preset=record", *constants], False)
    stage = next((st for st in hp.stages if st.repa), None)
    if stage is None or not hp.repa_weight:
        raise ValueError("no stage trains with REPA (stageK.repa=1 and repa_weight > 0): nothing to precompute")
    if not hp.repa_encoder:
        raise ValueError("repa_encoder is empty; pass repa_encoder=<hub id or folder> (the trainer's)")
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", 1)) if world is None else world
    root = Path(shards)
    ds = ShardDataset(root, sidecars=False)  # the trainer's images, decoded and cropped as it does
    groups = ds.set_stage(stage.res, hp.patch, hp.aspect_max)
    starts = np.cumsum([0] + ds.rows)
    todo = [k for k in range(rank, len(ds.files), world) if not sidecar_path(root, ds.files[k], "repa").exists()]
    stats = dict(files=len(todo), images=0, bytes=0)
    if not todo:
        return stats
    device = local_device()
    quiet_transformers()
    try:
        dino = load_vit(hp.repa_encoder, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    except Exception as e:
        raise ValueError(f"cannot load the REPA encoder {hp.repa_encoder} ({brief(e)}); pass repa_encoder=<hub id "
                         "or folder>") from None
    chunks = []  # (file, rows): one aspect bucket each, files in order
    for k in todo:
        for g in groups:
            mine = g[(g >= starts[k]) & (g < starts[k + 1])]
            chunks += [(k, mine[j:j + batch]) for j in range(0, len(mine), batch)]
    loader = torch.utils.data.DataLoader(
        ds, batch_sampler=[rows for _, rows in chunks], num_workers=min(8, os.cpu_count()) if workers is None else
        workers, collate_fn=functools.partial(collate_batch, text_len=1, text_dim=1))
    out, t0 = {}, time.time()
    try:
        for n, ((k, rows), (imgs, *_)) in enumerate(zip(chunks, loader)):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=hp.amp):  # as train_step runs REPA
                feats = repa_targets(dino, imgs.to(device).float() / 127.5 - 1, hp.patch)
            for i, f in zip(rows, feats.to(torch.bfloat16).cpu()):
                out[int(i)] = f.contiguous().view(torch.int16).numpy().tobytes()
            if n + 1 < len(chunks) and chunks[n + 1][0] == k:
                continue
            a, b = int(starts[k]), int(starts[k + 1])  # file k is complete: written, then forgotten
            meta = repa_meta(ds.table.column("caption", k), hp.repa_encoder, stage.res, hp.patch, hp.aspect_max)
            stats["bytes"] += write_sidecar(sidecar_path(root, ds.files[k], "repa"), [("repa", pa.binary())],
                                            [[[out.pop(i) for i in range(a, b)]]], meta)
            stats["images"] += b - a
            print(f"\rencode-repa rank {rank}/{world}: {todo.index(k) + 1}/{len(todo)} files, {stats['images']} "
                  f"images, {stats['images'] / (time.time() - t0):.1f} images/s", end="", file=sys.stderr, flush=True)
    except NoUsableRow as e:
        raise ValueError(e.line()) from None
    print(file=sys.stderr)
    n = max(1, stats["images"])
    print(f"encode-repa rank {rank}/{world}: {stats['images']} images at {stage.res} px, "
          f"{stats['bytes'] / n / 1024:.0f} KiB per image stored, {stats['bytes'] / n / 1e3:.0f} GB per million images")
    return stats


# ----------------------------------------------------------------------------------------------
# Loader throughput (`bench-decode`): decode + bucket resize per worker process, as the trainer's loader does it

SYNTH_SIZES = [(1024, 1024)] * 4 + [(1216, 832), (832, 1216), (1344, 768), (768, 1344)]  # FLUX-like sizes
SYNTH_ALPHA = 1.5  # amplitude ~ 1/f^1.5: JPEG q95 at 3.9-4.7 bits/pixel, as detailed photographs (1/f: 10+)


def synthetic_image(rng, w, h):
    """A stand-in for a photograph, for JPEG sizes and decode speed: coloured noise with random phases and a
    1/f^SYNTH_ALPHA amplitude spectrum (cloud-like texture at every scale), channels mixed so that they
    correlate as in photographs. -> uint8 (h, w, 3)."""
    f = np.hypot(np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :])
    f[0, 0] = 1.0
    spec = (rng.standard_normal((3, h, w // 2 + 1)) + 1j * rng.standard_normal((3, h, w // 2 + 1))) / f ** SYNTH_ALPHA
    x = np.fft.irfft2(spec, s=(h, w))  # (3, h, w)
    x = np.tensordot(np.array([[1.0, 0.3, 0.1], [0.8, 0.5, 0.1], [0.6, 0.3, 0.5]]), x, 1)  # luminance-dominated
    x = (x - x.mean(axis=(1, 2), keepdims=True)) / x.std() * 55 + rng.uniform(90, 160, (3, 1, 1))
    return np.clip(x, 0, 255).astype(np.uint8).transpose(1, 2, 0)


def synthetic_source_path(shards):  # beside the shard folder, never inside it: <shards>.source/synthetic.parquet
    shards = Path(shards).resolve()
    return shards.with_name(shards.name + ".source") / "synthetic.parquet"


def make_synthetic_source(path, n, seed=0):
    """n synthetic images (FLUX-like sizes, JPEG q95) as one parquet file with image and caption columns."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        w, h = SYNTH_SIZES[i % len(SYNTH_SIZES)]
        buf = io.BytesIO()
        Image.fromarray(synthetic_image(rng, w, h)).save(buf, format="JPEG", quality=95)
        images.append({"bytes": buf.getvalue(), "path": None})
    write_rows(Path(path), {"image": images, "caption": [f"synthetic image {i}" for i in range(n)],
                            "width": [SYNTH_SIZES[i % len(SYNTH_SIZES)][0] for i in range(n)],
                            "height": [SYNTH_SIZES[i % len(SYNTH_SIZES)][1] for i in range(n)]})


def _decode_worker(job):
    """Time the loader's __getitem__ (decode, bucket crop, resize) over `indices` -> (images per CPU second of
    this process, images per wall-clock second). The CPU-time rate is what a worker gets from a core of its own,
    also on a machine shared with other jobs."""
    ds, indices = job
    t0, c0 = time.perf_counter(), time.process_time()
    for i in indices:
        ds[i]
    return len(indices) / (time.process_time() - c0), len(indices) / (time.perf_counter() - t0)


def bench_decode(shards, res_list=(512, 1024), workers=1, n=256, batch_per_step=1024, steps_per_s=1.0, gpus=8):
    """Images/s per loader worker at each resolution (per CPU second of the worker), and the CPU cores needed to
    feed the record pace (batch_per_step x steps_per_s images/s over `gpus` GPUs, one worker per core).
    Returns {res: (rate, cores)}."""
    import torch

    from train_gpt_style import Hyperparameters, ShardDataset
    torch.set_num_threads(1)  # one core per worker, as in the trainer's DataLoader workers
    hp, need, results = Hyperparameters(), batch_per_step * steps_per_s, {}
    for res in res_list:
        check_res(res, hp.patch)
    for res in res_list:
        folder = Path(shards) / str(res) if (Path(shards) / str(res)).is_dir() else Path(shards)
        try:
            ds = ShardDataset(folder)
        except FileNotFoundError as e:
            if e.filename:  # the file system's error, not the loader's "no shards"
                raise
            raise ValueError(f"no parquet shards under {folder}; pass --shards with a folder written by data_prep.py "
                             "hf, or add --synthetic N to write some") from None
        ds.set_stage(res, hp.patch, hp.aspect_max)
        idx = np.random.default_rng(0).integers(0, len(ds), n)  # random rows, as the loader reads them
        ds.table.CACHE_BYTES = 0  # each read costs its row group, as in a record's data set, far beyond the cache
        jobs = [(ds, idx[w::workers]) for w in range(workers)]
        _decode_worker((ds, idx[:8]))  # warm-up: imports, page cache
        with worker_pool(workers) as pool:
            rates = np.array(list(pool.map(_decode_worker, jobs)))  # (workers, 2): per CPU second, per wall second
        rate = float(rates[:, 0].mean())
        results[res] = (rate, need / rate)
        print(f"bench-decode res:{res} workers:{workers} img/s/worker:{rate:.1f} (per CPU second; wall-clock "
              f"total {rates[:, 1].sum():.1f} img/s) cores_for_{gpus}_gpus@{batch_per_step}x{steps_per_s:g}steps/s:"
              f"{need / rate:.1f} ({need / gpus / rate:.2f} per GPU)")
    return results

# ----------------------------------------------------------------------------------------------
# CLI: one subcommand per job

# ----------------------------------------------------------------------------------------------
# Memory plan (`memory`): the analytic GiB per device of the trainer's step, by part, and the largest micro-batch that
# fits a budget; the trainer's bench logs the measured peak next to it

T5GEMMA_2B = dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=256)  # the record's text encoder (Gemma 2 2B layers), encoder side
T5GEMMA_2B_ENCODER = 2_614_341_888  # its parameters, with the 256,000-token embedding (tests: built on meta)
EVAL_MODELS = 754_098_401  # fp32 parameters of the evaluation's CLIP ViT-L/14-336, DINOv2-L and Inception-v3
MEM_BUDGET = 79.6  # GiB per device the plan fits the micro-batch into (H100 80 GB: 81,559 MiB)
MEM_MARGIN = 0.9  # the fit leaves 10 % of the budget to allocator fragmentation, cuBLAS/NCCL workspaces, CUDA context
VGG16 = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))  # LPIPS's VGG-16: (channels, convs) per level, 2x pooled


def train_memory(hp, stage, world=1, micro=None, vits=None, text_params=T5GEMMA_2B_ENCODER):
    """GiB per device of one training step by part, for eager autograd on CUDA (a compiled graph may save less):
    fp32 weights, gradients, Muon / Adam states and the fp32 EMA sharded over `world`; bf16 weights held
    through backward (FSDP, reshard=0: all; one process: autocast's copies) and, when several micro-batches
    accumulate under FSDP, the unsharded fp32 gradients; frozen bf16 encoders and fp32 evaluation models; what autograd
    saves (fused attention: q, k, v, out, logsumexp; recomputed blocks: their input; perceptual encoders on x0)."""
    import torch
    import torch.nn as nn
    from torchvision.models import vgg16
    from transformers import DINOv3ViTConfig, DINOv3ViTModel, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    from evals import REAL_VITS
    from support import block_set
    from train_gpt_style import REPA, PRXDiT, uses_muon
    B, a, vits = micro or stage.micro_batch, 2 if hp.amp else 4, vits or REAL_VITS  # a: activation bytes
    repa, use_repa = hp.repa_weight > 0 and any(st.repa for st in hp.stages), stage.repa and hp.repa_weight > 0
    count = lambda m: sum(p.numel() for p in m.parameters())
    with torch.device("meta"):
        dit = PRXDiT(hp)
        proj = REPA(hp, DINOv3ViTModel(DINOv3ViTConfig(**vits[0]))) if repa else nn.Module()
        encs = [text_params, count(DINOv3ViTModel(DINOv3ViTConfig(**vits[0]))) if repa else 0,
                count(Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**vits[1]))) if hp.pdino_weight else 0,
                count(vgg16().features[:30]) if hp.lpips_weight else 0]  # [:30]: the convs LPIPS uses (to relu5_3)
    n = count(dit) + count(proj)
    muon = sum(p.numel() for k, p in dit.named_parameters() if uses_muon(k, p))  # one momentum; Adam: two moments
    held = (2 / hp.depth if hp.reshard and world > 1 else 1) * n * (2 if hp.amp else 4 if world > 1 else 0)
    held += 4 * n if world > 1 and stage.batch // (world * B) > 1 else 0  # FSDP accumulates unsharded fp32 grads
    D, L, H, P, F_ = hp.hidden, hp.text_len, hp.heads, 3 * hp.patch ** 2, int(hp.hidden * hp.mlp_ratio)
    N = (stage.res // hp.patch) ** 2
    n_tok = lambda i: N - round(N * hp.tread_frac) if hp.tread_frac > 0 and hp.tread_start <= i <= hp.tread_end else N
    # per token of a block: LayerNorm inputs and outputs in fp32 (autocast), the bf16 casts of h for the linears,
    # RMSNorm in/out of q, k (fp32), q, k, v, out, gated branch outputs, the MLP's four F-wide tensors, statistics
    tok = (8 + a) + (8 + a * (2 if hp.amp else 1)) + (16 if hp.amp else 20) + 6 * a
    blk = lambda n: n * (tok * D + 4 * a * F_ + 16 + 12 * H) + L * ((4 * a + 4) * D + 4 * H)  # + text keys/values
    recompute = block_set(hp.recompute, hp.depth)
    act = sum(blk(n_tok(i)) if i not in recompute else a * D * n_tok(i) for i in range(hp.depth))
    act += max([blk(n_tok(i)) for i in recompute] or [0])  # one recomputed block, rematerialised in backward
    act += N * (a * (P + hp.bottleneck) + (8 + a) * D + 4 * P) + a * L * (hp.text_dim + D)  # in/out layers, loss
    if use_repa:  # projector: its input, SiLUs and linears (4 E-wide); the cosine's two fp32 inputs
        act += n_tok(hp.repa_block) * (a * D + (4 * a + 8) * vits[0]["hidden_size"])
    nb, r = max(1, round(B * hp.perc_frac)), stage.res // 2  # perceptual losses on nb images; LPIPS at half size
    if hp.lpips_weight:  # conv inputs / ReLU outputs, max-pool outputs and indices, per level normalise, difference
        act += nb / B * (a * 3 * r * r + sum((r >> l) ** 2 * (a * c * k + (8 + a) * VGG16[l - 1][0] * (l > 0)
                                                          + (8 + 2 * hp.amp) * c) for l, (c, k) in enumerate(VGG16)))
    if hp.pdino_weight:  # DINOv2 (frozen: no linear inputs): the clamp's fp32 input and the normalised image, fp32
        T_ = (hp.pdino_res // 14) ** 2 + 5  # LayerNorm inputs, q k v out, GELU input; cosine. 14-px patches + 5
        E, F2, n2 = (vits[1][k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers"))
        act += nb / B * ((4 + a) * 3 * hp.pdino_res ** 2 + T_ * (n2 * (8 * E + a * (4 * E + F2)) + 12 * E))
    gib = lambda x: x / 2 ** 30
    return dict(weights_opt=gib(4 * (2 * n + muon + 2 * (n - muon) + count(dit)) / world), gathered=gib(held),
                encoders=gib(2 * sum(encs) + 4 * EVAL_MODELS * (hp.eval_every > 0)), activations=gib(B * act))


def memory_report(hp, world=8, log=print, budget=MEM_BUDGET, **kw):  # `python data_prep.py memory`
    for i, st in enumerate(hp.stages, 1):
        m = train_memory(hp, st, world, **kw)
        B = kw.get("micro") or st.micro_batch
        per_image, fixed = m["activations"] / B, sum(m.values()) - m["activations"]
        fit = int((MEM_MARGIN * budget - fixed) / per_image)  # keeps this micro-batch's gradient accumulation
        log(f"memory estimate stage:{i} res:{st.res} micro_batch:{B} devices:{world} peak:"
            f"{sum(m.values()):.2f}GiB " + " ".join(f"{k}:{v:.2f}GiB" for k, v in m.items()) +
            f" max_micro_batch@{budget:g}GiB:{fit} recompute:{hp.recompute or 'none'}")


# The time budget: one optimizer step's work per device at a configuration, by part, from FLOPs (2 per multiply-add)
# and bytes at stated fractions of an H100's peak; what the GPU check will replace (docs/systems.md#time-budget).
BUDGET_EFF = dict(dit=0.45, encoders=0.50, newton_schulz=0.60, memory=0.70)  # assumed fractions of the peak
HBM_TB_S = 3.35  # H100 SXM memory bandwidth, TB/s
NVLINK_GB_S = 360.0  # NCCL bus bandwidth reached on 8 H100 NVLink (all-gather, reduce-scatter), GB/s


def text_encoder_flops(cfg, tokens):  # forward FLOPs of a Gemma-style encoder over `tokens` tokens (no embedding)
    D, F_, Q = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"] * cfg["head_dim"]
    KV = cfg["num_key_value_heads"] * cfg["head_dim"]
    return cfg["num_hidden_layers"] * (2 * tokens * (2 * D * Q + 2 * D * KV + 3 * D * F_) + 4 * tokens * tokens * Q)


def vit_flops(cfg, tokens):  # forward FLOPs of a ViT encoder over `tokens` tokens: its linears and attention
    D, F_, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    return layers * (2 * tokens * (4 * D * D + 2 * D * F_) + 4 * tokens * tokens * D)


def vgg_flops(side):  # forward FLOPs of LPIPS' VGG-16 convolutions (to relu5_3) on a side x side image
    total, c_in = 0, 3
    for level, (c, k) in enumerate(VGG16):
        for _ in range(k):
            total += 2 * 9 * c_in * c * (side >> level) ** 2
            c_in = c
    return total


def newton_schulz_flops(shape, steps=5):  # the quintic iteration on an m x n matrix (m <= n after transposing)
    m, n = sorted(shape)
    return steps * (4 * m * m * n + 2 * m ** 3)


def time_budget(hp, world=8, peak=None, eff=None):
    """Per stage: ms per optimizer step on each of `world` devices by part, the step time and the stage's hours.
    Compute parts: FLOPs / (peak x efficiency); memory-bound parts: bytes / (HBM x efficiency); communication is
    shown alone (FSDP2 overlaps it with compute) and not added."""
    import torch
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    from evals import REAL_VITS
    from train_gpt_style import REPA, PRXDiT, uses_muon
    eff, peak = {**BUDGET_EFF, **(eff or {})}, (peak or hp.peak_tflops) * 1e12
    with torch.device("meta"):
        dit = PRXDiT(hp)
        repa = REPA(hp, DINOv3ViTModel(DINOv3ViTConfig(**REAL_VITS[0])))
    n = sum(p.numel() for p in dit.parameters())
    mats = [p.shape for k, p in dit.named_parameters() if uses_muon(k, p)]
    n_muon = sum(a * b for a, b in mats)
    owned = sorted((newton_schulz_flops(s) for s in mats), reverse=True)[::world]  # the busiest rank's share, about
    out = []
    for st in hp.stages:
        G = st.batch / world  # images per device per step
        nb = G * hp.perc_frac
        use_repa = st.repa and hp.repa_weight > 0
        sort = hp.text_sort and not hp.text_online  # the loader deals by the lengths text_emb/ records
        text = support.expected_text_len(dataclasses.replace(hp, text_sort=sort), st, world)  # mean padded tokens
        dit_hp = dataclasses.replace(hp, text_len=text)
        flops = dict(dit=G * support.dit_train_flops(dit_hp, st.res, repa.proj[0].out_features if use_repa else 0),
                     text_encoder=G * text_encoder_flops(T5GEMMA_2B, hp.text_len) if hp.text_online else 0,
                     repa_target=G * vit_flops(REAL_VITS[0], (st.res // hp.patch) ** 2 + 5)  # without repa/
                     if use_repa and hp.repa_online else 0,
                     lpips=nb * 3 * vgg_flops(st.res // 2) if hp.lpips_weight else 0,  # x0, pred, pred's backward
                     pdino=nb * 3 * vit_flops(REAL_VITS[1], (hp.pdino_res // 14) ** 2 + 5) if hp.pdino_weight else 0,
                     newton_schulz=sum(owned) if hp.muon else 0)
        ms = {k: 1e3 * f / (peak * eff[k if k in eff else "encoders"]) for k, f in flops.items()}
        opt_bytes = (28 * (n - n_muon) + 20 * n_muon + 12 * n / hp.ema_every) / world  # Adam, Muon, EMA: sharded
        ms["optimizer_ema"] = 1e3 * opt_bytes / (HBM_TB_S * 1e12 * eff["memory"])
        comm = (2 * n + 4 * n + 2 * 2 * n_muon) * (world - 1) / world  # all-gather bf16, reduce-scatter fp32, Muon
        step = sum(ms.values())
        out.append(dict(res=st.res, images=G, text=text, tflop=sum(flops.values()) / 1e12, ms=ms, step_ms=step,
                        comm_ms=1e3 * comm / (NVLINK_GB_S * 1e9), hours=st.steps * step / 3.6e6))
    return out


def budget_report(hp, world=8, log=print, **kw):  # `python data_prep.py budget`
    rows = time_budget(hp, world, **kw)
    for i, r in enumerate(rows, 1):
        log(f"budget stage:{i} res:{r['res']} images/device:{r['images']:g} text_tokens:{r['text']:.0f} "
            f"tflop/device:{r['tflop']:.1f} " +
            " ".join(f"{k}:{v:.0f}ms" for k, v in r["ms"].items()) +
            f" step:{r['step_ms']:.0f}ms hours:{r['hours']:.2f} comm_if_not_overlapped:{r['comm_ms']:.0f}ms")
    log(f"budget schedule: {sum(r['hours'] for r in rows):.2f} h on {world} devices")


# The GPU check (docs/systems.md#the-gpu-check): what one H100/H200 does at the record's shapes, in a few minutes,
# compile included; check.json is rewritten after every measurement, so a timeout keeps what was measured.
CHECK_TOY = ["preset=cpu", "bench=2", "compile=0", "stage1.batch=8", "stage1.micro_batch=4", "stage2.batch=8",
             "stage2.micro_batch=4"]  # the CPU stand-in (CI): the same phases on the CPU demo's model


def _timed(fn, device, reps):  # median seconds of fn() over reps runs, after two warm-up runs
    import torch
    times = []
    for i in range(reps + 2):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times[2:])[reps // 2]


def attention_check(hp, device, reps=10):
    """Forward + backward of one block's attention at each stage's shapes (a micro-batch, TREAD's routed token count
    and the full one, [text; image] keys with ~130-token captions padded as the loader pads): each SDPA kernel
    alone, with the text mask and without, and the kernel the trainer's `sdpa` order runs, read from the profiler."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import support
    kernels = dict(flash=SDPBackend.FLASH_ATTENTION, efficient=SDPBackend.EFFICIENT_ATTENTION,
                   cudnn=SDPBackend.CUDNN_ATTENTION, math=SDPBackend.MATH)
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    out = []
    for k, st in enumerate(hp.stages, 1):
        N = (st.res // hp.patch) ** 2
        n = torch.normal(*map(float, support.BENCH_CAPTION_TOKENS), (st.micro_batch,), generator=g)
        n = n.round().clamp(1, hp.text_len)
        L = support.text_pad_len(int(n.max()), hp.text_len)
        keys = (torch.arange(L)[None] < n[:, None]).to(device)
        for q_len in sorted({N, N - round(N * hp.tread_frac)}):
            shape = (st.micro_batch, hp.heads, q_len, hp.hidden // hp.heads)
            q = torch.randn(shape, device=device, dtype=dt, requires_grad=True)
            kv = [torch.randn(shape[:2] + (L + q_len, shape[3]), device=device, dtype=dt, requires_grad=True)
                  for _ in range(2)]
            mask = torch.cat([keys, torch.ones(st.micro_batch, q_len, dtype=torch.bool, device=device)], 1)
            flops = 3.5 * 4 * st.micro_batch * hp.heads * q_len * (L + q_len) * shape[3]  # forward + backward
            row = dict(stage=k, queries=q_len, keys=L + q_len, micro_batch=st.micro_batch)
            for masked in (True, False):
                def step():
                    m = mask[:, None, None] if masked else None
                    F.scaled_dot_product_attention(q, *kv, attn_mask=m).sum().backward()
                for name, kernel in kernels.items():
                    try:
                        with sdpa_kernel(kernel):
                            sec = _timed(step, device, reps)
                        row[f"{name}{'' if masked else '_nomask'}_ms"] = round(1e3 * sec, 3)
                        row[f"{name}{'' if masked else '_nomask'}_tflops"] = round(flops / sec / 1e12, 1)
                    except RuntimeError:  # this kernel does not take these inputs here
                        row[f"{name}{'' if masked else '_nomask'}_ms"] = None
            with torch.profiler.profile() as prof, support.attention_backend(device, hp.sdpa):
                support.attention(q, *kv, mask[:, None, None]).sum().backward()  # what the trainer runs
            ran = {e.key for e in prof.key_averages() if "attention" in e.key.lower() or "fmha" in e.key.lower()
                   or "flash" in e.key.lower()}
            cpu = device.type == "cpu" and support.CPU_EXPLICIT_ATTENTION  # no SDPA kernel to find there
            row["ran"] = sorted(ran)[:4] or (["explicit product (support.attention, CPU)"] if cpu else [])
            out.append(row)
    return out


def newton_schulz_check(hp, device, reps=10, world=8):
    """Newton-Schulz of one rank's share of the block matrices (every world-th), batched by shape as Muon does."""
    import torch

    from train_gpt_style import PRXDiT, orthogonalise, uses_muon
    with torch.device("meta"):
        shapes = [tuple(p.shape) for k, p in PRXDiT(hp).named_parameters() if uses_muon(k, p)][::world]
    mats = [torch.randn(s, device=device).bfloat16() for s in shapes]
    sec = _timed(lambda: orthogonalise(mats, shapes, None, 5), device, reps)
    flops = sum(newton_schulz_flops(s) for s in shapes)
    return dict(matrices=len(shapes), ms=round(1e3 * sec, 2), tflops=round(flops / sec / 1e12, 1))


def gpu_check(out, seconds=480, toy=False, log=print):
    """The check's phases in order, each skipped when what is left of `seconds` is under its need; out/check.json
    after every one. The real step: `bench=5` of each stage on one process under torchrun (FSDP2 on one rank, NCCL
    on a GPU), compiled, host syncs reported; at the end the 8-device schedule projected from the measured steps."""
    import subprocess
    import torch

    from train_gpt_style import parse_args
    report = dict(device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                  torch=torch.__version__, toy=toy, seconds=seconds, phases={})
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    left = lambda: seconds - (time.monotonic() - t0)  # noqa: E731
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    extra = CHECK_TOY if toy else []
    hp = parse_args(["preset=record", *extra], False)  # the constants that follow the preset override it

    def save(name, value):
        report["phases"][name] = value
        report["elapsed_s"] = round(time.monotonic() - t0, 1)
        tmp = out / "check.json.tmp"
        tmp.write_text(json.dumps(report, indent=1))
        os.replace(tmp, out / "check.json")
        log(f"gpu-check {name}: {json.dumps(value)[:400]}")
    for name, fn in (("attention", attention_check), ("newton_schulz", newton_schulz_check)):
        try:  # a failing phase is reported and the next one runs
            save(name, fn(hp, device, reps=2 if toy else 10))
        except Exception as e:
            save(name, dict(failed=support.brief(e, 300)))
    stages = [("stage1", ["stages=1"]),
              ("stage2", ["stages=1", *(f"stage1.{k}={getattr(hp.stages[1], k)}" for k in
                                        ("res", "batch", "micro_batch", "repa"))])]
    need = 60 if toy else 150  # compile and warm-up of one stage
    for k, (name, args) in enumerate(stages):
        if left() < need:
            save(name, dict(skipped=f"{left():.0f} s left, {need} s needed"))
            continue
        run = out / name
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               str(Path(__file__).resolve()), "gpu-step", "--", "preset=record", "bench=5", "compile=1",
               f"run_dir={run}", *extra, *args]
        limit = max(need, left() - 5 - (need if k == 0 else 0))  # stage 1 leaves stage 2 its need
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # its own group: a timeout kills torchrun's worker too
        try:
            text = proc.communicate(timeout=limit)[0]
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            (out / f"{name}.log").write_text(proc.communicate()[0])
            save(name, dict(skipped=f"timed out after {limit:.0f} s"))
            continue
        (out / f"{name}.log").write_text(text)
        lines = text.splitlines()
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] \
            if (run / "metrics.jsonl").exists() else []
        bench = next((x for x in rows if x.get("bench")), None)
        if proc.returncode or bench is None:
            save(name, dict(failed=proc.returncode, tail=lines[-5:]))
            continue
        st = hp.stages[0 if name == "stage1" else 1]
        budget = time_budget(hp, 8)[0 if name == "stage1" else 1]
        bench["all_in_mfu"] = round(100 * budget["tflop"] * 1e12 * 8 / st.batch * bench["img_s"] / (
            hp.peak_tflops * 1e12), 1) if device.type == "cuda" else None  # budget FLOPs at the measured rate
        bench["dit_mfu"] = round(100 * bench["dit_tflops"] / hp.peak_tflops, 1) if device.type == "cuda" else None
        bench["estimate_gib"] = round(sum(train_memory(hp, st, 1).values()), 1)
        bench["syncs"] = [x for x in lines if x.startswith("host sync:")][:10]
        bench["hours_8"] = st.steps * st.batch / bench["img_s"] / 8 / 3600
        save(name, bench)
    done = [report["phases"].get(n, {}) for n, _ in stages]
    total = sum(x["hours_8"] for x in done if "hours_8" in x) if all("hours_8" in x for x in done) else None
    save("projection", dict(hours_8_devices=round(total, 2) if total else None,
                            note="DiT and encoders at the measured per-device rate; no communication or loading"))
    return report


def gpu_step(argv):
    """One bench run of the trainer (under torchrun) with host-sync detection on a GPU: each syncing source line of
    the run (setup and the log steps' intended syncs included) is printed once as 'host sync: file:line (count)'."""
    import torch
    import warnings

    import train_gpt_style as T
    seen = {}
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode("warn")
        show = warnings.showwarning

        def count(message, category, filename, lineno, *a, **k):
            if "synchroniz" in str(message):
                seen[f"{filename}:{lineno}"] = seen.get(f"{filename}:{lineno}", 0) + 1
            else:
                show(message, category, filename, lineno, *a, **k)
        warnings.showwarning = count
        warnings.simplefilter("always")
    T.main(argv)
    for where, n in sorted(seen.items(), key=lambda kv: -kv[1]):
        print(f"host sync: {where} ({n})")


def _floats(text):
    return [float(x) for x in text.split(",")]


def _ints(text):
    return [int(x) for x in text.split(",")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("shapes", help="render the synthetic shapes data set")
    p.add_argument("--out", default="data/shapes", help="output folder (default: data/shapes, the demo's)")
    p.add_argument("--n", type=int, default=50000, help="training images")
    p.add_argument("--size", type=int, default=64, help="image side S in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p = sub.add_parser("hf", help="convert a hub data set or local parquet files into bucketed JPEG shards")
    p.add_argument("--dataset", required=True, help="hub id (streamed) or local parquet folder/file")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--image-col", default=None, help="image column (default: known data set's, else image)")
    p.add_argument("--caption-cols", default=None, help="caption columns, comma-separated")
    p.add_argument("--caption-weights", type=_floats, default=None, help="sampling weights, comma-separated")
    p.add_argument("--res", type=int, default=512, help="bucket area ~res^2 (one conversion per stage)")
    p.add_argument("--heldout", type=int, default=10000, help="held-out rows, spread over the input")
    p.add_argument("--shard-rows", type=int, default=HF_SHARD_ROWS, help="input rows per shard")
    p.add_argument("--max-rows", type=int, default=None, help="convert only the first N input rows")
    p.add_argument("--split", default="train", help="hub split")
    p.add_argument("--config", default=None, help="hub config name, for a data set with several")
    p.add_argument("--workers", type=int, default=None, help="processes (default: the cores, at most 32)")
    p.add_argument("--seed", type=int, default=0, help="caption choice")
    p = sub.add_parser("encode-text", help="precompute text embeddings (run under torchrun for several GPUs)")
    p.add_argument("--shards", required=True, help="folder written by hf or shapes")
    p.add_argument("--text-encoder", default=None, help="hub id or folder (default: the trainer's)")
    p.add_argument("--text-len", type=int, default=None, help="max tokens (default: the trainer's)")
    p.add_argument("--batch", type=int, default=64, help="captions per forward pass")
    p = sub.add_parser("encode-repa", help="precompute the REPA targets (run under torchrun for several GPUs)")
    p.add_argument("--shards", required=True, help="folder written by hf or shapes")
    p.add_argument("constants", nargs="*", help="the trainer's name=value (res, patch, aspect_max, repa_encoder of "
                   "the first REPA stage; default: the record preset's)")
    p.add_argument("--batch", type=int, default=64, help="images per forward pass")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: the cores, at most 8)")
    p = sub.add_parser("regroup", help="rewrite shards in row groups of ~1 MiB (the trainer reads them in place)")
    p.add_argument("--shards", required=True, help="folder of parquet shards")
    p = sub.add_parser("bench-decode", help="loader decode + resize throughput per worker process")
    p.add_argument("--shards", required=True, help="shard folder (with --synthetic: where to write them)")
    p.add_argument("--res", type=_ints, default="512,1024", help="resolutions to decode to; a subfolder named RES "
                   "is used for RES when present")
    p.add_argument("--workers", type=int, default=1, help="worker processes, one per core")
    p.add_argument("--n", type=int, default=256, help="images decoded per resolution")
    p.add_argument("--synthetic", type=int, default=0, help="first write N synthetic images (1/f noise, "
                   "FLUX-like sizes; kept in SHARDS.source/), converted at each resolution into SHARDS/RES")
    p.add_argument("--batch-per-step", type=int, default=1024, help="record pace: images per step (stage 1)")
    p.add_argument("--steps-per-s", type=float, default=1.0, help="record pace: optimizer steps per second")
    p.add_argument("--gpus", type=int, default=8, help="GPUs fed by the node's cores")
    p = sub.add_parser("gpu-check", help="the GPU check: kernels and the real step of both stages in minutes")
    p.add_argument("--out", default="runs/gpu_check", help="folder of check.json and the runs' logs")
    p.add_argument("--seconds", type=float, default=480, help="wall-clock budget; phases that would not fit skip")
    p.add_argument("--toy", action="store_true", help="the same phases on a tiny model (CPU, CI)")
    p = sub.add_parser("gpu-step", help="(used by gpu-check under torchrun) one trainer bench with sync detection")
    p.add_argument("constants", nargs="*")
    p = sub.add_parser("budget", help="the time budget of a trainer configuration from FLOPs (no GPU needed)")
    p.add_argument("constants", nargs="*", help="the trainer's name=value overrides (default: the record preset)")
    p.add_argument("--devices", type=int, default=8, help="devices the run shards over")
    p = sub.add_parser("memory", help="the analytic memory plan of a trainer configuration (no GPU needed)")
    p.add_argument("constants", nargs="*", help="the trainer's name=value overrides (default: the record preset)")
    p.add_argument("--devices", type=int, default=8, help="devices the run shards over")
    p.add_argument("--budget", type=float, default=MEM_BUDGET, help="GiB per device to fit the micro-batch into")
    args = parser.parse_args(argv)
    try:
        if args.command == "shapes":
            print(make_shapes(args.out, args.n, args.size, args.seed, args.workers))
        elif args.command == "hf":
            convert_hf(args.dataset, args.out, args.image_col, args.caption_cols and args.caption_cols.split(","),
                       args.caption_weights, args.res, args.heldout, args.shard_rows, args.max_rows, args.workers,
                       args.seed, args.split, config=args.config)
        elif args.command == "memory":
            from train_gpt_style import parse_args
            memory_report(parse_args(["preset=record", *args.constants], False), args.devices, budget=args.budget)
        elif args.command == "gpu-check":
            gpu_check(Path(args.out), args.seconds, args.toy)
        elif args.command == "gpu-step":
            gpu_step(args.constants)
        elif args.command == "budget":
            from train_gpt_style import parse_args
            budget_report(parse_args(["preset=record", *args.constants], False), args.devices)
        elif args.command == "regroup":
            regroup(args.shards)
        elif args.command == "encode-text":
            encode_text(args.shards, args.text_encoder, args.text_len, args.batch)
        elif args.command == "encode-repa":
            encode_repa(args.shards, args.constants, args.batch, args.workers)
        elif args.command == "bench-decode":
            from train_gpt_style import Hyperparameters
            res_list = args.res
            for res in res_list:  # before minutes of synthetic images
                check_res(res, Hyperparameters().patch)
            if args.synthetic:  # the source lies beside the shards: a loader pointed at them must not train on it
                src = synthetic_source_path(args.shards)
                if not src.exists():
                    make_synthetic_source(src, args.synthetic)
                for res in res_list:
                    convert_hf(src, Path(args.shards) / str(res), res=res, heldout=0, workers=args.workers)
            bench_decode(args.shards, res_list, args.workers, args.n, args.batch_per_step, args.steps_per_s,
                         args.gpus)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    except BrokenProcessPool:  # finished shards and progress.json stay; the unfinished ones are redone
        parser.exit(2, f"error: {WORKER_DIED}\n")
    except OSError as e:  # a path that cannot be read or written, a full disk: finished shards stay (atomic)
        where = f" ({e.filename})" if e.filename else ""
        parser.exit(2, f"error: {e.strerror or e}{where}; check the paths and free space, then run the same "
                       "command again (it continues)\n")


if __name__ == "__main__":
    main()
