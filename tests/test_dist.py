"""Multi-process training through torchrun on CPU (gloo): FSDP, hybrid sharding, sharded Muon, DCP checkpoints.

Run as a script under torchrun, this file is the worker of the sharded-Muon test (see `muon_worker`)."""
import ast
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, corrupt_copy, expected_skips, few_prompts

# One tiny run: same seed, same global batch (8) and micro-batch (2) whatever the number of processes, every part on
# (TREAD, REPA, LPIPS, P-DINO, caption dropout, Muon, EMA); fp32 so that the only differences are summation orders.
ARGS = ["preset=cpu", "stages=1", "stage1.steps=5", "stage1.batch=8", "stage1.micro_batch=2", "log_every=1",
        "ckpt_every=3", "sample_every=0", "sample_steps=1", "warmup=2", "cooldown=0", "hidden=32", "heads=2",
        "depth=3", "amp=0"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # 2 cores shared by up to 4 processes


def train(run_dir, data, nproc=1, extra=()):
    """nproc=1: plain `python train_gpt_style.py` (no torchrun, no FSDP); else torchrun with nproc processes."""
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                                 if nproc > 1 else [])
    r = subprocess.run(launch + [str(ROOT / "train_gpt_style.py")] + ARGS + [f"data={data}", f"run_dir={run_dir}",
                                                                             *extra],
                       capture_output=True, text=True, timeout=600, cwd=ROOT, env=ENV)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


def losses(run_dir):  # step -> (loss, grad norm); a step logged twice keeps the last
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from data_prep import make_shapes
    tmp = tmp_path_factory.mktemp("dist")
    data = tmp / "data"  # with damaged rows: replaced by the same rows, and counted the same, on any world size
    damage = corrupt_copy(few_prompts(make_shapes(tmp / "shapes", n=256, shard_rows=128)), data, seed=0)
    logs = {1: train(tmp / "w1", data), 2: train(tmp / "w2", data, 2),
            4: train(tmp / "w4", data, 4, ["shard_size=2", "stage1.micro_batch=4"]),  # 2 a device: lowered
            "2rc": train(tmp / "w2rc", data, 2, ["recompute=0,2"])}  # FSDP with activation checkpointing
    return tmp, data, logs, damage


@pytest.mark.slow
def test_fsdp_and_hybrid_sharding_give_the_one_process_losses(runs):
    tmp, _, logs, damage = runs
    assert "FSDP" not in logs[1]
    assert "FSDP: 2 ranks, 1 x 2 (replicate x shard)" in logs[2]
    assert "FSDP: 4 ranks, 2 x 2 (replicate x shard)" in logs[4]
    assert "stage1.micro_batch 4 lowered to 2: a batch of 8 gives each of 4 devices 2 images (the same global " \
           "batch)" in logs[4] and "lowered" not in logs[2]
    ref = losses(tmp / "w1")
    assert sorted(ref) == [1, 2, 3, 4, 5] and len(set(v[0] for v in ref.values())) == 5  # it trains
    for world in (2, 4, "2rc"):
        got = losses(tmp / f"w{world}")
        assert sorted(got) == sorted(ref)
        for step in ref:
            for x, y in zip(ref[step], got[step]):
                assert y == pytest.approx(x, rel=1e-4), (world, step, ref[step], got[step])
    bad_rows = {w: [line for line in logs[w].splitlines() if line.startswith("data: bad rows")] for w in logs}
    assert bad_rows[1] != ["data: bad rows replaced or converted so far (all ranks): none"]
    assert bad_rows[1] == bad_rows[2] == bad_rows[4] and len(bad_rows[1]) == 1
    from support import StreamSampler
    it = iter(StreamSampler(256, 0, 0, 8, 8, 0, 1))  # the rows the 5 global batches drew, seed 0
    want = expected_skips([i for _ in range(5) for i in next(it)], damage, 256)
    assert ast.literal_eval(bad_rows[1][0].split("(all ranks): ", 1)[1]) == want and want
    # each rank wrote its own shard of the weights and optimizer states
    assert len(list((tmp / "w4" / "ckpt" / "step0000005").glob("*.distcp"))) == 4
    # the EMA, sharded under FSDP and updated shard by shard, is saved whole: the one-process run's, as close as the
    # weights are (summation orders, and Newton-Schulz in bf16 before amp=0 took it to fp32, moved them by up to 4e-5
    # in 5 steps; measured)
    ema = {w: torch.load(tmp / f"w{w}" / "ckpt" / "step0000005" / "ema.pt")["ema"] for w in (1, 2, 4, "2rc")}
    for w in (2, 4, "2rc"):
        assert ema[w].keys() == ema[1].keys()
        assert all(torch.allclose(ema[w][k], ema[1][k], rtol=0, atol=1e-4) for k in ema[1]), w


