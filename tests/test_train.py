"""Elastic training: sampling, slice-only gradients, losses, checkpoints and exact resume
(in-process SIGTERM and subprocess SIGKILL), and DDP / FSDP equivalence under torchrun."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from train_script import tiny_elastic, tokens

from flextron_fx.elastic.ops import WeightSlice
from flextron_fx.errors import CheckpointError, FlextronError, OutputError, TrainingError
from flextron_fx.train import TrainConfig, make_sampler, read_metrics, train_elastic
from flextron_fx.train import loop as train_loop
from flextron_fx.train.loop import accumulate, batch_rows, kd_loss, lm_loss, make_optimizer
from flextron_fx.train.sampling import budget

HERE = Path(__file__).parent
SCRIPT = HERE / "train_script.py"


@pytest.fixture()
def em():
    return tiny_elastic()


def _valid(em, widths) -> bool:
    return set(widths) == set(em.ops) and all(w in em.ops[n].candidates
                                              for n, w in widths.items())


def test_samplers_give_valid_candidates(em):
    gen = torch.Generator().manual_seed(0)
    uni = make_sampler(em, "uniform")
    draws = uni(gen, 200)
    assert all(_valid(em, w) for w in draws)
    for name, op in em.ops.items():  # every candidate of every op shows up
        assert {w[name] for w in draws} == set(op.candidates)
    sand = make_sampler(em, "sandwich")
    first, *rest = sand(gen, 20)
    assert first == {n: op.candidates[0] for n, op in em.ops.items()}
    assert len(rest) == 19 and all(_valid(em, w) for w in rest)
    mat = make_sampler(em, "matformer")
    below_full = min(len(op.candidates) for op in em.ops.values()) - 1
    picks = set()
    for _ in range(20):  # one granularity for every op, never the full network
        step = mat(gen, below_full)
        indices = []
        for w in step:
            assert _valid(em, w) and w != em.full_widths()
            index = {em.ops[n].candidates.index(v) for n, v in w.items()}
            assert len(index) == 1
            indices += index
        assert sorted(indices) == list(range(below_full))  # distinct within a step
        picks.add(indices[0])
    assert picks == set(range(below_full))  # in a random order
    longer = mat(gen, 2 * below_full + 1)  # more samples than granularities: each twice+
    assert len(longer) == 2 * below_full + 1
    assert len({tuple(sorted(w.items())) for w in longer}) == below_full
    full = em.num_params(em.full_widths(), non_embedding=True)
    draw = budget(em, 0.55, 0.75)
    for _ in range(30):
        w = draw(gen)
        assert _valid(em, w)
        assert 0.55 <= em.num_params(w, non_embedding=True) / full <= 0.75


def test_matformer_within_a_budget_range_draws_only_granularities_inside_it(em):
    gen = torch.Generator().manual_seed(0)
    full = em.num_params(em.full_widths(), non_embedding=True)
    below_full = min(len(op.candidates) for op in em.ops.values() if op.kind == "mlp") - 1
    mat, firsts = make_sampler(em, "matformer", kind="mlp"), set()
    for _ in range(20):  # a step of `below_full` samples holds every granularity once
        fractions = [em.num_params(w, non_embedding=True) / full for w in mat(gen, below_full)]
        assert len(set(fractions)) == below_full >= 2
        firsts.add(fractions[0])
    assert len(firsts) == below_full  # in a random order
    fractions = sorted(fractions)
    low, high = fractions[0] - 1e-6, fractions[-2] + 1e-6  # all but the largest
    draws = make_sampler(em, "matformer", (low, high), "mlp")(gen, 3 * (below_full - 1))
    assert sorted({em.num_params(w, non_embedding=True) / full for w in draws}) \
        == fractions[:-1]
    with pytest.raises(FlextronError, match="no granularity below full"):
        make_sampler(em, "matformer", (fractions[-1] + 0.01, 1.0), "mlp")
    with pytest.raises(FlextronError, match="budget range"):
        make_sampler(em, "matformer", (0.9, 0.5), "mlp")
    with pytest.raises(TrainingError, match="would ignore it"):
        train_elastic(em, tokens(), Path("unused"),
                      TrainConfig(steps=1, sampler="uniform", budget_range=(0.4, 0.7)))


@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_vary_samples_one_kind_and_keeps_the_other_full(em, kind):
    gen = torch.Generator().manual_seed(0)
    for name in ("uniform", "sandwich", "budget", "matformer"):
        draw = make_sampler(em, name, (0.5, 0.9) if kind == "mlp" else (0.7, 1.0), kind)
        draws = draw(gen, 40)
        assert all(_valid(em, w) for w in draws)
        for n, op in em.ops.items():
            seen = {w[n] for w in draws}
            if op.kind != kind:
                assert seen == {op.full}, (name, n, seen)
            else:
                assert seen == set(op.candidates[:-1]) if name == "matformer" \
                    else len(seen) > 1, (name, n, seen)
    with pytest.raises(TrainingError, match="vary"):
        train_elastic(em, tokens(), Path("unused"), TrainConfig(steps=1, vary="heads"))


def test_same_seed_same_samples_on_every_rank(em):
    a, b = make_sampler(em, "uniform"), make_sampler(em, "uniform")
    ga, gb = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert a(ga, 10) == b(gb, 10)


def _slices(em):
    """(parameter, WeightSlice) pairs of the graph."""
    gm = em.graph_module
    return [(gm.get_parameter(path), s) for path, s in em.weight_slices().items()]


def _outside(param: torch.Tensor, slicer: WeightSlice, widths: dict) -> torch.Tensor:
    """Entries of `param` that the slicer drops at `widths`."""
    plan = slicer.plan(widths[slicer.block])
    n = param.shape[slicer.axis]
    keep = torch.zeros(n, dtype=torch.bool)
    if plan is None:
        keep[:] = True
    elif isinstance(plan, int):
        keep[:plan] = True
    else:
        keep[plan] = True
    return param.detach().index_select(slicer.axis, (~keep).nonzero().flatten())


def test_subnetwork_step_touches_only_its_slice(em):
    sub = {n: op.candidates[0] for n, op in em.ops.items()}
    config = TrainConfig(steps=1, loss="lm")
    opt = make_optimizer(em, TrainConfig(steps=1, lr=1e-2))
    for p in em.parameters():
        p.requires_grad_(True)
    accumulate(em, em, tokens(4), [sub], config)
    em.set_widths(sub)
    pairs = _slices(em)
    assert len(pairs) >= 8
    before = [(_outside(p, s, sub).clone(), p) for p, s in pairs]
    for p, s in pairs:
        dropped = _outside(p.grad, s, sub)
        assert dropped.numel() > 0 and torch.count_nonzero(dropped) == 0
        assert torch.count_nonzero(p.grad) > 0  # the kept slice did learn
    opt.step()
    em.set_widths(sub)
    for (old, p), (_, s) in zip(before, pairs):
        assert torch.equal(_outside(p, s, sub), old)
    assert any(not torch.equal(p.detach(), q) for p, q in
               zip(em.parameters(), tiny_elastic().parameters()))


def test_losses_match_direct_formulas():
    g = torch.Generator().manual_seed(0)
    logits, teacher = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    ids = torch.randint(0, 11, (2, 5), generator=g)
    direct = torch.nn.CrossEntropyLoss()(logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
    assert torch.allclose(lm_loss(logits, ids), direct)
    t = 2.0
    p = F.softmax(teacher[:, :-1] / t, -1)
    q = F.softmax(logits[:, :-1] / t, -1)
    kl = (p * (p.log() - q.log())).sum(-1).mean() * t * t
    assert torch.allclose(kd_loss(logits, teacher, t), kl, atol=1e-6)
    assert kd_loss(teacher, teacher, t).abs() < 1e-6


def test_data_order_is_a_function_of_the_step():
    rows = [batch_rows(s, 4, 10, seed=1) for s in range(10)]
    flat = torch.cat(rows[:5]).tolist()  # 20 rows = two epochs of 10
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert torch.equal(batch_rows(3, 4, 10, seed=1), rows[3])


def test_bad_settings_are_refused(em, tmp_path):
    with pytest.raises(TrainingError, match="sampler"):
        train_elastic(em, tokens(), tmp_path / "a", TrainConfig(steps=1, sampler="nope"))
    with pytest.raises(TrainingError, match="loss"):
        train_elastic(em, tokens(), tmp_path / "a", TrainConfig(steps=1, loss="mse"))
    with pytest.raises(TrainingError, match="fewer than one batch"):
        train_elastic(em, tokens(2), tmp_path / "a", TrainConfig(steps=1, batch=4))
    with pytest.raises(TrainingError, match="LongTensor"):
        train_elastic(em, tokens().float(), tmp_path / "a", TrainConfig(steps=1))
    run = tmp_path / "b"
    train_elastic(em, tokens(), run, TrainConfig(steps=2, checkpoint_every=1), progress=False)
    with pytest.raises(TrainingError, match="already holds checkpoints"):
        train_elastic(em, tokens(), run, TrainConfig(steps=3), progress=False)
    with pytest.raises(TrainingError, match="different settings"):
        train_elastic(em, tokens(), run, TrainConfig(steps=3, lr=1.0), resume=True,
                      progress=False)


def _cfg(steps: int) -> TrainConfig:
    return TrainConfig(steps=steps, batch=4, samples=2, loss="lm+kd", lr=1e-3, warmup=2,
                       checkpoint_every=2, eval_every=3)


def test_sigterm_checkpoints_and_resume_is_exact(tmp_path):
    whole = tmp_path / "whole"
    train_elastic(tiny_elastic(), tokens(), whole, _cfg(8), heldout=tokens(8, seed=1),
                  progress=False)
    em = tiny_elastic()
    calls = []

    def hook(*_):  # 3 training passes per step; SIGTERM in the middle of step 4
        if torch.is_grad_enabled():  # not the validation forwards
            calls.append(1)
            if len(calls) == 3 * 3 + 2:
                os.kill(os.getpid(), signal.SIGTERM)
    handle = em.register_forward_pre_hook(hook)
    part = tmp_path / "part"
    out = train_elastic(em, tokens(), part, _cfg(8), heldout=tokens(8, seed=1), progress=False)
    handle.remove()
    assert out["status"] == "stopped" and out["step"] == 4
    assert (part / "checkpoints" / "step-0000004").is_dir()
    out = train_elastic(tiny_elastic(), tokens(), part, _cfg(8), heldout=tokens(8, seed=1),
                        resume=True, progress=False)
    assert out["status"] == "done" and out["step"] == 8
    a, b = read_metrics(whole), read_metrics(part)
    assert [r["step"] for r in b] == list(range(9))
    for ra, rb in zip(a, b):
        assert ra.get("loss") == rb.get("loss") and ra.get("val") == rb.get("val")
    assert (part / "curves.png").stat().st_size > 10_000


def test_resume_when_some_parameters_never_had_a_gradient(tmp_path):
    """The default conversion compensates attention too; training only MLP widths never
    uses the attention compensation, so Adam holds no state for it. Resuming such a run
    (it failed: "Missing optimizer state for parameter ... flextron_comp_0.bias") is
    exact."""
    from conftest import calibration
    from zoo import ZOO, sample_inputs

    import flextron_fx

    def compensated():
        torch.manual_seed(0)
        return flextron_fx.flextronize(ZOO["llama"](), sample_inputs("llama"), calibration(),
                                       progress=False)

    cfg = TrainConfig(steps=4, batch=4, samples=1, vary="mlp", lr=1e-3, warmup=1,
                      checkpoint_every=2, eval_every=0)
    em = compensated()
    unused = [n for n, p in em.named_parameters() if "flextron_comp" in n]
    assert unused
    train_elastic(em, tokens(), tmp_path / "whole", cfg, progress=False)
    stopped = train_elastic(compensated(), tokens(), tmp_path / "part", cfg, progress=False,
                            max_seconds=0.0)
    assert stopped["status"] == "stopped" and stopped["step"] == 1
    state = load_file(str(tmp_path / "part" / "checkpoints" / "step-0000001" /
                          "optimizer.safetensors"))
    assert any(k.startswith(n + "::") for n in unused for k in state)  # MLP ones
    assert not all(any(k.startswith(n + "::") for k in state) for n in unused)
    resumed = compensated()
    out = train_elastic(resumed, tokens(), tmp_path / "part", cfg, progress=False, resume=True)
    assert out["status"] == "done" and out["step"] == 4
    for (k, a), (_, b) in zip(em.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(TrainingError, match="does not fit this model"):
        # the uncompensated model: the checkpoint's factors do not fit it
        train_elastic(tiny_elastic(), tokens(), tmp_path / "part", cfg, progress=False,
                      resume=True)


def _script(*args, env_extra=None, **kw):
    env = dict(os.environ, PYTHONPATH=str(HERE.parent), OMP_NUM_THREADS="1",
               **(env_extra or {}))
    return subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A 10-step run of train_script.py that nothing stops (the reference for resumes)."""
    whole = tmp_path_factory.mktemp("whole") / "run"
    ref = _script(whole, 10)
    assert ref.wait(timeout=300) == 0, ref.stdout.read()
    return whole


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    folder = run / "checkpoints" / f"step-{step:07d}"
    return {f"{name}:{k}": v for name in ("model", "optimizer")
            for k, v in load_file(str(folder / f"{name}.safetensors")).items()}


