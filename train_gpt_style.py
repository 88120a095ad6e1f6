"""prx-speedrun: the PRX 24-hour text-to-image recipe in one hackable file.

Pixel-space x-prediction flow matching with the PRX simplified MMDiT, TREAD token routing, REPA alignment to
DINOv3, LPIPS and DINOv2 perceptual losses, Muon, and a two-stage schedule (512 px, then 1024 px).

    torchrun --standalone --nproc_per_node=8 train_gpt_style.py        # the record configuration
    python data_prep.py shapes && python train_gpt_style.py            # no GPU: the built-in CPU demo
    python train_gpt_style.py lr=2e-4 stage1.steps=500 run_dir=runs/x  # any constant, as name=value

It reads in the order of the work, each technique one section with the constant that switches it off (README
"Hacking"). Plumbing lives in support.py, the fixed evaluations in evals.py: leaf modules, imported from here.
"""
import copy
import dataclasses
import datetime
import functools
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

import evals  # a leaf module: the fixed evaluations (FID, FD-DINOv2, DINO-MMD, CMMD, validation loss, shapes score)
import support  # a leaf module: the plumbing (shard format and checks, crash-safe files, loader workers)

# ----------------------------------------------------------------------------------------------------------------
# Constants: the interface. Edit here, or override any of them on the command line as name=value.


@dataclass
class Stage:
    res: int  # image side in pixels (square crops; aspect buckets come with the data)
    batch: int  # global batch, fixed whatever the number of GPUs
    micro_batch: int  # per-device batch; grad accumulation = batch / (world * micro_batch)
    steps: int  # optimizer steps in this stage
    repa: bool  # REPA alignment on in this stage
    data: str = ""  # this stage's shards (e.g. a conversion at its res: 3x less decoding); "": the run's data


@dataclass
class Hyperparameters:
    preset: str = "record"  # "record" (8xH100) or "cpu" (the demo; chosen automatically without CUDA)
    run_dir: str = ""  # where the run writes; default runs/<date-time>
    resume: str = "auto"  # "auto": continue from run_dir's newest checkpoint when there is one; "off"
    init: str = ""  # the DiT's weights to start from (fresh optimizer, clock): run, checkpoint or diffusers folder
    seed: int = 0
    # data and text
    data: str = "data/shapes"  # folder of parquet shards written by data_prep.py; <data>/heldout: the eval reference
    text_encoder: str = "google/t5gemma-2b-2b-ul2"  # hub id or local folder; T5Gemma-2B encoder, 2304-d
    text_len: int = 256  # tokens per caption at most (a batch is padded to its longest caption's, masked)
    text_online: bool = False  # record: encode captions every step when a data folder has no text_emb/ (slower)
    text_keep: int = 0  # no text_emb/, at most this many distinct captions (the demo: 9,892): each encoded at start
    text_sort: bool = True  # with text_emb/: micro-batches of similar caption lengths, less padding (docs/systems.md)
    num_workers: int = 8  # image decoding processes per rank
    aspect_max: float = 2.0  # aspect-ratio buckets span ratios 1/aspect_max..aspect_max (1: square crops only)
    # model: PRX simplified MMDiT, 1.2B at the record size
    hidden: int = 1792
    depth: int = 16
    heads: int = 28  # head dim 64 = two RoPE axes of 32
    mlp_ratio: float = 3.5
    patch: int = 32  # pixel patches: 256 tokens at 512 px
    bottleneck: int = 256  # img_in: 3*32*32 -> 256 -> hidden
    text_dim: int = 2304  # text encoder width (T5Gemma-2B)
    # diffusion
    t_shift: float = 3.0  # timestep shift s: t -> s t / (1 + (s - 1) t), toward noise
    uniform_t: float = 0.1  # fraction of samples with plain uniform t
    stratified_t: bool = False  # the batch's t one per quantile slice, shuffled: same law, less noise (PRX: i.i.d.)
    t_min_div: float = 0.05  # clamp of t when converting x0 to velocity in sampling and the validation loss
    loss_t_min: float = 0.05  # the training loss's clamp: the x0 error weighs 1/max(t, loss_t_min)^2 (PRX: 0.05)
    caption_dropout: float = 0.1  # for classifier-free guidance
    # TREAD token routing (training only)
    tread_frac: float = 0.5  # fraction of image tokens that skip the routed blocks; 0 disables
    tread_start: int = 2  # first routed block (0-indexed)
    tread_end: int = 12  # last routed block (inclusive)
    # REPA (stage flag decides when)
    repa_weight: float = 0.5  # loss -w * cosine; 0 disables
    repa_block: int = 7  # align the output of this block (0-indexed)
    repa_encoder: str = "facebook/dinov3-vitl16-pretrain-lvd1689m"
    repa_online: bool = False  # record: DINOv3 every step when a REPA stage's data has no repa/ targets (slower)
    # perceptual losses on predicted x0
    lpips_weight: float = 0.1  # LPIPS-VGG on 0.5x images; 0 disables
    pdino_weight: float = 0.01  # 1 - cosine of DINOv2 patch features; 0 disables
    pdino_encoder: str = "facebook/dinov2-with-registers-base"
    pdino_res: int = 224  # P-DINO input side
    perc_frac: float = 1.0  # fraction of each micro-batch that gets the perceptual losses
    # optimisation
    muon: bool = True  # Muon for the blocks' matrices; 0: Adam for every parameter
    normuon: bool = False  # NorMuon: each row of Muon's update divided by its running RMS (PRX: plain Muon)
    lr: float = 1e-4  # Muon and Adam alike
    warmup: int = 1000  # linear warm-up steps, then constant
    cooldown: float = 0.0  # fraction of the last stage's final steps with linear decay to 0
    grad_clip: float = 0.2  # global gradient-norm clip (PRX); inf: none
    ema_decay: float = 0.999  # EMA of the weights, used for samples and evaluation; 0: the live weights
    ema_every: int = 10  # steps between EMA updates
    stage_switch: str = "carry"  # a later stage's start: carry on, reset (new optimiser states, warm-up), reset_ema
    # systems
    compile: bool = True  # torch.compile the denoiser and the frozen encoders
    amp: bool = True  # bf16 autocast (weights stay fp32), Muon in bf16; under torchrun FSDP gathers bf16 weights
    shard_size: int = 0  # torchrun: processes per FSDP shard group, replicated across groups; 0 = LOCAL_WORLD_SIZE
    reshard: bool = False  # FSDP: free gathered weights after forward (less memory, one more all-gather)
    recompute: str = ""  # blocks recomputed in backward (activation checkpointing): "0-3,7", "all"; "": none
    sdpa: str = "flash,efficient,cudnn,math"  # GPU attention kernels in training, first usable wins (PyTorch's order)
    peak_tflops: float = 989.0  # device bf16 dense peak for utilisation (H100 SXM; H200 the same)
    bench: int = 0  # bench=N: time N micro-steps per stage on synthetic data, print throughput, exit
    bench_devices: int = 8  # the bench also projects the schedule's wall-clock onto this many devices
    # logging, sampling, checkpoints (none of them counted in the training clock)
    log_every: int = 50  # steps between log lines (the only host syncs of the loop)
    sample_every: int = 5000  # steps between sample grids; 0: only at the end of each stage
    sample_prompts: str = ""  # the grids' prompts, one per line; "": FIXED_PROMPTS (the demo: its prompt files')
    tracker: str = "none"  # also send metrics and grids to tensorboard (run_dir/tensorboard) or wandb (docs/log.md)
    ckpt_every: int = 2000  # steps between checkpoints; 0: only at the end
    keep_ckpts: int = 3  # newest step checkpoints kept in run_dir/ckpt; 0 keeps all
    time_limit: float = 0.0  # seconds of wall-clock from start (e.g. a job's limit): stops with a checkpoint before
    max_bad_steps: int = 20  # non-finite steps in a row (each skipped) before the run stops; seen at log steps
    sample_steps: int = 50  # Euler steps when sampling (PRX evaluations use 50)
    cfg: float = 3.5  # classifier-free guidance scale on x0 (PRX evaluations use 3.5)
    cfg_lo: float = 0.0  # guidance interval: guide only for t in [cfg_lo, cfg_hi], elsewhere conditional only
    cfg_hi: float = 1.0  # (Kynkaanniemi et al. 2024); the full range [0, 1] is plain CFG
    restarts: int = 0  # restart sampling: this many times, noise the image at t = restart_lo back to restart_hi
    restart_lo: float = 0.05  # and solve down again (Xu et al. 2023); each restart adds the steps between them
    restart_hi: float = 0.4  # (the record samples without: restarts=0)
    grid_shift: int = 0  # each sampling step rolls the image up to this many px (random) before the DiT, and back:
    # the patch seams fall elsewhere every step (docs/sampling.md); 0: none
    last_rolls: int = 1  # with grid_shift: the last step's x0 is the mean over this many rolls (docs/sampling.md)
    eta: float = 0.0  # 0: Euler. Else x_s = (1 - s) x0 + s (sqrt(1 - eta^2) eps + eta fresh noise), eps: the step's
    eta_lo: float = 0.5  # predicted noise; from t = eta_lo up (objects take their place there; docs/sampling.md)
    # evaluation (docs/evaluation.md): fixed prompts, seeds, steps and CFG; not counted in the training clock
    eval_every: int = 10_000  # steps between evaluations, and at the last step; 0: none
    eval_n: int = 10_000  # images generated and reference images (the first eval_n of <data>/heldout)
    eval_seed: int = 0  # image i starts from the noise of eval_seed + i
    eval_prompts: str = ""  # file, one prompt per line; "": the captions of the held-out reference images
    eval_inception: str = "timm/inception_v3.tf_in1k"  # FID: a timm id or folder (not the TF-FID weights); "" skips
    eval_dino: str = "facebook/dinov2-large"  # FD-DINOv2: CLS features of DINOv2-L/14 at 224 px; "" skips
    eval_dino_mmd: str = "facebook/dinov2-with-registers-large"  # PRX's DINO-MMD: DINOv2-L/14-reg at 518 px; "" skips
    eval_clip: str = "openai/clip-vit-large-patch14-336"  # CMMD and CLIP score; "" skips both
    stages: list = field(default_factory=lambda: [
        Stage(res=512, batch=1024, micro_batch=32, steps=100_000, repa=True),
        Stage(res=1024, batch=512, micro_batch=8, steps=20_000, repa=False),
    ])


