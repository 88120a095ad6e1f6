"""Activation checkpointing (recompute) and the analytic memory estimate (train_memory), checked against the bytes
autograd really saves (torch.autograd.graph.saved_tensors_hooks) and the parameters and optimizer states built."""
import dataclasses
import os

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import data_prep as dp
import evals
import support
import train_gpt_style as T
from test_trainer import randomized


@pytest.fixture(autouse=True)
def sdpa_on_cpu(monkeypatch):  # these tests count what SDPA's kernels save (the GPU path), not the CPU stand-in
    monkeypatch.setattr(support, "CPU_EXPLICIT_ATTENTION", False)


class Saved:
    """Bytes of the tensors autograd saves for backward, deduplicated by storage, parameters excluded.
    `blocks`: also the bytes saved inside each of these modules' forward (attributed to the innermost one)."""

    def __init__(self, params, blocks=()):
        self.skip = {p.untyped_storage().data_ptr() for p in params}
        self.seen, self.where, self.per_block = {}, [None], {}
        for i, b in enumerate(blocks):
            b.register_forward_pre_hook(lambda m, a, i=i: self.where.append(i))
            b.register_forward_hook(lambda m, a, o, i=i: self.where.remove(i))  # returns None: output kept

    def pack(self, t):
        s = t.untyped_storage()
        if s.data_ptr() not in self.skip and s.data_ptr() not in self.seen:
            self.seen[s.data_ptr()] = s.nbytes()
            self.per_block[self.where[-1]] = self.per_block.get(self.where[-1], 0) + s.nbytes()
        return t

    def __enter__(self):
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        return self.ctx.__enter__()

    def __exit__(self, *a):
        self.ctx.__exit__(*a)

    @property
    def total(self):
        return sum(self.seen.values())


