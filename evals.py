"""Fixed evaluations of prx-speedrun. A leaf module: it imports nothing of the project; the trainer, sample.py and
data_prep.py import it.

- The record's evaluation: FID (Inception), FD-DINOv2 (Stein et al. 2023), CMMD (CLIP ViT-L/14-336, Jayasumana et al.
  2024) and CLIP score of generated images against held-out reference images (docs/evaluation.md). The caller passes
  the callables that generate and read images.
- The shapes benchmark of the CPU demo: a closed caption grammar ("a small red circle in the top left"), its exact
  renderer, held-out colour/shape pairs, the fixed prompt sets, a scorer that finds each named object by colour and
  judges position, shape and size, and the demo's tiny random encoders (docs/demo.md).
"""
import itertools
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw

# ----------------------------------------------------------------------------------------------------------------
# The record's evaluation: fixed prompts and seeds, generated in slices across ranks, features all-gathered, compared
# with the reference images. Reference statistics are computed once per model and resolution, and cached.

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MMD_FEATURES = {"clip": "cmmd", "dino_mmd": "dino_mmd"}  # features compared by MMD (their embeddings cached)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def frechet_distance(mu1, s1, mu2, s2):
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2) in float64, with tr (S1 S2)^1/2 = sum of the square roots of the
    eigenvalues of the symmetric S1^1/2 S2 S1^1/2 (no complex matrix square root)."""
    mu1, s1, mu2, s2 = (torch.as_tensor(a, dtype=torch.float64) for a in (mu1, s1, mu2, s2))
    w, V = torch.linalg.eigh(s1)
    r1 = (V * w.clamp(min=0).sqrt()) @ V.T  # S1^1/2
    tr_sqrt = torch.linalg.eigvalsh(r1 @ s2 @ r1).clamp(min=0).sqrt().sum()
    return ((mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * tr_sqrt).item()


def gaussian_stats(f):  # features (N, D) -> mean (D,), unbiased covariance (D, D), float64
    return f.double().mean(0), torch.cov(f.double().T)


def mmd(x, y, sigma=10.0, scale=1000.0, unbiased=True):
    """scale x squared MMD of x (m, D) and y (n, D) with the kernel exp(-|a - b|^2 / (2 sigma^2)) (CMMD: 10, 1000).
    Unbiased as in the CMMD paper (no i = j pairs within a set); unbiased=False: its reference code's V-statistic."""
    k = lambda a, b: torch.exp(-torch.cdist(a.double(), b.double()).pow(2) / (2 * sigma ** 2))
    within = lambda K: (K.sum() - K.diagonal().sum()) / (len(K) * (len(K) - 1)) if unbiased else K.mean()
    return (scale * (within(k(x, x)) + within(k(y, y)) - 2 * k(x, y).mean())).item()


DINO_MMD_RES = 518  # PRX's DINO-MMD: DINOv2-L/14 with registers at 518 px (37 x 37 patches)


