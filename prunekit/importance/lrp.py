"""Layer-wise relevance propagation (LRP) as a pruning criterion.

Yeom, Seegerer, Lapuschkin, Binder, Wiedemann, Müller, Samek, "Pruning by Explaining: A Novel Criterion for Deep
Neural Network Pruning", Pattern Recognition 115 (2021): the output is explained by LRP on reference samples, and
the relevance that reaches each weight (or filter), summed over the samples, says what to keep.

Relevance is computed by autograd in gradient-times-input form. Inside `propagation(model, rule)` the modules
back-propagate modified gradients ĝ instead of true ones, chosen so that the relevance of any tensor x of the
graph is R_x = x ⊙ ĝ_x. A layer's weight is one more input of it, so its relevance is R_W = W ⊙ ĝ_W. Every rule
below is linear in the gradient it receives, so one backward pass from the sum of a batch's start logits gives the
relevances summed over the batch's samples and tokens. The rules:

- nn.Linear, GPT-2 Conv1D, nn.Conv1d/2d/3d (z = W a + b), one of (see `Rule`):
  epsilon (Bach et al. 2015): ĝ_z ← ĝ_z ⊙ z / (z + ε sign z), then the layer's own backward: R_a[j] =
    Σ_k a_j w_kj R_k / (z_k + ε sign z_k), and R_W[k, j] = the same term summed over tokens. Summed over j, R_W
    gives R_k less the shares of the bias b_k and of ε.
  alpha_beta: R_a[j] = Σ_k (α (a_j w_kj)⁺ / z⁺_k − β (a_j w_kj)⁻ / z⁻_k) R_k with α − β = 1, z⁺_k = Σ_j
    (a_j w_kj)⁺ + b⁺_k + ε, z⁻_k = Σ_j (a_j w_kj)⁻ + b⁻_k − ε; R_W[k, j] is that term summed over tokens.
- nn.LayerNorm and any class named *RMSNorm: the LN-rule of Ali et al. (2022). The normalising denominator is a
  constant and the mean-centering stays linear, so the layer passes relevance like a linear map.
- Softmax attention: the AH-rule of Ali et al. (2022). The attention probabilities are constants, so relevance
  reaches the values only (and the query and key projections get none). Hugging Face models run eager attention
  during the pass; softmax returns detached probabilities, and scaled_dot_product_attention is written out with
  such a softmax.
- Elementwise activations (torch's and transformers.activations'): the identity rule, R_in = R_out, by
  ĝ_x = ĝ_y ⊙ f(x) / x (zero where |x| is below the dtype's smallest normal number).
- Gated MLPs (a module with gate_proj, up_proj, down_proj and act_fn: Llama, Qwen2, Mistral...): the uniform rule
  of AttnLRP (Achtibat et al. 2024) for the product act(gate) ⊙ up: half the product's relevance to each factor.
  Gradient times input would give each factor all of it.
- Residual additions need no rule: the gradient of a sum, times its summands, splits the relevance in proportion
  to them (the z-rule).

Everything else keeps its true gradient; constants added on the way (position embeddings, attention masks) and
biases absorb their shares. Without biases and with ε → 0 relevance is conserved: the input relevance adds up to
the start logits.

Ali, Schnake, Eberle, Montavon, Müller, Wolf, "XAI for Transformers: Better Explanations through Conservative
Propagation", ICML 2022. Achtibat, Hatefi, Dreyer, Jain, Wiegand, Lapuschkin, Samek, "AttnLRP: Attention-Aware
Layer-Wise Relevance Propagation for Transformers", ICML 2024. Bach, Binder, Montavon, Klauschen, Müller, Samek,
"On Pixel-Wise Explanations for Non-Linear Classifier Decisions by Layer-Wise Relevance Propagation", PLOS ONE 2015.
"""
from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import transformers.activations
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..calibration.hooks import removing
from ..calibration.loss import grads_for
from ..calibration.runner import call_model
from ..calibration.stats import Needs
from ..errors import CalibrationError, PrunekitError
from ..targets import Conv1D
from .base import ESTIMATORS, Estimator, group_sum

Start = Callable[[nn.Module, dict], torch.Tensor]  # (model, batch) -> the scalar relevance starts from

RULES = ("epsilon", "alpha_beta")