def test_sigkill_while_checkpointing_then_resume_repeats_every_step_and_the_weights(
        tmp_path, uninterrupted):
    """SIGKILL at a chosen point (a hook in the run, no timing): while checkpoint 6 is being
    written, after steps 5 and 6 were logged. The resumed run removes the half-written
    folder (with a log line), repeats the uninterrupted run step for step from checkpoint 4
    and ends with the same weights and optimizer state."""
    part = tmp_path / "part"
    killed = _script(part, 10, "--kill-in-checkpoint", 6)
    assert killed.wait(timeout=300) == -signal.SIGKILL, killed.stdout.read()
    assert (part / "checkpoints" / "latest").read_text() == "step-0000004"
    assert read_metrics(part)[-1]["step"] == 6  # logged steps that the checkpoint lacks
    leftovers = [p.name for p in (part / "checkpoints").iterdir() if p.name.startswith(".")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".step-0000006."), leftovers
    assert (part / ".lock").is_file()  # its lock file stays, but the lock went with it
    resumed = _script(part, 10, "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()
    log = resumed.stdout.read()
    assert f"removed 1 unfinished checkpoint file(s) from {part / 'checkpoints'}" in log, log
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == \
        ["latest", "step-0000008", "step-0000010"]
    assert not (part / ".lock").exists()
    a, b = read_metrics(uninterrupted), read_metrics(part)
    assert [r["step"] for r in b] == list(range(11))
    for key in ("loss", "loss_sub", "val", "sub_params", "lr"):
        assert [r.get(key) for r in a] == [r.get(key) for r in b], key
    ref, got = _weights(uninterrupted, 10), _weights(part, 10)
    assert ref.keys() == got.keys() and len(ref) > 10
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    assert not all(torch.equal(ref[k], v) for k, v in _weights(part, 8).items())  # it trains


def _torchrun(run, steps, parallel):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", "2", str(SCRIPT), str(run), str(steps), "--parallel", parallel]
    env = dict(os.environ, PYTHONPATH=str(HERE.parent), OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300,
                         check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


# both slow (41 s and 20 s of torchrun): the default suite's 20 minutes
@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one(tmp_path, parallel):
    single = tmp_path / "single"
    ref = _script(single, 6)
    assert ref.wait(timeout=120) == 0, ref.stdout.read()
    _torchrun(tmp_path / parallel, 6, parallel)
    a, b = read_metrics(single), read_metrics(tmp_path / parallel)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(7))
    for ra, rb in zip(a[1:], b[1:]):
        assert ra["sub_params"] == rb["sub_params"]  # the same sub-networks on every rank
        assert abs(ra["loss_full"] - rb["loss_full"]) < 1e-4
        assert max(abs(x - y) for x, y in zip(ra["loss_sub"], rb["loss_sub"])) < 1e-4
    for name, v in a[-1]["val"].items():
        assert abs(v - b[-1]["val"][name]) < 1e-4
    saved = json.loads((tmp_path / parallel / "checkpoints" / "step-0000006" /
                        "state.json").read_text())
    assert saved["world"] == 2
    # the weights after the steps: the same up to float summation order (2 x 2 rows
    # all-reduced against 4 rows at once), and far from the weights before training
    one, two = _weights(single, 6), _weights(tmp_path / parallel, 6)
    start = {k: v for k, v in _weights(single, 4).items() if k.startswith("model:")}
    assert one.keys() == two.keys() and len(start) > 10
    moved = max((one[k] - start[k]).abs().max().item() for k in start)
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    print(f"weights moved by up to {moved:.2e} from step 4, differ by up to {worst:.2e}")
    assert moved > 1e-4  # measured: 7.7e-4 moved, 8.8e-8 apart
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-6, rtol=1e-5, msg=k)
    shutil.rmtree(tmp_path)


