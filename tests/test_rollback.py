"""Rollback restores the whole model, not only the pruned weights (issue 26, item 3), and pruning is deterministic.

Every estimator, interrupted at each stage of a prune (while it scores or trains on the model, at the first, a
middle and the last layer it masks), and every allocator interrupted while it measures, leave every parameter,
buffer and train/eval flag as they were, and no mask behind."""
import importlib

import pytest
import torch

import prunekit
from conftest import calibration_for, tiny
from prunekit.allocation import ALLOCATORS
from prunekit.importance import ESTIMATORS

mask_module = importlib.import_module("prunekit.masks")  # prunekit.masks is also the function of that name
FAST = {"mask_sparsity": {"steps": 3}, "zeroth_order": {"probes": 2, "samples": 2}}


class Interrupt(KeyboardInterrupt):
    pass


def state(model):
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {name: t.detach().clone() for name, t in tensors.items()}, {n: m.training for n, m in model.named_modules()}


def assert_restored(model, before):
    tensors, modes = state(model)
    assert tensors.keys() == before[0].keys()
    changed = [name for name, t in tensors.items() if not torch.equal(t, before[0][name])]
    assert not changed, changed[:5]
    assert modes == before[1]
    assert prunekit.masks(model) == {}


def stages(n_layers: int):
    return ["scoring"] + [f"layer {k}" for k in sorted({1, n_layers // 2, n_layers})]


@pytest.mark.parametrize("name", sorted(ESTIMATORS.names()))
def test_every_estimator_interrupted_at_every_stage_restores_the_whole_model(name, monkeypatch):
    estimator = ESTIMATORS.create(name, **FAST.get(name, {}))
    x = calibration_for("llama")
    attach = mask_module.attach
    for stage in stages(14):  # tiny llama: 2 blocks of 7 Linears
        model = tiny("llama")
        model.model.layers[1].train()  # a mode of its own, to be kept
        before = state(model)
        calls = {"n": 0}

        def counting_attach(module, keep, param="weight"):
            calls["n"] += 1
            if stage == f"layer {calls['n']}":
                raise Interrupt(stage)
            return attach(module, keep, param)

        monkeypatch.setattr(mask_module, "attach", counting_attach)
        if stage == "scoring":  # after the estimator has had the model: gathered, trained, measured
            real_prune = type(estimator).prune
            monkeypatch.setattr(type(estimator), "prune", lambda self, *a, **k: (_ for _ in ()).throw(Interrupt()))
        with pytest.raises(Interrupt):
            prunekit.prune(model, 0.5, importance=estimator, calibration=x, progress=False)
        if stage == "scoring":
            monkeypatch.setattr(type(estimator), "prune", real_prune)
        assert_restored(model, before)


@pytest.mark.parametrize("name", sorted(set(ALLOCATORS.names()) - {"uniform", "global"}))  # global: structured only
def test_every_allocator_interrupted_while_it_measures_restores_the_whole_model(name, monkeypatch):
    """The allocators measure the model (ECoFLaP perturbs its weights) before any mask: an interrupt in the middle of
    that must not leave a perturbation behind."""
    model = tiny("llama")
    before = state(model)
    calls = {"n": 0}

    def interrupted(*args, **kwargs):  # any forward of the model during allocation, the second one
        calls["n"] += 1
        if calls["n"] == 2:
            raise Interrupt("allocation")
        return forward(*args, **kwargs)

    forward = type(model).forward
    monkeypatch.setattr(type(model), "forward", interrupted)
    with pytest.raises(Interrupt):
        prunekit.prune(model, 0.5, importance="wanda", allocator=name, calibration=calibration_for("llama"),
                       progress=False)
    assert calls["n"] >= 2
    monkeypatch.setattr(type(model), "forward", forward)
    assert_restored(model, before)


@pytest.mark.parametrize("name", sorted(ESTIMATORS.names()))
def test_pruning_is_deterministic(name):
    """The same model, data and options give the same masks and weights, run after run (README, Guarantees)."""
    x = calibration_for("llama")
    runs = []
    for _ in range(2):
        model = tiny("llama")
        prunekit.prune(model, 0.5, importance=ESTIMATORS.create(name, **FAST.get(name, {})), calibration=x,
                       progress=False)
        runs.append((prunekit.masks(model), model.state_dict()))
    (masks_a, state_a), (masks_b, state_b) = runs
    assert masks_a.keys() == masks_b.keys() and all(torch.equal(masks_a[k], masks_b[k]) for k in masks_a)
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