# The CPU demo: the same code path at toy scale on 2 cores: 9-10 min with bf16 instructions, 11-30 min in fp32
# without them (docs/demo.md). Its encoders are tiny random models of the real transformers classes; a text encoder
# 128 wide (text_dim) beat 64 wide on both seeds and every prompt set (the held-out gain within another draw's spread).
PRESETS = {
    "record": {},
    "cpu": dict(
        data="data/shapes", text_encoder="", repa_encoder="", pdino_encoder="", text_len=24, text_keep=20_000,
        num_workers=0, hidden=128, depth=6, heads=4, patch=8, bottleneck=64, text_dim=128,  # 16 / 64 tokens per image
        t_shift=1.0,  # no shift at 16-64 tokens (3 is for 256-1024); stratified_t: no gain on five seeds
        loss_t_min=0.3,  # less weight below t = 0.3, so more on mid noise, where outlines are decided (docs/demo.md)
        tread_frac=0.5, tread_start=1, tread_end=2, repa_block=1, repa_weight=0.1,
        # LPIPS and P-DINO off: with random VGG/DINOv2 features they cost 25 % of the step (docs/demo.md)
        lpips_weight=0.0, pdino_weight=0.0, pdino_res=56, perc_frac=0.125, lr=4e-3,  # 2.4M parameters: a large rate
        normuon=True,  # Muon's update with each row over its running RMS: learns more per step (docs/demo.md)
        warmup=100, cooldown=0.5, ema_decay=0.0, ema_every=1,  # the "EMA": each step's live weights, which won
        compile=False, amp=support.cpu_has_bf16(),  # compile: minutes, no faster; bf16 only with bf16 instructions
        log_every=50, sample_every=0, ckpt_every=500, sample_steps=20, eval_every=0,  # the shapes score judges it
        cfg=3.0, cfg_lo=0.3, restarts=4,  # guided below t = 0.3 outlines come out lumpier; restarts mend (docs/demo.md)
        grid_shift=4, eta=1.0,  # seams moved (lumps); fresh noise from t = 0.5: no squares stretched (docs/demo.md)
        last_rolls=8,  # the last x0 (the image) a mean over 8 rolls: one roll's seams weigh 1/8 (docs/demo.md)
        # stage 1 is a cheap warm start; most steps go to the judged 64 px, where positions must be relearnt. 6 blocks
        # for fewer steps beat 4 blocks for more in the same training time, on both seeds (docs/demo.md); 1,420 stage-2
        # steps: 120 more in the time that text_keep saves
        stages=[Stage(res=32, batch=64, micro_batch=64, steps=360, repa=True),
                Stage(res=64, batch=64, micro_batch=64, steps=1420, repa=False)],
    ),
}


def fail(msg):
    """The one error form: one clear line on stderr and exit code 2, no traceback; every check of the file ends here."""
    print("error: " + " ".join(str(msg).split()), file=sys.stderr)  # one line, whatever the message holds
    sys.exit(2)


def parse_args(argv, cuda_available):  # name=value overrides (support.parse_constants) -> Hyperparameters, checked
    hp = support.parse_constants(argv, Hyperparameters, Stage, PRESETS, "record" if cuda_available else "cpu")
    support.check_config(hp)
    return hp


# ----------------------------------------------------------------------------------------------------------------
# Model: PRX simplified MMDiT. Parameter names map one to one onto diffusers' PRXTransformer2DModel.
# Text tokens are projected once and never updated; image tokens are the only queries.