@pytest.mark.slow
def test_checkpoint_saved_by_two_processes_resumes_in_one(runs):
    tmp, data, _, _ = runs
    run = tmp / "resume"
    shutil.copytree(tmp / "w2", run)
    shutil.rmtree(run / "ckpt" / "step0000005")  # the run "died" after its step-3 checkpoint
    out = train(run, data)
    assert "resumed from" in out and "from a 2-rank checkpoint" in out
    ref, got = losses(tmp / "w2"), losses(run)
    for step in (4, 5):
        for x, y in zip(ref[step], got[step]):
            assert y == pytest.approx(x, rel=1e-4), (step, ref[step], got[step])


def test_fsdp_bf16_weights_leave_the_timestep_and_rope_in_fp32(tmp_path):
    """amp=1: FSDP gathers bf16 weights but must not round the forward's inputs. t (embedded at scale 1000) and
    RoPE's cos/sin reach the sharded model in fp32, as they reach the unsharded EMA that samples."""
    import copy
    import torch.distributed as dist

    import train_gpt_style as T
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        hp = T.parse_args(["preset=cpu"], False)
        torch.manual_seed(0)
        ref = T.PRXDiT(hp)
        for p in ref.parameters():  # non-zero weights everywhere (adaLN-zero would hide the time embedding)
            p.data.normal_(0, 0.05)
        env = T.Env(rank=0, world=1, master=True, device=torch.device("cpu"), distributed=True)
        model = T.shard(hp, env, [copy.deepcopy(ref)], lambda *a: None)[0]  # a run's sharding step
        seen = {}
        model.time_in.register_forward_pre_hook(lambda m, a: seen.setdefault("t", a[0].dtype) and None)
        model.blocks[0].register_forward_pre_hook(lambda m, a: seen.setdefault("cos", a[3].dtype) and None)
        g = torch.Generator().manual_seed(0)
        x, txt = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, hp.text_len, hp.text_dim, generator=g)
        t, mask = torch.tensor([0.9013, 0.6017]), torch.ones(2, hp.text_len, dtype=torch.bool)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, base = model(x, t, txt, mask)[0].float(), ref(x, t, txt, mask)[0].float()
        assert seen == {"t": torch.float32, "cos": torch.float32}
        assert (out - base).abs().max() < 0.03  # bf16 weights only; t rounded to bf16 gave 0.06
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- sharded Muon


