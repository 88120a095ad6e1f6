"""Sample images from a prx-speedrun checkpoint, score them on the shapes benchmark, export to diffusers.

    python sample.py --ckpt runs/demo --prompts data/shapes/prompts_seen.txt --out out/ --score
    python sample.py --ckpt runs/demo --prompt "a large blue square in the center" --out out/
    python sample.py --ckpt runs/record --export-diffusers exported/
    python sample.py --ckpt runs/record --eval          # the fixed evaluation (FID, FD-DINOv2, CMMD, CLIP score)

The model, the sampler and the text encoder come from train_gpt_style.py. EMA weights by default.
"""
import argparse
import dataclasses
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

import train_gpt_style as T


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


def load_model(path, ema=True):
    """-> (hp, model in eval mode, run folder). EMA weights from ema.pt; the raw ones (ema=False) from the sharded
    torch.distributed.checkpoint files, read in one process. Refuses a folder that is not a prx-speedrun checkpoint."""
    ck_dir = find_checkpoint(path)
    try:
        ck = torch.load(ck_dir / "ema.pt", map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or foreign file
        raise ValueError(f"cannot read checkpoint {ck_dir}/ema.pt: {e}") from None
    if not isinstance(ck, dict) or "config" not in ck or "ema" not in ck:
        raise ValueError(f"{ck_dir} is not a prx-speedrun checkpoint (no config/ema)")
    try:
        hp = T.hp_from_config(ck["config"])
    except TypeError as e:  # a config from another version of the trainer
        raise ValueError(f"{ck_dir}: its config does not fit this trainer ({e})") from None
    model = T.PRXDiT(hp)
    try:
        if ema:
            model.load_state_dict(ck["ema"])
        else:  # DCP fills these tensors (the trainer saved {"model": {"model.<name>": ...}}) in place
            sd = model.state_dict()
            warnings.filterwarnings("ignore", message=".*assuming the intent is to")  # one process: as meant
            dcp.load(dict(model={f"model.{k}": v for k, v in sd.items()}), checkpoint_id=ck_dir, no_dist=True)
    except (RuntimeError, dcp.CheckpointException) as e:
        raise ValueError(f"{ck_dir} does not match the architecture in its config: {str(e)[:200]}") from None
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


def snap_size(height, width, patch):
    """The aspect bucket of a size: sides rounded to multiples of the patch, the longer side cut to twice the
    shorter (width / height within [0.5, 2]). -> (height, width)"""
    h, w = (max(patch, round(s / patch) * patch) for s in (height, width))
    return min(h, 2 * w), min(w, 2 * h)


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
    from diffusers import PRXTransformer2DModel
    head = hp.hidden // hp.heads
    ref = PRXTransformer2DModel(in_channels=3, patch_size=hp.patch, context_in_dim=hp.text_dim,
                                hidden_size=hp.hidden, mlp_ratio=hp.mlp_ratio, num_heads=hp.heads, depth=hp.depth,
                                axes_dim=[head // 2, head // 2], bottleneck_size=hp.bottleneck)
    ref.load_state_dict(model.state_dict(), strict=True)  # parameter names map one to one
    ref.save_pretrained(out_dir)
    return out_dir


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", required=True, help="checkpoint folder (ckpt/step*) or run folder")
    ap.add_argument("--prompts", help="file with one prompt per line")
    ap.add_argument("--prompt", help="a single prompt")
    ap.add_argument("--out", help="output folder for PNGs")
    ap.add_argument("--steps", type=int, help="sampling steps (default: the run's sample_steps)")
    ap.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: the run's cfg)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, help="image side in px (default: the last stage's resolution)")
    ap.add_argument("--width", type=int, help="image width in px, snapped to the aspect buckets")
    ap.add_argument("--height", type=int, help="image height in px, snapped to the aspect buckets")
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
    try:
        hp, model, run_dir = load_model(a.ckpt, ema=not a.no_ema)
        if a.export_diffusers:
            export_diffusers(model, hp, a.export_diffusers)
            print(f"exported to {a.export_diffusers}")
            if not (a.prompts or a.prompt or a.eval):
                return
        if a.tread_guidance is not None and a.cfg is not None:
            raise ValueError("--tread-guidance replaces CFG (no unconditional pass): drop --cfg")
        interval = parse_interval(a.cfg_interval) if a.cfg_interval else (hp.cfg_lo, hp.cfg_hi)
        size = a.size or hp.stages[-1].res
        want = (a.height or size, a.width or size)
        h, w = snap_size(*want, hp.patch) if a.width or a.height else want
        if (h, w) != want:
            print(f"size {want[1]}x{want[0]} snapped to {w}x{h} (sides divisible by the patch {hp.patch}, "
                  "aspect ratio 0.5-2)")
        if a.eval:
            prompts = None
        elif a.prompts:
            prompts = [line.strip() for line in Path(a.prompts).read_text().splitlines() if line.strip()]
            if not prompts:
                raise ValueError(f"prompt file {a.prompts} is empty")
        elif a.prompt:
            prompts = [a.prompt]
        else:
            raise ValueError("give --prompts FILE or --prompt TEXT (or --export-diffusers DIR, or --eval)")
        if not (a.out or a.eval):
            raise ValueError("give --out DIR")
        for name, v in (("--batch", a.batch), ("--size", size), ("--steps", a.steps)):
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if a.score:  # every prompt must be a shapes caption: know it before sampling
            from data_prep import parse_shapes_caption
            for p in prompts:
                parse_shapes_caption(p)
        if size % hp.patch:
            raise ValueError(f"--size {size} is not divisible by the patch size {hp.patch}")
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        text = T.TextEncoder(text_encoder_path(hp, run_dir), hp.text_len, torch.device(dev),
                             torch.bfloat16 if dev == "cuda" else torch.float32)
    except (FileNotFoundError, ValueError, OSError) as e:
        T.fail(str(e))
    cfg = hp.cfg if a.cfg is None else a.cfg
    if a.eval:  # the run's fixed evaluation, with --steps, --cfg, --cfg-interval, --size if given
        hp = dataclasses.replace(hp, sample_steps=a.steps or hp.sample_steps, cfg=cfg, cfg_lo=interval[0],
                                 cfg_hi=interval[1])
        m = T.run_eval(model.to(dev), text, hp, T.prepare_eval(hp, dev), size, run_dir / "eval_ref", dev, a.batch)
        print("eval " + " ".join(f"{k}:{v:.4g}" for k, v in m.items()))
        return m
    images = T.generate(model.to(dev), text, prompts, (h, w), a.steps or hp.sample_steps, cfg, hp.t_shift,
                        hp.t_min_div, a.seed, a.batch, a.sampler, dev, amp=hp.amp, cfg_interval=interval,
                        tread_guidance=a.tread_guidance, tread_frac=hp.tread_frac or 0.5)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from PIL import Image
    for i, img in enumerate(T.to_uint8(images)):
        Image.fromarray(img).save(out / f"{i:05d}.png")
    T.save_grid(images[:64], out / "grid.png", nrow=8)
    print(f"{len(prompts)} images in {out}")
    if a.score:
        from data_prep import score_shapes
        sc = score_shapes(list(T.to_uint8(images)), prompts)
        print("shapes score: " + " ".join(f"{k}:{v:.3f}" for k, v in sc.items() if k != "per_image"))


if __name__ == "__main__":
    main(sys.argv[1:])
