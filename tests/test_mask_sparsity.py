"""MaskSparsity: the L1 penalty reaches only the selected scales (checked against the same training without it),
folding gates keeps the function, the selected channels are the ones pruned, the budget is met exactly, and a
failed training leaves the model as it was."""
import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import prunekit
from conftest import calibration_for, tiny
from prunekit.calibration.inputs import as_batches
from prunekit.calibration.loss import model_loss
from prunekit.errors import CalibrationError, PrunekitError
from prunekit.importance.mask_sparsity import (
    ChannelGates,
    ChannelScales,
    MaskSparsity,
    channels_first,
    lr_schedule,
    shrink,
)
from prunekit.targets import Target, find_targets

STEPS, LR = 20, 1e-2  # a short phase; the default λ scales with it (see MaskSparsity)


def trained(l1=None, **options):
    """(model, targets, stats) after MaskSparsity's gather on a tiny Llama (no dropout: the run is deterministic)."""
    model = tiny("llama")
    targets = find_targets(model)
    est = MaskSparsity(steps=STEPS, lr=LR, l1=l1, **options)
    stats = est.gather(model, targets, as_batches(calibration_for("llama"), model), progress=False)
    return model, targets, stats


@pytest.fixture(scope="module")
def regularised():
    return trained()


def lowest_rows(weight, fraction=0.5):
    """Rows of the dense weight with the smallest L1 norms: the mask that the default base, magnitude, gives."""
    chosen = torch.zeros(weight.shape[0], dtype=torch.bool)
    chosen[weight.abs().sum(1).argsort()[:round(fraction * weight.shape[0])]] = True
    return chosen


def test_the_penalty_pulls_only_the_selected_scales(regularised):
    model, targets, with_l1 = regularised
    _, _, without = trained(l1=0.0)
    dense = find_targets(tiny("llama"))
    for t, d, plain in zip(targets, dense, without.values()):
        st = with_l1[t.module]
        sel = st.selected
        assert torch.equal(sel, lowest_rows(d.weight)) and torch.equal(sel, plain.selected)
        assert st.source == "gate"
        assert not st.scale[sel].any()  # driven to zero
        assert (plain.scale[sel] - 1).abs().max() < 0.01  # which the task loss alone does not do
        # the unselected scales train as they would without the penalty: it touches them only through the rest
        # of the network, two orders of magnitude below what it does to the selected ones
        assert (st.scale[~sel] - plain.scale[~sel]).abs().max() < 0.01
        assert st.scale[~sel].min() > 0.99
    assert not any(m._forward_hooks for m in model.modules())  # gates folded, hooks gone


def test_the_proximal_step_shrinks_only_the_selected_scales():
    gate = nn.Parameter(torch.tensor([0.5, -2.0, 0.1, 1.0, 3.0]))
    shrink({"m": gate}, {"m": torch.tensor([True, True, True, False, False])}, 0.3)
    assert torch.allclose(gate.detach(), torch.tensor([0.2, -1.7, 0.0, 1.0, 3.0]))


def test_pruning_after_the_training_changes_nothing(regularised):
    """The selected scales end at exactly zero and are folded into their rows: pruning those rows is lossless."""
    model, targets, stats = regularised
    est = MaskSparsity()
    for t in targets:
        weight = t.weight.float()
        assert not weight[stats[t.module].selected].any()
        new, keep = est.prune(weight, stats[t.module], t.numel // 2, None)
        assert torch.equal(new, weight) and torch.equal(~keep.any(1), stats[t.module].selected)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_folding_keeps_the_gated_function(family):
    model = tiny(family)
    ids = calibration_for(family)
    gates = ChannelGates(t.module for t in find_targets(model))
    with torch.no_grad():
        for gate in gates.gates.values():
            gate.uniform_(-1.5, 1.5)
        gated = model(ids).logits
        gates.fold()
        folded = model(ids).logits
    assert not torch.allclose(gated, tiny(family)(ids).logits, atol=1e-3)  # the gates did change the function
    assert torch.allclose(folded, gated, rtol=1e-4, atol=1e-5)
    assert not any(m._forward_hooks for m in model.modules())


def test_folding_keeps_a_gated_convolution():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 4, 3, stride=2))
    x = torch.randn(2, 3, 8, 8)
    gates = ChannelGates([model[0], model[2]])
    with torch.no_grad():
        for gate in gates.gates.values():
            gate.uniform_(0.0, 2.0)
        gated = model(x)
        gates.fold()
        assert torch.allclose(model(x), gated, rtol=1e-5, atol=1e-6)


