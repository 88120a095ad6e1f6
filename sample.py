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
import re
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp

import evals
import support
import train_gpt_style as T

FLAGS = dict(sample_steps="--steps", cfg="--cfg", restarts="--restarts",  # the trainer's constants these flags set
             grid_shift="--grid-shift", last_rolls="--last-rolls", eta="--eta")


def hp_from_config(config):  # the resolved config saved in a checkpoint -> Hyperparameters (unknown keys refused)
    cfg = dict(config)
    cfg.pop("weight_init", None)  # a constant of earlier versions; it chose the initial weights only
    stages = [T.Stage(**st) for st in cfg.pop("stages")]
    return T.Hyperparameters(**cfg, stages=stages)


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
        ck = support.load_plain(ck_dir / "ema.pt")  # tensors and plain values only: a shared file runs no code
    except support.NotPlainData:
        raise
    except Exception as e:  # truncated or foreign file
        raise ValueError(f"cannot read checkpoint {ck_dir}/ema.pt: {one_line(e)}") from None
    if not isinstance(ck, dict) or "config" not in ck or not isinstance(ck.get("ema"), dict):
        raise ValueError(f"{ck_dir} is not a prx-speedrun checkpoint (no config/ema)")
    try:
        hp = hp_from_config(ck["config"])
        support.check_config(hp)
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
                support.check_index(ck_dir)
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
            dcp.load(dict(model={f"model.{k}": v for k, v in sd.items()}), checkpoint_id=ck_dir,
                     planner=support.PlainPlanner(ck_dir), no_dist=True)
    except support.NotPlainData:
        raise
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
    buckets = support.aspect_buckets(res, patch, aspect_max)
    w, h = buckets[support.nearest_bucket(buckets, width, height)]
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


