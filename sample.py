"""Sample images from a prx-speedrun checkpoint, score them on the shapes benchmark, export to diffusers.

    python sample.py --ckpt runs/demo --prompts data/shapes/prompts_seen.txt --out out/ --score
    python sample.py --ckpt runs/demo --prompt "a large blue square in the center" --out out/
    python sample.py --ckpt runs/record --export-diffusers exported/
    python sample.py --ckpt runs/record --eval          # the fixed evaluation (FID, FD-DINOv2, CMMD, CLIP score)

The model, the sampler and the text encoder come from train_gpt_style.py. EMA weights by default.
"""
import argparse
import dataclasses
import math
import os
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F

import train_gpt_style as T

FLAGS = dict(sample_steps="--steps", cfg="--cfg")  # the trainer's constants these flags set


# ----------------------------------------------------------------------------------------------------------------
# Evaluation: fixed prompts and seeds, generated in slices across ranks, features all-gathered, compared with the
# held-out reference images (<data>/heldout): FID (Inception), FD-DINOv2 (Stein et al. 2023), CMMD (CLIP ViT-L/14-336,
# Jayasumana et al. 2024), CLIP score. Reference statistics are computed once per model and resolution, and cached.

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


def load_eval_models(hp, device):
    """Frozen float32 feature extractors, by hub id or local folder: name -> fn(images (B, 3, H, W) in [0, 1]) ->
    (B, D); "clip_text": prompts -> unit CLIP text embeddings."""
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
            dino = T.load_vit(name, device, torch.float32)
            norm = (224, 224), T.IMAGENET_MEAN, T.IMAGENET_STD
            fns["dinov2"] = lambda x: dino(pixel_values=prep(x, *norm)).pooler_output
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
        T.fail(f"evaluation: {e}; pip install it (timm: FID's Inception), or set eval_inception= to skip FID")
    except (OSError, ValueError) as e:
        T.fail(f"cannot load evaluation model {name}: {T.brief(e, 200)}")
    return fns


def prepare_eval(hp, device):
    """Everything the evaluation needs, loaded once, so that a bad path fails before training starts:
    -> (feature extractors, held-out reference images (ShardDataset), prompts)."""
    try:
        ref = T.ShardDataset(Path(hp.data) / "heldout")
        prompts = Path(hp.eval_prompts).read_text().splitlines() if hp.eval_prompts else \
            list(ref.ds.select(range(min(hp.eval_n, len(ref))))["caption"])
    except (OSError, ValueError) as e:  # FileNotFoundError is an OSError
        T.fail(f"evaluation: {e}; write the held-out split with data_prep.py, fix eval_prompts, or set eval_every=0")
    if min(len(prompts), len(ref), hp.eval_n) < 2:
        T.fail(f"evaluation needs >= 2 prompts and reference images, has {len(prompts)} and {len(ref)}")
    return load_eval_models(hp, device), ref, [p or "" for p in prompts[:hp.eval_n]]


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