def test_prune_removes_the_selected_channels_and_meets_the_budget():
    model = tiny("llama")
    expected = {t.name: lowest_rows(t.weight) for t in find_targets(model)}
    report = prunekit.prune(model, 0.5, importance=MaskSparsity(steps=STEPS, lr=LR),
                            calibration=calibration_for("llama"), progress=False)
    targets = find_targets(model)
    assert report.pruned == sum(t.numel for t in targets) // 2
    masks = prunekit.masks(model)
    for t in targets:
        rows_pruned = ~masks[t.name].any(1)
        assert torch.equal(rows_pruned, expected[t.name]), t.name  # exactly the selected rows, whole
        assert int((~masks[t.name]).sum()) == t.numel // 2


def test_budgets_off_the_channel_grid_are_met_exactly():
    model = tiny("llama")
    expected = {t.name: lowest_rows(t.weight) for t in find_targets(model)}
    report = prunekit.prune(model, 0.3, importance=MaskSparsity(steps=STEPS, lr=LR),
                            calibration=calibration_for("llama"), progress=False)
    assert report.pruned == round(0.3 * sum(t.numel for t in find_targets(model)))
    assert sum(int((~keep).sum()) for keep in prunekit.masks(model).values()) == report.pruned
    for name, keep in prunekit.masks(model).items():
        assert not (~keep)[~expected[name]].any()  # only selected channels lose weights


def test_channels_first_prunes_whole_channels_then_the_smallest_weights_of_the_next():
    weight = torch.tensor([[1.0, -4.0, 2.0], [3.0, 0.5, -1.0], [3.0, 0.5, -2.0]])
    scale = torch.tensor([0.9, 0.1, 0.5])
    keep = channels_first(scale, weight, 5)
    assert torch.equal(keep, torch.tensor([[True, True, True], [False, False, False], [True, False, False]]))
    est = MaskSparsity()
    stats = ChannelScales(scale, torch.tensor([False, True, True]), "gate")
    new, keep = est.prune(weight, stats, 4, None)
    assert int((~keep).sum()) == 4 and torch.equal(new, weight * keep)
    _, keep = est.prune(weight.repeat(1, 4)[:, :8], stats, 0, (2, 4))
    assert torch.equal(keep.view(3, 2, 4).sum(2), torch.full((3, 2), 2))
    assert torch.equal(est.scores(weight, stats)[:, 0], scale)
    assert torch.equal(est.group_scores(weight, stats, 3), scale.sum().view(1))
    assert torch.equal(est.group_scores(weight, stats, dim=1), torch.zeros(3))  # the producing layer's scales count


def test_batchnorm_scales_are_regularised_instead_of_gates():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(1)
    batches = [{"input": torch.randn(16, 6, generator=g), "labels": torch.randint(0, 3, (16,), generator=g)}
               for _ in range(2)]
    targets = find_targets(model)
    est = MaskSparsity(steps=STEPS, lr=LR, loss=lambda m, b: F.cross_entropy(m(b["input"]), b["labels"]))
    stats = est.gather(model, targets, batches, progress=False)
    first, last = stats[model[0]], stats[model[3]]
    assert first.source == "1" and last.source == "gate"
    assert torch.equal(first.scale, model[1].weight.detach().abs())
    for st in (first, last):
        assert not st.scale[st.selected].any() and st.scale[~st.selected].min() > 0.5