@dataclass(frozen=True)
class Rule:
    """How linear layers pass relevance: "epsilon" or "alpha_beta" (alpha - beta = 1; alpha=1 is LRP-α1β0).

    epsilon stabilises every denominator. 1e-6 only keeps z / (z + ε) away from 0 / 0: it is orders of magnitude
    below the pre-activations of real layers, so relevance stays (near) conserved, which comparing layers by
    their share of it relies on. A large ε, which drops the relevance of weak pre-activations to denoise
    explanations, would also drop it unevenly across layers.
    """

    name: str = "epsilon"
    epsilon: float = 1e-6
    alpha: float = 1.0

    def __post_init__(self):
        if self.name not in RULES:
            raise PrunekitError(f"unknown LRP rule {self.name!r}; use one of {', '.join(RULES)}")
        if not self.epsilon > 0:
            raise PrunekitError(f"epsilon must be > 0, got {self.epsilon}")
        if not self.alpha >= 1:
            raise PrunekitError(f"alpha must be >= 1 (beta = alpha - 1 >= 0), got {self.alpha}")

    @property
    def beta(self) -> float:
        return self.alpha - 1.0


def stabilized(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """z + ε sign(z), with sign(0) = +1 so that no denominator is 0."""
    return z + torch.where(z >= 0, epsilon, -epsilon)


class _ScaledGrad(torch.autograd.Function):
    """Forward: y. Backward: the gradient of x is ĝ_y ⊙ scale (x and y of one shape; x may be y).

    The epsilon rule (x = y = z, scale z / (z + ε sign z)), the identity rule (scale y / x) and the uniform
    rule (scale 1/2) are all such rescalings. y is cloned: a view of an input returned from a custom Function
    may not be modified in place, and in-place ops on layer outputs are common (ReLU(inplace=True) after a Conv).
    """

    @staticmethod
    def forward(ctx, x, y, scale):
        ctx.scale = scale
        return y.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None, None


class _AlphaBeta(torch.autograd.Function):
    """Forward: z, the layer's output. Backward: the alpha-beta rule for (input, weight) of z = affine(a, W, b).

    With c⁺ = α R / z⁺ and c⁻ = β R / z⁻ (R = z ⊙ ĝ_z), the rule's modified gradients are vector-Jacobian
    products of the affine map applied to the sign-split parts: z⁺ = affine(a⁺, W⁺, b⁺) + affine(a⁻, W⁻) and
    z⁻ = affine(a⁺, W⁻, b⁻) + affine(a⁻, W⁺) back-propagate c⁺ and −c⁻, and each entry of a (of W) takes the
    gradient of the part its sign puts it in. So one backward serves Linear, Conv1D and convolutions alike.
    """

    @staticmethod
    def forward(ctx, a, weight, bias, z, affine, rule):
        ctx.save_for_backward(a, weight, bias, z)
        ctx.affine, ctx.rule = affine, rule
        return z.clone()

    @staticmethod
    def backward(ctx, grad):
        a, weight, bias, z = ctx.saved_tensors
        rule, affine = ctx.rule, ctx.affine
        with torch.enable_grad():
            parts = [t.detach().requires_grad_() for t in
                     (a.clamp(min=0), a.clamp(max=0), weight.clamp(min=0), weight.clamp(max=0))]
            a_pos, a_neg, w_pos, w_neg = parts
            b_pos, b_neg = (None, None) if bias is None else (bias.clamp(min=0), bias.clamp(max=0))
            z_pos = affine(a_pos, w_pos, b_pos) + affine(a_neg, w_neg, None)
            z_neg = affine(a_pos, w_neg, b_neg) + affine(a_neg, w_pos, None)
        relevance = z * grad
        c_pos = rule.alpha * relevance / (z_pos.detach() + rule.epsilon)
        c_neg = rule.beta * relevance / (z_neg.detach() - rule.epsilon)
        wanted = parts if ctx.needs_input_grad[1] else parts[:2]
        grads = torch.autograd.grad((z_pos, z_neg), wanted, (c_pos, -c_neg), allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(wanted, grads)]
        grad_a = torch.where(a > 0, grads[0], grads[1])
        grad_w = torch.where(weight > 0, grads[2], grads[3]) if ctx.needs_input_grad[1] else None
        return grad_a, grad_w, None, None, None, None


# ---------------------------------------------------------------------------------------------- module rules

LINEAR_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d) + ((Conv1D,) if Conv1D else ())