# ---- resuming: what the run was started with is checked, leftovers are cleaned ----------

@pytest.fixture()
def two_step_run(tmp_path):
    """A finished 2-step run with a checkpoint after each step."""
    run = tmp_path / "run"
    train_elastic(tiny_elastic(), tokens(), run, _quick(2), progress=False)
    return run


def _quick(steps: int, **kw) -> TrainConfig:
    return TrainConfig(steps=steps, batch=4, samples=1, checkpoint_every=1, warmup=1, **kw)


def test_resume_with_other_steps_is_refused_naming_both(two_step_run):
    with pytest.raises(TrainingError, match=r"steps=5, but it was started with steps=2.*"
                                            r"learning-rate schedule.*--steps 2"):
        train_elastic(tiny_elastic(), tokens(), two_step_run, _quick(5), resume=True,
                      progress=False)


def test_resume_on_other_training_data_is_refused(two_step_run):
    with pytest.raises(TrainingError, match=r"other training tokens: the run used 64 blocks "
                                            r"of 16 tokens \(sha256 \w+\), these are 64 "
                                            r"blocks of 16"):
        train_elastic(tiny_elastic(), tokens(seed=7), two_step_run, _quick(2), resume=True,
                      progress=False)
    with pytest.raises(TrainingError, match="other training tokens: .* these are 32 blocks"):
        train_elastic(tiny_elastic(), tokens(32), two_step_run, _quick(2), resume=True,
                      progress=False)
    with pytest.raises(TrainingError, match=r"other training data: domains: the run used "
                                            r"None, now \['code'\]"):
        train_elastic(tiny_elastic(), tokens(), two_step_run,
                      _quick(2, extra={"domains": ["code"]}), resume=True, progress=False)
    out = train_elastic(tiny_elastic(), tokens(), two_step_run,  # the same data: accepted
                        _quick(2, extra={"elastic": "moved/elsewhere"}), resume=True,
                        progress=False)
    assert out["step"] == 2


