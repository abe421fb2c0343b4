"""Data-parallel fit and fit_local on torch.distributed: exactness, resume, evaluation, faults.

Two spawns of two gloo processes on localhost (tests/train/dist_workers.py): the fault run
(rank 1 SIGKILLs itself), then one run that does every other two-process check. One process
computes the references here. With common random numbers per data point (float64), 2 × B/2
must follow the 1 × B trajectory to a relative difference of 1e-6.
"""

import math

import pyro
import pytest
import torch

from pyro_lvm.cli.launch import torchrun_args
from pyro_lvm.evaluate import elbo_decomposition, inference_gaps, log_likelihood
from pyro_lvm.evaluate.distributed import distributed_evaluate
from pyro_lvm.train.distributed import GradientSync
from pyro_lvm.train.distributed.data_parallel import DataParallel
from pyro_lvm.train.distributed.sharded import ShardedLocalGuide, shard_size
from pyro_lvm.train.step import Batch, svi_step
from tests.train import dist_workers as w

Z = 4.5  # two-sided false-alarm rate about 7e-6
RTOL = 1e-6
STEPS = 2 * w.EPOCHS  # N / B = 2 steps per epoch


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, per snapshot row, maximized over the rows."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    a, b = a.reshape(len(a), -1) if a.dim() else a, b.reshape(len(b), -1) if b.dim() else b
    return float(((a - b).abs().amax(-1) / b.abs().amax(-1).clamp(min=1e-300)).max())