def dit_inputs(hp, B, res, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(B, 3, res, res, generator=g), torch.rand(B, generator=g)
    txt = torch.randn(B, hp.text_len, hp.text_dim, generator=g)
    mask = torch.ones(B, hp.text_len, dtype=torch.bool)
    mask[0, hp.text_len // 2:] = False  # padding in the first caption
    keep = T.tread_keep(B, (res // hp.patch) ** 2, hp.tread_frac, "cpu", g) if hp.tread_frac else None
    return x, t, txt, mask, keep


def tiny_dino(dim):  # a frozen random DINOv3 of width `dim`: REPA's encoder (16-px patches, RoPE)
    from transformers import DINOv3ViTConfig, DINOv3ViTModel
    return DINOv3ViTModel(DINOv3ViTConfig(hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=1,
                                          num_attention_heads=2)).eval().requires_grad_(False)


def small_hp(**kw):
    base = dict(hidden=128, depth=4, heads=2, patch=8, bottleneck=32, text_dim=48, text_len=16, tread_frac=0.5,
                tread_start=1, tread_end=2, repa_block=2)
    return T.Hyperparameters(**{**base, **kw})


# ---------------------------------------------------------------- recompute (activation checkpointing)


def test_recompute_spec_parsing_and_one_line_errors():
    assert support.block_set("0-3,7", 16) == {0, 1, 2, 3, 7} and support.block_set("all", 4) == {0, 1, 2, 3}
    assert support.block_set("", 4) == set() and support.block_set("2", 4) == {2}
    for bad, msg in (("0-16", "outside 0..15"), ("x", "not a list of blocks"), ("-1", "not a list of blocks")):
        with pytest.raises(ValueError, match=msg):
            T.parse_args(["preset=record", f"recompute={bad}"], False)


@pytest.mark.parametrize("tread", [0.0, 0.5])
def test_recompute_gives_the_same_loss_and_gradients(tread):
    def run(recompute):
        hp = small_hp(tread_frac=tread, recompute=recompute)
        model, proj = randomized(T.PRXDiT(hp)), randomized(T.REPA(hp, tiny_dino(32)).proj, seed=1)
        x, t, txt, mask, keep = dit_inputs(hp, 3, 32)
        with sdpa_kernel(SDPBackend.MATH):  # backward too, as train_step runs it: recomputation uses these kernels
            out, (h, ids) = model(x, t, txt, mask, keep, hp.repa_block)  # REPA hooks a routed, recomputed block
            assert ids is keep and h.shape[1] == (keep.shape[1] if tread else (32 // hp.patch) ** 2)
            loss = out.square().mean() + proj(h).square().mean()
            loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}
    loss, grads = run("")
    for spec in ("1-2", "all"):
        loss_r, grads_r = run(spec)
        assert torch.allclose(loss, loss_r, rtol=1e-6)
        assert grads.keys() == grads_r.keys() and all(grads[n] is not None for n in grads)
        for n in grads:
            assert torch.allclose(grads[n], grads_r[n], rtol=1e-5, atol=1e-7), n


def test_recompute_saves_only_the_blocks_inputs():
    def saved(recompute):
        hp = small_hp(recompute=recompute)
        model = T.PRXDiT(hp)
        x, t, txt, mask, keep = dit_inputs(hp, 2, 64)
        s = Saved(model.parameters(), model.blocks)
        with s, sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            model(x, t, txt, mask, keep, hp.repa_block)
        return s
    plain = saved("")
    for spec, ids in (("0", [0]), ("1-2", [1, 2]), ("all", [0, 1, 2, 3])):
        share = sum(plain.per_block[i] for i in ids)
        drop = plain.total - saved(spec).total
        assert 0.85 * share < drop <= share, (spec, drop, share)  # the blocks' inputs stay


def test_recompute_compiles_to_one_graph():
    import torch._dynamo
    hp = small_hp(recompute="1-2", hidden=64)
    x, t, txt, mask, keep = dit_inputs(hp, 2, 32)
    torch._dynamo.reset()
    ex = torch._dynamo.explain(T.PRXDiT(hp))(x, t, txt, mask, keep, hp.repa_block)
    assert ex.graph_break_count == 0 and ex.graph_count == 1, ex.break_reasons


# ---------------------------------------------------------------- the analytic estimate against what autograd saves
# train_memory counts CUDA's eager autograd with a fused attention kernel. On this CPU we run SDPA's CPU flash kernel,
# which saves what the GPU kernels save (q, k, v, out, logsumexp; no N^2 matrix, unlike the math kernel), and
# correct two documented differences explicitly:
# - CPU autocast runs layer_norm in bf16 (CUDA: fp32), so a block saves the LayerNorm input, output and h once in bf16
#   instead of fp32 input + fp32 output + bf16 casts of h (one for the qkv linear, two for gate/up), statistics in bf16;
# - the CPU flash kernel returns out as (B, H, N, Dh) contiguous, so out.transpose(1, 2).reshape copies (on CUDA a
#   view).
# - CPU autocast runs pow in bf16 (CUDA: fp32), which changes LPIPS's per-level normalisation (below).


def gib(x):
    return x / 2 ** 30


def cpu_vs_cuda_dit(hp, N, K):  # bytes per image the CPU saves minus what CUDA saves, per the notes above
    D, a = hp.hidden, 2 if hp.amp else 4
    n_tok = [K if hp.tread_frac and hp.tread_start <= i <= hp.tread_end else N for i in range(hp.depth)]
    if not hp.amp:
        return sum(n_tok) * a * D  # the output copy only
    return sum(n_tok) * (a * D - 10 * D - 8) - 4 * D * N  # blocks' LayerNorms, copy; the final layer's LayerNorm


def measured_step(hp, B, res, enc_dim=32):
    """Saved bytes of a DiT forward and the trainer's losses (flow, REPA when on) under the trainer's autocast,
    parameters and autocast's cached bf16 weight copies counted apart. -> (activations, weight copies)."""
    model, repa = randomized(T.PRXDiT(hp)), T.REPA(hp, tiny_dino(enc_dim))
    params = list(model.parameters()) + list(repa.parameters())  # the projector's: the DINOv3 is frozen, apart
    x, t, txt, mask, keep = dit_inputs(hp, B, res)
    x0 = torch.randn_like(x)
    s = Saved(params)
    casts = {}

    def pack(tensor):  # a bf16 copy of a parameter made by autocast: the "gathered weights" part, not activations
        for p in params:
            if p.numel() == tensor.numel() and tensor.dtype != p.dtype and tensor.dim() == p.dim() and any(
                    c.shape == p.shape and torch.equal(c, p.to(c.dtype)) for c in (tensor, tensor.mT)):
                casts[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
                return tensor
        return s.pack(tensor)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), sdpa_kernel(SDPBackend.FLASH_ATTENTION), \
            torch.autocast("cpu", torch.bfloat16, enabled=hp.amp):
        use_repa = hp.repa_weight > 0
        pred, hooked = model(x, t, txt, mask, keep, repa.block if use_repa else -1)
        loss = T.flow_loss(pred, x0, x, t, hp.t_min_div).mean()
        if use_repa:  # the targets: the frozen DINOv3's patch features of x0 (no gradient: nothing saved)
            loss = loss + repa(hooked, x0, hp.patch).mean()
    return s.total, sum(casts.values()), sum(p.numel() for p in params) if hp.repa_weight else model_params(model)


def model_params(m):
    return sum(p.numel() for p in m.parameters())


SHAPES = [dict(hidden=128, heads=2, patch=8, text_len=16, tread_frac=0.5, res=64, B=2, repa_weight=0.5),
          dict(hidden=192, heads=3, patch=4, text_len=8, tread_frac=0.0, res=48, B=3, repa_weight=0.0)]


@pytest.mark.parametrize("amp", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=["tread_repa", "plain"])
def test_dit_activations_match_saved_tensors(shape, amp):
    shape = dict(shape)
    res, B = shape.pop("res"), shape.pop("B")
    hp = small_hp(amp=amp, lpips_weight=0, pdino_weight=0, depth=4, **shape)
    vits = (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),) * 2
    st = T.Stage(res, B, B, 1, repa=hp.repa_weight > 0)
    est = dp.train_memory(hp, st, vits=vits, text_params=0)
    N = (res // hp.patch) ** 2
    acts, casts, n = measured_step(hp, B, res)
    expected = est["activations"] + gib(B * cpu_vs_cuda_dit(hp, N, N - round(N * hp.tread_frac)))
    assert abs(gib(acts) - expected) / gib(acts) < 0.10, (gib(acts), expected)
    if amp:  # one process: autocast's bf16 weight copies are the "gathered" part: all weights (2 bytes each) but the
        # biases, RMSNorm weights and first layers of inputs that need no gradient (0.5 % of the record model)
        assert est["gathered"] == gib(2 * n)
        model = T.PRXDiT(hp)
        first = ("img_in.0.", "time_in.in_layer.", "txt_in.")
        kept = [p for k, p in model.named_parameters() if p.ndim == 2 and not k.startswith(first)]
        kept += [p for p in T.REPA(hp, tiny_dino(32)).parameters() if p.ndim == 2] if hp.repa_weight else []
        assert casts == 2 * sum(p.numel() for p in kept)


def perceptual_part(hp, st, vits):  # the estimate's bytes for the perceptual losses alone
    off = dp.train_memory(T.Hyperparameters(**{**hp.__dict__, "lpips_weight": 0, "pdino_weight": 0}), st, vits=vits,
                          text_params=0)
    return (dp.train_memory(hp, st, vits=vits, text_params=0)["activations"] - off["activations"]) * 2 ** 30


@pytest.mark.parametrize("amp", [True, False])
def test_lpips_activations_match_saved_tensors(amp):
    res, B = 96, 2
    hp = small_hp(amp=amp, lpips_weight=0.1, pdino_weight=0, repa_weight=0, patch=8)
    lp = T.load_lpips("cpu", pretrained=False).to(torch.bfloat16 if amp else torch.float32)  # bf16 on GPU
    pred, x0 = torch.rand(B, 3, res, res, requires_grad=True), torch.rand(B, 3, res, res)
    s = Saved(lp.parameters())
    with s, torch.autocast("cpu", torch.bfloat16, enabled=amp):
        T.lpips_loss(lp, pred * 2 - 1, x0 * 2 - 1)
    est = perceptual_part(hp, T.Stage(res, B, B, 1, False), evals.REAL_VITS)
    # CUDA autocast runs `in_feat ** 2` of LPIPS's normalisation and the squared difference in fp32: a fp32 copy of
    # each feature map (4 bytes) and a fp32 difference instead of bf16 (2 more): 6 bytes per feature element
    r = res // 2
    cuda_only = 6 * B * sum((r >> lvl) ** 2 * c for lvl, (c, _) in enumerate(dp.VGG16)) if amp else 0
    assert abs(est - cuda_only - s.total) / s.total < 0.10, (est - cuda_only, s.total)


@pytest.mark.parametrize("amp", [True, False])
def test_pdino_activations_match_saved_tensors(amp, tmp_path):
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel
    vit = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2)
    res, B, side = 64, 3, 56
    hp = small_hp(amp=amp, lpips_weight=0, pdino_weight=0.01, repa_weight=0, pdino_res=side, perc_frac=2 / 3)
    dino = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(patch_size=14, image_size=side, num_register_tokens=4,
                                                              **vit)).eval().requires_grad_(False)
    dino = dino.to(torch.bfloat16 if amp else torch.float32)
    pred, x0 = torch.rand(B, 3, res, res, requires_grad=True), torch.rand(B, 3, res, res)
    nb = round(B * hp.perc_frac)
    s = Saved(dino.parameters())
    with s, torch.autocast("cpu", torch.bfloat16, enabled=amp), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        T.pdino_loss(dino, pred[:nb] * 2 - 1, x0[:nb] * 2 - 1, side)
    est = perceptual_part(hp, T.Stage(res, B, B, 1, False), (vit, vit))
    # CUDA autocast runs layer_norm in fp32: its saved input is a fp32 copy; on CPU the bf16 input (2 bytes less)
    tokens = (side // 14) ** 2 + 5
    cuda_only = 2 * nb * tokens * vit["hidden_size"] * (2 * vit["num_hidden_layers"] + 1) if amp else 0
    assert abs(est - cuda_only - s.total) / s.total < 0.10, (est - cuda_only, s.total)


def test_weights_and_optimizer_states_match_the_built_modules_after_one_step():
    hp = small_hp(repa_weight=0.5)
    st = T.Stage(32, 2, 2, 1, True)
    vits = (dict(hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),) * 2
    model, repa = T.PRXDiT(hp), T.REPA(hp, tiny_dino(48))
    opts = T.build_optimizers(model, repa, hp)
    assert {id(p) for o in opts for g in o.param_groups for p in g["params"]} == {
        id(p) for p in [*model.parameters(), *repa.proj.parameters()]}  # the DINOv3 is not trained
    params = [p for o in opts for g in o.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.randn_like(p)
    for o in opts:
        o.step()
    weights = sum(4 * p.numel() for p in params)
    states = sum(v.nbytes for o in opts for s in o.state.values() for k, v in s.items() if k != "step")
    ema = sum(4 * p.numel() for p in model.parameters())  # the EMA copy of the DiT
    for world in (1, 8):  # parameters, gradients, states and the EMA sharded
        est = dp.train_memory(hp, st, world, vits=vits, text_params=0)
        assert est["weights_opt"] * 2 ** 30 == pytest.approx((2 * weights + states + ema) / world, rel=1e-12)


def test_encoder_parameter_counts_are_the_real_architectures():
    from transformers import T5GemmaConfig, T5GemmaModel
    gemma2_2b = dict(vocab_size=256_000, **dp.T5GEMMA_2B)  # google/t5gemma-2b-2b-ul2's encoder
    with torch.device("meta"):
        enc = T5GemmaModel(T5GemmaConfig(encoder=gemma2_2b, decoder=gemma2_2b)).get_encoder()
    assert sum(p.numel() for p in enc.parameters()) == dp.T5GEMMA_2B_ENCODER
    hp = T.Hyperparameters()
    parts = dp.train_memory(hp, hp.stages[0], 8)
    vgg = sum(p.numel() for p in T.load_lpips("cpu", pretrained=False).net.parameters())  # LPIPS's VGG-16 trunk
    dinos = [1e6 * n for n in (303.1, 86.6)]  # DINOv3 ViT-L/16 (~0.3 B) and DINOv2-B/14 (~86 M): model cards
    evals = 2 * dp.EVAL_MODELS  # fp32: 4 bytes
    assert parts["encoders"] * 2 ** 30 == pytest.approx(2 * (dp.T5GEMMA_2B_ENCODER + vgg + sum(dinos) + evals),
                                                        rel=0.01)


def test_evaluation_models_are_counted_with_their_real_sizes():
    import timm
    from transformers import CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model
    vit_l = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14)
    with torch.device("meta"):  # openai/clip-vit-large-patch14-336, facebook/dinov2-large, timm inception_v3
        clip = CLIPModel(CLIPConfig(projection_dim=768, text_config=dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, vocab_size=49408,
            max_position_embeddings=77, projection_dim=768), vision_config=dict(image_size=336, **vit_l)))
        models = [clip, Dinov2Model(Dinov2Config(image_size=518, **vit_l)),
                  timm.create_model("inception_v3", pretrained=False, num_classes=0)]
    assert sum(p.numel() for m in models for p in m.parameters()) == dp.EVAL_MODELS
    hp = T.Hyperparameters()
    on, off = (dp.train_memory(dataclasses.replace(hp, eval_every=e), hp.stages[0], 8)["encoders"] for e in (1, 0))
    assert (on - off) * 2 ** 30 == pytest.approx(4 * dp.EVAL_MODELS)


def test_fsdp_gradient_accumulation_holds_unsharded_fp32_gradients():
    hp = T.Hyperparameters()
    st = hp.stages[0]  # 1024 = 8 ranks x 32 x 4 micro-batches
    acc, one = (dp.train_memory(hp, st, 8, micro=m)["gathered"] for m in (32, 128))  # 128: no accumulation
    from transformers import DINOv3ViTConfig, DINOv3ViTModel
    with torch.device("meta"):  # the DiT and the REPA projector onto the real DINOv3 ViT-L/16 (1792 -> 1024 ...)
        n = sum(p.numel() for p in T.PRXDiT(hp).parameters()) + sum(
            p.numel() for p in T.REPA(hp, DINOv3ViTModel(DINOv3ViTConfig(**evals.REAL_VITS[0]))).parameters())
    assert (acc - one) * 2 ** 30 == pytest.approx(4 * n)
    assert dp.train_memory(hp, st, 1, micro=32)["gathered"] * 2 ** 30 == pytest.approx(2 * n)  # one process: none


def test_record_fits_and_the_largest_micro_batch_is_the_last_that_fits():
    import re
    hp, lines = T.Hyperparameters(), []
    dp.memory_report(hp, 8, lines.append)
    assert len(lines) == len(hp.stages)
    for st, line in zip(hp.stages, lines):
        # the fit keeps the configured micro-batch's gradient accumulation (conservative once a micro-batch would
        # hold a rank's whole share of the batch and FSDP would need no unsharded gradients)
        acc = dp.train_memory(hp, st, 8)["gathered"] - dp.train_memory(hp, st, 8, micro=st.batch // 8)["gathered"]
        total = lambda b: sum(dp.train_memory(hp, st, 8, micro=b).values()) + acc * (st.batch // (8 * b) <= 1)
        assert float(re.search(r"peak:([\d.]+)GiB", line).group(1)) == pytest.approx(total(st.micro_batch), abs=0.01)
        fit = int(re.search(r"max_micro_batch@79.6GiB:(\d+)", line).group(1))
        assert 0 < dp.MEM_MARGIN < 1 and total(st.micro_batch) < dp.MEM_MARGIN * dp.MEM_BUDGET  # fits 80 GB, headroom
        assert st.micro_batch <= fit
        assert total(fit) <= dp.MEM_MARGIN * dp.MEM_BUDGET < total(fit + 1)
    # recomputing every block shrinks the activations to the blocks' inputs plus one block
    full, rc = (dp.train_memory(T.Hyperparameters(recompute=r), hp.stages[1], 8)["activations"] for r in ("", "all"))
    assert rc < full / 2


def test_memory_cli_prints_train_memory_of_the_record_preset_with_the_overrides(capsys):
    """`python data_prep.py memory NAME=VALUE ... --devices N --budget G`: one line per stage of the record preset with
    those overrides, whose figures are train_memory's for that configuration on N devices, fitted into G GiB."""
    import re
    dp.main(["memory", "stage1.micro_batch=16", "recompute=0-3", "--devices", "4", "--budget", "60"])
    out = capsys.readouterr().out.strip().splitlines()
    hp = T.parse_args(["preset=record", "stage1.micro_batch=16", "recompute=0-3"], False)
    assert hp.stages[0].micro_batch == 16 and T.Hyperparameters().stages[0].micro_batch != 16  # an override
    assert len(out) == len(hp.stages) == 2
    for k, (st, line) in enumerate(zip(hp.stages, out), 1):
        m = re.fullmatch(rf"memory estimate stage:{k} res:{st.res} micro_batch:{st.micro_batch} devices:4 "
                         r"peak:([\d.]+)GiB weights_opt:([\d.]+)GiB gathered:([\d.]+)GiB encoders:([\d.]+)GiB "
                         r"activations:([\d.]+)GiB max_micro_batch@60GiB:(\d+) recompute:0-3", line)
        assert m, line
        parts = dp.train_memory(hp, st, 4)  # the configuration's (not the default record's) on 4 devices
        assert parts != dp.train_memory(T.Hyperparameters(), T.Hyperparameters().stages[k - 1], 8)
        assert m.group(1) == f"{sum(parts.values()):.2f}"  # the peak: the sum of the parts, to 2 decimals
        assert m.groups()[1:5] == tuple(f"{parts[p]:.2f}" for p in ("weights_opt", "gathered", "encoders",
                                                                    "activations"))
        # the fit into 90 % of 60 GiB: activations grow linearly with the micro-batch, the rest stays
        fixed, per_image = sum(parts.values()) - parts["activations"], parts["activations"] / st.micro_batch
        fit = int(m.group(6))
        assert fixed + fit * per_image <= dp.MEM_MARGIN * 60 < fixed + (fit + 1) * per_image
    with pytest.raises(SystemExit) as e:  # a bad override: one line, exit code 2
        dp.main(["memory", "recompute=x"])
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1


# ---------------------------------------------------------------- the time budget (data_prep.py budget)


def test_time_budget_flops_match_the_flop_counter_and_the_parts_add_up(capsys):
    """The budget's closed forms against torch's FLOP counter on the real classes (a DINOv2-with-registers ViT,
    LPIPS' VGG-16, Newton-Schulz), and its arithmetic: each part is FLOPs over peak x efficiency, the step their
    sum, the hours steps x step."""
    import warnings

    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    def counted(fn, skip=()):
        with FlopCounterMode(display=False) as fc:
            fn()
        return sum(v for k, v in fc.get_flop_counts()["Global"].items() if str(k) not in skip)
    cfg = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2)  # MLP ratio 4
    config = Dinov2WithRegistersConfig(**cfg, patch_size=14, num_register_tokens=4)
    config._attn_implementation = "eager"  # attention as matmuls, which the counter counts
    vit = Dinov2WithRegistersModel(config).eval()
    with torch.no_grad():  # 16 patches + CLS + 4 registers; the patch embedding (a convolution) is left out
        got = counted(lambda: vit(pixel_values=torch.randn(1, 3, 56, 56)), skip=("aten.convolution",))
    assert dp.vit_flops(cfg, 16 + 5) == got
    from transformers import T5GemmaConfig, T5GemmaModel  # the record's text encoder's classes (text_online=1)
    mod = dict(vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=24)
    enc = T5GemmaModel(T5GemmaConfig(encoder=mod, decoder=mod, vocab_size=50, attn_implementation="eager")).eval()
    with torch.no_grad():
        got = counted(lambda: enc.get_encoder()(input_ids=torch.randint(0, 50, (1, 20)),
                                                attention_mask=torch.ones(1, 20, dtype=torch.long)))
    assert dp.text_encoder_flops(mod, 20) == got
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import lpips
        vgg = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False).net
    with torch.no_grad():
        assert dp.vgg_flops(64) == counted(lambda: vgg(torch.randn(1, 3, 64, 64)))
    for shape in ((48, 32), (16, 64)):
        assert dp.newton_schulz_flops(shape) == counted(lambda: T.newton_schulz(torch.randn(*shape)))
    hp = T.parse_args(["preset=record"], False)
    rows = dp.time_budget(hp, 8)
    for st, r in zip(hp.stages, rows):
        assert r["images"] == st.batch / 8 and r["step_ms"] == pytest.approx(sum(r["ms"].values()))
        assert r["hours"] == pytest.approx(st.steps * r["step_ms"] / 3.6e6)
        assert r["text"] == support.expected_text_len(hp, st, 8) < 200  # text_sort: the micro-batches' mean padding
        text_hp = dataclasses.replace(hp, text_len=r["text"])
        dit = st.batch / 8 * support.dit_train_flops(text_hp, st.res, 1024 if st.repa else 0)  # REPA: to DINOv3-L
        assert r["ms"]["dit"] == pytest.approx(1e3 * dit / (989e12 * dp.BUDGET_EFF["dit"]))
        assert r["ms"]["repa_target"] == r["ms"]["text_encoder"] == 0  # precomputed: the record requires repa/ and
    online = dp.time_budget(T.parse_args(["preset=record", "repa_online=1"], False), 8)  # text_emb/
    assert [r["ms"]["repa_target"] > 0 for r in online] == [st.repa for st in hp.stages]
    assert online[0]["ms"]["repa_target"] == pytest.approx(1e3 * 128 * dp.vit_flops(evals.REAL_VITS[0], 256 + 5) /
                                                           (989e12 * dp.BUDGET_EFF["encoders"]))
    off = dp.time_budget(T.parse_args(["preset=record", "lpips_weight=0", "muon=0", "text_online=1"], False), 8)
    assert off[0]["ms"]["lpips"] == off[0]["ms"]["newton_schulz"] == 0
    assert off[0]["ms"]["text_encoder"] == pytest.approx(1e3 * 128 * dp.text_encoder_flops(dp.T5GEMMA_2B, 256) /
                                                         (989e12 * dp.BUDGET_EFF["encoders"]))
    dp.main(["budget"])
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"budget schedule: {sum(r['hours'] for r in rows):.2f} h on 8 devices"


# ---------------------------------------------------------------- the GPU check (bench_gpu.sh), at toy size


@pytest.mark.slow
def test_gpu_check_runs_every_phase_at_toy_size_and_keeps_what_it_measured(tmp_path):
    """bash bench_gpu.sh with TOY=1: the attention kernels at each stage's shapes (the mask's and the full query
    counts), Newton-Schulz of one rank's share, the real step of both stages through torchrun (the bench, FSDP on
    one rank), the projection as the sum of the stages' hours; with too little time the stages are skipped and
    check.json still holds what was measured."""
    import json
    import subprocess
    import sys

    from conftest import ROOT
    env = dict(os.environ, TOY="1", PYTHON=sys.executable, OMP_NUM_THREADS="2")
    r = subprocess.run(["bash", str(ROOT / "bench_gpu.sh"), str(tmp_path / "full")], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    report = json.loads((tmp_path / "full" / "check.json").read_text())
    phases = report["phases"]
    assert list(phases) == ["attention", "newton_schulz", "stage1", "stage2", "projection"] and report["toy"]
    hp = T.parse_args(dp.CHECK_TOY, False)
    N = [(st.res // hp.patch) ** 2 for st in hp.stages]
    assert [(a["stage"], a["queries"]) for a in phases["attention"]] == [
        (k, q) for k, n in enumerate(N, 1) for q in sorted({n, n - round(n * hp.tread_frac)})]
    for a in phases["attention"]:
        assert a["math_ms"] > 0 and a["math_nomask_ms"] > 0 and a["micro_batch"] == 4
        assert a["ran"] == ["explicit product (support.attention, CPU)"]  # on CPU no SDPA kernel runs in training
    assert phases["newton_schulz"]["matrices"] == len(range(0, 7 * hp.depth, 8)) and phases["newton_schulz"]["ms"] > 0
    for k, name in enumerate(("stage1", "stage2")):
        st, got = hp.stages[k], phases[name]
        assert got["res"] == st.res and got["step_ms"] > 0 and got["syncs"] == []  # no sync detection on CPU
        assert got["hours_8"] == pytest.approx(st.steps * st.batch / got["img_s"] / 8 / 3600)
    assert phases["projection"]["hours_8_devices"] == pytest.approx(phases["stage1"]["hours_8"] +
                                                                    phases["stage2"]["hours_8"], abs=0.01)
    r = subprocess.run(["bash", str(ROOT / "bench_gpu.sh"), str(tmp_path / "short")], capture_output=True, text=True,
                       cwd=ROOT, env=dict(env, CHECK_SECONDS="1"), timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    phases = json.loads((tmp_path / "short" / "check.json").read_text())["phases"]
    assert phases["attention"] and phases["stage1"]["skipped"].endswith("60 s needed")
    assert "skipped" in phases["stage2"] and phases["projection"]["hours_8_devices"] is None