def patchify(x, p):  # (B, C, H, W) -> (B, H/p * W/p, C*p*p), patch order (c, ph, pw)
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(x, p, H, W):  # inverse of patchify
    B, N, D = x.shape
    x = x.reshape(B, H // p, W // p, D // (p * p), p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, D // (p * p), H, W)


def rope_angles(h, w, head_dim, theta=1e4, device=None):
    """2-D RoPE angles of a (h, w) patch grid: (h*w, head_dim/2); first half from rows, second from columns."""
    axis = head_dim // 2  # 32 per axis at head dim 64
    freqs = theta ** (-torch.arange(0, axis, 2, dtype=torch.float64, device=device) / axis)  # (axis/2,)
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    ang = torch.cat([rows.reshape(-1, 1) * freqs, cols.reshape(-1, 1) * freqs], dim=-1)
    return ang.float()


def apply_rope(x, cos, sin):  # x (B, H, N, Dh); cos/sin (B or 1, 1, N, Dh/2); rotates adjacent pairs
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack([cos * x1 - sin * x2, sin * x1 + cos * x2], dim=-1)
    return out.flatten(-2).type_as(x)


def token_context(ang, txt_mask):
    """What a block needs to know of its image tokens' places: RoPE cos/sin (B or 1, 1, N, Dh/2) from their angles
    (B or 1, N, Dh/2), and the attention mask (B, 1, 1, L + N) over [text; image] keys."""
    ones = torch.ones(txt_mask.shape[0], ang.shape[1], dtype=torch.bool, device=txt_mask.device)
    return ang.cos()[:, None], ang.sin()[:, None], torch.cat([txt_mask, ones], dim=1)[:, None, None]


def timestep_embedding(t, dim=256, max_period=1e4, scale=1000.0):  # (B,) in [0, 1] -> (B, dim), cos first
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = scale * (t.float()[:, None] * freqs[None])
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.img_qkv_proj = nn.Linear(dim, 3 * dim, bias=False)
        self.txt_kv_proj = nn.Linear(dim, 2 * dim, bias=False)
        self.norm_q = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.norm_k = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.norm_added_k = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=False)])

    def forward(self, x, txt, cos, sin, mask):  # x (B, N, D), txt (B, L, D), mask (B, 1, 1, L + N) bool
        B, N, D = x.shape
        q, k, v = self.img_qkv_proj(x).view(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        tk, tv = self.txt_kv_proj(txt).view(B, -1, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        dt = v.dtype  # norms (fp32 weights too: FSDP gathers bf16 ones) and RoPE in fp32
        fp32 = lambda norm, x: F.rms_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.eps)
        q, k, tk = fp32(self.norm_q, q), fp32(self.norm_k, k), fp32(self.norm_added_k, tk).to(dt)  # (B, H, N, Dh)
        q, k = apply_rope(q, cos, sin).to(dt), apply_rope(k, cos, sin).to(dt)
        k, v = torch.cat([tk, k], dim=2), torch.cat([tv, v], dim=2)  # keys/values: [text; image]
        out = support.attention(q, k, v, mask)  # (B, H, N, Dh): SDPA on a GPU, the explicit product on CPU
        return self.to_out[0](out.transpose(1, 2).reshape(B, N, D))


class Modulation(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.lin = nn.Linear(dim, 6 * dim)

    def forward(self, vec):  # (B, D) -> 6 x (B, 1, D): (shift, scale, gate) for attention, then for the MLP
        return self.lin(F.silu(vec))[:, None].chunk(6, dim=-1)


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.attention = Attention(dim, heads)
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.modulation = Modulation(dim)

    def forward(self, x, txt, vec, cos, sin, mask):
        a_shift, a_scale, a_gate, m_shift, m_scale, m_gate = self.modulation(vec)
        h = (1 + a_scale) * F.layer_norm(x, x.shape[-1:], eps=1e-6) + a_shift  # LayerNorms carry no parameters
        x = x + a_gate * self.attention(h, txt, cos, sin, mask)
        h = (1 + m_scale) * F.layer_norm(x, x.shape[-1:], eps=1e-6) + m_shift
        return x + m_gate * self.down_proj(F.gelu(self.gate_proj(h), approximate="tanh") * self.up_proj(h))


class TimeEmbed(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.in_layer = nn.Linear(256, dim)
        self.out_layer = nn.Linear(dim, dim)

    def forward(self, t):
        return self.out_layer(F.silu(self.in_layer(timestep_embedding(t))))


class FinalLayer(nn.Module):
    def __init__(self, dim, out_dim):
        super().__init__()
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec)[:, None].chunk(2, dim=-1)
        return self.linear((1 + scale) * F.layer_norm(x, x.shape[-1:], eps=1e-6) + shift)


class PRXDiT(nn.Module):
    """Predicts x0 from (x_t, t, text)."""

    def __init__(self, hp):
        super().__init__()
        self.patch, self.head_dim = hp.patch, hp.hidden // hp.heads
        patch_dim = 3 * hp.patch ** 2
        self.img_in = nn.Sequential(nn.Linear(patch_dim, hp.bottleneck), nn.Linear(hp.bottleneck, hp.hidden))
        self.time_in = TimeEmbed(hp.hidden)
        self.txt_in = nn.Linear(hp.text_dim, hp.hidden)
        self.blocks = nn.ModuleList([Block(hp.hidden, hp.heads, hp.mlp_ratio) for _ in range(hp.depth)])
        self.final_layer = FinalLayer(hp.hidden, patch_dim)
        self.tread = (hp.tread_start, hp.tread_end)
        self.recompute = support.block_set(hp.recompute, hp.depth)  # these blocks keep only their inputs for backward
        self.initialize_weights()

    def initialize_weights(self):  # PRX's: PyTorch's default init of every layer (beat DiT's Xavier on the demo), but
        zero = [b.modulation.lin for b in self.blocks]  # adaLN-Zero: every block starts as the identity
        zero += [self.final_layer.adaLN_modulation[1], self.final_layer.linear]  # and the output is 0
        for w in [w for lin in zero for w in (lin.weight, lin.bias)]:
            nn.init.zeros_(w)

    def forward(self, x, t, txt, txt_mask, keep=None, hook=-1):
        """x (B, 3, H, W) noisy image, t (B,), txt (B, L, text_dim), txt_mask (B, L) bool.
        keep (B, K) long: the image tokens that go through the TREAD-routed blocks; None = all.
        -> x0 (B, 3, H, W), and (tokens (B, n, D), their indices (B, n) or None for all) after block `hook`."""
        B, _, H, W = x.shape
        img = self.img_in(patchify(x, self.patch))  # (B, N, D)
        txt = self.txt_in(txt)  # (B, L, D), computed once for every block
        vec = self.time_in(t)  # (B, D)
        ang = rope_angles(H // self.patch, W // self.patch, self.head_dim, device=x.device)[None]  # (1, N, Dh/2)
        ctx = token_context(ang, txt_mask)  # RoPE and attention mask of the tokens a block sees
        ids = None  # which tokens those are (TREAD); None: all
        hooked = None
        for i, block in enumerate(self.blocks):
            if keep is not None and i == self.tread[0]:
                img, ctx, stash = tread_route(img, keep, ang, txt_mask)
                ids = keep
            if i in self.recompute and torch.is_grad_enabled():  # non-reentrant: works under compile and FSDP2
                # (backward must run under the forward's attention kernels, see train_step)
                img = torch.utils.checkpoint.checkpoint(block, img, txt, vec, *ctx, use_reentrant=False)
            else:
                img = block(img, txt, vec, *ctx)
            if i == hook:
                hooked = (img, ids)
            if keep is not None and i == self.tread[1]:
                img, ctx = tread_restore(stash, keep, img, ang, txt_mask)
                ids = None
        return unpatchify(self.final_layer(img, vec), self.patch, H, W), hooked


# ----------------------------------------------------------------------------------------------------------------
# TREAD: a random subset of image tokens skips the routed blocks tread_start..tread_end, training only (Krause et
# al. 2025). Off: tread_frac=0. The draw of `keep` is keyed on the data stream (batch_draws); PRXDiT.forward calls
# route before the first routed block and restore after the last.


def tread_keep(batch, n_tokens, frac, device, generator=None):
    """Indices (B, N - round(N*frac)) of the tokens that go through the routed blocks, sorted, fresh per sample."""
    n_keep = n_tokens - round(n_tokens * frac)
    scores = torch.rand(batch, n_tokens, device=device, generator=generator)
    return scores.argsort(dim=1)[:, :n_keep].sort(dim=1).values


def gather_tokens(x, ids):  # x (B, N, ...), ids (B, K) -> (B, K, ...)
    return x.gather(1, ids.view(*ids.shape, *[1] * (x.dim() - 2)).expand(-1, -1, *x.shape[2:]))


def tread_route(img, keep, ang, txt_mask):
    """-> the kept tokens (B, K, D), their block context (RoPE at their original positions, mask of K image keys),
    and the stash of all tokens that restore puts them back into."""
    return gather_tokens(img, keep), token_context(gather_tokens(ang.expand(len(keep), -1, -1), keep), txt_mask), img


def tread_restore(stash, keep, img, ang, txt_mask):  # the routed tokens come back unchanged -> (B, N, D), context
    return stash.scatter(1, keep[..., None].expand(-1, -1, stash.shape[-1]), img), token_context(ang, txt_mask)


# ----------------------------------------------------------------------------------------------------------------
# Diffusion: x-prediction with the loss in velocity space (JiT). The time convention, once for the whole file:
# x_t = (1 - t) * x0 + t * noise, so t = 1 is pure noise and sampling runs t from 1 to 0.


def shift_t(t, s):  # the timestep shift toward noise: s t / (1 + (s - 1) t)
    return s * t / (1 + (s - 1) * t)


def sample_t(batch, hp, device, generator=None):
    """Logit-normal t, shifted; a fraction uniform; clipped to [1e-3, 1 - 1e-3]. stratified_t: the normal and the
    uniform draw each put one value in each of `batch` equal-probability slices, shuffled (each sample's law kept)."""
    kw = dict(device=device, generator=generator)
    strata = lambda: (torch.randperm(batch, **kw) + torch.rand(batch, **kw)) / batch  # one in each [k/B, (k+1)/B)
    z = math.sqrt(2) * torch.erfinv((2 * strata() - 1).clamp(-1 + 1e-6, 1 - 1e-6)) if hp.stratified_t else None
    ln = shift_t(torch.sigmoid(torch.randn(batch, **kw) if z is None else z), hp.t_shift)
    uni = strata() if hp.stratified_t else torch.rand(batch, **kw)
    pick = torch.rand(batch, **kw) < hp.uniform_t
    return torch.where(pick, uni, ln).clamp(1e-3, 1 - 1e-3)


def add_noise(x0, noise, t):  # x_t = (1 - t) x0 + t noise; x0, noise (B, C, H, W), t (B,)
    return (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise


def velocity(x_t, x0, t, t_min_div):  # v = dx/dt = noise - x0 = (x_t - x0) / t, with t clamped from below
    return (x_t - x0) / t.clamp(min=t_min_div).view(-1, 1, 1, 1)


def flow_loss(x0_pred, x0, x_t, t, t_min_div):
    """Per-sample MSE of predicted and true velocity, i.e. mean (x0_pred - x0)^2 / max(t, t_min_div)^2: (B,)."""
    err = velocity(x_t, x0_pred.float(), t, t_min_div) - velocity(x_t, x0, t, t_min_div)
    return err.pow(2).mean(dim=(1, 2, 3))


@torch.no_grad()
def sample_images(model, txt, txt_mask, null_txt, null_mask, size, steps, cfg, shift, t_min_div,
                  generator=None, sampler="euler", x=None, cfg_interval=(0, 1), restart=(0.05, 0.4), renoise=(),
                  grid_shift=(0, 1), eta=(0.0, 0.5), noise=None):
    """Euler (or Heun) from t = 1 to 0 on the shifted schedule, classifier-free guidance on x0: x0_u + cfg (x0_c -
    x0_u), only for t in cfg_interval (Kynkaanniemi et al. 2024; elsewhere one conditional pass). Restart sampling
    (Xu et al. 2023), once per renoise[k] (B, 3, H, W): at the grid time next below restart[0] the image is noised
    back to the grid time next above restart[1] with the flow's own marginal and solved down again. The DiT sees the
    image rolled by up to grid_shift[0] px per axis (draws shared by all batches), x0 rolled back; the last step's x0:
    the mean over grid_shift[1] rolls. Steps from t >= eta[1] are stochastic: eta[0] of the predicted noise (in std)
    redrawn by noise() -> (B, 3, H, W). -> (B, 3, H, W). model(x, t, txt, mask) -> (x0, ...): the DiT or a wrapper."""
    B, dev = txt.shape[0], txt.device
    if x is None:
        x = torch.randn(B, 3, size[0], size[1], device=dev, generator=generator)
    ts = shift_t(torch.linspace(1, 0, steps + 1), shift)  # on the host: deciding where to guide needs no sync
    guided = [cfg_interval[0] <= t <= cfg_interval[1] and cfg != 1 for t in ts.tolist()]
    lo, hi = int((ts <= restart[0] + 1e-6).nonzero()[0]), int((ts >= restart[1] - 1e-6).nonzero()[-1])  # hi < lo
    order = list(range(lo)) + list(range(hi, lo)) * len(renoise) + list(range(lo, steps))  # the steps, in order
    fresh, t_host, ts = iter(renoise), ts.tolist(), ts.to(dev)  # t_host: the loop's decisions need no sync
    (txt, txt_mask), (null_txt, null_mask) = support.same_text_len((txt, txt_mask), (null_txt, null_mask))
    both_txt, both_mask = torch.cat([txt, null_txt.expand(B, -1, -1)]), torch.cat([txt_mask, null_mask.expand(B, -1)])

    (g, n_last), gen = grid_shift, torch.Generator().manual_seed(0)
    rolls = torch.randint(-g, g + 1, (len(order) + n_last - 1, 2), generator=gen).tolist() if g else [None] * len(order)

    def vel(x, i, roll):  # roll: None (grid_shift=0) costs no copies
        tt, xr = ts[i].expand(B), x.roll(roll, (2, 3)) if roll else x
        if guided[i]:
            x0c, x0u = model(torch.cat([xr, xr]), tt.repeat(2), both_txt, both_mask)[0].float().chunk(2)
            x0 = x0u + cfg * (x0c - x0u)
        else:
            x0 = model(xr, tt, txt, txt_mask)[0].float()
        return velocity(x, x0.roll([-r for r in roll], (2, 3)) if roll else x0, tt, t_min_div)

    for n, i in enumerate(order):
        if n and i != order[n - 1] + 1:  # a restart: x at ts[lo] back to ts[hi], x_t = (1 - t) x0 + t noise
            a = (1 - ts[hi]) / (1 - ts[lo])
            x = a * x + (ts[hi] ** 2 - (a * ts[lo]) ** 2).sqrt() * next(fresh)
        dt = ts[i + 1] - ts[i]
        rs = rolls[n:n + 1] + (rolls[len(order):] if n == len(order) - 1 else [])  # the last step: n_last rolls
        v = sum(vel(x, i, r) for r in rs) / len(rs)
        if sampler == "heun" and i + 1 < steps:  # no second evaluation at t = 0
            v = 0.5 * (v + vel(x + dt * v, i + 1, rs[0]))
        if eta[0] and t_host[i] >= max(eta[1], t_min_div) and i + 1 < steps:  # x + (1 - t) v: the predicted noise
            x = x + ts[i + 1] * (((1 - eta[0] ** 2) ** 0.5 - 1) * (x + (1 - ts[i]) * v) + eta[0] * noise())
        x = x + dt * v
    return x.clamp(-1, 1)


@torch.no_grad()
def generate(model, text, prompts, size, steps, cfg, shift, t_min_div, seed=0, batch=16, sampler="euler",
             device="cpu", amp=False, cfg_interval=(0, 1), restarts=(0, 0.05, 0.4), grid_shift=(0, 1), eta=(0.0, 0.5)):
    """Captions -> images (B, 3, H, W) in [-1, 1]. Prompt i draws its noise, then its restarts[0] restart noises
    (from restarts[1] back to restarts[2]), then its stochastic steps' (eta), from seed + i: an image does not depend
    on the batch it is in (but for float rounding: a batch of two can round one pixel one level apart in fp32)."""
    device = torch.device(device)
    null_txt, null_mask = text([""])
    outs = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(prompts[i:i + batch]))]
        draw = lambda: torch.stack([torch.randn(3, *size, generator=g) for g in gens]).to(device)  # noqa: E731
        noise = [draw() for _ in range(1 + restarts[0])]
        txt, mask = text(prompts[i:i + batch])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp), support.attention_backend(device):
            outs.append(sample_images(model, txt, mask, null_txt, null_mask, size, steps, cfg, shift, t_min_div,
                                      sampler=sampler, x=noise[0], cfg_interval=cfg_interval, restart=restarts[1:],
                                      renoise=noise[1:], grid_shift=grid_shift, eta=eta, noise=draw).float().cpu())
    return torch.cat(outs)


# Every training draw is keyed on the sample's position in the global data stream, never on the rank, so that
# 1, 2 or 8 processes (any micro-batch) train on the same noise, t, routing and caption dropout.
def stream_key(seed, pos, noise):  # generator seed for stream position pos: global-batch draws, or one noise
    return (2 * pos + noise + seed * 0x9E3779B9) % 2 ** 64  # CPU generators keep the low 32 bits: seed mixed in


def batch_draws(hp, batch, n_tok, pos, gen):
    """The draws of the global batch that starts at stream position pos, on gen's device, to be sliced per rank:
    caption dropout (G,) bool, t (G,), TREAD keep (G, K) or None."""
    gen.manual_seed(stream_key(hp.seed, pos, 0))
    drop = torch.rand(batch, device=gen.device, generator=gen) < hp.caption_dropout
    keep = tread_keep(batch, n_tok, hp.tread_frac, gen.device, gen) if hp.tread_frac > 0 else None
    return drop, sample_t(batch, hp, gen.device, gen), keep


def sample_noise(hp, shape, positions, gen):  # (B, C, H, W) noise of the samples at these B stream positions
    out = torch.empty(shape, device=gen.device)
    for i, pos in enumerate(map(int, positions)):  # B small launches, no host sync
        out[i].normal_(generator=gen.manual_seed(stream_key(hp.seed, pos, 1)))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Frozen encoders: text (T5Gemma), and the vision transformers of REPA (DINOv3) and P-DINO (DINOv2 with registers).
# Each loads by hub id or local folder through the same code path; the CPU demo builds tiny random ones
# (evals.build_demo_encoders), the bench random ones of the real architectures.

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class TextEncoder:
    """Frozen transformers encoder: captions, cleaned (support.clean_caption: as diffusers' PRXPixelPipeline) ->
    (last_hidden_state (B, L, D), padding mask (B, L) bool); L: the longest caption's support.text_pad_len."""

    def __init__(self, path, max_len, device, dtype):
        from transformers import AutoModel, AutoTokenizer
        self.tok = AutoTokenizer.from_pretrained(path)
        self.tok.padding_side = "right"  # Gemma's tokenizer pads on the left: real tokens first, positions from 0
        model = AutoModel.from_pretrained(path, dtype=dtype)
        self.model = (model.get_encoder() if hasattr(model, "get_encoder") else model).to(device).eval()
        self.model.requires_grad_(False)
        self.max_len, self.device = max_len, device
        self.dim = self.model.config.hidden_size
        self.kept = {}  # caption -> its real tokens' outputs (n, D), from keep(): a frozen encoder's never change

    def keep(self, captions, batch=64):  # encode each caption once, in the order given: a resume keeps the same
        for i in range(0, len(captions), batch):
            h, mask = self(captions[i:i + batch])
            self.kept.update((c, x[k]) for c, x, k in zip(captions[i:i + batch], h, mask))

    @torch.no_grad()
    def __call__(self, captions):
        if self.kept and all(c in self.kept for c in captions):  # the batch padded as below, from what keep() made
            rows = [self.kept[c] for c in captions]
            L = support.text_pad_len(max(map(len, rows)), self.max_len)
            n = torch.tensor([len(r) for r in rows], device=self.device)
            return torch.stack([F.pad(r, (0, 0, 0, L - len(r))) for r in rows]), \
                torch.arange(L, device=self.device) < n[:, None]
        ids = self.tok([support.clean_caption(c) for c in captions], truncation=True, max_length=self.max_len)
        L = support.text_pad_len(max(map(len, ids.input_ids)), self.max_len)
        b = self.tok.pad(ids, padding="max_length", max_length=L, return_tensors="pt").to(self.device)
        h = self.model(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state
        return h.float() * b.attention_mask[..., None], b.attention_mask.bool()


def load_encoder(name, fn, path, *args):  # fn(path, *args), or one line when path holds no model we can load
    try:
        return fn(path, *args)
    except (OSError, ValueError) as e:
        fail(f"cannot load {name} {path} ({support.brief(e, 160)}); set {name} to a folder holding "
             "the model or a hub id that can be downloaded")


def load_vit(path, device, dtype):
    from transformers import AutoModel
    return AutoModel.from_pretrained(path, dtype=dtype).to(device).eval().requires_grad_(False)


@functools.lru_cache
def imagenet_stats(device):  # made once per device: no host-to-device copy in the step
    return (torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1),
            torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1))