_NOT_ELEMENTWISE = (nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.Softmax2d, nn.GLU, nn.MultiheadAttention)


def _activation_classes() -> tuple[type, ...]:
    """The elementwise activation modules of torch and transformers."""
    found = []
    for namespace in (nn.modules.activation, transformers.activations):
        for cls in vars(namespace).values():
            if (inspect.isclass(cls) and issubclass(cls, nn.Module) and cls.__module__ == namespace.__name__
                    and not issubclass(cls, _NOT_ELEMENTWISE)):
                found.append(cls)
    return tuple(found)


ACTIVATIONS = _activation_classes()


def _affine(module: nn.Module) -> Callable:
    """The layer's map (a, W, b or None) -> z, to re-apply it to the sign-split parts of its input and weight."""
    if isinstance(module, nn.Linear):
        return F.linear
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return module._conv_forward
    return lambda a, w, b: a @ w if b is None else a @ w + b  # GPT-2 Conv1D: weight [in, out]


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else next(iter(kwargs.values()))


def _linear_hook(rule: Rule):
    """A forward hook replacing the layer's output by an equal tensor whose backward applies the rule."""

    def hook(module, args, kwargs, z):
        if rule.name == "epsilon":
            with torch.no_grad():
                ratio = z / stabilized(z, rule.epsilon)
            return _ScaledGrad.apply(z, z, ratio)
        return _AlphaBeta.apply(_first_input(args, kwargs), module.weight, module.bias, z.detach(),
                                _affine(module), rule)

    return hook


def _identity_hook(module, args, kwargs, y):
    x = _first_input(args, kwargs)
    with torch.no_grad():
        ratio = torch.where(x.abs() >= torch.finfo(x.dtype).tiny, y / x, torch.zeros_like(y))
    return _ScaledGrad.apply(x, y, ratio)


def _uniform_pre_hook(module, args, kwargs):
    """On down_proj of a gated MLP, whose input is act(gate) * up: halving the product's gradient gives each
    factor half its relevance."""
    if args:
        return (_ScaledGrad.apply(args[0], args[0], 0.5),) + args[1:], kwargs
    key = next(iter(kwargs))
    return args, {**kwargs, key: _ScaledGrad.apply(kwargs[key], kwargs[key], 0.5)}