def _column(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)[:, None]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The two-process results and the one-process references (computed once)."""
    folder = tmp_path_factory.mktemp("dist")
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ref = {loss: w.run_fit(loss, k, w.EPOCHS) for loss, k in w.ESTIMATORS}
        ref["elbo_clip"] = w.run_fit("elbo", 1, w.EPOCHS, optimizer=w.clipped())
        for loss, k in w.ESTIMATORS:
            ref[f"{loss}_sgd"] = w.run_fit(loss, k, w.EPOCHS, optimizer=w.sgd())
        ref["elbo_sgd_clip"] = w.run_fit("elbo", 1, w.EPOCHS, optimizer=w.sgd(w.SGD_CLIP))
        ref["local_ckpt"] = folder / "local_ref.pt"
        ref["local"] = w.run_local(w.EPOCHS, ref["local_ckpt"])
        ref["local_b2"] = w.run_local(2, batch_size=2)
        ref["delta_valid"] = w.run_fit(
            "elbo", 1, w.EPOCHS, guide=w.delta_guide, valid_data=w.data()
        )
        w.run_fit("elbo", 1, w.HALF, folder / "fit1.pt")  # for 1 -> 2
        w.run_local(w.HALF, folder / "local1.pt")
        fault = w.spawn(w.fault_worker, 2, folder / "fault", str(folder / "fault.pt"), 3)
        fault_epoch = torch.load(folder / "fault.pt", weights_only=True)["epoch"]
        # generous: a loaded 2-core machine runs the two processes several times slower
        two = w.spawn(w.exact_worker, 2, folder / "two", str(folder), wait=300.0)
        if any(two[1]) or two[2] != [0, 0]:
            pytest.fail(
                f"the two-process run failed: exit codes {two[2]}\n{two[1][0] or two[1][1]}"
            )
        # 2 -> 1: resume here what two processes wrote
        ref["resume_fit"] = w.run_fit("elbo", 1, w.EPOCHS, folder / "fit2.pt", resume=True)
        ref["resume_local"] = w.run_local(w.EPOCHS, folder / "local2half.pt", resume=True)
        pyro.set_rng_seed(5)
        w.run_fit("elbo", 1, w.EPOCHS, guide=w.mc_guide)
        ref["mc_elbo"] = elbo_decomposition(w.model, w.mc_guide, w.data(), num_samples=200)
        # the parameters the two processes evaluated with (after their first "elbo" run)
        w.run_fit("elbo", 1, w.EPOCHS)
        x = w.data()
        ref["ll"] = log_likelihood(w.model, w.delta_guide, x, num_samples=3)
        ref["decomposition"] = elbo_decomposition(w.model, w.delta_guide, x)
        ref["ll_one"] = distributed_evaluate(
            log_likelihood, w.model, w.delta_guide, x, num_samples=3
        )
        pyro.set_rng_seed(7)
        ref["gaps"] = inference_gaps(w.model, w.GapGuide(), x, **w.GAPS)
        yield {"ref": ref, "two": two, "fault": (*fault, fault_epoch), "folder": folder}
    finally:
        torch.set_default_dtype(dtype)


def _two(runs):
    results, errors, codes, _ = runs["two"]
    assert errors == [None, None] and codes == [0, 0], errors
    assert results[0] is not None and results[1] is not None
    return results


@pytest.mark.parametrize("loss", [name for name, _ in w.ESTIMATORS])
def test_two_processes_follow_the_one_process_trajectory(runs, loss):
    ref_snaps, ref_losses, _ = runs["ref"][loss]
    for out in _two(runs):  # both ranks hold the same parameters and losses
        snaps, losses, _ = out[loss]
        assert snaps.shape == ref_snaps.shape == (w.EPOCHS, ref_snaps.shape[1])
        assert len(losses) == STEPS
        assert _rel(snaps, ref_snaps) <= RTOL
        assert _rel(_column(losses), _column(ref_losses)) <= RTOL
        assert out[f"{loss}_reduces"] == STEPS  # one bucketed all-reduce per step
    assert _rel(ref_snaps[-1:], ref_snaps[:1]) > 1e-2  # the parameters did move


def test_pyro_svi_path_is_exact_with_one_all_reduce_per_step(runs):
    ref_snaps = runs["ref"]["elbo"][0]  # FastSVI in one process; pyro SVI agrees to rounding
    for out in _two(runs):
        assert _rel(out["elbo_svi"][0], ref_snaps) <= RTOL
        # pyro.optim steps one torch optimizer per parameter: the hook still runs once
        assert out["svi_reduces"] == STEPS


def test_gradient_clipping_sees_the_all_reduced_gradient(runs):
    """pyro.optim clips each parameter's gradient before stepping it: with the all-reduce
    before that call, 2 processes clip the global-batch gradient exactly as 1 process does."""
    ref_snaps = runs["ref"]["elbo_clip"][0]
    assert _rel(ref_snaps, runs["ref"]["elbo"][0]) > 1e-3  # the clipping is active
    for out in _two(runs):
        assert _rel(out["elbo_clip"][0], ref_snaps) <= RTOL
        assert _rel(_column(out["elbo_clip"][1]), _column(runs["ref"]["elbo_clip"][1])) <= RTOL
        assert out["clip_reduces"] == STEPS


@pytest.mark.parametrize("loss", [name for name, _ in w.ESTIMATORS])
def test_plain_sgd_sees_the_scale_of_the_all_reduced_gradient(runs, loss):
    """SGD's step is lr times the gradient: a summed (not weighted) all-reduce or a wrong
    world size doubles or halves every step, which Adam's normalization would hide."""
    ref_snaps, ref_losses, _ = runs["ref"][f"{loss}_sgd"]
    assert _rel(ref_snaps[-1:], ref_snaps[:1]) > 1e-2  # the parameters did move
    for out in _two(runs):
        snaps, losses, _ = out[f"{loss}_sgd"]
        assert snaps.shape == ref_snaps.shape and len(losses) == STEPS
        assert _rel(snaps, ref_snaps) <= RTOL
        assert _rel(_column(losses), _column(ref_losses)) <= RTOL


def test_sgd_with_a_partly_binding_clip_sees_the_all_reduced_gradient(runs):
    ref_snaps, ref_losses, _ = runs["ref"]["elbo_sgd_clip"]
    assert _rel(ref_snaps, runs["ref"]["elbo_sgd"][0]) > 1e-3  # the clip binds somewhere
    for out in _two(runs):
        assert _rel(out["elbo_sgd_clip"][0], ref_snaps) <= RTOL
        assert _rel(_column(out["elbo_sgd_clip"][1]), _column(ref_losses)) <= RTOL


def test_validation_is_split_and_combined_exactly(runs):
    ref = runs["ref"]["delta_valid"]
    for out in _two(runs):
        assert _rel(out["delta_valid"][0], ref[0]) <= RTOL
        assert len(out["delta_valid"][2]) == w.EPOCHS
        assert _rel(_column(out["delta_valid"][2]), _column(ref[2])) <= RTOL