def vit_patch_tokens(vit, img01, size, mode):
    """Images in [0, 1] (B, 3, H, W) resized to `size` as PRX resizes (`mode` nearest or bilinear, no antialias),
    clamped to [0, 1] -> patch tokens (B, N, D) without CLS and registers."""
    x = F.interpolate(img01.float(), size=size, mode=mode).clamp(0, 1)
    mean, std = imagenet_stats(x.device)
    h = vit(pixel_values=((x - mean) / std).to(next(vit.parameters()).dtype)).last_hidden_state
    return h[:, 1 + getattr(vit.config, "num_register_tokens", 0):].float()


# ----------------------------------------------------------------------------------------------------------------
# REPA: align the tokens after block `repa_block` to frozen DINOv3 patch features of the clean image, in the stages
# with repa=True (Yu et al. 2025). Off: repa_weight=0. The projector is trained with the DiT (Adam).


class REPA(nn.Module):
    def __init__(self, hp, dino):
        super().__init__()
        self.dino = [dino]  # in a list: frozen, not a submodule (not trained, sharded or saved)
        self.block = hp.repa_block
        dim = dino.config.hidden_size
        self.proj = nn.Sequential(nn.Linear(hp.hidden, dim), nn.SiLU(), nn.Linear(dim, dim), nn.SiLU(),
                                  nn.Linear(dim, dim))  # 1792 -> 1024 -> 1024 -> 1024 with SiLU

    def forward(self, hooked, x0, patch, target=None):  # -> (B,) negative mean cosine over the tokens the hooked block
        tokens, ids = hooked  # saw; target: precomputed (B, N * E) bf16 from repa/ (data_prep.py encode-repa), or None
        if target is None:
            target = repa_targets(self.dino[0], x0, patch)
        target = target.to(x0.device, non_blocking=True).float().view(len(x0), -1, self.proj[-1].out_features)
        if ids is not None:  # a subset of the tokens went through that block (TREAD)
            target = gather_tokens(target, ids)
        return -F.cosine_similarity(self.proj(tokens).float(), target, dim=-1).mean(dim=1)


@torch.no_grad()
def repa_targets(dino, x0, patch):
    """Clean images (B, 3, H, W) in [-1, 1] -> DINOv3 patch features on the DiT's token grid (B, N, E).
    The image is resized by 16/patch (nearest, as PRX) so that DINOv3's 16-px patches line up with the DiT's."""
    H, W = x0.shape[-2:]
    p = dino.config.patch_size
    return vit_patch_tokens(dino, (x0 + 1) / 2, (H // patch * p, W // patch * p), "nearest")


# ----------------------------------------------------------------------------------------------------------------
# LPIPS: LPIPS-VGG between the predicted and the clean x0 at half size, at every t. Off: lpips_weight=0.


def load_lpips(device, pretrained):
    import lpips
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):  # a random VGG: the same one every time
        warnings.simplefilter("ignore")  # torchvision's "pretrained" deprecation chatter
        torch.manual_seed(0)
        m = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=not pretrained, verbose=False)
    return m.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)  # VGG's faster layout


def lpips_loss(lp, pred, x0):  # -> (B,)
    dt = next(lp.parameters()).dtype  # bf16 on GPU
    half = lambda x: F.interpolate(x.float(), scale_factor=0.5, mode="bilinear", align_corners=False).to(
        dt, memory_format=torch.channels_last)
    return lp(half(pred), half(x0)).flatten().float()


# ----------------------------------------------------------------------------------------------------------------
# P-DINO: 1 - cosine of frozen DINOv2 patch features of the predicted and the clean x0, at every t. Off: pdino_weight=0.


def pdino_loss(dino, pred, x0, res):  # -> (B,) mean over patches of 1 - cosine; PRX's bilinear resize, then clamp
    fp = vit_patch_tokens(dino, (pred + 1) / 2, (res, res), "bilinear")
    with torch.no_grad():
        ft = vit_patch_tokens(dino, (x0 + 1) / 2, (res, res), "bilinear")
    return (1 - F.cosine_similarity(fp, ft, dim=-1)).mean(dim=1)


# ----------------------------------------------------------------------------------------------------------------
# Muon for the 2-D weights inside the blocks, Adam for everything else; warm-up; clipping. Off: muon=0 (all Adam).


def newton_schulz(G, steps=5, eps=1e-7, dtype=torch.bfloat16):
    """Approximate orthogonalisation U V^T of G (..., m, n) (quintic iteration; Jordan et al. 2024), in `dtype`.
    Singular values go to ~[0.7, 1.2]; a leading batch dimension orthogonalises each matrix on its own."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(dtype)  # bf16 (amp) is enough for an approximate orthogonalisation, and twice as fast
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    tall = X.shape[-2] > X.shape[-1]
    X = X.mT if tall else X
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return (X.mT if tall else X).to(G.dtype)


def shard_rows(n, world):  # rows of each rank's shard of an n-row matrix: FSDP2 splits dim 0 like torch.chunk
    c = -(-n // world)
    return [min(c, max(0, n - r * c)) for r in range(world)]


def all_to_all(chunks, sizes, group):
    """chunks[k]: tensors for rank k; sizes[j]: the numels rank j sends here -> received pieces, j-major (flat)."""
    send = torch.cat([chunks[0][0].new_empty(0)] + [c.flatten() for cs in chunks for c in cs])
    recv = send.new_empty(sum(map(sum, sizes)))
    dist.all_to_all_single(recv, send, [sum(s) for s in sizes], [sum(c.numel() for c in cs) for cs in chunks],
                           group=group)
    return recv.split([n for s in sizes for n in s])


def orthogonalise(updates, shapes, group, ns_steps, dtype=torch.bfloat16):
    """Newton-Schulz of full matrices. updates[i]: this rank's rows of matrix i (global shape shapes[i]), sharded over
    `group` (None: whole matrices). Rank i % S of the group orthogonalises matrix i: one all-to-all brings each rank
    the full matrices it owns, one sends the results' rows back; matrices of one shape share a batched iteration."""
    n, S, me = len(shapes), group.size() if group else 1, group.rank() if group else 0
    rows = [shard_rows(s[0], S) for s in shapes]
    owned = [list(range(k, n, S)) for k in range(S)]  # matrices by owner
    mine = owned[me]
    full = dict(enumerate(updates))
    if S > 1:
        got = all_to_all([[updates[i] for i in owned[k]] for k in range(S)],
                         [[rows[i][j] * shapes[i][1] for i in mine] for j in range(S)], group)
        full = {i: torch.cat([got[j * len(mine) + m].view(-1, shapes[i][1]) for j in range(S)])
                for m, i in enumerate(mine)}
    by_shape = {}
    for i in mine:
        by_shape.setdefault(tuple(shapes[i]), []).append(i)
    for idx in by_shape.values():
        full.update(zip(idx, newton_schulz(torch.stack([full[i] for i in idx]), ns_steps, dtype=dtype).unbind(0)))
    if S == 1:
        return [full[i] for i in range(n)]
    back = all_to_all([[full[i].split(rows[i])[j] for i in mine] for j in range(S)],
                      [[rows[i][me] * shapes[i][1] for i in owned[k]] for k in range(S)], group)
    out = dict(zip([i for k in range(S) for i in owned[k]], back))  # pieces arrive by owner
    return [out[i].view(-1, shapes[i][1]) for i in range(n)]