def test_a_failed_training_restores_the_model_completely():
    model = tiny("llama")
    before = copy.deepcopy(model.state_dict())
    calls = []

    def failing(m, batch):
        calls.append(1)
        if len(calls) == 4:  # after three optimiser steps
            raise RuntimeError("out of data")
        return model_loss(m, batch)

    est = MaskSparsity(steps=STEPS, lr=LR, loss=failing)
    with pytest.raises(RuntimeError, match="out of data"):
        est.gather(model, find_targets(model), as_batches(calibration_for("llama"), model), progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks for m in model.modules()) and not model.training


def test_a_diverging_loss_stops_with_a_clear_error_and_restores_the_model():
    model = tiny("llama")
    before = copy.deepcopy(model.state_dict())
    est = MaskSparsity(steps=STEPS, lr=LR, loss=lambda m, b: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(CalibrationError, match="lower lr"):
        est.gather(model, find_targets(model), as_batches(calibration_for("llama"), model), progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_training_loop_of_the_users():
    model = tiny("llama")
    windows = calibration_for("llama", n=4)
    calls = []

    def train():
        calls.append(1)
        yield {"input_ids": windows[:2]}
        yield {"input_ids": windows[2:]}

    est = MaskSparsity(steps=5, lr=LR, train=train)
    est.gather(model, find_targets(model), as_batches(calibration_for("llama"), model), progress=False)
    assert len(calls) == 3  # 2 + 2 + 1 batches: called again whenever it ran out

    spent = MaskSparsity(steps=5, lr=LR, train=iter([{"input_ids": windows}]))
    with pytest.raises(CalibrationError, match="re-iterable"):
        spent.gather(model, find_targets(model), as_batches(calibration_for("llama"), model), progress=False)


def test_options_and_defaults():
    est = MaskSparsity()
    assert est.fraction == 0.5 and est.momentum == 0.9 and est.base.name == "magnitude"
    # default λ: the proximal steps alone would move a selected scale by 2 over the phase
    assert est.l1 * sum(lr_schedule(est.lr, est.steps)) == pytest.approx(2)
    assert lr_schedule(1.0, 10) == pytest.approx([1.0] * 3 + [0.1] * 3 + [0.01] * 3 + [0.001])
    with pytest.raises(PrunekitError):
        MaskSparsity(fraction=0)
    with pytest.raises(PrunekitError):
        MaskSparsity(base=MaskSparsity())
    with pytest.raises(PrunekitError):
        MaskSparsity(lr=0)


def test_gates_refuse_a_layer_they_cannot_gate():
    layer = nn.Embedding(4, 3)
    with pytest.raises(PrunekitError, match="Linear"):
        ChannelGates([layer])
    assert not layer._forward_hooks
    with pytest.raises(PrunekitError, match="Linear"):
        MaskSparsity().gather(layer, [Target("e", layer, None)], [{"input": torch.tensor([0])}], progress=False)


def test_groups_select_whole_heads_by_their_summed_base_scores():
    """group=8 (the tiny Llama's head width) on the value projections: the mask takes whole heads, the ones whose
    rows have the smallest summed L1 norm, and only their gates go to zero."""
    model = tiny("llama")
    dense = {t.name: t.weight.detach().clone() for t in find_targets(model, include=r"v_proj$")}
    targets = find_targets(model, include=r"v_proj$")
    est = MaskSparsity(steps=STEPS, lr=LR, fraction=0.5, group=8)
    stats = est.gather(model, targets, as_batches(calibration_for("llama"), model), progress=False)
    for t in targets:
        heads = dense[t.name].abs().sum(1).view(-1, 8).sum(1)  # base magnitude per head
        expected = torch.zeros(heads.numel(), dtype=torch.bool)
        expected[heads.argsort()[:heads.numel() // 2]] = True
        st = stats[t.module]
        assert torch.equal(st.selected, expected.repeat_interleave(8))
        assert not st.scale[st.selected].any() and st.scale[~st.selected].min() > 0.99
    other = tiny("llama")
    with pytest.raises(PrunekitError, match="group=3 does not divide"):
        MaskSparsity(steps=1, group=3).gather(other, find_targets(other, include=r"v_proj$"),
                                              as_batches(calibration_for("llama"), other), progress=False)
    with pytest.raises(PrunekitError, match="group must be"):
        MaskSparsity(group=0)
