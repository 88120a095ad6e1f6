"""Data preparation for prx-speedrun: writes parquet shards the trainer reads.

    python data_prep.py shapes --out data/shapes [--n 50000] [--size 64] [--seed 0]

`shapes` renders a synthetic captioned data set ("a small red circle in the top left") with a
closed grammar, held-out colour/shape combinations and an exact scorer (`score_shapes`), so a run
can be judged on compositional generalisation in minutes on one GPU.

Shard format (shared with the real data): DIR/train/shard-00000.parquet, ... with columns
image (datasets Image feature: {bytes, path}, PNG bytes), caption (string), width, height (int32),
plus DIR/meta.json. Shards appear atomically (temp file + os.replace); present shards are skipped.
"""
import argparse
import io
import itertools
import json
import os
import re
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# ----------------------------------------------------------------------------------------------
# Shapes spec: the constants are the data set's definition (the trainer imports them)

SHAPES_COLORS = {  # name -> RGB, chosen far apart (closest pair: orange/yellow, 71 apart)
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 200, 40), "purple": (140, 60, 190), "orange": (240, 130, 30),
}
SHAPES_SHAPES = ("circle", "square", "triangle")  # filled; triangle isosceles, apex up, base = height
SHAPES_SIZES = {"small": 1 / 6, "large": 1 / 3}  # side (circle: diameter) as a fraction of S
SHAPES_POSITIONS = {  # object centre (bounding-box centre) as fractions (fx, fy) of S
    "top left": (1 / 4, 1 / 4), "top right": (3 / 4, 1 / 4),
    "bottom left": (1 / 4, 3 / 4), "bottom right": (3 / 4, 3 / 4), "center": (1 / 2, 1 / 2),
}
SHAPES_CORNERS = tuple(p for p in SHAPES_POSITIONS if p != "center")  # two-object images use these
SHAPES_HELDOUT = {("purple", "triangle"), ("orange", "circle"), ("green", "square")}  # never trained on
SHAPES_SEEN = [(c, s) for c in SHAPES_COLORS for s in SHAPES_SHAPES if (c, s) not in SHAPES_HELDOUT]
SHAPES_JITTER = 1 / 16  # centre jitter, uniform in [-S/16, S/16] per axis (large corner objects never touch)
WHITE = (255, 255, 255)  # background
SUPERSAMPLE = 4  # draw at 4x and box-downsample: exact area anti-aliasing, exact colours inside
SHARD_ROWS = 10_000  # images per parquet shard
N_PROMPTS_TWO = 100  # lines in prompts_two.txt
PROMPT_SEED = 1234  # fixed seed of prompts_two.txt: the evaluation never depends on --seed
MIN_SIZE = 16  # smallest side S at which small objects (S/6 px) stay recognisable

# ----------------------------------------------------------------------------------------------
# Captions and rendering

def shapes_caption(objects):
    """[(size_name, color, shape, position), ...] -> 'a small red circle in the top left and ...'"""
    return " and ".join(f"a {sz} {c} {sh} in the {p}" for sz, c, sh, p in objects)


_OBJECT_RE = re.compile("a ({}) ({}) ({}) in the ({})".format(
    *("|".join(names) for names in (SHAPES_SIZES, SHAPES_COLORS, SHAPES_SHAPES, SHAPES_POSITIONS))))


def parse_shapes_caption(text):
    """Inverse of shapes_caption for one or two objects; ValueError outside the grammar."""
    matches = [_OBJECT_RE.fullmatch(part) for part in text.strip().split(" and ")]
    if not 1 <= len(matches) <= 2 or not all(matches):
        raise ValueError(f"not a shapes caption: {text!r}")
    return [m.groups() for m in matches]