class Muon(torch.optim.Optimizer):
    """Momentum, Nesterov, Newton-Schulz (normuon: then each row over its running RMS, the norm kept), the update
    scaled to AdamW's RMS: 0.2 * sqrt(max(rows, cols)). Parameters may be FSDP shards (DTensor, rows split over
    ranks): momentum and row statistics stay sharded, Newton-Schulz see `orthogonalise`."""

    def __init__(self, params, lr, momentum=0.95, ns_steps=5, dtype=torch.bfloat16, normuon=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, ns_steps=ns_steps, normuon=normuon))
        self.dtype = dtype  # Newton-Schulz's and its all-to-all's (bf16: half the bytes, the same result)

    @torch.no_grad()
    def step(self, closure=None):  # closure: unused, part of the optimizer interface (DCP calls step(closure=None))
        local = lambda t: t.to_local() if isinstance(t, DTensor) else t
        skip = getattr(self, "found_inf", None)  # as in torch's fused Adam: 1 leaves weights and momentum unchanged
        for g in self.param_groups:
            ps = [p for p in g["params"] if p.grad is not None]
            if not ps:
                continue
            grads = [local(p.grad) for p in ps]
            for p in [p for p in ps if "momentum_buffer" not in self.state[p]]:  # allocated once
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                if g["normuon"]:  # the rows' running mean square: a column, sharded as the rows are
                    self.state[p]["row_ms"] = torch.zeros_like(p[:, :1])
            bufs = [local(self.state[p]["momentum_buffer"]) for p in ps]
            if skip is not None:  # skipped: the buffers lerp onto themselves, the update is scaled to 0
                grads = [torch.where(skip > 0, b, gr) for b, gr in zip(bufs, grads)]
            torch._foreach_lerp_(bufs, grads, 1 - g["momentum"])
            nesterov = [n.to(self.dtype) for n in torch._foreach_lerp(grads, bufs, g["momentum"])]
            group = None
            if isinstance(ps[0], DTensor):  # the mesh dimension that splits rows
                group = ps[0].device_mesh.get_group([pl.is_shard() for pl in ps[0].placements].index(True))
            upd = orthogonalise(nesterov, [p.shape for p in ps], group, g["ns_steps"], self.dtype)
            if g["normuon"]:  # NorMuon (Li et al. 2025): each row over its running RMS, then the norm as before
                us, vs = [u.float() for u in upd], [local(self.state[p]["row_ms"]) for p in ps]
                for v, u in zip(vs, us):
                    # 0.05: the running mean square's decay 0.95 (the paper's beta2); a skipped step leaves it
                    v.lerp_(u.pow(2).mean(dim=1, keepdim=True), 0.05 if skip is None else 0.05 * (1 - skip))
                hats = [u / (v.sqrt() + 1e-8) for u, v in zip(us, vs)]
                norms = torch.stack([torch.stack([u.norm(), h.norm()]) for u, h in zip(us, hats)])
                if group is not None:  # a rank holds whole rows: a matrix's norm sums over its shard group
                    dist.all_reduce(norms.square_(), group=group)
                    norms.sqrt_()
                upd = [h * (n[0] / (n[1] + 1e-12)) for h, n in zip(hats, norms)]
            for p, u in zip(ps, upd):
                u = u if skip is None else u * (1 - skip)
                local(p).add_(u, alpha=-g["lr"] * 0.2 * math.sqrt(max(p.shape)))


def uses_muon(name, p):  # the blocks' matrices; the rest of the DiT and the REPA projector take Adam
    return name.startswith("blocks.") and p.ndim == 2


def build_optimizers(model, extra, hp):
    """Muon: 2-D weights in the blocks. Adam: in/out projections, embeddings, norms, biases, REPA projector."""
    muon = [p for n, p in model.named_parameters() if uses_muon(n, p) and hp.muon]
    adam = [p for n, p in model.named_parameters() if not (uses_muon(n, p) and hp.muon)]
    adam += [p for p in extra.parameters()]
    adam_opt = torch.optim.Adam(adam, lr=hp.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)
    dtype = torch.bfloat16 if hp.amp else torch.float32
    return [Muon(muon, lr=hp.lr, dtype=dtype, normuon=hp.normuon), adam_opt] if muon else [adam_opt]


def lr_factor(step, hp):
    """Linear warm-up at the start of the run (and of each stage with stage_switch=reset*), constant, and an optional
    linear cool-down to 0 over the final `cooldown` fraction of the last stage (an earlier stage ends at the full
    rate, which the next stage's would undo; on the demo's five seeds more held-out pairs came out right)."""
    ends = np.cumsum([st.steps for st in hp.stages])
    k = min(int(np.searchsorted(ends, step, side="right")), len(ends) - 1)  # the stage of this step
    cool = int(hp.cooldown * hp.stages[k].steps) if k == len(ends) - 1 else 0
    start = ends[k - 1] if k and hp.stage_switch != "carry" else 0  # where the warm-up starts
    warm = min(1.0, (step - start + 1) / max(1, hp.warmup))
    return float(warm * (min(1.0, (ends[k] - step) / cool) if cool else 1.0))


# ----------------------------------------------------------------------------------------------------------------
# EMA of the DiT's weights every ema_every steps, in fp32 (bf16 would lose the updates), sharded as the DiT is; samples,
# evaluations and ema.pt gather it. Off: ema_decay=0 (a copy of the live weights at each update).


@torch.no_grad()
def ema_update(ema, model, decay):  # each rank averages its own rows: the EMA is sharded like the model
    local = lambda ps: [p.to_local() if isinstance(p, DTensor) else p for p in ps]  # noqa: E731
    torch._foreach_lerp_(local(ema.parameters()), local(model.parameters()), 1 - decay)


def gathered(ema, hp):  # the EMA as one unsharded module (every rank takes part): samples, evaluations, ema.pt
    if not isinstance(next(ema.parameters()), DTensor):
        return ema.eval()
    with torch.device("meta"):
        full = PRXDiT(hp)
    full.load_state_dict({k: v.full_tensor() for k, v in ema.state_dict().items()}, assign=True)
    return full.requires_grad_(False).eval()


# ----------------------------------------------------------------------------------------------------------------
# Data: parquet shards (image {bytes, path}, caption, width, height) from data_prep.py. A global batch is one aspect
# bucket and the same images whatever the world size: a seeded bucket choice per batch (weighted by bucket size),
# one seeded permutation per epoch and bucket, cut into rank micro-batches. The position in the stream is a number
# of images, saved with the checkpoint. A bad row is replaced by its bucket's next row and counted by cause. The
# buckets (support.aspect_buckets): sides multiple of the patch, areas within 10 % of res^2, ratios up to aspect_max.


class ShardDataset(torch.utils.data.Dataset):
    """The training shards of a folder (support.py: format and checks), with their precomputed text embeddings and
    REPA targets when <folder>/text_emb/ and repa/ hold them (sidecars=False: neither). set_stage(res): each row's
    aspect bucket (from width/height; square without), and the REPA targets if computed on that stage's crops."""

    def __init__(self, folder, text_encoder="", text_dim=0, repa_encoder="", sidecars=True):
        self.root = Path(folder)
        self.files, self.rows, self.table = support.open_shards(folder)  # read in place (support.ShardRows)
        files = self.files if sidecars else []
        self.sizes = [self.table.column(c).to_numpy() if c in self.table.names else np.ones(len(self.table))
                      for c in ("width", "height")]
        captions = functools.partial(self.table.column, "caption")  # file k's captions, read when sidecars exist
        self.emb = support.open_text_emb(self.root, files, self.rows, captions, text_encoder, text_dim)
        self.has_emb = self.emb is not None
        self.lengths = self.emb.data.column("n_tokens").to_numpy() if self.has_emb else None  # for text_sort
        self.repa, self.repa_grid = support.open_repa_targets(self.root, files, self.rows, captions, repa_encoder)
        self.skipped = {}  # bad rows met by cause (make_loader counts them)

    def __len__(self):
        return len(self.table)

    def set_stage(self, res, patch, aspect_max, repa=False):  # -> row indices of each aspect bucket at this resolution
        self.targets = self.repa if repa and self.repa_grid == support.repa_grid(res, patch, aspect_max) else None
        self.buckets = support.aspect_buckets(res, patch, aspect_max)
        self.bucket_of = support.nearest_bucket(self.buckets, *self.sizes)
        self.groups = [np.flatnonzero(self.bucket_of == b) for b in range(len(self.buckets))]
        return self.groups

    def __getitem__(self, i):  # -> (uint8 (3, h, w), caption, (emb bytes, n_tokens) | None, REPA bytes | None, causes)
        from PIL import Image
        group = self.groups[self.bucket_of[i]]
        causes = []
        w, h = self.buckets[self.bucket_of[i]]
        for _ in range(len(group)):
            try:
                row = self.table[int(i)]
                img, cause = support.decode_image(row["image"], (w, h))
            except support.UnreadableGroup as e:  # garbled data in a shard: replaced as a bad image is, counted by file
                row, img, cause = {"caption": None}, None, f"unreadable:{e.file}"
            causes += [cause] if cause else []
            if img is not None and (row["caption"] or "").strip():
                break
            causes += [] if img is None else ["empty_caption"]
            i = group[(np.searchsorted(group, i) + 1) % len(group)]  # deterministic: the bucket's next row
        else:
            met = ", ".join(f"{c}: {causes.count(c)}" for c in dict.fromkeys(causes))
            raise support.NoUsableRow(f"no row of the {w}x{h} bucket of {self.root} has a decodable image and a "
                                      f"caption ({met}); check the shards with data_prep.py or remove them")
        W, H = img.size
        s = min(W / w, H / h)  # the centred box of the bucket's aspect ratio, resized to (w, h)
        box = ((W - w * s) / 2, (H - h * s) / 2, (W + w * s) / 2, (H + h * s) / 2)
        img = img.resize((w, h), Image.BICUBIC if s < 1 else Image.BOX, box=box)
        e = self.emb[int(i)] if self.has_emb else None  # row i of the sidecars (kept apart: joining the columns
        emb = (e["text_emb"], e["n_tokens"]) if e else None  # of thousands of files costs minutes at start)
        target = self.targets[int(i)]["repa"] if self.targets is not None else None  # the row it trains on: i
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1), row["caption"], emb, target, causes


def make_loader(ds, res, stage, start, hp, rank, world):  # -> (images, captions, text, REPA targets, slots), ...
    groups = ds.set_stage(res, hp.patch, hp.aspect_max, stage.repa and hp.repa_weight > 0)
    k = next(i for i, st in enumerate(hp.stages) if st is stage)
    first = sum(st.batch * st.steps for st in hp.stages[:k])  # the image position where this stage began
    sampler = support.StreamSampler(len(ds), hp.seed, start, stage.batch, stage.micro_batch, rank, world, groups, first,
                                    ds.lengths if hp.text_sort else None)
    collate = functools.partial(support.collate_batch, text_len=hp.text_len, text_dim=hp.text_dim)
    try:
        for imgs, captions, emb, targets, causes in torch.utils.data.DataLoader(
                ds, batch_sampler=sampler, num_workers=hp.num_workers, collate_fn=collate,
                pin_memory=torch.cuda.is_available(), persistent_workers=False, worker_init_fn=support.own_session,
                generator=torch.Generator().manual_seed(hp.seed),  # not the global RNG
                prefetch_factor=4 if hp.num_workers else None):
            for c in causes:  # counted as batches are consumed: the same counts for any num_workers
                ds.skipped[c] = ds.skipped.get(c, 0) + 1
            slots = torch.tensor(sampler.slots.popleft())  # the samples' places in the global batch: their draws
            yield imgs, captions, emb, targets, slots.pin_memory() if imgs.is_pinned() else slots
    except support.NoUsableRow as e:
        fail(e.line())