def muon_worker():
    """Under torchrun (4 processes): Muon on row-sharded DTensor parameters, on a 1-D mesh of 4 and on a 2 x 2
    hybrid mesh, against Muon on the full tensors in this process; then NorMuon the same way. Shapes include uneven
    and empty shards."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import train_gpt_style as T
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    shapes = [(30, 8), (5, 4), (30, 8), (16, 12), (8, 30), (30, 8), (3, 5)]  # 5 rows over 4 ranks: 2, 2, 1, 0
    g = torch.Generator().manual_seed(0)  # the same full tensors on every rank
    w0 = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(3)]
    calls = []
    ns = T.newton_schulz
    T.newton_schulz = lambda X, *a, **k: calls.append(X.shape[0]) or ns(X, *a, **k)  # count matrices per rank
    sent, a2a = set(), dist.all_to_all_single
    dist.all_to_all_single = lambda out, inp, *a, **k: sent.add(str(inp.dtype)) or a2a(out, inp, *a, **k)
    ref = [torch.nn.Parameter(w.clone()) for w in w0]
    opt = T.Muon(ref, lr=0.02)
    for step in grads:
        for p, gr in zip(ref, step):
            p.grad = gr.clone()
        opt.step()
    full_calls, calls[:] = sum(calls), []
    result = {}
    for mesh_shape, placements in (((world,), [Shard(0)]), ((2, world // 2), [Replicate(), Shard(0)])):
        mesh = init_device_mesh("cpu", mesh_shape)
        ps = [torch.nn.Parameter(distribute_tensor(w.clone(), mesh, placements)) for w in w0]
        opt = T.Muon(ps, lr=0.02)
        for step in grads:
            for p, gr in zip(ps, step):
                p.grad = distribute_tensor(gr.clone(), mesh, placements)
            opt.step()
        err = max(((p.full_tensor() - r).abs().max() / (r - w).abs().max()).item() for p, r, w in zip(ps, ref, w0))
        counts = [None] * world
        dist.all_gather_object(counts, sum(calls))
        calls[:] = []
        result[str(mesh_shape)] = dict(err=err, counts=counts, full=full_calls, sent=sorted(sent))
    T.newton_schulz = ns
    ref = [torch.nn.Parameter(w.clone()) for w in w0]  # NorMuon: rows on their own rank, norms summed over the group
    opt = T.Muon(ref, lr=0.02, normuon=True)
    for step in grads:
        for p, gr in zip(ref, step):
            p.grad = gr.clone()
        opt.step()
    for mesh_shape, placements in (((world,), [Shard(0)]), ((2, world // 2), [Replicate(), Shard(0)])):
        mesh = init_device_mesh("cpu", mesh_shape)
        ps = [torch.nn.Parameter(distribute_tensor(w.clone(), mesh, placements)) for w in w0]
        opt = T.Muon(ps, lr=0.02, normuon=True)
        for step in grads:
            for p, gr in zip(ps, step):
                p.grad = distribute_tensor(gr.clone(), mesh, placements)
            opt.step()
        assert all(type(opt.state[p]["row_ms"]).__name__ == "DTensor" for p in ps)  # sharded as the rows
        err = max(((p.full_tensor() - r).abs().max() / (r - w).abs().max()).item() for p, r, w in zip(ps, ref, w0))
        result["normuon " + str(mesh_shape)] = dict(err=err)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(result))
    dist.barrier()  # a rank that tears gloo down while another still uses it aborts ("terminate called ...")
    dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_muon_update_equals_the_unsharded_one():
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
                        str(ROOT / "tests" / "test_dist.py")], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.split("RESULT ", 1)[1].splitlines()[0])
    n = 7 * 3  # matrices x steps
    for mesh, res in result.items():
        if mesh.startswith("normuon"):  # the norms summed as squares over the ranks: other rounding, same update
            assert res["err"] < 2e-5, (mesh, res)
            continue
        assert res["err"] < 1e-6, (mesh, res)  # the same full matrices go through Newton-Schulz
        assert res["full"] == n and res["sent"] == ["torch.bfloat16"]  # the matrices travel in bf16 both ways
        if mesh == "(4,)":  # round-robin over 4 ranks: matrices 0,4 / 1,5 / 2,6 / 3
            assert res["counts"] == [6, 6, 6, 3]
        else:  # each 2-rank shard group splits the work; the two groups (replicas) do the same
            assert res["counts"] == [12, 9, 12, 9]


if __name__ == "__main__":
    muon_worker()
    sys.stdout.flush()  # then exit without C++ static destructors: gloo's threads torn down there can abort a
    os._exit(0)  # finished rank ("terminate called without an active exception", seen once in ~10 CI runs)


@pytest.mark.parametrize("reshard", [0, 1])
def test_accumulation_gathers_the_weights_once_per_step_and_equals_the_unsharded_step(tmp_path, monkeypatch,
                                                                                      reshard):
    """reshard=0: the gathered weights stay from the first micro-batch's forward to the last one's backward (one
    all-gather per FSDP unit and optimizer step, not one per micro-batch), and are sharded again before the
    optimizer steps: the step equals train_step on the unsharded model. reshard=1 gathers again for every forward and
    backward, as it did. The EMA, sharded like the model, gathers to the unsharded run's EMA."""
    import copy
    import torch.distributed as dist
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group

    import support
    import train_gpt_style as T
    gathers, unshard = [], _fsdp_param_group.FSDPParamGroup.unshard

    def counted(group, *a, **k):  # an unshard that gathers (with one rank FSDP skips only the collective itself)
        gathers.extend([1] if group._all_gather_result is None and not group.is_unsharded else [])
        return unshard(group, *a, **k)
    monkeypatch.setattr(_fsdp_param_group.FSDPParamGroup, "unshard", counted)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        hp = T.parse_args(["preset=cpu", "amp=0", "tread_frac=0", "caption_dropout=0", "ema_every=1",
                           f"reshard={reshard}"], False)
        stage = T.Stage(res=16, batch=6, micro_batch=2, steps=2, repa=False)  # 3 micro-batches per step
        g = torch.Generator().manual_seed(0)
        batches = [(torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=g), None,
                    (torch.randn(2, 8, hp.text_dim, generator=g), torch.ones(2, 8, dtype=torch.bool)), None,
                    torch.arange(j % 3 * 2, j % 3 * 2 + 2))  # the slots in the global batch, in stream order
                   for j in range(6)]
        torch.manual_seed(0)
        ref = T.PRXDiT(hp)
        for p in ref.parameters():
            p.data.normal_(0, 0.05)
        null = (torch.zeros(1, 1, hp.text_dim), torch.ones(1, 1, dtype=torch.bool))
        results = {}
        for distributed in (False, True):
            model, ema = copy.deepcopy(ref), copy.deepcopy(ref).requires_grad_(False)
            env = T.Env(rank=0, world=1, master=True, device=torch.device("cpu"), distributed=distributed)
            sharded = T.shard(hp, env, [model], lambda *a: None, ema) if distributed else []
            m = T.Models(model, model, ema, None, null, None, None, None, None, sharded)
            optimizers = T.build_optimizers(model, torch.nn.Module(), hp)
            state, health, it = T.State(), torch.zeros(3, dtype=torch.long), iter(batches)
            gathers.clear()
            for _ in range(2):
                sums = T.train_step(stage, it, state, m, optimizers, hp, env, torch.Generator(), health)[0]
                state.step += 1
                state.data_pos += stage.batch
            results[distributed] = (sums[0].item(), len(gathers), [p.full_tensor() if hasattr(p, "full_tensor")
                                                                   else p for p in model.parameters()],
                                    T.gathered(ema, hp).state_dict())
            assert all(type(p).__name__ == "DTensor" for p in model.parameters()) == distributed  # sharded again
            assert all(type(p).__name__ == "DTensor" for p in ema.parameters()) == distributed  # the EMA too
        units = hp.depth + 1  # each block, and the rest of the DiT
        assert results[False][1] == 0
        assert results[True][1] == 2 * units * (1 if not reshard else 2 * 3)  # reshard=1: forward and backward
        assert results[True][0] == pytest.approx(results[False][0], rel=1e-5)
        for a, b in zip(results[True][2], results[False][2]):
            assert torch.allclose(a, b, atol=1e-6)
        ema = results[True][3]  # the sharded EMA, updated shard by shard and gathered, is the unsharded one
        assert ema.keys() == results[False][3].keys() and not any(v.is_meta for v in ema.values())
        assert all(torch.allclose(ema[k], results[False][3][k], atol=1e-6) for k in ema)
        assert not all(torch.equal(ema[k], ref.state_dict()[k]) for k in ema)  # it moved
        fresh = copy.deepcopy(ref).requires_grad_(False)  # a resume: ema.pt's full tensors into a sharded EMA
        T.shard(hp, env, [copy.deepcopy(ref)], lambda *a: None, fresh)
        support.load_full_state(fresh, ema)
        assert all(torch.equal(v, ema[k]) for k, v in T.gathered(fresh, hp).state_dict().items())
    finally:
        dist.destroy_process_group()