def test_per_datapoint_algorithm_is_exact_and_gathers_its_shards(runs):
    out = _two(runs)[0]
    assert (
        len(out["local"]) == STEPS
        and _rel(_column(out["local"]), _column(runs["ref"]["local"])) <= RTOL
    )
    two = torch.load(runs["folder"] / "local2.pt", weights_only=True)
    one = torch.load(runs["ref"]["local_ckpt"], weights_only=True)
    # one file, the layout of an unsharded run: all rows in dataset order
    assert two["guide"]["loc_unconstrained"].shape == (w.N, w.DZ)
    assert two["param_store"]["module_owned"] == one["param_store"]["module_owned"]
    assert (
        _rel(two["guide"]["loc_unconstrained"][None], one["guide"]["loc_unconstrained"][None])
        <= RTOL
    )
    assert two["param_store"]["values"].keys() == one["param_store"]["values"].keys()
    for name, value in one["param_store"]["values"].items():
        assert _rel(two["param_store"]["values"][name][None], value[None]) <= RTOL


def test_per_datapoint_steps_of_a_process_without_points_are_exact(runs):
    from pyro_lvm.data import Minibatches

    order = Minibatches(w.data(), 2, seed=1)
    pairs = torch.cat([order.permutation(e).reshape(-1, 2) for e in range(2)])
    assert bool(((pairs % 2).sum(-1) != 1).any())  # some global batch leaves a process empty
    ref = _column(runs["ref"]["local_b2"])
    for out in _two(runs):
        assert len(out["local_b2"]) == 16 and _rel(_column(out["local_b2"]), ref) <= RTOL


def test_resume_across_world_sizes(runs):
    ref_snaps = runs["ref"]["elbo"][0]
    out = _two(runs)[0]
    assert _rel(out["resume_fit"][0][-1:], ref_snaps[-1:]) <= RTOL  # 1 -> 2
    assert _rel(runs["ref"]["resume_fit"][0][-1:], ref_snaps[-1:]) <= RTOL  # 2 -> 1
    local = _column(runs["ref"]["local"])
    assert _rel(_column(out["resume_local"]), local) <= RTOL  # 1 -> 2
    assert _rel(_column(runs["ref"]["resume_local"]), local) <= RTOL  # 2 -> 1


def test_sigkill_of_one_rank_stops_the_other_and_the_run_resumes(runs):
    results, errors, codes, seconds, epoch = runs["fault"]
    assert codes[1] == -9  # SIGKILL
    assert codes[0] == 0 and errors[0] is None, errors[0]
    assert "rank 0 of 2" in results[0]["error"] and "resume" in results[0]["error"]
    assert seconds[0] < 60  # well within the join limit: it did not hang
    # the checkpoint rank 0 wrote before the failure resumes (in the two-process spawn)
    assert epoch == 2  # rank 1 died in epoch 3, before its end
    assert _rel(_two(runs)[0]["resume_fault"][0][-1:], runs["ref"]["elbo"][0][-1:]) <= RTOL


def test_ordinary_seeding_agrees_within_monte_carlo_error(runs):
    one, two = runs["ref"]["mc_elbo"].elbo, _two(runs)[0]["mc_elbo"].elbo
    assert one.shape == two.shape == (w.N,)
    se = math.sqrt(one.var() / w.N + two.var() / w.N)
    assert abs(float(one.mean() - two.mean())) <= Z * se


def test_distributed_evaluation_gathers_in_the_original_order(runs):
    ref = runs["ref"]
    for out in _two(runs):
        assert torch.allclose(out["ll"], ref["ll"], rtol=RTOL, atol=0)
        assert torch.allclose(
            out["decomposition"].elbo, ref["decomposition"].elbo, rtol=RTOL, atol=0
        )
        assert torch.allclose(out["decomposition"].kl, ref["decomposition"].kl, rtol=RTOL, atol=0)
    # in one process the wrapper is the function itself
    assert torch.allclose(ref["ll_one"], ref["ll"], rtol=1e-12, atol=0)


def test_distributed_inference_gaps_per_point_in_order(runs):
    one = runs["ref"]["gaps"]
    for out in _two(runs):
        two = out["gaps"]
        assert two.log_px.shape == two.elbo_optimized.shape == (w.N,)
        assert two.num_samples == one.num_samples
        assert 0 < two.inner_steps <= w.GAPS["max_steps"]
        # L[q] per point depends on the encoder only: per-point z-test against one process
        se = (one.elbo_amortized_se**2 + two.elbo_amortized_se**2).sqrt()
        assert bool(((one.elbo_amortized - two.elbo_amortized).abs() <= Z * se).all())
        # and the points are distinguishable at that precision (a swapped order would fail)
        assert float((one.elbo_amortized - one.elbo_amortized.flip(0)).abs().max()) > 10 * float(
            se.max()
        )