# ----------------------------------------------------------------------------------------------------------------
# Logging and checkpoints: the log is the record (source, versions, hardware, config, greppable step lines); a
# checkpoint is complete or absent (support.py: the log file that survives a full disk, atomic folders).


def save_checkpoint(run_dir, tag, state, bad_rows, m, optimizers, hp, env, log, final=False):
    """ckpt/<tag>/: the DiT, the REPA projector and the optimizers (sharded), ema.pt (the EMA weights and the config:
    what sample.py reads), extra.pt (the State, every rank's RNG states, the config). A failed save is logged and
    training goes on, unless it is the final one."""
    extra = dict(dataclasses.asdict(state), bad_rows=support.bad_row_counts(bad_rows, state.bad_rows),
                 config=dataclasses.asdict(hp), rng=support.all_ranks(support.rng_states(env.device)))  # load_plain
    files = {"ema.pt": dict(ema=gathered(m.ema, hp).state_dict(), config=dataclasses.asdict(hp)), "extra.pt": extra}
    err = support.write_checkpoint(Path(run_dir, "ckpt", tag), m.trainable, optimizers, files, hp.keep_ckpts)
    if err:  # training goes on without this one, unless it is the last
        msg = f"checkpoint {Path(run_dir, 'ckpt', tag)} not written ({err}); the last good one is " \
              f"{support.last_checkpoint(run_dir)}"
        log(msg + ("; stopping" if final else "; training continues"))
        if final:
            fail(msg)


def load_checkpoint(paths, state, m, optimizers, env, log):
    """Continue exactly where the newest loadable checkpoint of `paths` left off: weights, EMA, optimizers, State,
    RNG (the sharded state resharded to this run's world size)."""
    try:
        path, files = support.read_checkpoint(paths, m.trainable, optimizers,
                                              lambda f: support.load_full_state(m.ema, f["ema.pt"]["ema"]), log)
    except support.NotPlainData as e:
        fail(e)
    if path is None:
        fail(f"no checkpoint in {paths[0].parent} can be loaded: their files are damaged, or a constant that changes "
             "the trainable parameters or optimizer states (e.g. repa_weight, normuon) differs; use a new run_dir or "
             "move them away")
    ck = files["extra.pt"]
    for f in dataclasses.fields(State):
        setattr(state, f.name, ck[f.name])
    if len(ck["rng"]) == env.world:  # same world size: each rank continues its own random stream
        support.set_rng_states(ck["rng"][env.rank], env.device)
    else:  # the training draws are keyed on the data stream, not on these
        log(f"resuming on {env.world} ranks from a {len(ck['rng'])}-rank checkpoint: new global RNG streams")
    log(f"resumed from {path} at step {state.step}, image {state.data_pos}")
    log.metrics(dict(resumed_from=state.step, checkpoint=str(path)))  # rows of later steps before it: superseded


# ----------------------------------------------------------------------------------------------------------------
# The training loop: distributed setup, the models, train_step, and one flat loop whose clock stops around logging,
# sampling, evaluation and checkpoints.

FIXED_PROMPTS = [  # the record configuration's sample grid (fixed prompts and seeds)
    "a red fox sitting in fresh snow at sunrise, photograph", "a bowl of ramen with a soft-boiled egg, studio lighting",
    "an astronaut riding a horse on the moon, oil painting", "a cozy reading nook with a window and a sleeping cat",
    "a neon sign that says PRX above a rainy street at night", "a watercolor map of an imaginary island with mountains",
    "a close-up portrait of an old fisherman with a knitted hat", "three green apples on a wooden table, soft shadows",
]
LOSS_PARTS = ("flow", "repa", "lpips", "pdino")  # logged after the total loss, in this order
T_BINS = (0.3, 0.6)  # flow loss reported for t in [0, .3), [.3, .6), [.6, 1]
ARCH = ("hidden", "depth", "heads", "mlp_ratio", "patch", "bottleneck", "text_dim")  # what a checkpoint must match


@dataclass
class State:  # what a checkpoint's extra.pt holds, besides the RNG states and the config
    step: int = 0
    stage: int = 0  # index into hp.stages
    data_pos: int = 0  # images of the global data stream consumed
    train_time: float = 0.0  # seconds of training steps (each stage's first step, which compiles, is not timed)
    timed_steps: int = 0
    skipped: int = 0  # non-finite steps skipped
    bad_rows: dict = field(default_factory=dict)  # bad rows met by cause, all ranks, before this process


@dataclass
class Env:  # this process's place in the run
    rank: int
    world: int
    master: bool
    device: torch.device
    distributed: bool
    cpu_group: object = None  # gloo: the stop flags need no device sync
    notes: list = field(default_factory=list)  # what setup changed, logged once there is a log


@dataclass
class Models:  # what the run trains, and the frozen models it trains against
    model: nn.Module  # the DiT; its FSDP shards under torchrun
    forward: object  # the model, compiled
    ema: nn.Module
    text: TextEncoder
    null: tuple  # the empty caption's embedding and mask: caption dropout and CFG
    repa: REPA
    lpips: nn.Module
    pdino: nn.Module
    trainable: nn.ModuleDict  # what DCP saves
    sharded: list  # the FSDP roots


def setup_env(hp):
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else \
        torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:  # a device's share of a batch under its micro-batch lowers the micro-batch; the global batch stays
        notes = support.fit_micro_batches(hp.stages, world)
    except ValueError as e:
        fail(e)
    return Env(rank, world, rank == 0, device, distributed, dist.new_group(backend="gloo") if distributed else None,
               notes)


def open_run_dir(hp, env):
    """run_dir made and seen by every rank, its log opened, its checkpoints (oldest first) checked against resume
    and the architecture, all before any model is built. -> (run_dir, log, checkpoints)."""
    name = [hp.run_dir or f"runs/{datetime.datetime.now():%Y%m%d-%H%M%S}", os.urandom(8).hex()]
    if env.distributed:  # rank 0's clock names the run for everyone
        dist.broadcast_object_list(name, 0)
    run_dir = Path(name[0])
    try:
        log = support.open_log(run_dir, name[1], env.master, env.cpu_group, (hp.tracker, dataclasses.asdict(hp)))
    except ValueError as e:
        fail(e)
    cks = [] if hp.bench else sorted((run_dir / "ckpt").glob("step*"))
    if cks and hp.resume == "off":
        fail(f"run_dir {run_dir} holds checkpoints of an earlier run; use a new run_dir, or resume=auto to continue it")
    if err := support.architecture_error(cks, {k: getattr(hp, k) for k in ARCH}):  # the newest readable one's
        fail(err)
    return run_dir, log, cks


def load_data(hp, log):  # -> this run's ShardDataset of each stage (one per folder), the dict that counts bad rows
    folders = [os.path.normpath(st.data or hp.data) for st in hp.stages]
    datasets, bad_rows = {}, {}
    for d in dict.fromkeys(folders):  # each checked before any model is built
        try:
            ds = datasets[d] = ShardDataset(d, hp.text_encoder, hp.text_dim, hp.repa_encoder)
        except (FileNotFoundError, ValueError) as e:
            fail(str(e))
        ds.skipped = bad_rows  # the bad rows of every folder counted together, logged after each stage
        if not (ds.has_emb or hp.text_online or hp.preset == "cpu"):
            fail(f"{d} has no text_emb/: the record encodes its captions once (data_prep.py encode-text --shards {d}),"
                 " not every step; or set text_online=1 (the cost: data_prep.py budget text_online=1)")
        log(f"data: {len(ds)} images from {d} for stage {','.join(str(k) for k, f in enumerate(folders, 1) if f == d)}"
            f"; text embeddings {'precomputed (text_emb/)' if ds.has_emb else 'encoded every step (no text_emb/)'}; "
            f"REPA targets {f'of the crops {ds.repa_grid} (repa/)' if ds.repa else 'none'}{ds.table.note(d)}")
    for i, (st, d) in enumerate(zip(hp.stages, folders), 1):  # upscaled images would train silently
        if (res := support.converted_res(d)) and res < st.res:
            fail(f"stage{i} trains at {st.res} px but {d} was converted at {res} px (its meta.json): its images would "
                 f"be upscaled; convert the data at {st.res} px (data_prep.py hf --res {st.res}) and set stage{i}.data")
        grid = support.repa_grid(st.res, hp.patch, hp.aspect_max)  # the crops (res:patch:aspect_max) REPA sees
        if st.repa and hp.repa_weight and not (hp.repa_online or hp.preset == "cpu") and datasets[d].repa_grid != grid:
            fail(f"{d} has no REPA targets of stage{i}'s crops {grid} (repa/: {datasets[d].repa_grid or 'none'}): the "
                 f"record computes them once (data_prep.py encode-repa --shards {d}), not every step; or set "
                 "repa_online=1 (the cost: data_prep.py budget repa_online=1)")
    return [datasets[f] for f in folders], bad_rows