def test_leftovers_of_a_killed_checkpoint_write_are_removed(two_step_run, caplog):
    folder = two_step_run / "checkpoints"
    stale = [folder / ".step-0000003.k2j3h4_x", folder / ".step-0000003.tmp-999999-ab12"]
    for p in stale:  # the old and the current naming of a temporary checkpoint folder
        p.mkdir()
        (p / "model.safetensors").write_bytes(b"\0" * 8)
    (folder / "latest.tmp").write_text("step-0000003")
    with caplog.at_level("WARNING"), pytest.raises(TrainingError, match="steps=3"):
        train_elastic(tiny_elastic(), tokens(), two_step_run, _quick(3), resume=True,
                      progress=False)  # refused, but the leftovers are gone first
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step-0000001",
                                                        "step-0000002"]
    assert "removed 3 unfinished checkpoint file(s)" in caplog.text
    assert ".step-0000003.k2j3h4_x" in caplog.text


@pytest.mark.parametrize("damage", ["model", "optimizer", "rng", "state-json", "state-key"])
def test_damaged_training_checkpoint_is_reported(two_step_run, damage):
    step2 = two_step_run / "checkpoints" / "step-0000002"
    if damage == "state-json":
        (step2 / "state.json").write_text('{"step": 2, "tok')
        what = r"state.json is damaged: it cannot be read as JSON"
    elif damage == "state-key":
        state = json.loads((step2 / "state.json").read_text())
        del state["scheduler"]
        (step2 / "state.json").write_text(json.dumps(state))
        what = r"state.json is damaged: the entry 'scheduler' is missing"
    else:
        f = step2 / f"{damage}.safetensors"
        f.write_bytes(f.read_bytes()[:100])
        what = rf"{damage}.safetensors is damaged: it cannot be read"
    with pytest.raises(CheckpointError, match=rf"step-0000002/{what}.*point .*latest at "
                                              r"step-0000001 \(the one before\)"):
        train_elastic(tiny_elastic(), tokens(), two_step_run, _quick(2), resume=True,
                      progress=False)


