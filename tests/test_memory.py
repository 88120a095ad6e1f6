"""Activation checkpointing (recompute) and the analytic memory estimate (train_memory), checked against the bytes
autograd really saves (torch.autograd.graph.saved_tensors_hooks) and the parameters and optimizer states built."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import train_gpt_style as T
from test_trainer import randomized


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


def small_hp(**kw):
    base = dict(hidden=128, depth=4, heads=2, patch=8, bottleneck=32, text_dim=48, text_len=16, tread_frac=0.5,
                tread_start=1, tread_end=2, repa_block=2)
    return T.Hyperparameters(**{**base, **kw})


# ---------------------------------------------------------------- recompute (activation checkpointing)


def test_recompute_spec_parsing_and_one_line_errors():
    assert T.block_set("0-3,7", 16) == {0, 1, 2, 3, 7} and T.block_set("all", 4) == {0, 1, 2, 3}
    assert T.block_set("", 4) == set() and T.block_set("2", 4) == {2}
    for bad, msg in (("0-16", "outside 0..15"), ("x", "not a list of blocks"), ("-1", "not a list of blocks")):
        with pytest.raises(ValueError, match=msg):
            T.parse_args(["preset=record", f"recompute={bad}"], False)


@pytest.mark.parametrize("tread", [0.0, 0.5])
def test_recompute_gives_the_same_loss_and_gradients(tread):
    def run(recompute):
        hp = small_hp(tread_frac=tread, recompute=recompute)
        model, proj = randomized(T.PRXDiT(hp)), randomized(T.repa_projector(hp.hidden, 32), seed=1)
        x, t, txt, mask, keep = dit_inputs(hp, 3, 32)
        with sdpa_kernel(SDPBackend.MATH):
            out, h = model(x, t, txt, mask, keep, hp.repa_block)  # REPA hooks a routed, recomputed block
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