def build_models(hp, env, run_dir, log, init=None):
    """Frozen encoders (hub id or folder; the demo's tiny random ones, the bench's random ones of the real sizes), the
    DiT (weights from the state dict `init` if given), the REPA projector, the EMA; FSDP under torchrun; compile."""
    dev = env.device
    paths = [hp.text_encoder, hp.repa_encoder, hp.pdino_encoder]
    enc_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if hp.preset == "cpu" or hp.bench:
        vocab = ["a b c"] if hp.bench else [line for n in ("seen", "heldout") for line in
                                            Path(hp.data, f"prompts_{n}.txt").read_text().splitlines()] + ["and"]
        folder = run_dir / ("bench_encoders" if hp.bench else "demo_encoders")
        vits = evals.REAL_VITS if hp.preset != "cpu" else None  # the bench's: the real architectures
        demo = support.on_master(evals.build_demo_encoders, folder, hp, vocab, vits)
        paths = demo if hp.bench else [p or d for p, d in zip(paths, demo)]
    text = load_encoder("text_encoder", TextEncoder, paths[0], hp.text_len, dev, enc_dtype)
    if text.dim != hp.text_dim:
        fail(f"text encoder {paths[0]} has width {text.dim} but text_dim={hp.text_dim}; set text_dim")
    null = text([""])
    any_repa = hp.repa_weight > 0 and any(st.repa for st in hp.stages)
    dino3 = load_encoder("repa_encoder", load_vit, paths[1], dev, enc_dtype) if any_repa else None
    dino2 = load_encoder("pdino_encoder", load_vit, paths[2], dev, enc_dtype) if hp.pdino_weight else None
    real_vgg = hp.preset != "cpu" and not hp.bench  # the bench needs no weights (and no download)
    lp = load_lpips(dev, pretrained=real_vgg).to(enc_dtype) if hp.lpips_weight > 0 else None
    for frozen in (text.model, dino3, dino2, lp):  # replicated on every rank
        if frozen is not None and hp.compile:
            frozen.compile()
    model = PRXDiT(hp).to(dev)
    if init is not None:  # the weights to start from; the EMA copies them
        try:
            model.load_state_dict(init)
        except RuntimeError as e:  # the same architecture constants, another layout (another diffusers version)
            fail(f"init {hp.init} does not fit the DiT ({support.brief(e, 160)}); init a model of this trainer")
    repa = REPA(hp, dino3).to(dev) if any_repa else None
    trainable = nn.ModuleDict(dict(model=model, **(dict(repa=repa) if repa else {})))
    if env.distributed:  # same initial weights on every rank
        for p in trainable.parameters():
            dist.broadcast(p.data, 0)
    ema = copy.deepcopy(model).requires_grad_(False)  # fp32 (bf16 would lose updates); sharded as the model
    sharded = shard(hp, env, [model] + ([repa] if repa else []), log, ema) if env.distributed else []
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {hp.depth} blocks of width "
        f"{hp.hidden}, patch {hp.patch}")
    forward = torch.compile(model) if hp.compile else model
    return Models(model, forward, ema, text, null, repa, lp, dino2, trainable, sharded)