def test_a_run_folder_another_process_trains_in_is_refused(two_step_run):
    """Two processes training in one folder would both write checkpoints and metrics: the
    second is refused, naming the first, and nothing of the run changes. Once the first is
    gone (here SIGKILLed, so it cleaned nothing up) the run resumes."""
    run = two_step_run
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (run / "checkpoints").iterdir())
    metrics = (run / "metrics.jsonl").read_text()
    hold = ("import sys, time; from pathlib import Path; "
            "from flextron_fx.train.state import run_lock\n"
            "with run_lock(Path(sys.argv[1])):\n print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(run)],
                              env=dict(os.environ, PYTHONPATH=str(HERE.parent)),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(TrainingError, match=rf"is in use: process {holder.pid} on .* is "
                                                r"training in it.*kill -TERM"):
            train_elastic(tiny_elastic(), tokens(), run, _quick(2), resume=True,
                          progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert sorted((p.name, p.stat().st_mtime_ns)
                  for p in (run / "checkpoints").iterdir()) == before
    assert (run / "metrics.jsonl").read_text() == metrics
    out = train_elastic(tiny_elastic(), tokens(), run, _quick(2), resume=True,
                        progress=False)
    assert out["status"] == "done" and out["step"] == 2


def test_a_foreign_run_folder_is_refused_and_kept(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"model_type": "llama"}')  # a model folder, say
    with pytest.raises(OutputError, match=r"config.json, not a training run.*overwrite"):
        train_elastic(tiny_elastic(), tokens(), mine, _quick(1), progress=False)
    assert sorted(p.name for p in mine.iterdir()) == ["config.json"]
    assert json.loads((mine / "config.json").read_text()) == {"model_type": "llama"}
    out = train_elastic(tiny_elastic(), tokens(), mine, _quick(1), progress=False,
                        overwrite=True)
    assert out["status"] == "done"


@pytest.mark.parametrize("how", ["removed", "replaced"])
@pytest.mark.parametrize("every, stops_at", [(1, 1), (3, 2)])
def test_a_run_folder_removed_while_training_stops_the_run_clearly(tmp_path, monkeypatch, how,
                                                                   every, stops_at):
    """Deleting (or deleting and recreating) the run folder mid-run stops the run at its
    next write (a checkpoint, or else the next step's metrics) with an error that says so,
    instead of writing the rest of the run into a new folder of that name."""
    run = tmp_path / "run"

    def remove_the_folder(folder):  # called after step 1's evaluation
        shutil.rmtree(folder)
        if how == "replaced":
            folder.mkdir()

    monkeypatch.setattr(train_loop, "plot_run", remove_the_folder)
    with pytest.raises(TrainingError, match=rf"run was removed, moved or replaced while this "
                                            rf"process trained in it \(at step {stops_at}\)"
                                            r".*resume"):
        train_elastic(tiny_elastic(), tokens(), run,
                      TrainConfig(steps=3, batch=4, samples=1, checkpoint_every=every,
                                  warmup=1, eval_every=1),
                      heldout=tokens(4, seed=3), progress=False)
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()
    if how == "replaced":
        assert list(run.iterdir()) == []  # the new folder is left as it was made
    else:
        assert not run.exists()