def run_eval(model, text, hp, ev, res, cache_dir, device, batch=32):
    """The fixed evaluation of `model` at res x res (ev: prepare_eval's) -> metrics, on every rank. Image i comes from
    prompt i and the noise of eval_seed + i, with the run's sampling steps, CFG and guidance interval."""
    fns, ref, prompts = ev
    m, n = len(prompts), min(hp.eval_n, len(ref))  # generated and reference images
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

    def mine(N):  # this rank's contiguous part of range(N) (split like an FSDP shard), in batches
        lo = sum(T.shard_rows(N, world)[:rank])
        hi = lo + T.shard_rows(N, world)[rank]
        return [(a, min(a + batch, hi)) for a in range(lo, hi, batch)]

    def generated():
        for a, b in mine(m):
            x = T.generate(model, text, prompts[a:b], (res, res), hp.sample_steps, hp.cfg, hp.t_shift, hp.t_min_div,
                         hp.eval_seed + a, batch, device=device, amp=hp.amp, cfg_interval=(hp.cfg_lo, hp.cfg_hi))
            yield torch.from_numpy(T.to_uint8(x)).permute(0, 3, 1, 2) / 255, prompts[a:b]  # as a saved PNG

    gen = eval_features(fns, generated(), device)
    ids = {"inception": hp.eval_inception, "dinov2": hp.eval_dino, "clip": hp.eval_clip}
    paths = {k: Path(cache_dir, re.sub(r"[^\w.-]", "_", f"{k}-{v}-res{res}-n{n}") + ".pt") for k, v in ids.items() if v}
    todo = [[k for k, p in paths.items() if not p.exists()]]  # rank 0 decides for all
    if dist.is_initialized():
        dist.broadcast_object_list(todo, 0)
    if todo[0]:  # reference features of the first n held-out images, resized like training images
        ref.set_stage(res, hp.patch, 1.0)  # square centre crops, like the square generated images
        f = eval_features({k: fns[k] for k in todo[0]}, ((torch.stack([ref[j][0] for j in range(a, b)]) / 255, None)
                                                         for a, b in mine(n)), device)
        if rank == 0:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            for k in todo[0]:  # CMMD needs the embeddings themselves, FD only their Gaussian statistics
                torch.save(f[k] if k == "clip" else gaussian_stats(f[k]), paths[k].with_suffix(".tmp"))
                os.replace(paths[k].with_suffix(".tmp"), paths[k])
        if dist.is_initialized():
            dist.barrier()
    ref_stats = {k: torch.load(p, weights_only=True) for k, p in paths.items()}
    out = dict(eval_n=m, eval_res=res)
    for k, metric in (("inception", "fid"), ("dinov2", "fd_dinov2")):
        if k in ref_stats:
            out[metric] = frechet_distance(*gaussian_stats(gen[k]), *ref_stats[k])
    if "clip" in ref_stats:
        out["cmmd"] = mmd(gen["clip"].to(device), ref_stats["clip"].to(device))  # 3 (n x n) kernels: on the device
        out["clip_score"] = gen["clip_score"].mean().item()
    return out



def find_checkpoint(path):
    """A checkpoint folder (ckpt/step*/, holding ema.pt), its ema.pt, or a run folder (its newest checkpoint)."""
    p = Path(path)
    if p.is_file() or (p / "ema.pt").exists():
        return p.parent if p.is_file() else p
    if p.is_dir():
        cks = sorted(c.parent for c in (p / "ckpt").glob("step*/ema.pt"))
        if not cks:
            raise FileNotFoundError(f"no checkpoint (ckpt/step*/ema.pt) in {p}")
        return cks[-1]
    raise FileNotFoundError(f"checkpoint {p} does not exist")


def one_line(e):  # an exception's first line, for messages that must stay on one
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def state_mismatch(want, got):
    """Tensor shapes by name, from the config (want) and from the file (got) -> "" or a one-line summary."""
    missing = [k for k in want if k not in got]
    unexpected = [k for k in got if k not in want]
    sized = [k for k in want if k in got and tuple(got[k]) != tuple(want[k])]
    if not (missing or unexpected or sized):
        return ""
    first = f"{missing[0]} missing" if missing else f"{unexpected[0]} unexpected" if unexpected else \
        f"{sized[0]} is {tuple(got[sized[0]])} in the file, {tuple(want[sized[0]])} from the config"
    return f"{len(missing)} missing, {len(unexpected)} unexpected, {len(sized)} size-mismatched tensors ({first})"


