"""The fine-tuning methods' config dataclasses: keywords and configs build the same method, one validation, repr,
json beside the deltas read back on load, the one batch rule; and the optimizer every method hands out."""
import copy
import json

import pytest
import torch

from conftest import VOCAB, tiny
from prunekit import PrunekitError
from prunekit.tuning import ISTConfig, LIFTConfig, S2FTConfig, SPTConfig, load_deltas, prepare, save_deltas
from prunekit.tuning.sparse import selection

pytestmark = pytest.mark.usefixtures("one_thread")


def batches(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (2, 10), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


CONFIGS = {  # a non-default setting of every method, small enough for the tiny models
    "lift": lambda: LIFTConfig(rank=2, filter_rank=3, interval=1, svd="exact"),
    "s2ft": lambda: S2FTConfig(heads=0.5, channels=0.25, seed=3),
    "ist": lambda: ISTConfig(rank=2, update=0.5, interval=2, seed=4),
    "spt": lambda: SPTConfig(batches=batches(), budget=1200, rank=2, progress=False),
}


def train(model, optimizer, steps=2):
    for batch in batches(steps, seed=5):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("method", list(CONFIGS))
def test_a_config_and_its_keywords_set_up_the_same_method_and_the_config_comes_back_from_the_saved_deltas(
        tmp_path, method):
    config = CONFIGS[method]()
    keywords = {k: v for k, v in vars(config).items()}
    by_config, by_keywords = tiny("llama"), tiny("llama")
    tuned = prepare(by_config, config)
    twin = prepare(by_keywords, method, **keywords)
    assert tuned.config is config and twin.config == config and type(twin) is type(tuned)
    assert tuned.trainable_count() == twin.trainable_count() > 0
    assert [n for n, p in by_config.named_parameters() if p.requires_grad] == \
        [n for n, p in by_keywords.named_parameters() if p.requires_grad]
    train(by_config, tuned.optimizer(lr=0.05))

    path = save_deltas(tuned, tmp_path / method)
    written = json.loads((path / "tuning_config.json").read_text())
    assert written["method"] == method and written["config"] == config.to_dict()
    assert written["summary"]["trainable"] == tuned.trainable_count() and written["summary"]["steps"] == 2
    assert not {"batches", "loss_fn", "calibration", "progress"} & set(written["config"])  # inputs of the run
    meta = load_deltas(tiny("llama"), path)
    assert type(meta["config"]) is type(config) and meta["config"] == config  # runtime inputs do not compare


def test_repr_shows_the_options_and_not_the_inputs_of_the_run():
    config = SPTConfig(batches=batches(), rank=4)
    assert repr(config) == ("SPTConfig(budget=None, rank=4, alpha=10.0, per_sample=True, lora_alpha=None, "
                            "dropout=0.0, include=None, exclude=None)")
    tuned = prepare(tiny("llama"), "lift", rank=2)
    assert repr(tuned) == ("LIFT(LIFTConfig(rank=2, filter_rank=64, interval=400, svd='randomized', niter=2, "
                           "include=None, exclude=None))")
    assert tuned.rank == 2 and tuned.interval == 400  # options read as the method's attributes too


@pytest.mark.parametrize("build,message", [
    (lambda: LIFTConfig(rank=True), "LIFT's rank must be an integer >= 1, got True"),
    (lambda: LIFTConfig(interval=-1), "LIFT's interval must be an integer >= 0, got -1"),
    (lambda: LIFTConfig(include="q_proj("), r"LIFT's include must be a regular expression over module names, or "
                                            r"None, got 'q_proj\('"),
    (lambda: S2FTConfig(channels=float("nan")), r"S2FT's channels is a fraction of units in \[0, 1\], got nan"),
    (lambda: S2FTConfig(seed=1.5), "S2FT's seed must be an integer, got 1.5"),
    (lambda: ISTConfig(dora="yes"), "IST's dora must be True or False, got 'yes'"),
    (lambda: ISTConfig(score_lr=float("inf")), "IST's score_lr .* must be a positive number"),
    (lambda: SPTConfig(batches=batches(), lora_alpha=0), "SPT's lora_alpha must be a number > 0, or None, got 0"),
    (lambda: SPTConfig.from_dict({"rank": 2, "ranks": 3}), r"saved SPT options \['ranks'\] are not options of "
                                                           r"SPTConfig"),
])
def test_bad_options_are_refused_by_the_config_with_what_was_wrong(build, message):
    with pytest.raises(PrunekitError, match=message):
        build()


@pytest.mark.parametrize("method,options", [("ist", dict(rank=2)), ("spt", dict())])
def test_one_batch_rule_for_every_method_a_single_batch_is_refused_a_list_of_them_taken(method, options):
    one = batches(1)[0]
    for single in (one, one["input_ids"]):  # a dict iterates over its keys, a tensor over its rows
        model = tiny("llama")
        before = copy.deepcopy(model.state_dict())
        with pytest.raises(PrunekitError, match=f"{method.upper()}'s batches must be an iterable of batches .*wrap "
                                                f"a single batch in a list, got (dict|Tensor)"):
            prepare(model, method, batches=single, **options)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert prepare(tiny("llama"), method, batches=[one], **options).trainable_count() > 0


def test_a_config_with_keywords_or_of_another_method_is_refused():
    with pytest.raises(PrunekitError, match=r"LIFT takes a config or keyword options, not both; got a config and "
                                            r"\['rank'\]"):
        prepare(tiny("llama"), LIFTConfig(), rank=4)
    with pytest.raises(PrunekitError, match="LIFT takes a LIFTConfig, got ISTConfig"):
        prepare(tiny("llama"), "lift", config=ISTConfig(rank=2))


def test_every_method_trains_with_torchs_own_adamw_fused_where_the_device_has_it():
    model = tiny("llama")
    tuned = prepare(model, CONFIGS["lift"]())
    optimizer = tuned.optimizer(lr=0.05, weight_decay=0.1)
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["fused"]  # CPU has the fused kernel
    assert optimizer.defaults["weight_decay"] == 0.1
    held = optimizer.param_groups[0]["params"]
    assert held == tuned.trainable() and all(selection(p).values is p for p in held)  # the selected values
    assert sum(p.numel() for p in held) == tuned.trainable_count()