def render_shapes(objects, size, rng=None):
    """Draw objects [(size_name, color, shape, position), ...] on an (S, S) white RGB image.
    rng (np.random.Generator) jitters each centre by up to S/16 per axis; None draws on the anchors."""
    ss = SUPERSAMPLE
    img = Image.new("RGB", (size * ss, size * ss), WHITE)
    draw = ImageDraw.Draw(img)
    for size_name, color, shape, position in objects:
        d = SHAPES_SIZES[size_name] * size  # side in output pixels
        jx, jy = (0.0, 0.0) if rng is None else rng.uniform(-1, 1, 2) * SHAPES_JITTER * size
        cx, cy = (f * size + j for f, j in zip(SHAPES_POSITIONS[position], (jx, jy)))
        # supersampled pixel box [x0, x1) x [y0, y1) of one fixed side per size; PIL boxes include
        # their last pixel, hence the -1s below
        side = round(d * ss)
        x0, y0 = (round(c * ss - side / 2) for c in (cx, cy))
        x1, y1 = x0 + side, y0 + side
        fill = SHAPES_COLORS[color]
        if shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif shape == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        else:  # apex at top centre, base along the bottom edge
            draw.polygon([((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
    return img.resize((size, size), Image.Resampling.BOX)


def sample_shapes_objects(rng, n_objects):
    """One object anywhere, or two at distinct corners; only seen colour/shape combinations."""
    positions = (rng.choice(list(SHAPES_POSITIONS), 1) if n_objects == 1
                 else rng.choice(SHAPES_CORNERS, n_objects, replace=False))
    objects = []
    for p in positions:
        color, shape = SHAPES_SEEN[rng.integers(len(SHAPES_SEEN))]
        objects.append((str(rng.choice(list(SHAPES_SIZES))), color, shape, str(p)))
    return objects


def shapes_prompts():
    """The fixed evaluation prompts: {'seen': 150, 'heldout': 30, 'two': 100 lines}."""
    def singles(combos):
        return [shapes_caption([(sz, c, sh, p)]) for c, sh in combos for sz in SHAPES_SIZES
                for p in SHAPES_POSITIONS]
    rng, two = np.random.default_rng(PROMPT_SEED), {}  # dict: unique lines in drawing order
    while len(two) < N_PROMPTS_TWO:
        two[shapes_caption(sample_shapes_objects(rng, 2))] = None
    return {"seen": singles(SHAPES_SEEN), "heldout": singles(sorted(SHAPES_HELDOUT)), "two": list(two)}

# ----------------------------------------------------------------------------------------------
# Shards

def write_shard(path, images, captions):
    """Write PIL images + captions as one parquet shard, atomically (temp name, then os.replace)."""
    import datasets  # here, not at the top: importing it costs seconds that scoring doesn't need
    datasets.disable_progress_bars()  # our own progress line says how far the shards are
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string"),
                                  "width": datasets.Value("int32"), "height": datasets.Value("int32")})
    pngs = []
    for img in images:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        pngs.append({"bytes": buf.getvalue(), "path": None})
    ds = datasets.Dataset.from_dict({"image": pngs, "caption": captions,
                                     "width": [im.width for im in images],
                                     "height": [im.height for im in images]}, features=features)
    tmp = path.with_name(path.name + ".tmp")
    ds.to_parquet(str(tmp))
    os.replace(tmp, path)


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
        with Pool(min(workers or os.cpu_count(), len(todo))) as pool:
            for k, rows in enumerate(pool.imap_unordered(_make_shapes_shard, todo), 1):
                done += rows
                print(f"\rshapes: {k}/{len(todo)} shards, {done} images, {time.time() - t0:.1f}s",
                      end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    for name, lines in shapes_prompts().items():
        if not (path := out / f"prompts_{name}.txt").exists():
            path.write_text("\n".join(lines) + "\n")
    return out

# ----------------------------------------------------------------------------------------------
# Scorer: find each named object by colour, then judge position, shape and size from its pixels

COLOR_TOL = 60  # max RGB distance of a pixel from the white->colour line to count as that colour
MIN_AREA = 0.15  # a colour blob must cover >= 15 % of (named side)^2 (a triangle covers 50 %)
SQUARE_FILL = 0.89  # area / (width * height) above this is a square (ideal 1; circle pi/4 = 0.785)
TRIANGLE_SKEW = -0.25  # rows' coverage skewness below this is an apex-up triangle (ideal -0.57; else 0)
SIZE_SPLIT = 1 / 4  # extent above S/4 is large (between small S/6 and large S/3)


def _blend(img, color):
    """Read (H, W, 3) float pixels as `color` blended over white: returns the (H, W) fraction of
    colour (0 where the pixel lies more than COLOR_TOL off the white->colour line) and that distance."""
    v = np.subtract(color, WHITE, dtype=np.float64)  # (3,)
    d = img - np.array(WHITE, dtype=np.float64)  # (H, W, 3)
    alpha = np.clip(d @ v / (v @ v), 0, 1)  # (H, W)
    resid = np.linalg.norm(d - alpha[..., None] * v, axis=-1)  # (H, W)
    return np.where(resid < COLOR_TOL, alpha, 0.0), resid


def _grow(mask):
    """Dilate an (H, W) bool mask by one pixel (4-neighbourhood)."""
    p = np.pad(mask, 1)
    return mask | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]


def _components(mask):
    """4-connected components of an (H, W) bool mask, as a list of bool masks, largest first."""
    h, w = mask.shape
    none = h * w
    lab = np.where(mask, np.arange(h * w).reshape(h, w), none)
    while True:  # propagate the smallest label through each component
        pad = np.pad(lab, 1, constant_values=none)
        new = np.minimum.reduce([lab, pad[:-2, 1:-1], pad[2:, 1:-1], pad[1:-1, :-2], pad[1:-1, 2:]])
        new = np.where(mask, new, none)
        if np.array_equal(new, lab):
            break
        lab = new
    ids, counts = np.unique(lab[mask], return_counts=True)
    return [lab == i for i in ids[np.argsort(-counts, kind="stable")]]


def _measure(weights):
    """Coverage weights (H, W) of one blob -> area, extent, centroid, fill ratio, row skewness."""
    rows, cols = weights.sum(1), weights.sum(0)  # (H,), (W,)
    area = weights.sum()
    width, height = rows.max(), cols.max()  # widest row, tallest column (in pixels)
    y = np.arange(len(rows)) + 0.5
    cy = rows @ y / area
    cx = cols @ (np.arange(len(cols)) + 0.5) / area
    var = rows @ (y - cy) ** 2 / area
    skew = rows @ (y - cy) ** 3 / area / max(var, 1e-9) ** 1.5
    return area, max(width, height), np.array([cx, cy]), area / max(width * height, 1e-9), skew


def _judge(img, objects):
    """img (H, W, 3) float; objects of one prompt -> list of {color, position, shape, size} bools.
    An object whose colour is not found is wrong on every attribute."""
    S = img.shape[0]
    anchors = {p: np.multiply(f, S) for p, f in SHAPES_POSITIONS.items()}  # name -> (x, y) px
    blend = {c: _blend(img, rgb) for c, rgb in SHAPES_COLORS.items()}
    nearest = np.array(list(blend))[np.stack([r for _, r in blend.values()]).argmin(0)]  # (H, W)
    results = [dict(color=False, position=False, shape=False, size=False) for _ in objects]
    for c in dict.fromkeys(o[1] for o in objects):
        cover = blend[c][0]  # (H, W)
        idx = [k for k, o in enumerate(objects) if o[1] == c]
        # the len(idx) largest at-least-half-covered blobs, grown by a pixel to take in their edges
        blobs = _components((cover >= 0.5) & (nearest == c))[:len(idx)]
        stats = [_measure(cover * _grow(b)) for b in blobs]
        # objects sharing this colour take the blobs in the assignment nearest their anchors
        best = min(itertools.permutations(range(len(stats)), min(len(stats), len(idx))),
                   key=lambda perm: sum(np.hypot(*(stats[b][2] - anchors[objects[k][3]]))
                                        for k, b in zip(idx, perm)))
        for k, b in zip(idx, best):
            size_name, _, shape, position = objects[k]
            area, extent, centre, fill, skew = stats[b]
            if area < MIN_AREA * (SHAPES_SIZES[size_name] * S) ** 2:
                continue
            near = min(anchors, key=lambda p: np.hypot(*(centre - anchors[p])))
            found = ("triangle" if skew < TRIANGLE_SKEW and fill < SQUARE_FILL
                     else "square" if fill > SQUARE_FILL else "circle")
            results[k] = dict(color=True, position=near == position, shape=found == shape,
                              size=("large" if extent > SIZE_SPLIT * S else "small") == size_name)
    return results


def score_shapes(images, prompts):
    """Score generated images against their shapes prompts (any side S).
    images: list of PIL images or uint8 array (N, H, W, 3); prompts: list of N captions.
    Returns {'color', 'position', 'shape', 'size': accuracy over objects, 'full': fraction of
    images with every attribute of every object right, 'per_image': [bool] * N}.
    Colour: a blob of pixels blended from the named colour, of area >= MIN_AREA; position: its
    centroid's nearest anchor; shape: fill ratio and the skew of its rows; size: its extent."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    per_object, per_image = [], []
    for img, prompt in zip(images, prompts):
        arr = np.asarray(img.convert("RGB") if isinstance(img, Image.Image) else img, dtype=np.float64)
        res = _judge(arr, parse_shapes_caption(prompt))
        per_object += res
        per_image.append(all(all(r.values()) for r in res))
    out = {a: float(np.mean([r[a] for r in per_object])) for a in ("color", "position", "shape", "size")}
    return {**out, "full": float(np.mean(per_image)), "per_image": per_image}

# ----------------------------------------------------------------------------------------------
# CLI: one subcommand per source (later: hf, encode-text)

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("shapes", help="render the synthetic shapes data set")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=50000, help="training images")
    p.add_argument("--size", type=int, default=64, help="image side S in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    args = parser.parse_args(argv)
    try:
        if args.command == "shapes":
            print(make_shapes(args.out, args.n, args.size, args.seed, args.workers))
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    main()