def test_one_process_objects_are_the_identity():
    par = DataParallel(10, 4)
    batch = Batch((torch.randn(4, 2), torch.arange(4)), {"y": torch.arange(4)}, 4)
    assert not par.active and par.is_main and par.hooks == [] and par.shard(batch) is batch
    assert par.reduce([1.5, 2.0]) == [1.5, 2.0] and not par.agree(False) and par.agree(True)
    assert par.mean(lambda rows: float(torch.arange(10.0)[rows].mean()), 10) == 4.5
    GradientSync(["p"])([])  # no process group: nothing to do
    guide = ShardedLocalGuide(w.LocalDeltaGuide(shard_size(7)), 7)
    assert guide.local_rows(torch.tensor([3, 5])).tolist() == [3, 5]
    assert list(guide.state_dict()) == ["loc_unconstrained"]  # the unsharded guide's names
    with pytest.raises(ValueError, match="shard_size"):
        ShardedLocalGuide(w.LocalDeltaGuide(6), 7)


def test_before_update_hooks_run_once_per_step_with_every_gradient():
    """pyro.optim holds one torch optimizer per parameter; the hook still runs once."""
    pyro.clear_param_store()
    x = w.data().to(torch.get_default_dtype())
    svi = pyro.infer.SVI(w.model, w.mc_guide, pyro.optim.Adam({"lr": 0.1}), pyro.infer.Trace_ELBO())
    seen = []
    for _ in range(2):  # the first step creates the optimizers
        svi_step(svi, Batch((x[:8], torch.arange(8)), {}, 8), before_update=[seen.append])
    assert [len(params) for params in seen] == [5, 5]  # w, b, a, c, s
    assert all(p.grad is not None for params in seen for p in params)


def test_nproc_relaunches_the_same_command_through_torchrun():
    from torch.distributed.run import get_args_parser

    argv = ["train", "--nproc", "2", "--epochs", "3", "--nproc=2", "--out", "d"]
    args = get_args_parser().parse_args(torchrun_args(2, argv))
    assert args.standalone and args.nproc_per_node == "2" and args.module
    assert args.training_script == "pyro_lvm"
    assert args.training_script_args == ["train", "--epochs", "3", "--out", "d"]


def test_bad_layouts_are_refused_by_name(monkeypatch):
    import pyro_lvm.train.distributed.data_parallel as d

    monkeypatch.setattr(d, "rank_and_size", lambda: (0, 4))
    monkeypatch.setattr(d, "init_distributed", lambda device=None: (0, 4))
    with pytest.raises(ValueError, match="batch_size"):
        DataParallel(num_data=10, batch_size=8)  # the last minibatch has 2 < 4 points
    DataParallel(num_data=10, batch_size=8, owned=True)  # fit_local: empty shards are fine
    with pytest.raises(ValueError, match="at most num_data processes"):
        DataParallel(num_data=3, batch_size=3, owned=True)


def test_shard_slices_positional_and_named_tensors_alike(monkeypatch):
    import pyro_lvm.train.distributed.data_parallel as d

    monkeypatch.setattr(d, "rank_and_size", lambda: (1, 2))
    monkeypatch.setattr(d, "init_distributed", lambda device=None: (1, 2))
    idx = torch.tensor([5, 2, 7, 4, 1])
    batch = Batch((idx.double()[:, None], idx), {"y": 10 * idx}, 5)
    par = DataParallel(10, 5)
    part = par.shard(batch)  # rank 1 of 2: the second contiguous piece
    assert part.args[1].tolist() == [4, 1] and part.args[0][:, 0].tolist() == [4.0, 1.0]
    assert part.kwargs["y"].tolist() == [40, 10] and part.size == 2 and par.sync.weight == 0.4
    owned = DataParallel(10, 5, owned=True).shard(batch)  # the odd indices
    assert owned.args[1].tolist() == [5, 7, 1] and owned.kwargs["y"].tolist() == [50, 70, 10]