def load_eval_models(hp, device):
    """Frozen float32 feature extractors of hp.eval_inception, eval_dino, eval_dino_mmd, eval_clip (hub ids or folders;
    "" skips one): name -> fn(images (B, 3, H, W) in [0, 1]) -> (B, D); "clip_text": prompts -> unit CLIP text
    embeddings. A model that cannot be loaded: ValueError, one line."""
    def prep(x, size, mean, std):  # bicubic resize, then the model's normalisation
        x = F.interpolate(x.float(), size=tuple(size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        return (x - x.new_tensor(mean).view(1, 3, 1, 1)) / x.new_tensor(std).view(1, 3, 1, 1)
    fns, name = {}, ""
    try:
        if name := hp.eval_inception:  # timm (optional package): 2048-d pooled features (num_classes=0)
            import timm
            net = timm.create_model(("local-dir:" if Path(name).is_dir() else "hf-hub:") + name, pretrained=True,
                                    num_classes=0).to(device).eval()
            c = net.pretrained_cfg
            fns["inception"] = lambda x: net(prep(x, c["input_size"][1:], c["mean"], c["std"]))
        if name := hp.eval_dino:  # the CLS token after the final norm
            from transformers import AutoModel
            dino = AutoModel.from_pretrained(name, dtype=torch.float32).to(device).eval()
            norm = (224, 224), IMAGENET_MEAN, IMAGENET_STD
            fns["dinov2"] = lambda x: dino(pixel_values=prep(x, *norm)).pooler_output
        if name := hp.eval_dino_mmd:  # PRX's: the unit CLS token after the final norm, at DINO_MMD_RES
            from transformers import AutoModel
            reg = AutoModel.from_pretrained(name, dtype=torch.float32).to(device).eval()
            big = (DINO_MMD_RES, DINO_MMD_RES), IMAGENET_MEAN, IMAGENET_STD
            fns["dino_mmd"] = lambda x: F.normalize(reg(pixel_values=prep(x, *big)).pooler_output, dim=-1)
        if name := hp.eval_clip:
            from transformers import AutoTokenizer, CLIPModel
            clip, tok = CLIPModel.from_pretrained(name).to(device).eval(), AutoTokenizer.from_pretrained(name)
            size, n_tok = clip.config.vision_config.image_size, clip.config.text_config.max_position_embeddings
            fns["clip"] = lambda x: F.normalize(clip.get_image_features(
                pixel_values=prep(x, (size, size), CLIP_MEAN, CLIP_STD)).pooler_output, dim=-1)

            def clip_text(prompts):
                b = tok(prompts, padding=True, truncation=True, max_length=n_tok, return_tensors="pt").to(device)
                return F.normalize(clip.get_text_features(**b).pooler_output, dim=-1)
            fns["clip_text"] = clip_text
    except ImportError as e:
        raise ValueError(f"{e}; pip install it (timm: FID's Inception), or set eval_inception= to skip FID") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load evaluation model {name}: {type(e).__name__}: {' '.join(str(e).split())[:200]}") \
            from None
    return fns


@torch.no_grad()
def eval_features(fns, chunks, device):
    """This rank's chunks of (images in [0, 1], prompts or None) -> {name: (N, D)} of all ranks, in order; with
    prompts also "clip_score" (N, 1): 100 x cosine of the CLIP image and text embeddings, clipped at 0."""
    out = {}
    for x, prompts in chunks:
        f = {k: fn(x.to(device)).float() for k, fn in fns.items() if k != "clip_text"}
        if prompts is not None and "clip" in f:
            f["clip_score"] = 100 * (f["clip"] * fns["clip_text"](prompts)).sum(-1, keepdim=True).clamp(min=0)
        for k, v in f.items():
            out.setdefault(k, []).append(v.cpu())
    parts = [out]
    if dist.is_initialized():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, out)
    return {k: torch.cat([t for p in parts for t in p.get(k, [])]) for k in set().union(*parts)}


def run_eval(fns, generate, reference, m, n, ids, res, cache_dir, device, batch=32, progress=False, val_loss=None,
             bins=()):
    """The fixed evaluation -> metrics, on every rank. generate(a, b): images (B, 3, H, W) in [0, 1] for prompts a..b-1
    and those prompts (m in all); reference(a, b): the reference images a..b-1 in [0, 1] (n in all); ids: feature
    name -> model id, naming the cached reference statistics. progress: a line on stderr, rewritten per batch.
    val_loss(a, b): the per-image validation losses of reference images a..b-1 and their t, or None; reported in all
    and per t-bin, bins being the inner edges."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

    def shown(fn, what, N):  # fn, saying how far it got
        def call(a, b):
            out = fn(a, b)
            if progress and rank == 0:
                print(f"\reval: {what} {b}/{N}", end="\n" if b == N else "", file=sys.stderr, flush=True)
            return out
        return call
    generate = shown(generate, "images generated", m)
    reference = shown(reference, "reference images read", n)

    def mine(N):  # this rank's contiguous part of range(N) (ceil(N / world) each, like an FSDP shard), in batches
        c = -(-N // world)
        lo, hi = min(N, rank * c), min(N, (rank + 1) * c)
        return [(a, min(a + batch, hi)) for a in range(lo, hi, batch)]

    gen = eval_features(fns, (generate(a, b) for a, b in mine(m)), device)
    paths = {k: Path(cache_dir, re.sub(r"[^\w.-]", "_", f"{k}-{v}-res{res}-n{n}") + ".pt") for k, v in ids.items() if v}
    todo = [[k for k, p in paths.items() if not p.exists()]]  # rank 0 decides for all
    if dist.is_initialized():
        dist.broadcast_object_list(todo, 0)
    if todo[0]:  # reference features of the first n reference images
        f = eval_features({k: fns[k] for k in todo[0]}, ((reference(a, b), None) for a, b in mine(n)), device)
        if rank == 0:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            for k in todo[0]:  # CMMD needs the embeddings themselves, FD only their Gaussian statistics
                torch.save(f[k] if k in MMD_FEATURES else gaussian_stats(f[k]), paths[k].with_suffix(".tmp"))
                os.replace(paths[k].with_suffix(".tmp"), paths[k])
        if dist.is_initialized():
            dist.barrier()
    ref_stats = {k: torch.load(p, weights_only=True) for k, p in paths.items()}
    out = dict(eval_n=m, eval_res=res)
    for k, metric in (("inception", "fid"), ("dinov2", "fd_dinov2")):
        if k in ref_stats:
            out[metric] = frechet_distance(*gaussian_stats(gen[k]), *ref_stats[k])
    for k, metric in MMD_FEATURES.items():  # 3 (n x n) kernels: on the device
        if k in ref_stats:
            out[metric] = mmd(gen[k].to(device), ref_stats[k].to(device))
    if "clip" in ref_stats:
        out["clip_score"] = gen["clip_score"].mean().item()
    if val_loss:  # the per-image losses of every rank, in order
        losses, ts = (torch.cat(part) for part in zip(*all_ranks([val_loss(a, b) for a, b in mine(n)])))
        out["val_loss"] = losses.mean().item()
        for i, (lo, hi) in enumerate(zip((0,) + tuple(bins), tuple(bins) + (1.01,))):
            out[f"val_loss_t{i}"] = losses[(ts >= lo) & (ts < hi)].mean().item()
    return out


def all_ranks(items):  # this rank's list of (losses, t) -> every rank's, in rank order
    if not dist.is_initialized():
        return items
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, [(a.cpu(), b.cpu()) for a, b in items])
    return [x for p in parts for x in p]


def prepare_eval(hp, device, reference):
    """What the fixed evaluation needs, loaded once, so that a bad path fails before training starts. reference():
    the held-out images (the trainer's ShardDataset). -> (feature extractors, reference images, prompts: the
    eval_prompts file, or the captions of the first eval_n reference images). ValueError, one line."""
    try:
        ref = reference()
        prompts = Path(hp.eval_prompts).read_text().splitlines() if hp.eval_prompts else \
            ref.table.column("caption").slice(0, hp.eval_n).to_pylist()
        if min(len(prompts), len(ref), hp.eval_n) < 2:
            raise ValueError(f"it needs >= 2 prompts and reference images, has {len(prompts)} and {len(ref)}")
    except (OSError, ValueError) as e:  # FileNotFoundError is an OSError
        raise ValueError(f"{e}; write the held-out split with data_prep.py, fix eval_prompts, or set eval_every=0") \
            from None
    return load_eval_models(hp, device), ref, [p or "" for p in prompts[:hp.eval_n]]


def evaluate(hp, ev, generate, res, cache_dir, device, batch=32, progress=False, flow=None):
    """The fixed evaluation at res x res (ev: prepare_eval's) -> metrics, on every rank. generate(prompts, seed):
    uint8 images (B, res, res, 3), prompt j from the noise of seed + j; image i comes from prompt i and the noise of
    eval_seed + i. The reference images are square centre crops, like the square generated ones. flow: the trainer's
    (x0_pred(x_t, t, captions), add_noise, flow_loss, T_BINS) for the validation loss: reference image j with its
    caption, noised at t = (j + 1/2) / n by the noise of eval_seed + j (fixed, comparable across runs; no sampling)."""
    fns, ref, prompts = ev
    ref.set_stage(res, hp.patch, 1.0)
    gen = lambda a, b: (torch.from_numpy(generate(prompts[a:b], hp.eval_seed + a)).permute(0, 3, 1, 2) / 255,
                        prompts[a:b])  # as saved 8-bit PNGs
    reference = lambda a, b: torch.stack([ref[j][0] for j in range(a, b)]) / 255
    ids = {"inception": hp.eval_inception, "dinov2": hp.eval_dino, "dino_mmd": hp.eval_dino_mmd, "clip": hp.eval_clip}
    n = min(hp.eval_n, len(ref))
    dev = torch.device(device)

    @torch.no_grad()
    def val_loss(a, b):
        x0_pred, add_noise, flow_loss, _ = flow
        items = [ref[j] for j in range(a, b)]  # (uint8 image, caption, ...)
        x0 = (torch.stack([it[0] for it in items]) / 127.5 - 1).to(dev)
        t = ((torch.arange(a, b) + 0.5) / n).to(dev)
        noise = torch.stack([torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(hp.eval_seed + j))
                             for j in range(a, b)]).to(dev)
        x_t = add_noise(x0, noise, t)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=hp.amp):
            pred = x0_pred(x_t, t, [it[1] for it in items])
        return flow_loss(pred.float(), x0, x_t, t, hp.t_min_div), t
    t0 = time.perf_counter()
    out = run_eval(fns, gen, reference, len(prompts), n, ids, res, cache_dir, device, batch, progress,
                   val_loss if flow else None, flow[3] if flow else ())
    return {**out, "eval_time_s": time.perf_counter() - t0}  # sampling, features and the validation loss


# ----------------------------------------------------------------------------------------------------------------
# The shapes benchmark: the constants are the data set's definition

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
N_PROMPTS_TWO = 100  # lines in prompts_two.txt
PROMPT_SEED = 1234  # fixed seed of prompts_two.txt: the evaluation never depends on --seed
MIN_SIZE = 16  # smallest side S at which small objects (S/6 px) stay recognisable


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


# ----------------------------------------------------------------------------------------------------------------
# Scorer: find each named object by colour, then judge position, shape and size from its pixels

COLOR_TOL = 60  # max RGB distance of a pixel from the white->colour line to count as that colour
MIN_AREA = 0.15  # a colour blob must cover >= 15 % of (named side)^2 (a triangle covers 50 %)
SIZE_SPLIT = 1 / 4  # extent above S/4 is large (between small S/6 and large S/3)
# Shape: the blob against the ideal circle, square and triangle of its area and centroid (drawn exactly, FIT_SUB^2
# samples a pixel). The named one must fit best, its outline off by at most SHAPE_MEAN_DEV px on average (blur:
# Gaussian sigma 0.5 px passes, 0.75 px fails), and no 3x3-px window may differ from it by more than SHAPE_LOCAL_DEV
# px of coverage (rounded corners, dents, bent sides, lumps). Validated on renders and degraded ones (tests).
FIT_SUB = 8  # samples per pixel and axis: the ideal outline to 1/8 px, far below the limits below
# measured at 64 px: renders 0.00-0.04 mean, <= 0.18 local; noise 8/255 <= 0.09, <= 0.63; blur sigma 0.5 px <= 0.19,
# <= 0.90; blur 0.75 px 0.26-0.42, >= 1.04; rounded corners (radius 0.25 side) >= 1.2 local; dents >= 4.9 local
SHAPE_MEAN_DEV = 0.3  # px
SHAPE_LOCAL_DEV = 1.0  # px of coverage in a 3x3-px window
AREA_PER_SIDE2 = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}  # area / side^2 of each ideal shape
PERIMETER_PER_SIDE = {"circle": np.pi, "square": 4.0, "triangle": 1 + 5 ** 0.5}


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


def _silhouette(cover, blob):
    """One blob's coverage (H, W), as a person sees its outline: inside (pixels whose 4 neighbours are in the blob) 1,
    whatever the shade; the edge pixels' colour fractions relative to the inside's median shade; two pixels around
    it taken in, so that a blurred edge counts against the shape."""
    core = ~_grow(~blob)
    level = np.median(cover[core]) if core.any() else 1.0
    return np.where(core, 1.0, np.clip(cover / max(level, 1e-6), 0, 1)) * _grow(_grow(blob))


def _measure(weights):
    """Coverage weights (H, W) of one blob -> area, extent, centroid (x, y)."""
    rows, cols = weights.sum(1), weights.sum(0)  # (H,), (W,)
    area = weights.sum()
    cy = rows @ (np.arange(len(rows)) + 0.5) / area
    cx = cols @ (np.arange(len(cols)) + 0.5) / area
    return area, max(rows.max(), cols.max()), np.array([cx, cy])  # extent: the widest row or tallest column


def ideal_shape(shape, cx, cy, side, h, w):
    """Coverage (h, w) of the exact shape of bounding-box centre (cx, cy) and side `side` (px; pixel i spans [i, i+1)),
    as render_shapes draws it (triangle: apex up, base = height), FIT_SUB^2 samples a pixel."""
    o = (np.arange(FIT_SUB) + 0.5) / FIT_SUB
    y = (np.arange(h)[:, None] + o).reshape(-1, 1) - cy  # (h * FIT_SUB, 1)
    x = (np.arange(w)[:, None] + o).reshape(1, -1) - cx  # (1, w * FIT_SUB)
    r = side / 2
    if shape == "circle":
        inside = x ** 2 + y ** 2 <= r ** 2
    elif shape == "square":
        inside = (np.abs(x) <= r) & (np.abs(y) <= r)
    else:  # apex (0, -r), base at y = r: half-width (y + r) / 2
        inside = (y <= r) & (np.abs(x) <= (y + r) / 2)
    return inside.reshape(h, FIT_SUB, w, FIT_SUB).mean((1, 3))


def shape_fit(weights, area, centre):
    """One blob's coverage (H, W) -> {shape: (mean outline deviation px, largest 3x3-window deviation px^2)} against
    the ideal shape of the same area and centroid (a triangle's centroid lies side/6 below its box centre)."""
    ys, xs = np.nonzero(weights)
    out = {}
    for shape, k in AREA_PER_SIDE2.items():
        side = (area / k) ** 0.5
        pad = int(side / 2) + 3  # the window: the blob's box and room for the ideal shape
        y0, x0 = max(0, ys.min() - pad), max(0, xs.min() - pad)
        win = weights[y0:ys.max() + pad + 1, x0:xs.max() + pad + 1]
        cy = centre[1] - (side / 6 if shape == "triangle" else 0) - y0
        err = np.abs(win - ideal_shape(shape, centre[0] - x0, cy, side, *win.shape))
        p = np.pad(err, 1)
        local = sum(p[i:i + err.shape[0], j:j + err.shape[1]] for i in range(3) for j in range(3)).max()
        out[shape] = (err.sum() / (PERIMETER_PER_SIDE[shape] * side), local)
    return out


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
        weights = [_silhouette(cover, b) for b in blobs]
        stats = [_measure(wt) for wt in weights]
        # objects sharing this colour take the blobs in the assignment nearest their anchors
        best = min(itertools.permutations(range(len(stats)), min(len(stats), len(idx))),
                   key=lambda perm: sum(np.hypot(*(stats[b][2] - anchors[objects[k][3]]))
                                        for k, b in zip(idx, perm)))
        for k, b in zip(idx, best):
            size_name, _, shape, position = objects[k]
            area, extent, centre = stats[b]
            if area < MIN_AREA * (SHAPES_SIZES[size_name] * S) ** 2:
                continue
            near = min(anchors, key=lambda p: np.hypot(*(centre - anchors[p])))
            fit = shape_fit(weights[b], area, centre)
            mean, local = fit[shape]
            right = min(fit, key=lambda s: fit[s][0]) == shape and mean <= SHAPE_MEAN_DEV and local <= SHAPE_LOCAL_DEV
            results[k] = dict(color=True, position=near == position, shape=right,
                              size=("large" if extent > SIZE_SPLIT * S else "small") == size_name)
    return results


def score_shapes(images, prompts):
    """Score generated images against their shapes prompts (any side S).
    images: list of PIL images or uint8 array (N, H, W, 3); prompts: list of N captions.
    Returns {'color', 'position', 'shape', 'size': accuracy over objects, 'full': fraction of
    images with every attribute of every object right, 'per_image': [bool] * N}.
    Colour: a blob of pixels blended from the named colour, of area >= MIN_AREA; position: its
    centroid's nearest anchor; shape: the named shape fits it best and closely (shape_fit); size: its extent."""
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


# ----------------------------------------------------------------------------------------------------------------
# The demo's encoders: tiny random models of the real classes (no download), loaded by the trainer through the code
# path of the real checkpoints

REAL_VITS = (dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),  # v3 L/16
             dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12))  # v2 B/14
TINY_VIT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
DEMO_TEXT_WINDOW = 6  # tokens: about one object phrase ("a small red circle in the top left")
# A random Gemma's blocks add unit-RMS outputs (post-norms) to word embeddings of RMS 0.02 * sqrt(width) ~ 0.2: a
# colour word's output is ~30 % its colour, the rest its neighbours'. x16: ~95 %, each word kept, closer to a trained
# encoder; the held-out colour-shape pairs then come out in their colours (docs/demo.md)
DEMO_TEXT_EMBED_SCALE = 16.0


def build_demo_encoders(folder, hp, vocab_text, vits=None):
    """Tiny random T5Gemma / DINOv3 / DINOv2-registers models, saved to `folder` so that the demo loads them
    through exactly the code path of the real checkpoints. Returns the three folder paths. They are drawn from the
    run's seed (hp.seed): the draw moves the demo's scores as much as the training seed does, so seeds span both."""
    vits, folder = vits or (TINY_VIT, TINY_VIT), Path(folder)
    paths = [folder / "text_encoder", folder / "dinov3", folder / "dinov2"]
    if all((p / "config.json").exists() for p in paths):
        return [str(p) for p in paths]
    with torch.random.fork_rng(devices=[]):  # leaves the run's random stream as it was
        torch.manual_seed(hp.seed)
        _write_random_encoders(paths, hp, vocab_text, vits)
    return [str(p) for p in paths]


def _write_random_encoders(paths, hp, vocab_text, vits):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import (DINOv3ViTConfig, DINOv3ViTModel, Dinov2WithRegistersConfig, Dinov2WithRegistersModel,
                              PreTrainedTokenizerFast, T5GemmaConfig, T5GemmaModel)
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(vocab_text, trainers.WordLevelTrainer(special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>",
                                  bos_token="<bos>")
    # A random encoder attends almost uniformly; local (sliding-window) attention makes each word's output the
    # average of its own phrase, so a colour stays bound to its shape and position in two-object captions.
    mod = dict(vocab_size=tok.vocab_size, hidden_size=hp.text_dim, intermediate_size=2 * hp.text_dim,
               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=hp.text_dim // 2,
               query_pre_attn_scalar=hp.text_dim // 2, sliding_window=DEMO_TEXT_WINDOW,
               layer_types=["sliding_attention"] * 2)
    t5 = T5GemmaModel(T5GemmaConfig(encoder=mod, decoder=mod, vocab_size=tok.vocab_size))
    with torch.no_grad():
        t5.get_encoder().embed_tokens.weight.mul_(DEMO_TEXT_EMBED_SCALE)
    t5.save_pretrained(paths[0])
    tok.save_pretrained(paths[0])
    regs = dict(num_register_tokens=4)  # the real checkpoints have 4 registers
    # the real checkpoints' patch sizes (16, 14); image_size only sizes the position table (DINOv3 uses RoPE)
    DINOv3ViTModel(DINOv3ViTConfig(patch_size=16, image_size=64, **vits[0], **regs)).save_pretrained(paths[1])
    Dinov2WithRegistersModel(Dinov2WithRegistersConfig(patch_size=14, image_size=hp.pdino_res, **vits[1], **regs)
                             ).save_pretrained(paths[2])