def diffusers_transformer(model, hp):
    """Our DiT as diffusers' PRXTransformer2DModel, the same weights (the parameter names map one to one)."""
    try:
        from diffusers import PRXTransformer2DModel
    except ImportError as e:
        raise ValueError(f"cannot export to diffusers ({e}); pip install a diffusers with PRXTransformer2DModel "
                         "(requirements.txt)") from None
    head = hp.hidden // hp.heads
    ref = PRXTransformer2DModel(in_channels=3, axes_dim=[head // 2, head // 2],
                                **{name: getattr(hp, k) for k, name in support.DIFFUSERS_ARCH.items()})
    try:
        ref.load_state_dict(model.state_dict(), strict=True)
    except RuntimeError as e:  # another diffusers version's layout
        raise ValueError(f"this diffusers' PRXTransformer2DModel does not match ({support.brief(e, 200)}); "
                         "install the version in requirements.txt") from None
    return ref.eval()


def encoder_only(path, dtype):
    """The run's text encoder as a model diffusers' pipeline calls and reloads: T5Gemma's encoder-decoder becomes
    transformers' own T5GemmaEncoderModel (same weights; saved whole, it would be re-read as a default T5Gemma);
    any other encoder stays as it is."""
    from transformers import AutoModel, T5GemmaConfig, T5GemmaEncoderModel
    m = AutoModel.from_pretrained(path, dtype=dtype)
    if type(m).__name__ != "T5GemmaModel":
        return m.eval()
    config = T5GemmaConfig.from_dict({**m.config.to_dict(), "is_encoder_decoder": False,
                                      "architectures": ["T5GemmaEncoderModel"]})
    enc = T5GemmaEncoderModel(config).to(dtype)
    enc.load_state_dict({f"encoder.{k}": v for k, v in m.get_encoder().state_dict().items()}, strict=True)
    return enc.eval()


def pipeline_timesteps(steps, shift):
    """The trainer's sampling grid (linspace(1, 0, steps + 1) without its end, shifted) as the `timesteps` argument
    of PRXPixelPipeline, whose scheduler must then have shift=1 (the grid is shifted already)."""
    return (1000 * T.shift_t(torch.linspace(1, 0, steps + 1)[:-1], shift)).tolist()


def model_card(hp, ck_dir, run_dir, has_grid, ema=True):
    """README.md of an exported pipeline: what was trained, its last scores, samples, how to load it."""
    import json
    rows = support.read_metrics(run_dir) if (Path(run_dir) / "metrics.jsonl").is_file() else []
    scores = [r for r in rows if "shapes" in r or "fid" in r or "fd_dinov2" in r][-1:]
    res, steps, shift = hp.stages[-1].res, hp.sample_steps, hp.t_shift
    call = f'height={res}, width={res}, guidance_scale={hp.cfg}, use_resolution_binning={res == 1024}'
    lines = [
        "---", "library_name: diffusers", "pipeline_tag: text-to-image",
        "tags: [prx-speedrun, PRXPixelPipeline, pixel-space, flow-matching]", "---",
        f"# {Path(run_dir).name}: a prx-speedrun model", "",
        f"A pixel-space x-prediction flow-matching model, the PRX simplified MMDiT ({hp.hidden} wide, {hp.depth} "
        f"blocks, {hp.heads} heads, patch {hp.patch}), trained with prx-speedrun's `train_gpt_style.py` and exported "
        f"from `{ck_dir}` ({'EMA' if ema and hp.ema_decay else 'live'} weights).",
        "Stages: " + "; ".join(f"{st.res} px, batch {st.batch}, {st.steps} steps" for st in hp.stages) + ".",
        f"Text encoder: `{hp.text_encoder or 'the CPU demo random T5Gemma'}`, {hp.text_len} tokens.", "",
        "## Last scores", "", f"`{json.dumps(scores[0])}`" if scores else "none logged", ""]
    lines += ["## Samples", "", "![samples](samples.png)", ""] if has_grid else []
    lines += [
        "## Use", "", "```python", "from diffusers import PRXPixelPipeline",
        'pipe = PRXPixelPipeline.from_pretrained("PATH")  # this folder, or its hub id',
        f'image = pipe("a prompt", num_inference_steps={steps}, {call}).images[0]', "```", "",
        "One prompt per call with guidance (diffusers 0.42.1 builds the guided timestep for a batch of one).", "",
        f"The pipeline's default timesteps (`linspace(1, 1/1000, N)` at the scheduler's shift {shift}) differ a "
        "little from the trainer's. The trainer's grid gives the images of `sample.py` (the same noise, fp32):", "",
        "```python"]
    if shift != 1:
        lines += ["from diffusers import FlowMatchEulerDiscreteScheduler  # the grid below is shifted already",
                  "pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.0)"]
    lines += [f"timesteps = {[round(t, 4) for t in pipeline_timesteps(steps, shift)]}",
              f'image = pipe("a prompt", timesteps=timesteps, {call}).images[0]', "```"]
    if hp.t_min_div != 0.05:
        lines += ["", f"The run clamped t at {hp.t_min_div} when converting x0 to a velocity, the pipeline at 0.05."]
    if (hp.cfg_lo, hp.cfg_hi) != (0, 1):
        lines += ["", f"The run guided for t in [{hp.cfg_lo}, {hp.cfg_hi}] only; the pipeline guides every step."]
    if hp.restarts:
        lines += ["", f"The run sampled with {hp.restarts} restarts (noised back from t = {hp.restart_lo} to "
                  f"{hp.restart_hi} and solved again, `sample.py`); the pipeline solves once."]
    if hp.grid_shift:
        last = f", its last prediction the mean over {hp.last_rolls} rolls" if hp.last_rolls > 1 else ""
        lines += ["", f"The run rolled the image by up to {hp.grid_shift} px before each step's transformer and back"
                  f"{last} (`sample.py`); the pipeline does not."]
    if hp.eta:
        lines += ["", f"The run's steps from t = {hp.eta_lo} up redrew {hp.eta} of their predicted noise "
                  "(`sample.py`); the pipeline's steps are deterministic."]
    return "\n".join(lines) + "\n"


def export_diffusers(model, hp, out_dir, text_path=None, dtype=torch.float32, card=None, grid=None):
    """--export-diffusers: a diffusers PRXPixelPipeline folder (model_index.json, transformer/, text_encoder/,
    tokenizer/ (right padding, as trained), scheduler/ (FlowMatchEuler at the run's shift), README.md (card: the
    model card) and samples.png (a copy of the picture `grid`)); text_path None: the transformer alone
    (--transformer-only: config.json + safetensors)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():  # save_pretrained would only log a warning and write nothing
        raise ValueError(f"--export-diffusers {out} is a file; give a folder (new or existing)")
    transformer = diffusers_transformer(model, hp)
    if dtype != torch.float32:
        from diffusers.utils import logging
        logging.set_verbosity_error()  # its note on modules kept in fp32: this model has none
        transformer = transformer.to(dtype)
    if text_path is None:
        written, saved = transformer, out / "config.json"
    else:
        from diffusers import FlowMatchEulerDiscreteScheduler, PRXPixelPipeline
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(text_path)
        tok.padding_side = "right"  # as the trainer's TextEncoder: real tokens first, positions from 0
        written = PRXPixelPipeline(transformer, FlowMatchEulerDiscreteScheduler(shift=hp.t_shift),
                                   encoder_only(text_path, dtype), tok, default_sample_size=hp.stages[-1].res,
                                   prompt_max_tokens=hp.text_len, noise_scale=1.0)  # the trainer's noise: N(0, 1)
        saved = out / "transformer" / "config.json"
    try:
        written.save_pretrained(out)
        if card is not None:
            (out / "README.md").write_text(card)
        if grid is not None:
            shutil.copyfile(grid, out / "samples.png")
    except OSError as e:  # a file in the path, no permission, a full disk
        raise ValueError(f"--export-diffusers {out} cannot be written ({e.strerror or e}); choose another folder") \
            from None
    if not saved.is_file() or not any(saved.parent.glob("*.safetensors")):
        raise ValueError(f"--export-diffusers {out}: diffusers wrote no config.json + safetensors there; choose "
                         "another folder")
    return out


def tread_guided(model, scale, frac, interval):
    """TREAD self-guidance in place of CFG (no unconditional pass), in PRX's convention: x0_r + scale (x0 - x0_r)
    for t in interval (elsewhere x0: scale 1 everywhere is the conditional sample), where x0_r is the same model with
    a fixed `frac` of the image tokens routed past the TREAD blocks (one routing for every sample and step, so an
    image does not depend on its batch): a weaker model whose errors the full one is pushed away from. -> a model
    for T.generate (with cfg=1)."""
    def guided(x, t, txt, mask):
        x0 = model(x, t, txt, mask)[0].float()
        if not interval[0] <= float(t[0]) <= interval[1]:
            return x0, None
        n_tok = (x.shape[2] // model.patch) * (x.shape[3] // model.patch)
        keep = T.tread_keep(1, n_tok, frac, "cpu", torch.Generator().manual_seed(0)).to(x.device).expand(len(x), -1)
        routed = model(x, t, txt, mask, keep)[0].float()
        return routed + scale * (x0 - routed), None
    return guided


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


def unknown_words(tok, prompts):
    """The words of `prompts` (cleaned as the trainer cleans them) that a word-level tokenizer (the CPU demo's)
    reads as its unknown token, each once, in order of appearance."""
    pre, vocab = tok.backend_tokenizer.pre_tokenizer, tok.get_vocab()
    if pre is None:
        return []
    words = (w for p in prompts for w, _ in pre.pre_tokenize_str(support.clean_caption(p)))
    return list(dict.fromkeys(w for w in words if w not in vocab))


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
    ap.add_argument("--out", help="output folder for PNGs (default: RUN/sampled)")
    ap.add_argument("--steps", type=int, help="sampling steps (default: the run's sample_steps)")
    ap.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: the run's cfg)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, help="image side in px (default: the last stage's resolution); with "
                    "--width/--height: the resolution whose aspect buckets they snap to")
    ap.add_argument("--width", type=int, help="image width in px, snapped to the nearest aspect bucket")
    ap.add_argument("--height", type=int, help="image height in px, snapped to the nearest aspect bucket")
    ap.add_argument("--cfg-interval", metavar="LO,HI", help="guide only for t in [LO, HI] (default: the run's)")
    ap.add_argument("--restarts", type=int, help="restart sampling: times the image is noised back from the run's "
                    "restart_lo to restart_hi and solved again (default: the run's restarts; 0: none)")
    ap.add_argument("--grid-shift", type=int, help="roll the image up to N px (random) before each step's DiT and "
                    "back, so that the patch seams fall elsewhere every step (default: the run's grid_shift; 0: none)")
    ap.add_argument("--last-rolls", type=int, help="with grid shifts: the last step's prediction is the mean over N "
                    "rolls, so that no seam stays in the image (default: the run's last_rolls; 1: one roll)")
    ap.add_argument("--eta", type=float, help="stochastic steps from the run's eta_lo up: this fraction of the noise "
                    "each predicts (in std) is drawn afresh (default: the run's eta; 0: deterministic Euler)")
    ap.add_argument("--tread-guidance", type=float, metavar="S", help="TREAD self-guidance of strength S instead "
                    "of CFG (no unconditional pass), PRX's convention: x0_r + S (x0 - x0_r), x0_r with tokens "
                    "routed past the TREAD blocks; S=1: the conditional sample")
    ap.add_argument("--sampler", choices=("euler", "heun"), default="euler")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    ap.add_argument("--score", action="store_true", help="score the images on the shapes benchmark")
    ap.add_argument("--export-diffusers", metavar="DIR", help="write a diffusers PRXPixelPipeline folder (docs/"
                    "sampling.md): transformer, text encoder, tokenizer, scheduler and a model card")
    ap.add_argument("--transformer-only", action="store_true", help="--export-diffusers writes the "
                    "PRXTransformer2DModel alone")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="--export-diffusers: weights' type "
                    "(bf16 halves the files)")
    ap.add_argument("--eval", action="store_true", help="run the fixed evaluation of the run's config (README)")
    a = ap.parse_args(argv)
    support.quiet_transformers()
    try:  # the flags alone first: a bad one fails before the checkpoint is read
        for name, v in (("--batch", a.batch), ("--size", a.size), ("--width", a.width), ("--height", a.height)):
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        try:  # the flags obey the trainer's rules for their constants (nan, inf: all-black images)
            given = lambda v, default: default if v is None else v  # noqa: E731
            support.check_config(dataclasses.replace(T.Hyperparameters(), sample_steps=given(a.steps, 1),
                                                     cfg=given(a.cfg, 1.0), restarts=given(a.restarts, 0),
                                                     grid_shift=given(a.grid_shift, 1),
                                                     last_rolls=given(a.last_rolls, 1), eta=given(a.eta, 0.0)))
        except ValueError as e:
            raise ValueError(re.sub(r"\b(sample_steps|cfg|restarts|grid_shift|last_rolls|eta)\b", lambda m: FLAGS[m[1]],
                                    str(e))) from None
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
            for p in filter(None, prompts):
                evals.parse_shapes_caption(p)
        hp, model, run_dir = load_model(a.ckpt, ema=not a.no_ema)
        if prompts is not None and not a.out:  # the run's folder by default
            a.out = str(run_dir / "sampled")
            print(f"--out not given: writing to {a.out}")
        if a.export_diffusers:
            grids = sorted(Path(run_dir, "samples").glob("*.png"), key=lambda p: p.stat().st_mtime)[-1:]
            card = model_card(hp, find_checkpoint(a.ckpt), run_dir, bool(grids), ema=not a.no_ema)
            export_diffusers(model, hp, a.export_diffusers, None if a.transformer_only else
                             text_encoder_path(hp, run_dir), torch.bfloat16 if a.dtype == "bf16" else torch.float32,
                             None if a.transformer_only else card, None if a.transformer_only else (grids or [None])[0])
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
        if not hp.text_encoder and prompts and (unknown := unknown_words(text.tok, prompts)):
            print(f"warning: the demo's text encoder does not know {' '.join(map(repr, unknown))} (read as "
                  f"{text.tok.unk_token}: its vocabulary is the words of the shapes data)", file=sys.stderr)
    except (FileNotFoundError, ValueError, OSError) as e:
        T.fail(e)
    cfg = hp.cfg if a.cfg is None else a.cfg
    restarts = hp.restarts if a.restarts is None else a.restarts
    if a.eval:  # the run's fixed evaluation, with --steps, --cfg, --cfg-interval, --restarts, --size if given
        hp = dataclasses.replace(hp, sample_steps=a.steps or hp.sample_steps, cfg=cfg, cfg_lo=interval[0],
                                 cfg_hi=interval[1], restarts=restarts)
        m = T.evaluate(model.to(dev), text, hp, T.prepare_eval(hp, dev), size, run_dir / "eval_ref", dev, a.batch,
                       progress=True)
        print("eval " + " ".join(f"{k}:{v:.4g}" for k, v in m.items()))
        return m
    out, done, kept = Path(a.out), [], []  # done: line indices written; kept: 8-bit copies of the first 64 (all with
    # --score, which judges the small shapes images)
    kw = dict(size=(h, w), steps=a.steps or hp.sample_steps, cfg=cfg, shift=hp.t_shift, t_min_div=hp.t_min_div,
              sampler=a.sampler, device=dev, amp=hp.amp, cfg_interval=interval,
              restarts=(restarts, hp.restart_lo, hp.restart_hi),
              grid_shift=(hp.grid_shift if a.grid_shift is None else a.grid_shift,
                          hp.last_rolls if a.last_rolls is None else a.last_rolls),
              eta=(hp.eta if a.eta is None else a.eta, hp.eta_lo))
    model = model.to(dev)
    if a.tread_guidance is not None:  # no TREAD in the run: half the tokens routed
        model, kw["cfg"] = tread_guided(model, a.tread_guidance, hp.tread_frac or 0.5, interval), 1.0
    from PIL import Image
    n = sum(1 for p in prompts if p)
    try:  # each batch's PNGs are written as soon as it is sampled: a crash keeps them, memory stays one batch
        for i, img in sample_lines(model, text, prompts, a.seed, a.batch, **kw):
            u8 = support.to_uint8(img[None])[0]  # (H, W, 3)
            Image.fromarray(u8).save(out / f"{i:05d}.png")
            done.append(i)
            if len(done) % a.batch == 0 or len(done) == n:  # progress on stderr, one line rewritten
                print(f"\rsampled {len(done)}/{n} images", end="\n" if len(done) == n else "", file=sys.stderr,
                      flush=True)
            if a.score or len(kept) < 64:
                kept.append(u8)
        grid = torch.from_numpy(np.stack(kept[:64])).permute(0, 3, 1, 2) / 127.5 - 1
        support.save_grid(grid, out / "grid.png", nrow=8, captions=[prompts[i] for i in done[:64]])
    except OSError as e:  # e.g. a full disk
        T.fail(f"writing {out} failed ({e.strerror or e}); free space or choose another --out (images written so "
               "far are kept)")
    skipped = len(prompts) - len(done)
    note = f" ({skipped} blank lines skipped; PNGs keep the line numbers)" if skipped else ""
    print(f"{len(done)} images in {out}{note}")
    if a.score:
        sc = evals.score_shapes(kept, [prompts[i] for i in done])
        print("shapes score: " + " ".join(f"{k}:{v:.3f}" for k, v in sc.items() if k != "per_image"))


if __name__ == "__main__":
    main(sys.argv[1:])