def shard(hp, env, roots, log, ema=None):
    """FSDP2: each block, then the rest of the DiT, and the REPA projector, sharded over `shard_size` ranks and
    replicated across shard groups (hybrid: shard within a node, replicate across nodes). -> the FSDP roots."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    size = hp.shard_size or int(os.environ.get("LOCAL_WORLD_SIZE", env.world))
    if env.world % size:
        fail(f"world size {env.world} is not a multiple of shard_size={size}; set shard_size to a divisor")
    shape = (env.world // size, size) if size < env.world else (size,)
    mesh = init_device_mesh(env.device.type, shape, mesh_dim_names=("replicate", "shard")[-len(shape):])
    # bf16 weights, fp32 gradient reduction; the forward's inputs stay as they are: cast to bf16, t (embedded at
    # scale 1000) and RoPE's cos/sin would differ from what the unsharded EMA sees when it samples
    mp = MixedPrecisionPolicy(torch.bfloat16, torch.float32, cast_forward_inputs=False) if hp.amp else \
        MixedPrecisionPolicy()
    for m in [*roots[0].blocks, *roots] + ([ema] if ema is not None else []):  # the EMA: its rows split alike
        fully_shard(m, mesh=mesh, reshard_after_forward=hp.reshard, mp_policy=mp)
    log(f"FSDP: {env.world} ranks, {env.world // size} x {size} (replicate x shard), reshard after forward "
        f"{hp.reshard}, {'bf16' if hp.amp else 'fp32'} weights gathered")
    return roots


def train_step(stage, batches, state, m, optimizers, hp, env, gen, health):
    """One optimizer step over the global batch (batches: this rank's micro-batches). -> device tensors, no host
    sync: sums (loss, LOSS_PARTS, flow summed per t-bin), counts per t-bin, gradient norm."""
    dev = env.device
    accum = stage.batch // (env.world * stage.micro_batch)
    sums, counts = torch.zeros(8, device=dev), torch.zeros(3, device=dev)
    weights = dict(flow=1.0, repa=hp.repa_weight, lpips=hp.lpips_weight, pdino=hp.pdino_weight)
    repa = m.repa if stage.repa else None
    for a in range(accum):
        for root in m.sharded:  # reduce-scatter gradients after the last micro-batch only, and (reshard=0) keep the
            root.set_requires_gradient_sync(a == accum - 1)  # gathered weights until then: one all-gather per step
            root.set_reshard_after_backward(a == accum - 1 or hp.reshard)
        imgs, captions, emb, targets, slots = next(batches)  # slots: the samples' places in the global batch
        if a == 0:  # the global batch is one aspect bucket: its token count shapes the TREAD draws
            n_tok = (imgs.shape[2] // hp.patch) * (imgs.shape[3] // hp.patch)
            drops, ts, keeps = batch_draws(hp, stage.batch, n_tok, state.data_pos, gen)
        x0 = imgs.to(dev, non_blocking=True).float() / 127.5 - 1  # (B, 3, H, W) in [-1, 1]
        B = x0.shape[0]
        if emb is not None:  # precomputed (ShardDataset)
            txt, mask = emb[0].to(dev, non_blocking=True).float(), emb[1].to(dev, non_blocking=True)
        else:
            txt, mask = m.text(captions)
        idx = slots.to(dev, non_blocking=True)
        drop, t = drops[idx], ts[idx]  # drop: caption dropout (for CFG)
        keep = keeps[idx] if keeps is not None else None
        null_txt, null_mask = support.pad_text(*m.null, txt.shape[1])  # the batch's text is at least as long
        txt = torch.where(drop[:, None, None], null_txt, txt)
        mask = torch.where(drop[:, None], null_mask, mask)
        x_t = add_noise(x0, sample_noise(hp, x0.shape, state.data_pos + slots, gen), t)
        nb = max(1, round(B * hp.perc_frac))  # perceptual losses on the first nb samples
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=hp.amp), support.attention_backend(dev, hp.sdpa):
            x0_pred, hooked = m.forward(x_t, t, txt, mask, keep, repa.block if repa else -1)
            flow = flow_loss(x0_pred, x0, x_t, t, hp.loss_t_min)  # (B,)
            parts = dict(flow=flow.mean())
            if repa:
                parts["repa"] = repa(hooked, x0, hp.patch, targets).mean()
            if m.lpips:
                parts["lpips"] = lpips_loss(m.lpips, x0_pred[:nb], x0[:nb]).mean()
            if m.pdino:
                parts["pdino"] = pdino_loss(m.pdino, x0_pred[:nb], x0[:nb], hp.pdino_res).mean()
            loss = sum(weights[k] * v for k, v in parts.items())
        with support.attention_backend(dev, hp.sdpa):  # recomputed blocks run their forward again: same kernels
            (loss / accum).backward()
        zero = torch.zeros((), device=dev)
        sums[:5] += torch.stack([loss] + [parts.get(k, zero) for k in LOSS_PARTS]).detach().float() / accum
        bins = sum((t >= edge).long() for edge in T_BINS)  # (B,) in 0..2, no host-to-device copy
        sums[5:].index_add_(0, bins, flow.detach().float())
        counts.index_add_(0, bins, torch.ones_like(t))
    # the optimizer step (gradients already averaged over ranks by FSDP): clip, schedule, step, EMA
    gnorm = torch.nn.utils.clip_grad_norm_([p for o in optimizers for g in o.param_groups for p in g["params"]],
                                           hp.grad_clip)
    gnorm = gnorm.full_tensor() if isinstance(gnorm, DTensor) else gnorm
    # A non-finite loss or gradient norm skips the update on the device, without a host sync: Adam (fused) and Muon
    # read found_inf and leave weights and states as they were. health: (current streak, longest, skipped steps).
    bad = (~(torch.isfinite(gnorm) & torch.isfinite(sums[0]))).float()
    if env.distributed:  # the loss differs per rank: skip on every rank or on none
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    health[0].add_(1).mul_(bad.long())
    torch.maximum(health[1], health[0], out=health[1])
    health[2].add_(bad.long())
    for o in optimizers:
        for g in o.param_groups:
            g["lr"] = hp.lr * lr_factor(state.step, hp)
        o.found_inf = bad
        o.step()
        o.zero_grad(set_to_none=True)
    if state.step % hp.ema_every == 0:
        ema_update(m.ema, m.model, hp.ema_decay)
    return sums, counts, gnorm


def sample(model, text, hp, prompts, res, seed=0, batch=16, device="cpu"):  # the constants' sampler -> (B, 3, res, res)
    return generate(model, text, prompts, (res, res), hp.sample_steps, hp.cfg, hp.t_shift, hp.t_min_div, seed, batch,
                    device=device, amp=hp.amp, cfg_interval=(hp.cfg_lo, hp.cfg_hi), eta=(hp.eta, hp.eta_lo),
                    restarts=(hp.restarts, hp.restart_lo, hp.restart_hi), grid_shift=(hp.grid_shift, hp.last_rolls))


def prepare_eval(hp, device):  # the fixed evaluation's models, reference images and prompts: a bad path fails now
    try:
        return evals.prepare_eval(hp, device, lambda: ShardDataset(Path(hp.data) / "heldout"))
    except (OSError, ValueError) as e:
        fail(f"evaluation: {e}")


def evaluate(model, text, hp, ev, res, cache_dir, device, batch=32, progress=False):  # docs/evaluation.md, all ranks
    gen = lambda prompts, seed: support.to_uint8(sample(model, text, hp, prompts, res, seed, batch, device))
    flow = (lambda x_t, t, c: model(x_t, t, *text(c))[0], add_noise, flow_loss, T_BINS)  # the validation loss's
    return evals.evaluate(hp, ev, gen, res, cache_dir, device, batch, progress, flow)


def score_demo(model, text, hp, run_dir, log, device="cpu"):
    """The shapes benchmark at the end of the CPU demo (fixed prompt files, seed, steps and CFG) -> per prompt set
    the fraction of images fully right and each attribute's accuracy over the objects."""
    result = {}
    for name in ("seen", "heldout", "two"):
        prompts = Path(hp.data, f"prompts_{name}.txt").read_text().splitlines()
        imgs = sample(model, text, hp, prompts, hp.stages[-1].res, seed=1234, batch=50, device=device)
        sc = evals.score_shapes(list(support.to_uint8(imgs)), prompts)
        result[name] = {k: sc[k] for k in ("full", "color", "position", "shape", "size")}
        support.write_grid(imgs[:32], run_dir / "samples" / f"eval_{name}.png", 8, log, prompts[:32])
        log(f"shapes score {name}: " + " ".join(f"{k}:{v:.3f}" for k, v in result[name].items()))
    return result


def train(hp):
    """The run: setup, then the loop over stages and steps -> (State, Models). bench=N: the same loop for N timed
    steps per stage (and two more that compile) on synthetic data, with random encoders; nothing saved."""
    timer = dict(t0=time.monotonic(), tick=time.monotonic(), ckpt_s=0.0)  # time_limit counts from here
    env = setup_env(hp)
    run_dir, log, cks = open_run_dir(hp, env)
    for note in env.notes:
        log(note)
    support.seed_all(hp.seed + env.rank)
    support.describe_run(log, __file__, dataclasses.asdict(hp), hp.preset == "cpu", env.device, env.world)
    support.quiet_transformers()  # no progress bars, info lines or two harmless warnings
    init = None  # weights only, read (and their architecture checked) before data and encoders; a resume wins
    if hp.init and not hp.bench:
        try:
            init = None if cks else support.read_init(hp.init, {k: getattr(hp, k) for k in ARCH})
        except (OSError, ValueError) as e:
            fail(e)
        log(f"init={hp.init} not used: resuming from {cks[-1]}" if cks else f"init: the DiT's weights from {hp.init}")
    datasets, bad_rows = load_data(hp, log) if not hp.bench else (None, {})
    m = build_models(hp, env, run_dir, log, init)
    online = [ds for ds in dict.fromkeys(datasets or []) if not ds.has_emb] if hp.text_keep else []  # no text_emb/
    captions = sorted({c for ds in online for c in ds.table.column("caption").to_pylist() if c and c.strip()})
    if len(captions) > hp.text_keep:
        log(f"text: {len(captions)} distinct captions, more than text_keep={hp.text_keep}: encoded every step")
    elif captions:  # a few distinct captions (the demo's): each encoded once, not in every step that draws it
        t0 = time.monotonic()
        m.text.keep(captions)
        log(f"text: the data's {len(captions)} distinct captions encoded once ({time.monotonic() - t0:.1f} s)")
    optimizers = build_optimizers(m.model, m.repa or nn.Module(), hp)
    ev = prepare_eval(hp, env.device) if hp.eval_every and not hp.bench else None  # a bad path fails now
    state = State()
    gen = torch.Generator(env.device)  # the training draws, reseeded per global batch and per sample
    if cks:  # resume=auto (with resume=off, open_run_dir refused them)
        load_checkpoint(cks, state, m, optimizers, env, log)
    health = torch.tensor([0, 0, state.skipped], device=env.device)  # non-finite steps: streak, longest, total
    grid = support.grid_prompts(hp, FIXED_PROMPTS)  # the sample grids' prompts
    bench_hours = []
    stages = support.bench_stages(hp, env.world) if hp.bench else hp.stages
    total = sum(st.steps for st in stages)
    timer.update(tick=time.monotonic(), ckpt_s=min(120.0, hp.time_limit / 10))  # until a checkpoint is measured
    stop = support.stop_reason(hp.time_limit, timer, env.cpu_group)  # a signal during setup: no step at all
    timer["loop"] = (time.monotonic(), state.train_time, state.step)  # the step lines' ETA counts overheads from here
    costs = [st.batch * support.dit_train_flops(hp, st.res) for st in stages]  # a step's FLOPs: ETAs across stages
    for k, stage in enumerate(stages):
        first_step = sum(st.steps for st in stages[:k])
        if state.step >= first_step + stage.steps or stop:
            continue  # a stage finished before the resume, or a stop
        state.stage = k
        if k and state.step == first_step and hp.stage_switch != "carry":  # docs/constants.md: the stage switch
            optimizers = build_optimizers(m.model, m.repa or nn.Module(), hp)  # fresh states; lr_factor warms up
            if hp.stage_switch == "reset_ema":
                ema_update(m.ema, m.model, 0.0)  # the EMA restarts from the live weights
        repa_dim = m.repa.proj[-1].out_features if m.repa and stage.repa else 0  # the REPA targets' width
        buckets = support.aspect_buckets(stage.res, hp.patch, hp.aspect_max)  # the bench's
        batches = support.synthetic_batches(stage, hp, env.world, buckets, repa_dim) if hp.bench else \
            make_loader(datasets[k], stage.res, hp.stages[k], state.data_pos, hp, env.rank, env.world)
        accum = stage.batch // (env.world * stage.micro_batch)
        step_flops = support.dit_train_flops(hp, stage.res, repa_dim)
        log(f"stage {k + 1}/{len(stages)}: {stage.res} px, batch {stage.batch} ({env.world} x {stage.micro_batch} x "
            f"{accum} accum), {stage.steps} steps, REPA {'on' if stage.repa and m.repa else 'off'}" +
            (f", stage_switch={hp.stage_switch}" if k else ""))
        clock = None  # None until this stage's first step (it compiles) has run: that step is not timed
        pending = 0  # steps run since the clock last stopped
        start = (state.train_time, state.timed_steps)  # at the stage's start, for the bench
        while state.step < first_step + stage.steps and not stop:
            sums, counts, gnorm = train_step(stage, batches, state, m, optimizers, hp, env, gen, health)
            state.step += 1
            state.data_pos += stage.batch
            pending += 1
            last = state.step == first_step + stage.steps
            stop = support.stop_reason(hp.time_limit, timer, env.cpu_group) if state.step < total else None
            log_now = state.step % hp.log_every == 0 or last or state.step == 1 or stop
            sample_now = not hp.bench and (hp.sample_every and state.step % hp.sample_every == 0 or last)
            ckpt_now = not hp.bench and (hp.ckpt_every and state.step % hp.ckpt_every == 0 or state.step == total or
                                         stop)
            eval_now = ev and (state.step % hp.eval_every == 0 or state.step == total) and not stop
            if log_now or sample_now or ckpt_now or eval_now or clock is None:  # stop the clock: sync the device
                if log_now:
                    if env.distributed:
                        dist.all_reduce(sums)
                        dist.all_reduce(counts)
                        sums[:5] /= env.world
                    s, c, gn = sums.tolist(), counts.tolist(), gnorm.item()  # host sync: these steps only
                    _, worst, state.skipped = health.tolist()
                elif torch.cuda.is_available():
                    torch.cuda.synchronize()
                if clock is not None:
                    state.train_time += time.perf_counter() - clock
                    state.timed_steps += pending
                pending = 0
            if log_now:
                avg = state.train_time / max(1, state.timed_steps)
                mfu = f"{100 * step_flops / avg / env.world / (hp.peak_tflops * 1e12):.1f}%" \
                    if env.device.type == "cuda" and state.timed_steps else "n/a"
                bins = [s[5 + i] / c[i] if c[i] else float("nan") for i in range(3)]
                log(f"step:{state.step}/{total} stage:{k + 1} loss:{s[0]:.4f} flow:{s[1]:.4f} repa:{s[2]:.4f} "
                    f"lpips:{s[3]:.4f} pdino:{s[4]:.4f} gnorm:{gn:.3f} skipped:{state.skipped} "
                    f"train_time:{state.train_time * 1000:.0f}ms step_avg:{avg * 1000:.1f}ms "
                    f"img/s:{stage.batch / avg if state.timed_steps else 0:.1f} mfu:{mfu} " +
                    support.etas(stages, k, state, start, timer["loop"], costs))
                log.metrics(dict(step=state.step, stage=k + 1, train_time_s=state.train_time, loss=s[0], flow=s[1],
                                 repa=s[2], lpips=s[3], pdino=s[4], grad_norm=gn, skipped=state.skipped,
                                 flow_t0=bins[0], flow_t1=bins[1], flow_t2=bins[2],
                                 lr=hp.lr * lr_factor(state.step - 1, hp), step_avg_ms=avg * 1000))
                if worst >= hp.max_bad_steps:  # the weights are still those of the last good step
                    msg = (f"{worst} non-finite steps in a row (skipped) by step {state.step}; the last good "
                           f"checkpoint is {support.last_checkpoint(run_dir)}; lower lr or check the data, then resume")
                    log(msg, console=False)
                    fail(msg)
            if sample_now:
                path = run_dir / "samples" / f"step{state.step:07d}.png"
                imgs = sample(gathered(m.ema, hp), m.text, hp, grid, stage.res, device=env.device)
                support.write_grid(imgs, path, 4, log, grid)
            if ckpt_now:
                t_ck = time.monotonic()
                state.skipped = int(health[2])
                save_checkpoint(run_dir, f"step{state.step:07d}", state, bad_rows, m, optimizers, hp, env, log,
                                final=state.step == total or bool(stop))
                timer["ckpt_s"] = time.monotonic() - t_ck
            if eval_now:
                metrics = evaluate(gathered(m.ema, hp), m.text, hp, ev, stage.res, run_dir / "eval_ref", env.device)
                log(f"eval step:{state.step} " + " ".join(f"{k}:{v:.4g}" for k, v in metrics.items()))
                log.metrics(dict(step=state.step, stage=k + 1, **metrics))
            if pending == 0:
                clock = time.perf_counter()  # restart after logging, sampling, checkpointing, evaluating
                timer["tick"] = time.monotonic()  # and time_limit's step time leaves them out too
            if hp.bench and state.step == first_step + 1:  # the bench's second aspect bucket compiles too: untimed
                clock = None
        if hp.bench:
            support.log_bench(stage, k, hp, env, state, start, step_flops, log, bench_hours)  # the last: the total
        else:
            bad = support.bad_row_counts(bad_rows, state.bad_rows)
            log(f"data: bad rows replaced or converted so far (all ranks): {bad or 'none'}")
    if stop and not hp.bench:
        log(f"stopped after step {state.step}/{total} ({stop}); the checkpoint is {support.last_checkpoint(run_dir)}; "
            "run the same command to resume")
    elif not hp.bench:
        log(f"done: {state.step} steps, train_time {state.train_time:.1f}s")
        scores = None
        try:  # training is done and saved: a signal from here on ends the scoring at once
            support.STOP["scoring"] = True
            if hp.preset == "cpu" and not support.STOP["signal"]:
                scores = score_demo(gathered(m.ema, hp), m.text, hp, run_dir, log, env.device)
                log.metrics(dict(step=state.step, shapes=scores))
            support.log_end(log, hp, run_dir, support.last_checkpoint(run_dir), scores)
        except KeyboardInterrupt:
            log(f"scoring stopped ({support.STOP['signal']}); the checkpoint is {support.last_checkpoint(run_dir)}")
    log.close()  # the tracker's files
    if env.distributed:
        dist.barrier()  # no rank tears gloo/NCCL down while another still talks to it
        dist.destroy_process_group()
    return state, m


def main(argv):
    try:
        hp = parse_args(argv, torch.cuda.is_available())
        support.check_device(hp, torch.cuda.is_available(), argv)  # a GPU torch cannot use; the record without one
        support.check_paths(hp, PRESETS["cpu"]["data"])
    except ValueError as e:
        fail(str(e))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    support.STOP.update(signal=None, scoring=False)
    try:  # the run takes SIGTERM and SIGINT (on_signal) and gives them back, however it ends
        for sig in () if hp.bench else handlers:
            signal.signal(sig, support.on_signal)
        return train(hp)
    finally:
        for sig, h in handlers.items():
            signal.signal(sig, h)


if __name__ == "__main__":
    main(sys.argv[1:])