def load_model(path, ema=True):
    """-> (hp, model in eval mode, run folder). EMA weights from ema.pt; the raw ones (ema=False) from the sharded
    torch.distributed.checkpoint files, read in one process. Refuses a folder that is not a prx-speedrun checkpoint,
    and weights that do not fit the architecture in its config, in one line."""
    ck_dir = find_checkpoint(path)
    try:
        ck = torch.load(ck_dir / "ema.pt", map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or foreign file
        raise ValueError(f"cannot read checkpoint {ck_dir}/ema.pt: {one_line(e)}") from None
    if not isinstance(ck, dict) or "config" not in ck or not isinstance(ck.get("ema"), dict):
        raise ValueError(f"{ck_dir} is not a prx-speedrun checkpoint (no config/ema)")
    try:
        hp = T.hp_from_config(ck["config"])
        T.check_config(hp)
    except (TypeError, KeyError, ValueError) as e:  # a config from another version of the trainer, or edited
        why = f"no {e}" if isinstance(e, KeyError) else one_line(e)
        raise ValueError(f"{ck_dir}: its config does not fit this trainer ({why}); sample it with the trainer "
                         "version that wrote it") from None
    model = T.PRXDiT(hp)
    want = {k: v.shape for k, v in model.state_dict().items()}
    try:
        if ema:
            got = {k: getattr(v, "shape", ()) for k, v in ck["ema"].items()}
        else:  # the trainer saved {"model": {"model.<name>": ...}}: flattened to "model.model.<name>"
            try:
                meta = dcp.FileSystemReader(ck_dir).read_metadata().state_dict_metadata
            except OSError as e:
                raise FileNotFoundError(f"{ck_dir} has no raw weights ({one_line(e)}); drop --no-ema") from None
            got = {k[len("model.model."):]: m.size for k, m in meta.items() if k.startswith("model.model.")}
        if diff := state_mismatch(want, got):
            raise ValueError(diff)
        if ema:
            model.load_state_dict(ck["ema"])
        else:  # DCP fills these tensors in place
            sd = model.state_dict()
            warnings.filterwarnings("ignore", message=".*assuming the intent is to")  # one process: as meant
            dcp.load(dict(model={f"model.{k}": v for k, v in sd.items()}), checkpoint_id=ck_dir, no_dist=True)
    except (ValueError, RuntimeError, dcp.CheckpointException) as e:
        raise ValueError(f"{ck_dir} does not match the architecture in its config: {one_line(e)}; its config was "
                         "edited or its weights come from another run: use a checkpoint as the trainer wrote it") \
            from None
    return hp, model.eval().requires_grad_(False), ck_dir.parents[1] if ck_dir.parent.name == "ckpt" \
        else ck_dir.parent


def text_encoder_path(hp, run_dir):
    """The configured encoder, or the demo's random one saved inside the run folder."""
    if hp.text_encoder:
        return hp.text_encoder
    p = Path(run_dir) / "demo_encoders" / "text_encoder"
    if not p.exists():
        raise FileNotFoundError(f"this run used the demo's random text encoder, expected at {p}")
    return str(p)


def snap_size(height, width, res, patch, aspect_max):
    """The trainer's aspect bucket at resolution res nearest a size in log aspect ratio, as the data loader assigns
    images: the token count of a res x res image (within 10 %), sides multiples of the patch. -> (height, width)"""
    buckets = T.aspect_buckets(res, patch, aspect_max)
    w, h = buckets[T.nearest_bucket(buckets, width, height)]
    return h, w


def parse_interval(text):
    """'LO,HI' -> (lo, hi) with 0 <= lo <= hi <= 1."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--cfg-interval expects LO,HI (two numbers in [0, 1]), got {text!r}") from None
    if not 0 <= lo <= hi <= 1:
        raise ValueError(f"--cfg-interval needs 0 <= LO <= HI <= 1, got {text!r}")
    return lo, hi


def export_diffusers(model, hp, out_dir):
    """Write a diffusers PRXTransformer2DModel folder (config + safetensors) with these weights."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():  # save_pretrained would only log a warning and write nothing
        raise ValueError(f"--export-diffusers {out} is a file; give a folder (new or existing)")
    try:
        from diffusers import PRXTransformer2DModel
    except ImportError as e:
        raise ValueError(f"cannot export to diffusers ({e}); pip install a diffusers with PRXTransformer2DModel "
                         "(requirements.txt)") from None
    head = hp.hidden // hp.heads
    ref = PRXTransformer2DModel(in_channels=3, patch_size=hp.patch, context_in_dim=hp.text_dim,
                                hidden_size=hp.hidden, mlp_ratio=hp.mlp_ratio, num_heads=hp.heads, depth=hp.depth,
                                axes_dim=[head // 2, head // 2], bottleneck_size=hp.bottleneck)
    try:
        ref.load_state_dict(model.state_dict(), strict=True)  # parameter names map one to one
    except RuntimeError as e:  # another diffusers version's layout
        raise ValueError(f"this diffusers' PRXTransformer2DModel does not match ({T.brief(e, 200)}); "
                         "install the version in requirements.txt") from None
    try:
        ref.save_pretrained(out)
    except OSError as e:  # a file in the path, no permission, a full disk
        raise ValueError(f"--export-diffusers {out} cannot be written ({e.strerror or e}); choose another folder") \
            from None
    if not (out / "config.json").is_file() or not any(out.glob("*.safetensors")):
        raise ValueError(f"--export-diffusers {out}: diffusers wrote no config.json + safetensors there; choose "
                         "another folder")
    return out


def sample_lines(model, text, lines, seed, batch, **kw):
    """-> (line index, image (3, H, W) in [-1, 1]) for the non-blank lines, sampled `batch` at a time (the caller
    writes each batch before the next is sampled). Line i starts from the noise of seed + i, as in T.generate, so
    that a blank line moves neither the names nor the seeds of the others. kw: T.generate's sampling arguments."""
    todo = [(i, p) for i, p in enumerate(lines) if p]
    for b in range(0, len(todo), batch):
        runs = []  # consecutive lines: one T.generate call each (its prompt j gets seed + first line + j)
        for i, p in todo[b:b + batch]:
            if runs and runs[-1][-1][0] == i - 1:
                runs[-1].append((i, p))
            else:
                runs.append([(i, p)])
        for r in runs:
            images = T.generate(model, text, [p for _, p in r], seed=seed + r[0][0], batch=len(r), **kw)
            yield from zip([i for i, _ in r], images)


def read_prompts(a):
    """--prompts FILE: its lines, stripped (blank ones kept as "", so that line i keeps index i); --prompt TEXT."""
    if a.prompts and a.prompt is not None:
        raise ValueError("give --prompts FILE or --prompt TEXT, not both")
    if a.prompts:
        try:
            lines = [line.strip() for line in Path(a.prompts).read_text().splitlines()]
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) else "not UTF-8"
            raise ValueError(f"--prompts {a.prompts} cannot be read ({why}); give a text file with one prompt per "
                             "line") from None
        if not any(lines):
            raise ValueError(f"prompt file {a.prompts} is empty; give a text file with one prompt per line")
        return lines
    if a.prompt and a.prompt.strip():
        return [a.prompt]
    raise ValueError("give --prompts FILE or --prompt TEXT (or --export-diffusers DIR, or --eval)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", required=True, help="checkpoint folder (ckpt/step*) or run folder")
    ap.add_argument("--prompts", help="file with one prompt per line")
    ap.add_argument("--prompt", help="a single prompt")
    ap.add_argument("--out", help="output folder for PNGs")
    ap.add_argument("--steps", type=int, help="sampling steps (default: the run's sample_steps)")
    ap.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: the run's cfg)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, help="image side in px (default: the last stage's resolution); with "
                    "--width/--height: the resolution whose aspect buckets they snap to")
    ap.add_argument("--width", type=int, help="image width in px, snapped to the nearest aspect bucket")
    ap.add_argument("--height", type=int, help="image height in px, snapped to the nearest aspect bucket")
    ap.add_argument("--cfg-interval", metavar="LO,HI", help="guide only for t in [LO, HI] (default: the run's)")
    ap.add_argument("--tread-guidance", type=float, metavar="S", help="TREAD self-guidance of strength S instead "
                    "of CFG (no unconditional pass): x0 + S (x0 - x0 with tokens routed past the TREAD blocks)")
    ap.add_argument("--sampler", choices=("euler", "heun"), default="euler")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    ap.add_argument("--score", action="store_true", help="score the images on the shapes benchmark")
    ap.add_argument("--export-diffusers", metavar="DIR", help="write a diffusers PRXTransformer2DModel folder")
    ap.add_argument("--eval", action="store_true", help="run the fixed evaluation of the run's config (README)")
    a = ap.parse_args(argv)
    T.quiet_transformers()
    try:  # the flags alone first: a bad one fails before the checkpoint is read
        for name, v in (("--batch", a.batch), ("--size", a.size), ("--width", a.width), ("--height", a.height)):
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        try:  # --steps and --cfg obey the trainer's rules for its sample_steps and cfg (nan, inf: all-black images)
            T.check_config(dataclasses.replace(T.Hyperparameters(), sample_steps=1 if a.steps is None else a.steps,
                                               cfg=1.0 if a.cfg is None else a.cfg))
        except ValueError as e:
            raise ValueError(re.sub(r"^(sample_steps|cfg)\b", lambda m: FLAGS[m[1]], str(e))) from None
        if a.tread_guidance is not None and not math.isfinite(a.tread_guidance):
            raise ValueError(f"--tread-guidance must be a finite number, got {a.tread_guidance}")
        if a.tread_guidance is not None and a.cfg is not None:
            raise ValueError("--tread-guidance replaces CFG (no unconditional pass): drop --cfg")
        if a.eval and (a.score or a.width or a.height or a.prompts or a.prompt is not None):
            raise ValueError("--eval runs the fixed evaluation (square images, its own prompts): drop --score, "
                             "--width, --height, --prompt and --prompts")
        if a.score and (a.width or a.height):
            raise ValueError("--score judges square images (the shapes benchmark): drop --width and --height")
        interval = parse_interval(a.cfg_interval) if a.cfg_interval else None
        prompts = None if a.eval or (a.export_diffusers and not (a.prompts or a.prompt)) else read_prompts(a)
        if a.score:  # every prompt must be a shapes caption: know it before sampling
            from data_prep import parse_shapes_caption
            for p in filter(None, prompts):
                parse_shapes_caption(p)
        if prompts is not None and not a.out:
            raise ValueError("give --out DIR")
        hp, model, run_dir = load_model(a.ckpt, ema=not a.no_ema)
        if a.export_diffusers:
            export_diffusers(model, hp, a.export_diffusers)
            print(f"exported to {a.export_diffusers}")
            if not (prompts or a.eval):
                return
        try:  # before any sampling: an output folder that cannot be made fails now
            a.out and Path(a.out).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"--out {a.out} cannot be created ({e.strerror}); choose another folder") from None
        interval = interval or (hp.cfg_lo, hp.cfg_hi)
        size = a.size or hp.stages[-1].res
        if size % hp.patch:
            raise ValueError(f"--size {size} is not divisible by the patch size {hp.patch}; use a multiple of it")
        want = (a.height or size, a.width or size)
        h, w = snap_size(*want, size, hp.patch, hp.aspect_max) if a.width or a.height else want
        if (h, w) != want:
            print(f"size {want[1]}x{want[0]} snapped to {w}x{h} (the aspect bucket of {size} px nearest in aspect "
                  "ratio: the token count the model was trained on)")
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        text = T.TextEncoder(text_encoder_path(hp, run_dir), hp.text_len, torch.device(dev),
                             torch.bfloat16 if dev == "cuda" else torch.float32)
    except (FileNotFoundError, ValueError, OSError) as e:
        T.fail(e)
    cfg = hp.cfg if a.cfg is None else a.cfg
    if a.eval:  # the run's fixed evaluation, with --steps, --cfg, --cfg-interval, --size if given
        hp = dataclasses.replace(hp, sample_steps=a.steps or hp.sample_steps, cfg=cfg, cfg_lo=interval[0],
                                 cfg_hi=interval[1])
        m = run_eval(model.to(dev), text, hp, prepare_eval(hp, dev), size, run_dir / "eval_ref", dev, a.batch)
        print("eval " + " ".join(f"{k}:{v:.4g}" for k, v in m.items()))
        return m
    out, done, kept = Path(a.out), [], []  # done: line indices written; kept: 8-bit copies of the first 64 (all with
    # --score, which judges the small shapes images)
    kw = dict(size=(h, w), steps=a.steps or hp.sample_steps, cfg=cfg, shift=hp.t_shift, t_min_div=hp.t_min_div,
              sampler=a.sampler, device=dev, amp=hp.amp, cfg_interval=interval, tread_guidance=a.tread_guidance,
              tread_frac=hp.tread_frac or 0.5)  # no TREAD in the run: half the tokens routed
    from PIL import Image
    try:  # each batch's PNGs are written as soon as it is sampled: a crash keeps them, memory stays one batch
        for i, img in sample_lines(model.to(dev), text, prompts, a.seed, a.batch, **kw):
            u8 = T.to_uint8(img[None])[0]  # (H, W, 3)
            Image.fromarray(u8).save(out / f"{i:05d}.png")
            done.append(i)
            if a.score or len(kept) < 64:
                kept.append(u8)
        T.save_grid(torch.from_numpy(np.stack(kept[:64])).permute(0, 3, 1, 2) / 127.5 - 1, out / "grid.png", nrow=8)
    except OSError as e:  # e.g. a full disk
        T.fail(f"writing {out} failed ({e.strerror or e}); free space or choose another --out (images written so "
               "far are kept)")
    skipped = len(prompts) - len(done)
    note = f" ({skipped} blank lines skipped; PNGs keep the line numbers)" if skipped else ""
    print(f"{len(done)} images in {out}{note}")
    if a.score:
        from data_prep import score_shapes
        sc = score_shapes(kept, [prompts[i] for i in done])
        print("shapes score: " + " ".join(f"{k}:{v:.3f}" for k, v in sc.items() if k != "per_image"))


if __name__ == "__main__":
    main(sys.argv[1:])
