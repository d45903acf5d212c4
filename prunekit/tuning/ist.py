"""IST: train the adapters of a few layers per step, chosen by layer importance learned along the way.

Yao, Gao, Li, Zhao, Wang, Wang, Zhu, "Layer-wise Importance Matters: Less Memory for Better Performance in
Parameter-efficient Fine-tuning of Large Language Models", Findings of EMNLP 2024 (arXiv:2410.11772).
Importance-aware Sparse Tuning sits on top of per-layer PEFT modules (here peft's LoRA and DoRA); a "layer" is a
transformer block, and all adapters inside block l form layer l. Each layer has a score I_l, zero at the start;
a higher score means less important.

- Fine-tuning loop: before every optimizer step, n_u = `update` (25%) of the layers are drawn without
  replacement with probabilities proportional to sigmoid(−I_l); only their adapters get gradients in that step
  (the others' requires_grad is off, so autograd does no weight-gradient work for them and AdamW skips them,
  keeping their moments).
- Importance loop (response suppression), every `interval` (10) steps: `rounds` (3) times, n_s = `suppress`
  (50%) of the layers, drawn with probabilities proportional to sigmoid(I_l) and distinct from the sets of the
  earlier rounds, have their adapters' scaling multiplied by λ = `factor` (0.25) and the loss L_k of a batch is
  measured without gradients (eval mode). With rewards R_k = exp(−L_k), their mean R̄ and p = sigmoid(I) taken
  before the update, every layer l suppressed in round k gets I_l += `score_lr` (10) · (R_k − R̄) · p_l (1 − p_l),
  a REINFORCE step: layers whose suppression costs little become less important.

Sources: the paper's text could not be read here (only its abstract), so the defaults and the update rule above
are those of the authors' implementation: the repository the paper links (github.com/Kaiseem/IST) holds only a
README ("code will be updated soon"); the implementation its README calls official is
github.com/antgroup/importance-aware-sparse-tuning-IST-paper, `ist.py` (ISTCallback: rl_step = 3, rl_lr = 10,
response_suppression_factor = 0.25, update_importance_interval_steps = 10, n_layers_updated =
int(0.25 · layers), n_layers_suppressed = int(0.5 · layers), redraw until the rounds' sets differ) with
`llama_7B_LoRA_IST.sh` (LoRA, lr 2e-4). Where this implementation deliberately differs from that code:
- the suppression batch is the latest training batch (captured by a forward pre-hook on the model, so no extra
  data loading or backward pass), unless `batches` are given; the reference draws a separate batch of 16 from
  the training set;
- at least one layer is updated / suppressed (the reference's int(0.25 · layers) is 0 below 4 layers), and the
  rounds' suppressed sets are distinct only while distinct sets remain (the reference loops forever when there
  are fewer possible sets than rounds, e.g. 2 layers);
- scaling goes through peft's `scale_layer` and is then restored exactly (the reference overwrites every
  `scaling` with one saved value, which breaks per-layer ranks or alphas);
- "layers" are the blocks that hold adapters (the reference draws among all blocks, wasting draws on blocks
  without adapters); adapters outside every block train in every step.

Train with `optimizer(lr)` in any loop (its step hooks draw the layers and update the scores), or with a
`transformers.Trainer`: pass `optimizers=(tuned.optimizer(lr), None)`, or let the Trainer build its optimizer and
add `callbacks=[tuned.callback()]`. Adapters over pruned layers keep the pruned entries zero (`lowrank.protect`).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import PrunekitError
from ..targets import find_blocks, find_targets
from .base import TUNERS, Method
from .config import BATCHES, FLAG, LOSS_FN, PATTERN, Config, Rule, integer, number, option, optional
from .lowrank import check_protectable, inject, lora_layers, protect


def draw(scores: torch.Tensor, count: int, generator: torch.Generator, important: bool = True) -> list[int]:
    """`count` distinct layers, drawn with probability ∝ sigmoid(−I) (important ones, to train) or ∝ sigmoid(I)
    (unimportant ones, to suppress), sequentially without replacement (torch.multinomial), sorted."""
    weights = torch.sigmoid(-scores if important else scores).double()
    return sorted(torch.multinomial(weights, count, replacement=False, generator=generator).tolist())


def _fraction(example: str) -> Rule:
    return number(lambda v: 0 < v <= 1, f"is a fraction of the layers in (0, 1] ({example})")


@dataclass
class ISTConfig(Config):
    """IST's options. rank: LoRA rank to inject when the model has no peft LoRA layers yet (alpha = 2 · rank,
    dropout 0; dora=True for DoRA), on every Linear of the repeated blocks or those `include` / `exclude` (regexes)
    name; a model that already has them (peft.get_peft_model) is used as it is, and then rank / dora / include /
    exclude must not be given. update / suppress: fractions of the layers trained per step / suppressed per round;
    interval: steps between score updates; factor: λ; rounds; score_lr; seed: of the layer draws. Inputs of the run
    (not saved): batches, an iterable of batches for the suppression losses (default: the latest training batch);
    loss_fn(outputs, batch), the loss when outputs.loss is not it."""

    method: ClassVar[str] = "ist"
    rank: int | None = option(None, optional(integer(1), "must be an integer >= 1 (the LoRA rank to inject), or "
                                                         "None to use the model's own peft adapters;"))
    dora: bool = option(False, FLAG)
    update: float = option(0.25, _fraction("0.25 trains the adapters of a quarter of the layers in each step"))
    suppress: float = option(0.5, _fraction("0.5 suppresses half of the layers in each round"))
    interval: int = option(10, integer(1, " (steps between score updates, 10 by default)"))
    factor: float = option(0.25, number(lambda v: 0 <= v < 1, "(λ, the scale of the suppressed adapters) must be in "
                                                               "[0, 1); 0.25 by default"))
    rounds: int = option(3, integer(1, " (suppression rounds per score update, 3 by default)"))
    score_lr: float = option(10.0, number(lambda v: v > 0, "(step size of the importance scores) must be a positive "
                                                           "number; 10 by default"))
    seed: int = option(0, integer())
    include: str | None = option(None, PATTERN)
    exclude: str | None = option(None, PATTERN)
    batches: Iterable | None = option(None, BATCHES, saved=False)
    loss_fn: Callable | None = option(None, LOSS_FN, saved=False)


@TUNERS.register("ist")
class IST(Method):
    """Importance-aware Sparse Tuning (Yao et al., EMNLP 2024 Findings); see the module docstring and `ISTConfig`."""

    config_class = ISTConfig
    takes_adapters = True

    def __init__(self, config: ISTConfig | None = None, **options):
        super().__init__(config, **options)
        self._batches = None  # the iterator over config.batches
        self.layers: dict[str, nn.Module] = {}  # peft LoRA layers by name
        self.blocks: list[list[nn.Module]] = []  # per scheduled layer (block holding adapters), its LoRA layers
        self.block_index: list[int] = []  # the index of each scheduled layer among the model's blocks
        self.adapter = "default"
        self.scores = torch.zeros(0)
        self.active: list[int] = []
        self.history: list[tuple[list[int], float]] = []  # the last score update's (suppressed layers, loss)
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self._batch = None
        self._hook = None

    # -- set-up
    def attach(self, model: nn.Module) -> None:
        name, c = type(model).__name__, self.config
        layers = lora_layers(model)
        if layers:
            given = [k for k in ("rank", "dora", "include", "exclude") if getattr(c, k) not in (None, False)]
            if given:
                raise PrunekitError(f"{name} already has peft LoRA layers ({len(layers)}), which IST schedules as "
                                    f"they are; {', '.join(given)} would be ignored: drop "
                                    f"{'it' if len(given) == 1 else 'them'}, or pass the model without adapters")
            adapter = self._adapter_of(layers)
            check_protectable(layers)
            names = None
        else:
            if c.rank is None:
                raise PrunekitError(f"IST looked for peft LoRA/DoRA layers (peft.tuners.lora.Linear) in {name} and "
                                    f"found none: pass rank=<r> to put LoRA on the Linear layers of its blocks, or "
                                    f"wrap it with peft.get_peft_model first")
            names = [t.name for t in find_targets(model, c.include, c.exclude)]
            adapter = "default"  # inject() refuses DoRA over pruned layers before it changes anything
        _, blocks = find_blocks(model)
        if len(blocks) < 2:
            raise PrunekitError(f"IST schedules the adapters of a model's blocks; it looked for a ModuleList or "
                                f"Sequential of >= 2 same-class blocks holding Linear layers in {name} and found "
                                f"none")
        owner = {id(m): i for i, block in enumerate(blocks) for m in block.modules()}
        if names is not None:
            if not any(id(model.get_submodule(n)) in owner for n in names):
                raise PrunekitError(f"none of the layers include={c.include!r} / exclude={c.exclude!r} name in "
                                    f"{name} is inside its blocks, so IST would have no layer to schedule; name "
                                    f"Linear layers of the blocks")
            layers = inject(model, names, c.rank, alpha=2 * c.rank, dropout=0.0, dora=c.dora)
        else:
            if not any(id(layer) in owner for layer in layers.values()):
                raise PrunekitError(f"none of {name}'s peft LoRA layers ({', '.join(list(layers)[:3])}...) is inside "
                                    f"its blocks, so IST would have no layer to schedule; put LoRA on the blocks' "
                                    f"Linear layers")
            protect(layers)
        owner = {id(m): i for i, block in enumerate(blocks) for m in block.modules()}  # now with the LoRA layers
        self.adapter = adapter
        self.layers = layers
        grouped: dict[int, list[nn.Module]] = {}
        for layer in layers.values():
            if id(layer) in owner:
                grouped.setdefault(owner[id(layer)], []).append(layer)
        self.block_index = sorted(grouped)
        self.blocks = [grouped[i] for i in self.block_index]
        for p in model.parameters():
            p.requires_grad_(False)
        for p in self.trainable():  # all of them, so that an optimizer built now (a Trainer's) holds every one
            p.requires_grad_(True)
        self.scores = torch.zeros(len(self.blocks))
        self.model = model
        self._hook = model.register_forward_pre_hook(self._capture, with_kwargs=True)

    @staticmethod
    def _adapter_of(layers: dict[str, nn.Module]) -> str:
        active = {a for layer in layers.values() for a in layer.active_adapters}
        if len(active) != 1:
            raise PrunekitError(f"IST trains one peft adapter; the model's LoRA layers have "
                                f"{len(active) or 'no'} active adapters ({', '.join(sorted(active))}): "
                                f"set_adapter(<name>) to one first")
        merged = [n for n, layer in layers.items() if layer.merged]
        if merged:
            raise PrunekitError(f"{merged[0]}'s adapter is merged into its weight, where it neither trains nor can be "
                                f"suppressed; unmerge_adapter() first")
        return active.pop()

    def count(self, fraction: float) -> int:
        """Layers per draw: int(fraction · layers), at least 1 (the reference's int(), floored at one layer)."""
        return max(1, int(len(self.blocks) * fraction))

    def _capture(self, module, args, kwargs) -> None:
        if torch.is_grad_enabled():  # a training forward; suppression and evaluation run without gradients
            self._batch = (args, dict(kwargs))

    def _params(self, layers) -> list[nn.Parameter]:
        """The adapter's parameters in these LoRA layers (lora_A, lora_B and DoRA's magnitude)."""
        return [p for layer in layers for n, p in layer.named_parameters()
                if n.startswith("lora_") and n.split(".")[1] == self.adapter]

    def _activate(self, active: list[int]) -> None:
        """Only the adapters of the `active` layers get gradients in the next step."""
        self.active = active
        for i, layers in enumerate(self.blocks):
            for p in self._params(layers):
                p.requires_grad_(i in active)

    def sample(self) -> list[int]:
        """The layers whose adapters train in the next step (drawn ∝ sigmoid(−I))."""
        return draw(self.scores, self.count(self.config.update), self.generator)

    # -- training
    def trainable(self) -> list[nn.Parameter]:
        return self._params(self.layers.values())

    def trainable_count(self) -> int:
        """Every adapter number training changes over the run (a step changes those of the drawn layers only)."""
        return sum(p.numel() for p in self.trainable())

    def hooked(self, optimizer):
        """Registers IST on the optimizer and draws the layers of the first step."""
        super().hooked(optimizer)
        if not self.active:
            self._activate(self.sample())
        return optimizer

    def after_step(self) -> None:
        if self.steps % self.config.interval == 0:
            self.update_scores()
        self._activate(self.sample())

    @torch.no_grad()
    def update_scores(self) -> None:
        """Response suppression (module docstring): `rounds` losses with distinct sampled sets of layers' adapters
        scaled by λ, rewards exp(−loss) centred on their mean, a REINFORCE step on the suppressed layers' scores.
        The rounds' (suppressed layers, loss) are kept in `history`."""
        batch = self._next_batch()
        n = self.count(self.config.suppress)
        distinct = math.comb(len(self.blocks), n)
        rounds: list[tuple[list[int], float]] = []
        was_training = self.model.training
        self.model.eval()
        try:
            for _ in range(self.config.rounds):
                picked = draw(self.scores, n, self.generator, important=False)
                while any(picked == seen for seen, _ in rounds) and len({tuple(s) for s, _ in rounds}) < distinct:
                    picked = draw(self.scores, n, self.generator, important=False)
                suppressed = [layer for i in picked for layer in self.blocks[i]]
                saved = [dict(layer.scaling) for layer in suppressed]
                for layer in suppressed:
                    layer.scale_layer(self.config.factor)
                try:
                    loss = self._loss(*batch)
                    if self.group is not None:  # the loss over every rank's batch, so every rank's scores agree
                        loss = self.group.sum_number(loss) / self.group.world
                finally:
                    for layer, scaling in zip(suppressed, saved):
                        layer.scaling.update(scaling)  # exactly as before (no division by λ)
                rounds.append((picked, loss))
        finally:
            self.model.train(was_training)
        rewards = [math.exp(-loss) for _, loss in rounds]
        mean = sum(rewards) / len(rewards)
        p = torch.sigmoid(self.scores)
        step = torch.zeros_like(self.scores)
        for (picked, _), reward in zip(rounds, rewards):
            for i in picked:
                step[i] += (reward - mean) * p[i] * (1 - p[i]) * self.config.score_lr
        self.scores += step
        self.history = rounds

    def _next_batch(self) -> tuple[tuple, dict]:
        if self.config.batches is None:
            if self._batch is None:
                raise PrunekitError("IST has no batch to measure suppression on: no forward with gradients ran "
                                    "since prepare(); train with forward + backward, or pass batches=[...]")
            return self._batch
        if self._batches is not None:
            batch = next(self._batches, None)
        if self._batches is None or batch is None:
            self._batches = iter(self.config.batches)  # again from the start (a DataLoader reshuffles)
            batch = next(self._batches, None)
            if batch is None:
                raise PrunekitError("IST's batches are empty; pass at least one batch")
        device = next(self.model.parameters()).device
        if isinstance(batch, dict):
            return (), {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return (batch.to(device) if isinstance(batch, torch.Tensor) else batch,), {}

    def _loss(self, args: tuple, kwargs: dict) -> float:
        outputs = self.model(*args, **kwargs)
        if self.config.loss_fn is not None:
            batch = kwargs if not args else args[0] if len(args) == 1 and not kwargs else (args, kwargs)
            loss = self.config.loss_fn(outputs, batch)
        else:
            loss = getattr(outputs, "loss", None)
            if loss is None and isinstance(outputs, dict):
                loss = outputs.get("loss")
        if loss is None:
            raise PrunekitError("IST's suppression needs a loss, and the model's outputs have none: put labels in "
                                "the batches, or pass loss_fn=lambda outputs, batch: <loss>")
        return float(loss)

    def callback(self):
        """A transformers TrainerCallback that hooks IST onto the optimizer a Trainer builds itself."""
        from transformers import TrainerCallback

        method = self

        class ISTCallback(TrainerCallback):
            def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
                if optimizer is None:
                    raise PrunekitError("IST's callback got no optimizer from the Trainer; pass "
                                        "optimizers=(tuned.optimizer(lr), None) to the Trainer instead")
                method.hooked(getattr(optimizer, "optimizer", optimizer))  # inside accelerate's wrapper

        return ISTCallback()

    def lora_layers(self) -> dict[str, nn.Module]:
        return self.layers
