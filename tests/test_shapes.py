"""Tests of the shapes benchmark (its definition, renderer and scorer in evals.py) and of its data set
(data_prep.py shapes): geometry measured on rendered pixels against the spec's closed forms, the shard format,
determinism, prompt files and the scorer."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import evals  # noqa: E402
from data_prep import make_shapes  # noqa: E402
from evals import (SHAPES_COLORS, SHAPES_HELDOUT, SHAPES_POSITIONS, SHAPES_SHAPES,  # noqa: E402
                   SHAPES_SIZES, parse_shapes_caption, render_shapes, score_shapes, shapes_caption)

# the spec, written out independently of evals.py
WHITE = (255, 255, 255)
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
          "yellow": (235, 200, 40), "purple": (140, 60, 190), "orange": (240, 130, 30)}
SIZES = {"small": 1 / 6, "large": 1 / 3}  # side / S
ANCHORS = {"top left": (1 / 4, 1 / 4), "top right": (3 / 4, 1 / 4), "bottom left": (1 / 4, 3 / 4),
           "bottom right": (3 / 4, 3 / 4), "center": (1 / 2, 1 / 2)}  # centre / S
CORNERS = {"top left", "top right", "bottom left", "bottom right"}
HELDOUT = {("purple", "triangle"), ("orange", "circle"), ("green", "square")}
AREA = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}  # area / side^2
N, S_DATA, ROWS = 600, 32, 200  # a small training split: 3 shards of 200 images at S=32


def coverage(img, color):
    """(H, W) fraction of `color` over white, read from the channel where the two differ most."""
    k = int(np.argmax(np.abs(np.subtract(WHITE, color))))
    return (255.0 - np.asarray(img, dtype=np.float64)[..., k]) / (255 - color[k])


def anchor(position, S):
    return np.array(ANCHORS[position]) * S


def test_spec_constants():
    assert SHAPES_COLORS == COLORS and SHAPES_HELDOUT == HELDOUT
    assert set(SHAPES_SHAPES) == {"circle", "square", "triangle"}
    assert SHAPES_SIZES == pytest.approx(SIZES)
    assert SHAPES_POSITIONS.keys() == ANCHORS.keys()
    assert all(SHAPES_POSITIONS[p] == pytest.approx(ANCHORS[p]) for p in ANCHORS)


# ---------------------------------------------------------------------------------------------
# Geometry of single renders

@pytest.mark.parametrize("S", [32, 37, 64])
def test_colours_background_and_centre(S):
    for color, rgb in COLORS.items():
        for shape in SHAPES_SHAPES:
            for size_name, frac in SIZES.items():
                img = np.asarray(render_shapes([(size_name, color, shape, "top left")], S))
                assert img.shape == (S, S, 3) and img.dtype == np.uint8
                cx, cy = anchor("top left", S)
                assert tuple(img[int(cy), int(cx)]) == rgb  # solid palette colour at the centre
                # exactly white everywhere more than a pixel outside the object's box
                far = np.ones((S, S), bool)
                r = frac * S / 2 + 1
                far[int(cy - r):math.ceil(cy + r), int(cx - r):math.ceil(cx + r)] = False
                assert (img[far] == 255).all()
                # every pixel is a blend of the palette colour and white
                a = coverage(img, rgb)[..., None]
                assert np.abs(img - (255 + a * (np.array(rgb) - 255))).max() <= 1


@pytest.mark.parametrize("S", [32, 37, 64, 96])
def test_extent_area_and_position(S):
    rng = np.random.default_rng(0)
    offsets = []
    for shape in SHAPES_SHAPES:
        for size_name, frac in SIZES.items():
            for position in ANCHORS:
                d = frac * S  # the spec's side
                cov = coverage(render_shapes([(size_name, "red", shape, position)], S, rng), COLORS["red"])
                ys, xs = np.nonzero(cov > 0)
                w, h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
                assert abs(w - d) <= 1.5 and abs(h - d) <= 1.5, (shape, size_name, w, h, d)
                assert cov.sum() == pytest.approx(AREA[shape] * d * d, rel=0.04)
                if shape != "triangle":  # widest row = diameter / side, to a quarter pixel
                    assert cov.sum(1).max() == pytest.approx(d, abs=0.25)
                centre = np.array([xs.min() + xs.max() + 1, ys.min() + ys.max() + 1]) / 2
                off = centre - anchor(position, S)
                assert np.abs(off).max() <= S / 16 + 1, (position, off)
                offsets.append(off)
    # jitter is present and spans most of +-S/16
    assert np.abs(offsets).max() > 0.75 * S / 16 and np.std(offsets) > S / 64


def test_anchors_without_jitter():
    S = 64
    for position in ANCHORS:
        cov = coverage(render_shapes([("large", "blue", "square", position)], S), COLORS["blue"])
        y, x = np.indices(cov.shape) + 0.5
        centroid = np.array([(cov * x).sum(), (cov * y).sum()]) / cov.sum()
        np.testing.assert_allclose(centroid, anchor(position, S), atol=0.25)


@pytest.mark.parametrize("size_name", list(SIZES))
def test_triangle_apex_up(size_name):
    S = 64
    cov = coverage(render_shapes([(size_name, "green", "triangle", "center")], S), COLORS["green"])
    widths = cov.sum(1)[cov.sum(1) > 0]  # row widths, top to bottom
    assert widths[0] < 0.25 * widths.max()  # narrow apex on top
    assert np.argmax(widths) >= len(widths) - 2  # widest rows at the base
    assert (np.diff(widths[:-1]) > 0).all()  # widening all the way down
    # isosceles: symmetric about the vertical through the centre
    x = np.arange(S) + 0.5
    assert (cov.sum(0) @ x) / cov.sum() == pytest.approx(S / 2, abs=0.25)


def test_caption_grammar():
    one = [("small", "red", "circle", "top left")]
    two = [("large", "purple", "square", "bottom right"), ("small", "orange", "triangle", "top left")]
    assert shapes_caption(one) == "a small red circle in the top left"
    assert shapes_caption(two) == ("a large purple square in the bottom right and "
                                   "a small orange triangle in the top left")
    assert parse_shapes_caption(shapes_caption(one)) == one
    assert parse_shapes_caption(shapes_caption(two)) == two
    assert parse_shapes_caption("a large blue square in the center") == [("large", "blue", "square", "center")]
    for bad in ["", "a small red circle", "a tiny red circle in the top left", "a small red circle in the middle",
                "a small pink circle in the top left", "a small red circle in the top left and",
                "the small red circle in the top left", "a small red circle in the top  left",
                " and ".join(["a small red circle in the top left"] * 3)]:
        with pytest.raises(ValueError):
            parse_shapes_caption(bad)


# ---------------------------------------------------------------------------------------------
# Generated split: shards, determinism, prompt files

@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes") / "a", n=N, size=S_DATA, seed=0, workers=2,
                       shard_rows=ROWS)


def read_rows(out):
    import pyarrow.parquet as pq
    return [row for p in sorted((out / "train").glob("*.parquet")) for row in pq.read_table(p).to_pylist()]


def decode(row):
    import io
    return Image.open(io.BytesIO(row["image"]["bytes"]))


def test_split_layout_and_meta(split):
    assert sorted(p.name for p in (split / "train").iterdir()) == [f"shard-{i:05d}.parquet" for i in range(3)]
    meta = json.loads((split / "meta.json").read_text())
    assert (meta["n"], meta["size"], meta["seed"]) == (N, S_DATA, 0)
    assert {tuple(h.split()) for h in meta["heldout"]} == HELDOUT
    rows = read_rows(split)
    assert len(rows) == N and all(r["width"] == r["height"] == S_DATA for r in rows)
    with pytest.raises(ValueError):  # a different set into the same folder
        make_shapes(split, n=N, size=S_DATA, seed=1, shard_rows=ROWS)


def test_split_captions(split):
    objects = [parse_shapes_caption(r["caption"]) for r in read_rows(split)]  # every caption parses
    assert [len(o) for o in objects] == [1, 2] * (N // 2)  # half one object, half two
    combos = {(c, s) for objs in objects for _, c, s, _ in objs}
    assert not combos & HELDOUT
    assert len(combos) == len(COLORS) * len(SHAPES_SHAPES) - len(HELDOUT)  # all 15 seen
    for objs in objects:
        if len(objs) == 2:
            assert objs[0][3] != objs[1][3] and {objs[0][3], objs[1][3]} <= CORNERS
    assert {o[3] for objs in objects if len(objs) == 1 for o in objs} == set(ANCHORS)
    assert {o[0] for objs in objects for o in objs} == set(SIZES)


def test_split_images_match_captions(split):
    rows = read_rows(split)
    assert all(decode(r).format == "PNG" for r in rows[:10])
    result = score_shapes([decode(r) for r in rows], [r["caption"] for r in rows])
    assert result["full"] >= 0.97


def test_load_dataset_decodes_images(split, tmp_path):
    import datasets
    ds = datasets.load_dataset("parquet", data_files=str(split / "train" / "*.parquet"), split="train",
                               cache_dir=str(tmp_path / "cache"))
    assert isinstance(ds.features["image"], datasets.Image)
    assert len(ds) == N and set(ds.column_names) == {"image", "caption", "width", "height"}
    img = ds[0]["image"]
    assert isinstance(img, Image.Image) and img.size == (S_DATA, S_DATA) and img.mode == "RGB"
    assert ds[0]["caption"] == read_rows(split)[0]["caption"]


def test_deterministic_and_resumable(split, tmp_path):
    shards = sorted((split / "train").glob("*.parquet"))
    # same seed with one process: the same bytes (shards depend only on (seed, shard index))
    again = make_shapes(tmp_path / "b", n=N, size=S_DATA, seed=0, workers=1, shard_rows=ROWS)
    for p in shards:
        assert (again / "train" / p.name).read_bytes() == p.read_bytes()
    # another seed: other pictures
    other = read_rows(make_shapes(tmp_path / "c", n=N, size=S_DATA, seed=1, workers=2, shard_rows=ROWS))
    rows = read_rows(split)
    assert sum(a["caption"] != b["caption"] for a, b in zip(rows, other)) > N // 2
    assert not np.array_equal(np.asarray(decode(rows[0])), np.asarray(decode(other[0])))
    # an interrupted run continues: only the missing shard is written, with the same bytes
    kept = again / "train" / shards[0].name
    os.utime(kept, (0, 0))
    (again / "train" / shards[1].name).unlink()
    make_shapes(again, n=N, size=S_DATA, seed=0, workers=1, shard_rows=ROWS)
    assert (again / "train" / shards[1].name).read_bytes() == shards[1].read_bytes()
    assert kept.stat().st_mtime == 0
    assert not list((again / "train").glob("*.tmp"))


def test_prompt_files(split):
    read = lambda name: (split / f"prompts_{name}.txt").read_text().splitlines()  # noqa: E731
    seen, heldout, two = read("seen"), read("heldout"), read("two")
    assert (len(seen), len(heldout), len(two)) == (150, 30, 100)
    for lines in (seen, heldout, two):
        assert len(set(lines)) == len(lines)
    seen_objs = [parse_shapes_caption(p) for p in seen]
    assert all(len(o) == 1 and (o[0][1], o[0][2]) not in HELDOUT for o in seen_objs)
    assert {(c, s) for [(_, c, s, _)] in [parse_shapes_caption(p) for p in heldout]} == HELDOUT
    assert all(len(parse_shapes_caption(p)) == 1 for p in heldout)
    for objs in map(parse_shapes_caption, two):
        assert len(objs) == 2 and objs[0][3] != objs[1][3] and {objs[0][3], objs[1][3]} <= CORNERS
        assert not {(c, s) for _, c, s, _ in objs} & HELDOUT
    assert two == evals.shapes_prompts()["two"]  # fixed, whatever the data seed


def test_cli_errors(tmp_path):
    for args, msg in [(["--size", "8"], "--size"), (["--n", "0"], "--n")]:
        proc = subprocess.run([sys.executable, str(ROOT / "data_prep.py"), "shapes", "--out", str(tmp_path / "x"),
                               *args], capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and msg in proc.stderr
        assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------
# Scorer

def all_prompts():
    return [p for lines in evals.shapes_prompts().values() for p in lines]


@pytest.mark.parametrize("S", [32, 64])
def test_scorer_on_ground_truth(S):
    prompts = all_prompts()
    rng = np.random.default_rng(S)
    images = [render_shapes(parse_shapes_caption(p), S, rng) for p in prompts]
    assert score_shapes(images, prompts)["full"] >= 0.98
    # what a careful person still calls right: a slightly soft edge (Gaussian sigma S/128, 0.5 px at 64), a lighter
    # or unevenly shaded colour, mild pixel noise
    soft = [im.filter(ImageFilter.GaussianBlur(S / 128)) for im in images]
    assert score_shapes(soft, prompts)["full"] >= 0.98
    yy, xx = np.mgrid[0:S, 0:S] / S
    shade = (0.85 + 0.075 * (1 + np.sin(2 * np.pi * (xx + yy))))[..., None]  # colour strength 0.85..1, smooth
    shaded = [Image.fromarray((255 - (255 - np.asarray(im, float)) * shade).round().astype(np.uint8)) for im in images]
    assert score_shapes(shaded, prompts)["full"] >= 0.98
    noisy = [Image.fromarray(np.clip(np.asarray(im, float) + rng.normal(0, 8, (S, S, 3)), 0, 255).astype(np.uint8))
             for im in images]
    assert score_shapes(noisy, prompts)["full"] >= 0.95
    # as a uint8 array: same answer as the PIL images
    arr = np.stack([np.asarray(im) for im in images[:20]])
    assert score_shapes(arr, prompts[:20])["per_image"] == score_shapes(images[:20], prompts[:20])["per_image"]


def degraded(obj, S, how, k, rng):
    """obj drawn as render_shapes does (4x supersampled, box-downsampled, centre jittered), but wrong in one way:
    `rounded` corners of radius k*side, `lumpy` outline r (1 + k sin 3 theta), `oval` aspect k, `bent` sides
    (sagitta k*side, out if k > 0), `dented` (a bite of radius k*side out of the right side)."""
    from PIL import ImageDraw
    size_name, color, shape, position = obj
    ss, fill = 4, COLORS[color]
    img = Image.new("RGB", (S * ss, S * ss), WHITE)
    draw = ImageDraw.Draw(img)
    d = SIZES[size_name] * S * ss
    cx, cy = (anchor(position, S) + rng.uniform(-1, 1, 2) * S / 16) * ss
    box = (cx - d / 2, cy - d / 2, cx + d / 2, cy + d / 2)
    apex = np.array([cx, cy - d / 2])  # the triangle's corners
    right = np.array([cx + d / 2, cy + d / 2])
    left = np.array([cx - d / 2, cy + d / 2])
    if how == "rounded":
        draw.rounded_rectangle(box, radius=k * d, fill=fill)
    elif how == "lumpy":
        th = np.linspace(0, 2 * np.pi, 240, endpoint=False)
        r = d / 2 * (1 + k * np.sin(3 * th + rng.uniform(0, 2 * np.pi)))
        draw.polygon(list(zip(cx + r * np.cos(th), cy + r * np.sin(th))), fill=fill)
    elif how == "oval":
        a, b = d / 2 * k ** 0.5, d / 2 / k ** 0.5
        (draw.ellipse if shape == "circle" else draw.rectangle)((cx - a, cy - b, cx + a, cy + b), fill=fill)
    elif how == "bent":
        pts = []
        for a, b in ((apex, right), (right, left), (left, apex)):
            normal = np.array([b[1] - a[1], a[0] - b[0]]) / np.hypot(*(b - a))  # outward (clockwise order)
            pts += [tuple(a + t * (b - a) + normal * k * d * 4 * t * (1 - t)) for t in np.linspace(0, 1, 60)[:-1]]
        draw.polygon(pts, fill=fill)
    else:  # dented
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([tuple(apex), tuple(right), tuple(left)], fill=fill)
        x = cx + (d / 2 if shape != "triangle" else d / 4)  # on the right side (a triangle's: halfway up)
        draw.ellipse((x - k * d, cy - k * d, x + k * d, cy + k * d), fill=WHITE)
    return img.resize((S, S), Image.Resampling.BOX)


DEGRADED = [("square", "rounded", 0.25), ("square", "oval", 1.3), ("square", "dented", 0.2),
            ("circle", "lumpy", 0.1), ("circle", "oval", 1.3), ("circle", "dented", 0.2),
            ("triangle", "bent", 0.08), ("triangle", "bent", -0.08), ("triangle", "dented", 0.15)]


@pytest.mark.parametrize("shape,how,k", DEGRADED)
def test_strict_scorer_fails_deformed_shapes(shape, how, k):
    """Rounded corners, lumps, ovals, bent sides, dents: the object is found (colour, position) and its shape is
    wrong in (nearly) every image at 64 px, small and large."""
    prompts = [p for p in evals.shapes_prompts()["seen"] + evals.shapes_prompts()["heldout"]
               if parse_shapes_caption(p)[0][2] == shape]
    rng = np.random.default_rng(7)
    images = [degraded(parse_shapes_caption(p)[0], 64, how, k, rng) for p in prompts]
    result = score_shapes(images, prompts)
    assert result["color"] == 1 and result["position"] >= 0.95
    assert result["shape"] <= 0.05 and result["full"] <= 0.05, result["shape"]
    if how != "dented":  # half as deformed: a careful person still sees it at the large size
        large = [i for i, p in enumerate(prompts) if parse_shapes_caption(p)[0][0] == "large"]
        images = [degraded(parse_shapes_caption(prompts[i])[0], 64, how, 1 + (k - 1) / 2 if how == "oval" else k / 2,
                           rng) for i in large]
        assert score_shapes(images, [prompts[i] for i in large])["shape"] <= 0.1


def test_strict_scorer_fails_blurred_objects():
    """A blurred object (Gaussian sigma 0.75 px or more at 64 px) is not a sharp shape; 0.5 px still is (above)."""
    prompts = all_prompts()
    rng = np.random.default_rng(3)
    images = [render_shapes(parse_shapes_caption(p), 64, rng) for p in prompts]
    for sigma in (0.75, 1.0):
        result = score_shapes([im.filter(ImageFilter.GaussianBlur(sigma)) for im in images], prompts)
        assert result["color"] == 1 and result["shape"] <= 0.05 and result["full"] <= 0.05, (sigma, result["shape"])


def test_shape_fit_is_exact_on_the_ideal_shapes():
    """ideal_shape's coverage is the closed form's: area side^2 * (pi/4, 1, 1/2), centroid on the box centre (the
    triangle's side/6 below it); shape_fit gives the named shape a deviation of ~0 and the others a large one."""
    for shape, a in AREA.items():
        side, cx, cy = 17.3, 30.2, 28.7
        cov = evals.ideal_shape(shape, cx, cy, side, 64, 64)
        assert cov.sum() == pytest.approx(a * side ** 2, rel=1e-2)  # sampled at 1/FIT_SUB px
        c = np.array([cov.sum(0) @ (np.arange(64) + 0.5), cov.sum(1) @ (np.arange(64) + 0.5)]) / cov.sum()
        assert np.allclose(c, [cx, cy + (side / 6 if shape == "triangle" else 0)], atol=0.5 / evals.FIT_SUB)
        fit = evals.shape_fit(cov, cov.sum(), c)
        assert fit[shape][0] < 0.02 and fit[shape][1] < 0.1
        for other in set(fit) - {shape}:  # the wrong shapes: far beyond both limits
            assert fit[other][0] > 2 * evals.SHAPE_MEAN_DEV and fit[other][1] > 4 * evals.SHAPE_LOCAL_DEV


@pytest.mark.parametrize("S", [32, 64])
def test_scorer_on_noise_and_blank(S):
    prompts = all_prompts()
    noise = np.random.default_rng(0).integers(0, 256, (len(prompts), S, S, 3), dtype=np.uint8)
    result = score_shapes(noise, prompts)
    assert result["full"] <= 0.01 and len(result["per_image"]) == len(prompts)
    blank = np.full((len(prompts), S, S, 3), 255, np.uint8)
    assert score_shapes(blank, prompts)["full"] == 0


def test_scorer_attributes():
    S = 64
    prompt = "a large red circle in the top left"
    right = ("large", "red", "circle", "top left")
    cases = {  # drawn object -> the only attribute that should score wrong
        ("large", "red", "circle", "top left"): None,
        ("large", "orange", "circle", "top left"): "color",
        ("large", "purple", "circle", "top left"): "color",
        ("large", "red", "circle", "bottom right"): "position",
        ("large", "red", "circle", "center"): "position",
        ("large", "red", "square", "top left"): "shape",
        ("large", "red", "triangle", "top left"): "shape",
        ("small", "red", "circle", "top left"): "size",
    }
    for drawn, wrong in cases.items():
        result = score_shapes([render_shapes([drawn], S)], [prompt])
        if wrong == "color":  # nothing of that colour: nothing else can be judged either
            assert result["color"] == 0 and not result["per_image"][0]
            continue
        for attr in ("color", "position", "shape", "size"):
            assert result[attr] == (0.0 if attr == wrong else 1.0), (drawn, attr)
        assert result["per_image"][0] == (drawn == right)
    # a wrongly coloured object beside a right one: half the colours right
    img = render_shapes([right, ("small", "blue", "square", "bottom right")], S)
    result = score_shapes([img], [prompt + " and a small green square in the bottom right"])
    assert result["color"] == 0.5 and not result["per_image"][0]


def test_scorer_shared_colour():
    S = 64
    objs = [("large", "red", "circle", "top left"), ("small", "red", "square", "bottom right")]
    img = render_shapes(objs, S, np.random.default_rng(0))
    assert score_shapes([img], [shapes_caption(objs)])["full"] == 1
    assert score_shapes([img], [shapes_caption(objs[::-1])])["full"] == 1  # order of mention is free
    swapped = [("large", "red", "square", "top left"), ("small", "red", "circle", "bottom right")]
    result = score_shapes([img], [shapes_caption(swapped)])
    assert result["shape"] == 0 and result["position"] == 1 and result["color"] == 1
    moved = [("large", "red", "circle", "top right"), ("small", "red", "square", "bottom left")]
    result = score_shapes([img], [shapes_caption(moved)])
    assert result["position"] == 0 and result["full"] == 0