def _layer_norm(module: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    # in float32, as torch's layer_norm computes for half-precision inputs
    dims = tuple(range(-len(module.normalized_shape), 0))
    centered = x.float() - x.float().mean(dims, keepdim=True)
    std = (centered.square().mean(dims, keepdim=True) + module.eps).sqrt()
    y = centered / std.detach()
    if module.weight is not None:
        y = y * module.weight.float()
    if module.bias is not None:
        y = y + module.bias.float()
    return y.to(x.dtype)


def _rms_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # computed in float32 and cast back before the scale, as Llama's RMSNorm does
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    x32 = x.float()
    if eps is None:  # torch's nn.RMSNorm(eps=None)
        eps = torch.finfo(x32.dtype).eps
    rms = (x32.square().mean(-1, keepdim=True) + eps).sqrt()
    y = (x32 / rms.detach()).to(x.dtype)
    weight = getattr(module, "weight", None)
    return y if weight is None else weight * y


def _is_rms_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm")


def _norm_hook(module, args, kwargs, output):
    x = _first_input(args, kwargs)
    y = _layer_norm(module, x) if isinstance(module, nn.LayerNorm) else _rms_norm(module, x)
    tolerance = max(1e-4, 4 * torch.finfo(output.dtype).eps)
    if y.shape != output.shape or not torch.allclose(y, output, rtol=tolerance, atol=tolerance):
        raise PrunekitError(f"LRP's LN-rule recomputes {type(module).__name__} as (x - mean) / std * weight + bias "
                            f"(RMSNorm: x / rms * weight) but this module computes something else; LRP cannot "
                            f"propagate through it")
    return y


def _is_gated_mlp(module: nn.Module) -> bool:
    return all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")) \
        and isinstance(module.down_proj, nn.Module)


def _install_rules(model: nn.Module, rule: Rule, handles: list) -> None:
    """Hooks putting the rules on the model's modules, their handles appended to `handles`."""
    for module in model.modules():
        if isinstance(module, LINEAR_TYPES):
            handles.append(module.register_forward_hook(_linear_hook(rule), with_kwargs=True))
        elif isinstance(module, nn.LayerNorm) or _is_rms_norm(module):
            handles.append(module.register_forward_hook(_norm_hook, with_kwargs=True))
        elif isinstance(module, ACTIVATIONS):
            handles.append(module.register_forward_hook(_identity_hook, with_kwargs=True))
        if _is_gated_mlp(module):
            handles.append(module.down_proj.register_forward_pre_hook(_uniform_pre_hook, with_kwargs=True))


@contextlib.contextmanager
def _out_of_place(model: nn.Module):
    """In-place activations run out of place: the identity rule needs their input after the call."""
    changed = [m for m in model.modules() if isinstance(m, ACTIVATIONS) and getattr(m, "inplace", False) is True]
    for m in changed:
        m.inplace = False
    try:
        yield
    finally:
        for m in changed:
            m.inplace = True


# ------------------------------------------------------------------------------------------------- attention

@contextlib.contextmanager
def _patched(owner, name: str, replacement):
    """owner.name = replacement for the duration; restored exactly (deleted again if owner only inherited it)."""
    own = name in vars(owner)
    original = vars(owner)[name] if own else None
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        if own:
            setattr(owner, name, original)
        else:
            delattr(owner, name)


def _detached(softmax):
    def constant_softmax(*args, **kwargs):
        return softmax(*args, **kwargs).detach()

    return constant_softmax


def _written_out_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                           enable_gqa=False):
    """torch's scaled_dot_product_attention with constant attention probabilities (the AH-rule): fused kernels
    hide the softmax from the rule, so the pass computes attention explicitly."""
    if dropout_p:
        raise PrunekitError("LRP needs the model in eval mode (attention dropout is on)")
    if enable_gqa:
        groups = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(groups, -3), value.repeat_interleave(groups, -3)
    scores = query @ key.transpose(-2, -1) * (query.shape[-1] ** -0.5 if scale is None else scale)
    if is_causal:
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    probabilities = torch.softmax(scores.float(), dim=-1).to(value.dtype).detach()
    return probabilities @ value


@contextlib.contextmanager
def constant_attention():
    """Softmax (as F.softmax, torch.softmax and Tensor.softmax) returns detached probabilities, and
    scaled_dot_product_attention is computed with them. Process-wide for the duration: every softmax of the
    model is a constant then (routers of mixtures of experts included), and so is any in a `start` function."""
    with contextlib.ExitStack() as stack:
        for owner in (F, torch, torch.Tensor):
            stack.enter_context(_patched(owner, "softmax", _detached(owner.softmax)))
        stack.enter_context(_patched(F, "scaled_dot_product_attention", _written_out_attention))
        yield


def _configs(model: nn.Module) -> list:
    """Every distinct Hugging Face config of the model and its sub-configs, parents before children."""
    found, seen = [], set()

    def visit(config):
        if config is None or id(config) in seen or not hasattr(config, "_attn_implementation"):
            return
        seen.add(id(config))
        found.append(config)
        for key in getattr(config, "sub_configs", {}) or {}:
            visit(getattr(config, key, None))

    for module in model.modules():
        visit(getattr(module, "config", None))
    return found


@contextlib.contextmanager
def eager_attention(model: nn.Module):
    """Hugging Face models compute attention eagerly (with torch.softmax) for the duration, whatever
    implementation (sdpa, flash, flex) they were loaded with. Set on the configs, where the attention modules and
    the mask builders read it at every call, and restored there, parents first since a parent's setter also
    resets its sub-configs. (model.set_attn_implementation would mark sub-configs as changed for good.)"""
    configs = _configs(model)
    before = [config._attn_implementation for config in configs]
    try:
        for config in configs:
            config._attn_implementation = "eager"
        yield
    finally:
        for config, implementation in zip(configs, before):
            config._attn_implementation = implementation


@contextlib.contextmanager
def propagation(model: nn.Module, rule: Rule | None = None):
    """Inside: the model back-propagates LRP's modified gradients (see the module docstring); outputs unchanged.
    Everything is restored on exit."""
    rule = rule or Rule()
    with removing([]) as handles, _out_of_place(model), eager_attention(model), constant_attention():
        _install_rules(model, rule, handles)
        yield


# --------------------------------------------------------------------------------------------------- passes

def _generates(model: nn.Module) -> bool:
    can_generate = getattr(model, "can_generate", None)
    return bool(callable(can_generate) and can_generate()
                and not getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def _chosen(model: nn.Module, batch: dict, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, target class) at every position relevance starts from: the next token for a causal LM (with
    positions of padding or label -100 dropped), else the batch's labels or the predicted class."""
    mask = batch.get("attention_mask")
    mask = None if mask is None else mask.to(logits.device).bool()
    if logits.dim() == 3 and _generates(model):
        ids = batch.get("labels", batch.get("input_ids"))
        if ids is None:
            raise CalibrationError("a causal LM's relevance starts at the next token's logit; the batch has no "
                                   "input_ids or labels")
        ids = ids.to(logits.device)
        logits, classes = logits[:, :-1], ids[:, 1:]
        keep = classes != -100
        if mask is not None:
            keep &= mask[:, 1:] & mask[:, :-1]
    else:
        labels = batch.get("labels")
        classes = logits.argmax(-1) if labels is None else labels.to(logits.device)
        keep = classes != -100
        if mask is not None and mask.shape == keep.shape:
            keep &= mask
    return logits[keep], classes[keep]


def target_logits(model: nn.Module, batch: dict) -> torch.Tensor:
    """The default start: the sum over the batch of the target logits (see `_chosen`)."""
    out = call_model(model, batch)
    logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
    if logits is None:
        raise CalibrationError(f"{type(model).__name__} returns no logits to start relevance from; pass start=fn, "
                               f"fn(model, batch) -> scalar tensor (e.g. a sum of hidden states it returns)")
    logits, classes = _chosen(model, batch, logits)
    return logits.gather(-1, classes.long().unsqueeze(-1)).sum()


@dataclass
class Explanation:
    """One LRP pass over a batch: the start value, relevance at the model's inputs (per input tensor: floating
    inputs such as pixel_values, or the token embeddings, named "embeddings"), and per weight as [out, in]."""

    start: torch.Tensor
    inputs: dict[str, torch.Tensor]
    weights: dict[nn.Module, torch.Tensor]


def _is_input(key: str, value: torch.Tensor) -> bool:
    return value.is_floating_point() and key != "labels" and not key.endswith("mask")


@contextlib.contextmanager
def _input_leaves(model: nn.Module, batch: dict) -> Iterator[tuple[dict, dict]]:
    """(batch, leaves): the batch with its floating inputs made leaves that require grad, or, when it holds token
    ids only, the outputs of the input embeddings made such leaves as they are computed."""
    leaves = {k: v.detach().requires_grad_() for k, v in batch.items() if _is_input(k, v)}
    if leaves:
        yield {**batch, **leaves}, leaves
        return
    get = getattr(model, "get_input_embeddings", None)
    try:
        embeddings = get() if get is not None else None
    except NotImplementedError:
        embeddings = None
    if embeddings is None:
        yield batch, leaves
        return

    def leaf(module, args, output):
        made = output.detach().requires_grad_()
        leaves["embeddings" if not leaves else f"embeddings.{len(leaves)}"] = made  # one per call
        return made

    with removing([embeddings.register_forward_hook(leaf)]):
        yield batch, leaves


def _out_first(module: nn.Module, values: torch.Tensor) -> torch.Tensor:
    return values.t() if Conv1D and isinstance(module, Conv1D) else values


def explain(model: nn.Module, batch: dict, modules: Sequence[nn.Module] = (), start: Start | None = None) -> Explanation:
    """Relevance of the batch's inputs and of the weights of `modules`, from `start(model, batch)` (default:
    `target_logits`). Run it inside `propagation(model, rule)`; outside, it gives gradient times input."""
    weights = [m.weight for m in modules]
    with grads_for(model, weights), _input_leaves(model, batch) as (batch, leaves):
        value = (start or target_logits)(model, batch)
        if not value.requires_grad:
            raise CalibrationError("the start value does not depend on the model's inputs or the scored weights")
        sources = list(leaves.values()) + weights
        grads = torch.autograd.grad(value, sources, allow_unused=True)
    relevance = [torch.zeros_like(s) if g is None else s.detach() * g for s, g in zip(sources, grads)]
    inputs = dict(zip(leaves, relevance))
    per_weight = {m: _out_first(m, r.float()) for m, r in zip(modules, relevance[len(leaves):])}
    return Explanation(value.detach(), inputs, per_weight)


def _first(batches: Sequence[dict], limit: int | None) -> Iterator[dict]:
    """The batches holding the first `limit` samples (all of them for None), the last one cut."""
    left = limit
    for batch in batches:
        if left is not None and left <= 0:
            return
        size = len(next(iter(batch.values())))
        yield batch if left is None or size <= left else {k: v[:left] for k, v in batch.items()}
        if left is not None:
            left -= size


# ------------------------------------------------------------------------------------------------ estimator

@dataclass
class LayerRelevance:
    """A layer's relevance per weight, [out, in], summed over the calibration samples, and the sum of |relevance|
    over every scored layer (for the layer's share)."""

    weights: torch.Tensor
    total: float


@ESTIMATORS.register("lrp")
class LRP(Estimator):
    """Relevance of each weight for the model's output, by LRP (Yeom et al., "Pruning by Explaining", 2021;
    rules in the module docstring).

    Relevance starts at the target logit of each calibration sample: the "labels" of a classifier's batch (else
    its predicted class), the next token at every position of a causal LM, or `start(model, batch)` -> scalar
    for any other model (BertModel, say). Following Yeom et al. the criterion is each weight's relevance summed
    over the reference samples. Yeom et al. use LRP-α1β0 with a positive start, under which relevance is
    nonnegative; the epsilon rule and logits of either sign give signed relevance, and a weight whose summed
    relevance is strongly negative carries as much of the output as a positive one, so the score per weight is
    |Σ R_w|. A group (output channel, head; see base.group_sum) scores |Σ R_w| over the group, the net relevance
    passing through its outputs or inputs. layer_score is the layer contribution of LRP-QViT (Ranjan and Savakis,
    arXiv:2401.11243, 2024): the layer's share of the summed |R_w| of all scored layers.

    Under the AH-rule the query and key projections receive no relevance: their scores are all 0 (a warning
    says so), so exclude them from LRP pruning or prune them by another criterion.

    rule: "epsilon" or "alpha_beta"; epsilon: the stabiliser (see `Rule`); alpha: α of alpha-beta (β = α − 1);
    samples: at most this many calibration samples (all by default). One backward pass per batch.
    """

    needs = Needs.RELEVANCE

    def __init__(self, rule: str = "epsilon", epsilon: float = 1e-6, alpha: float = 1.0, samples: int | None = None,
                 start: Start | None = None):
        if samples is not None and samples < 1:
            raise PrunekitError(f"samples must be >= 1 (or None for all), got {samples}")
        self.rule, self.samples, self.start = Rule(rule, epsilon, alpha), samples, start

    def gather(self, model, targets, batches, progress=True) -> dict:
        modules = [t.module for t in targets]
        sums = {t.module: torch.zeros(t.shape, device=t.weight.device) for t in targets}
        with propagation(model, self.rule):
            for batch in tqdm(list(_first(batches, self.samples)), desc=self.name, disable=not progress, unit="batch"):
                for module, relevance in explain(model, batch, modules, self.start).weights.items():
                    sums[module] += relevance
        silent = [t.name for t in targets if not sums[t.module].any()]
        if silent:
            names = ", ".join(silent[:4]) + (", ..." if len(silent) > 4 else "")
            warnings.warn(f"LRP: no relevance reached {len(silent)} layer(s) ({names}); their weights all score 0 "
                          f"(under the AH-rule attention queries and keys get none)", stacklevel=2)
        everything = sum(float(r.abs().sum()) for r in sums.values())
        return {module: LayerRelevance(r, everything) for module, r in sums.items()}

    def scores(self, weight, stats: LayerRelevance) -> torch.Tensor:
        return stats.weights.to(weight.device).abs()

    def group_scores(self, weight, stats: LayerRelevance, size=1, dim=0) -> torch.Tensor:
        return group_sum(stats.weights.to(weight.device), size, dim).abs()

    def layer_score(self, weight, stats: LayerRelevance) -> float:
        return float(stats.weights.abs().sum()) / stats.total if stats.total > 0 else 0.0

    def __repr__(self) -> str:
        r = self.rule
        return f"LRP(rule={r.name!r}, epsilon={r.epsilon:g}, alpha={r.alpha:g}, samples={self.samples})"
