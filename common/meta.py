"""Functional meta-learning core: inner-loop adaptation and each algorithm's local update.

Everything here is a pure function of a parameter dict evaluated with ``torch.func``: no module is copied
or mutated, so MAML's second-order graph lives exactly as long as one call. (learn2learn's mutable
``clone()`` keeps graphs alive through module attributes, which is where its users' memory growth comes
from.)

Every algorithm returns a *pseudo-gradient* ``g``; the server moves ``θ ← θ − β·mean(g)`` or feeds
``mean(g)`` to Adam (see ``optim``). For ``reptile`` and ``fedavg`` ``g = θ − θ'`` (FedJAX's convention),
so plain SGD with ``β = 1`` is exactly model averaging; for ``fomaml``, ``maml`` and ``meta-sgd`` ``g`` is a
query-loss gradient. One outer mechanism therefore serves all five algorithms.

``meta-sgd`` meta-learns one inner learning rate per parameter beside θ. The rates travel *in the parameter
dict*, as extra tensors named ``LEARNED_LR_PREFIX + name`` (see ``with_learned_rates``), so that whatever carries
θ (the server's state, the outer optimizer, aggregation plain or SecAgg+-masked, checkpoints, the model a
device keeps) carries them too, and code that needs θ alone splits them off by name (``split_learned_rates``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value

from metafleet.common.errors import ConfigError

Params = dict[str, Tensor]
Batch = tuple[Tensor, Tensor]
# An inner step size: one number for every parameter, or one tensor per parameter (Meta-SGD's learned rates).
StepSize = float | Params


@dataclass(frozen=True)
class Objective:
    """A training loss and the metric users read, with the direction that is better."""

    metric_name: str
    loss: Callable[[Tensor, Tensor], Tensor]
    metric: Callable[[Tensor, Tensor], Tensor]
    higher_is_better: bool
    # Targets are class ids (integers): support sets are stratified by them and labels checked against the
    # model's outputs.
    class_targets: bool = False


def flat_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    # Sequence models emit (batch, time, classes); flattening lets one objective serve both shapes.
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def _accuracy(logits: Tensor, target: Tensor) -> Tensor:
    predicted = logits.reshape(-1, logits.shape[-1]).argmax(dim=-1)
    return (predicted == target.reshape(-1)).float().mean()


REGRESSION = Objective("mse", F.mse_loss, F.mse_loss, higher_is_better=False)
CLASSIFICATION = Objective("accuracy", flat_cross_entropy, _accuracy, higher_is_better=True, class_targets=True)


@dataclass(frozen=True)
class Episode:
    """One client's task for one round: adapt on ``support``, measure on ``query``."""

    support: Batch
    query: Batch

    @property
    def num_examples(self) -> int:
        return int(self.support[0].shape[0] + self.query[0].shape[0])

    def union(self) -> Batch:
        return (torch.cat([self.support[0], self.query[0]]), torch.cat([self.support[1], self.query[1]]))

    def to(self, device: torch.device | str) -> Episode:
        return Episode(tuple(t.to(device) for t in self.support), tuple(t.to(device) for t in self.query))


HEAD_INITS = ("learned", "prototypes")
# Logit bias of a class the support set lacks (a client with fewer classes than the head has outputs):
# finite, so updates and personal models stay checkable, and far below any real logit.
_ABSENT_CLASS_BIAS = -1e9


class FunctionalModel:
    """An ``nn.Module`` seen as a pure function ``f(params, x)``.

    The module's own tensors are never changed. Buffers are passed as constants, so norms should not track
    running statistics (the bundled models use GroupNorm, which also behaves on 5-example support sets).

    ``head_init`` says where adaptation on a support set starts: ``"learned"``, from θ as it is;
    ``"prototypes"``, from θ with its linear head replaced by the support set's class prototypes
    (``prototype_head``). The second needs a classifier built as ``head(features(x))``.
    """

    def __init__(self, module: nn.Module, objective: Objective, head_init: str = "learned"):
        self.module = module
        self.objective = objective
        self.buffers: Params = {name: b.detach() for name, b in module.named_buffers()}
        self.has_rnn = any(isinstance(m, nn.RNNBase) for m in module.modules())
        if head_init not in HEAD_INITS:
            raise ConfigError("head_init", head_init, f"must be one of {list(HEAD_INITS)}")
        if head_init == "prototypes" and not (
            objective.class_targets
            and isinstance(getattr(module, "features", None), nn.Module)
            and isinstance(getattr(module, "head", None), nn.Linear)
        ):
            raise ConfigError("head_init", head_init,
                              f"needs a classifier built as head(features(x)); {type(module).__name__} is not one")
        self.head_init = head_init
        # The parameters a prototype head replaces: θ's values for them are never used, nor updated.
        self.replaced = frozenset({"head.weight", "head.bias"} if head_init == "prototypes" else ())

    def init_params(self) -> Params:
        return {name: p.detach().clone() for name, p in self.module.named_parameters()}

    def forward(self, params: Params, x: Tensor) -> Tensor:
        return functional_call(self.module, (params, self.buffers), (x,), strict=True)

    def loss(self, params: Params, batch: Batch) -> Tensor:
        x, y = batch
        return self.objective.loss(self.forward(params, x), y)

    @torch.no_grad()
    def metric(self, params: Params, batch: Batch) -> float:
        x, y = batch
        return float(self.objective.metric(self.forward(params, x), y))

    def embed(self, params: Params, x: Tensor) -> Tensor:
        """``features(x)``: the input to the linear head."""
        prefix = "features."
        own = {name[len(prefix):]: t for name, t in {**params, **self.buffers}.items() if name.startswith(prefix)}
        return functional_call(self.module.features, own, (x,), strict=True)

    def start(self, params: Params, support: Batch) -> Params:
        """The parameters adaptation on ``support`` starts from (see ``head_init``); differentiable in θ."""
        return prototype_head(self, params, support) if self.head_init == "prototypes" else params

    def without_replaced(self, update: Params) -> Params:
        """``update`` with zeros for the parameters a prototype head replaces (θ's values there do nothing)."""
        return {name: torch.zeros_like(t) if name in self.replaced else t for name, t in update.items()}


def prototype_head(fmodel: FunctionalModel, params: Params, support: Batch) -> Params:
    """θ with its linear head set from the support set's class means in feature space (prototypes ``c_k``):
    weight ``2 c_k``, bias ``-|c_k|²``, so logits rank classes as ProtoNets' ``-|f(x) - c_k|²`` does (Snell et
    al., NeurIPS 2017). Adaptation then fine-tunes from a classifier that already uses the support set:
    Proto-MAML (Triantafillou et al., "Meta-Dataset", ICLR 2020). Labels are ``0..ways-1``; a class the support
    set lacks gets a logit that never wins. Written without data-dependent shapes, so it is differentiable
    (MAML, FOMAML's gradient through the prototypes) and runs under ``torch.func``.
    """
    x, y = support
    embeddings = fmodel.embed(params, x)
    ways = params["head.weight"].shape[0]
    # A comparison, not F.one_hot: one_hot reads its input's values on the host, which vmap cannot batch.
    members = (y.unsqueeze(-1) == torch.arange(ways, device=y.device)).to(embeddings.dtype)  # (examples, ways)
    counts = members.sum(0)
    prototypes = (members.T @ embeddings) / counts.clamp(min=1).unsqueeze(1)
    bias = torch.where(counts > 0, -(prototypes**2).sum(1), torch.full_like(counts, _ABSENT_CLASS_BIAS))
    return {**params, "head.weight": 2 * prototypes, "head.bias": bias}


def params_device(params: Params) -> torch.device:
    """The device parameters live on (all on one: the client moves θ as a whole)."""
    return next(iter(params.values())).device


def _detached(params: Params) -> Params:
    return {name: t.detach() for name, t in params.items()}


def adapt(
    fmodel: FunctionalModel,
    params: Params,
    support: Batch,
    steps: int,
    inner_lr: StepSize,
    *,
    differentiable: bool = False,
) -> Params:
    """``steps`` plain SGD steps on ``support`` from ``params``; returns the adapted parameters. ``inner_lr`` is
    one step size, or one tensor per parameter (``θ − α ⊙ ∇L``, Meta-SGD's step).

    With ``differentiable=True`` the steps stay on the autograd tape of an enclosing ``torch.func.grad``
    (second-order MAML); otherwise every step is cut from it, which is what first-order methods and
    on-device personalization need and keeps memory flat in ``steps``.
    """
    if steps < 0:
        raise ConfigError("inner_steps", steps, "must be >= 0")
    loss_grad = grad(fmodel.loss) if differentiable else _first_order_grad(fmodel)
    if not differentiable:
        params = _detached(params)
    for _ in range(steps):
        params = sgd_step(params, loss_grad(params, support), inner_lr)
    return params


def sgd_step(params: Params, grads: Params, lr: StepSize) -> Params:
    """``θ − lr·∇``, with ``lr`` one number or one tensor per parameter (elementwise)."""
    if isinstance(lr, dict):
        return {name: p - lr[name] * grads[name] for name, p in params.items()}
    return {name: p - lr * grads[name] for name, p in params.items()}


# -- Meta-SGD's learned inner rates ------------------------------------------------------------------------------
LEARNED_LR_PREFIX = "meta-sgd.log-lr."
# The outer step projects log α into this interval (``project_learned_rates``). The inner step itself is never
# clamped (the meta-gradient stays exact); the bound only keeps exp(log α) a positive, finite float32 whatever an
# outer step does: below 1e-8 a coordinate has stopped adapting in float32 anyway, and a step size of 10 diverges
# on any loss whose curvature is above 0.2, so neither end is a rate a run can need.
LOG_LR_BOUNDS = (math.log(1e-8), math.log(10.0))


def is_learned_rate(name: str) -> bool:
    return name.startswith(LEARNED_LR_PREFIX)


def with_learned_rates(theta: Params, inner_lr: float) -> Params:
    """θ followed by Meta-SGD's rates, one tensor per θ tensor (same shape), all ``inner_lr`` to start with.

    The rates are stored as log α, and the inner step uses α = exp(log α): the rate is positive whatever value
    an outer step (Adam or SGD on the mean meta-gradient, DP noise) gives the stored tensor, so an inner step
    never turns into gradient *ascent* (and the server projects log α into ``LOG_LR_BOUNDS`` after each outer
    step, so α stays finite too); and an outer step changes a rate by a factor rather than an amount,
    which suits rates that differ by orders of magnitude between layers and tasks (Adam moves log α by about
    its lr a round, i.e. α by about that fraction). Starting at the configured inner lr makes round 0 exactly
    MAML's model with MAML's step, so a Meta-SGD run's round-0 evaluation is the other methods' local-only
    baseline. (Li et al. learn α itself, from a random start; log α adds the sign and the scale-free steps.)
    """
    if not (inner_lr > 0 and math.isfinite(inner_lr)):
        raise ConfigError("inner_lr", inner_lr, "must be a finite number > 0 (meta-sgd's rates start at it)")
    log_lr = math.log(inner_lr)
    rates = {LEARNED_LR_PREFIX + name: torch.full_like(t, log_lr) for name, t in theta.items()}
    return {**theta, **rates}


def split_learned_rates(params: Params) -> tuple[Params, Params]:
    """(θ, log α keyed by θ's own names); log α is empty for every algorithm but meta-sgd."""
    theta = {name: t for name, t in params.items() if not is_learned_rate(name)}
    log_rates = {name[len(LEARNED_LR_PREFIX):]: t for name, t in params.items() if is_learned_rate(name)}
    return theta, log_rates


def join_learned_rates(theta: Params, log_rates: Params, order: Sequence[str]) -> Params:
    """``split_learned_rates`` undone, in ``order`` (the received parameters' own: SecAgg+'s path names the
    arrays of an update by position)."""
    joined = {**theta, **{LEARNED_LR_PREFIX + name: t for name, t in log_rates.items()}}
    return {name: joined[name] for name in order}


def step_sizes(params: Params, inner_lr: float) -> tuple[Params, StepSize]:
    """θ and what to adapt it with: Meta-SGD's learned rates α where ``params`` carry them, else ``inner_lr``."""
    theta, log_rates = split_learned_rates(params)
    if not log_rates:
        return params, inner_lr
    return theta, {name: torch.exp(t) for name, t in log_rates.items()}


def meta_parameters(algorithm: str, theta: Params, inner_lr: float) -> Params:
    """What the server keeps and sends for ``algorithm``: θ, and for meta-sgd θ with its rates at ``inner_lr``."""
    return with_learned_rates(theta, inner_lr) if algorithm == "meta-sgd" else theta


def project_learned_rates(params: Params) -> Params:
    """``params`` with every log α clamped into ``LOG_LR_BOUNDS`` (θ untouched): the outer step's projection."""
    low, high = LOG_LR_BOUNDS
    return {name: t.clamp(low, high) if is_learned_rate(name) else t for name, t in params.items()}


def learned_rate_summary(params: Params) -> dict[str, float]:
    """The learned rates' smallest, geometric-mean and largest value over every coordinate (empty for other
    algorithms): what a run's metrics show of α, which the server holds anyway."""
    _, log_rates = split_learned_rates(params)
    if not log_rates:
        return {}
    flat = torch.cat([t.detach().flatten().double() for t in log_rates.values()])
    return {"learned-lr-min": float(flat.min().exp()), "learned-lr-geomean": float(flat.mean().exp()),
            "learned-lr-max": float(flat.max().exp())}


def _first_order_grad(fmodel: FunctionalModel) -> Callable[[Params, Batch], Params]:
    """The loss gradient as plain detached tensors, by ordinary autograd.

    Same values as ``torch.func.grad`` (checked by the tests), but eager autograd keeps PyTorch's fused
    kernels: an LSTM step is about 10x faster than under the ``grad`` transform. Only used where no
    higher-order graph is wanted.
    """

    def loss_grad(params: Params, batch: Batch) -> Params:
        return _first_order_grad_and_loss(fmodel, params, batch)[0]

    return loss_grad


def _first_order_grad_and_loss(fmodel: FunctionalModel, params: Params, batch: Batch) -> tuple[Params, Tensor]:
    with torch.enable_grad():
        leaves = {name: p.detach().requires_grad_(True) for name, p in params.items()}
        loss = fmodel.loss(leaves, batch)
        grads = torch.autograd.grad(loss, list(leaves.values()))
    return dict(zip(leaves, grads, strict=True)), loss.detach()


@dataclass
class LocalUpdate:
    """What a client sends: a pseudo-gradient, its aggregation weight, and scalar metrics."""

    pseudo_grad: Params
    num_examples: int
    metrics: dict[str, float]


def _difference(before: Params, after: Params) -> Params:
    return {name: before[name] - after[name] for name in before}


def fedavg_update(fmodel: FunctionalModel, params: Params, episode: Episode, steps: int, lr: float) -> LocalUpdate:
    """FedAvg (McMahan et al., AISTATS 2017): ``steps`` SGD steps on all local data; ``g = θ − θ'``."""
    data = episode.union()
    trained = adapt(fmodel, params, data, steps, lr)
    return LocalUpdate(
        _difference(params, trained),
        episode.num_examples,
        {"loss-before": float(fmodel.loss(params, data)), "loss-after": float(fmodel.loss(trained, data))},
    )


def reptile_update(fmodel: FunctionalModel, params: Params, episode: Episode, steps: int, lr: float) -> LocalUpdate:
    """Reptile (Nichol, Achiam & Schulman, arXiv:1803.02999): ``steps`` SGD steps on support; ``g = θ − θ'``."""
    with torch.no_grad():
        start = fmodel.start(_detached(params), episode.support)
    adapted = adapt(fmodel, start, episode.support, steps, lr)
    return LocalUpdate(
        fmodel.without_replaced(_difference(start, adapted)),
        episode.num_examples,
        {
            "loss-before": float(fmodel.loss(start, episode.query)),
            "loss-after": float(fmodel.loss(adapted, episode.query)),
        },
    )


def fomaml_update(fmodel: FunctionalModel, params: Params, episode: Episode, steps: int, lr: float) -> LocalUpdate:
    """First-order MAML (Finn et al., ICML 2017, sec. 5.2): the query gradient at the adapted parameters."""
    with torch.no_grad():
        start = fmodel.start(_detached(params), episode.support)
    adapted = adapt(fmodel, start, episode.support, steps, lr)
    if fmodel.replaced:
        query_grad, query_loss = _first_order_prototype_grad_and_loss(fmodel, adapted, episode)
    else:
        # Eager autograd, as in the inner loop: torch.func's transform cannot run cuDNN's LSTM on a GPU.
        query_grad, query_loss = _first_order_grad_and_loss(fmodel, adapted, episode.query)
    return LocalUpdate(
        query_grad,
        episode.num_examples,
        {"loss-before": float(fmodel.loss(start, episode.query)), "loss-after": float(query_loss)},
    )


def _first_order_prototype_grad_and_loss(
    fmodel: FunctionalModel, adapted: Params, episode: Episode
) -> tuple[Params, Tensor]:
    """FOMAML's query gradient where the head starts from prototypes: the head's value is the adapted one,
    but its gradient also flows back through the prototypes into the features, as in fo-Proto-MAML
    (Triantafillou et al., 2020). First order: the prototypes are taken at the adapted features. With 0
    inner steps this is exactly the ProtoNet loss's gradient."""
    with torch.enable_grad():
        leaves = {name: p.detach().requires_grad_(name not in fmodel.replaced) for name, p in adapted.items()}
        prototypes = prototype_head(fmodel, leaves, episode.support)
        head = {name: prototypes[name] + (adapted[name] - prototypes[name]).detach() for name in fmodel.replaced}
        loss = fmodel.loss({**leaves, **head}, episode.query)
        trained = [name for name in leaves if name not in fmodel.replaced]
        grads = dict(zip(trained, torch.autograd.grad(loss, [leaves[name] for name in trained]), strict=True))
    return fmodel.without_replaced({**adapted, **grads}), loss.detach()


def maml_update(fmodel: FunctionalModel, params: Params, episode: Episode, steps: int, lr: float) -> LocalUpdate:
    """MAML (Finn, Abbeel & Levine, ICML 2017): the exact second-order meta-gradient through ``steps`` steps."""

    def query_loss_after_adaptation(theta: Params) -> Tensor:
        start = fmodel.start(theta, episode.support)
        return fmodel.loss(adapt(fmodel, start, episode.support, steps, lr, differentiable=True), episode.query)

    with _second_order_kernels(fmodel, params):
        meta_grad, query_loss = grad_and_value(query_loss_after_adaptation)(_detached(params))
    with torch.no_grad():
        loss_before = float(fmodel.loss(fmodel.start(params, episode.support), episode.query))
    return LocalUpdate(
        fmodel.without_replaced(_detached(meta_grad)),
        episode.num_examples,
        {"loss-before": loss_before, "loss-after": float(query_loss)},
    )


def _second_order_kernels(fmodel: FunctionalModel, params: Params) -> contextlib.AbstractContextManager:
    # cuDNN's fused RNN kernels have no double backward: on a GPU an LSTM's second-order step runs unfused.
    # (flags() resets every cuDNN setting, TF32 included, so it is entered only where needed.)
    unfused = fmodel.has_rnn and params_device(params).type == "cuda"
    return torch.backends.cudnn.flags(enabled=False) if unfused else contextlib.nullcontext()


def meta_sgd_update(fmodel: FunctionalModel, params: Params, episode: Episode, steps: int, lr: float) -> LocalUpdate:
    """Meta-SGD (Li, Zhou, Chen & Li, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning",
    arXiv:1707.09835; FedMeta's second algorithm, Chen et al., arXiv:1802.07876): MAML's exact second-order
    meta-gradient, taken for θ *and* for the learned rates, through ``steps`` inner steps
    ``θ ← θ − α ⊙ ∇L_support(θ)``. ``params`` carry the rates as log α (``with_learned_rates``); the
    pseudo-gradient holds ``∂L_query/∂θ`` and ``∂L_query/∂log α`` under the same names, so the server's one outer
    step moves both. ``lr`` is not used: the rates in ``params`` are the step sizes (``lr`` only started them).
    """
    theta, log_rates = split_learned_rates(_detached(params))
    if set(log_rates) != set(theta):
        missing = sorted(set(theta) - set(log_rates))
        raise ValueError(f"meta-sgd needs a learned rate {LEARNED_LR_PREFIX}NAME for every parameter; "
                         f"{len(missing)} of {len(theta)} have none (first: {missing[:1]})")

    def query_loss_after_adaptation(theta: Params, log_rates: Params) -> Tensor:
        start = fmodel.start(theta, episode.support)
        rates = {name: torch.exp(t) for name, t in log_rates.items()}
        return fmodel.loss(adapt(fmodel, start, episode.support, steps, rates, differentiable=True), episode.query)

    with _second_order_kernels(fmodel, params):
        (theta_grad, rate_grad), query_loss = grad_and_value(query_loss_after_adaptation, argnums=(0, 1))(
            theta, log_rates)
    with torch.no_grad():
        loss_before = float(fmodel.loss(fmodel.start(theta, episode.support), episode.query))
    # A prototype head's θ is never used, but its rate is: the head's adaptation starts from the prototypes.
    pseudo_grad = join_learned_rates(fmodel.without_replaced(_detached(theta_grad)), _detached(rate_grad), params)
    return LocalUpdate(pseudo_grad, episode.num_examples, {"loss-before": loss_before, "loss-after": float(query_loss)})


LocalUpdateFn = Callable[[FunctionalModel, Params, Episode, int, float], LocalUpdate]

ALGORITHMS: dict[str, LocalUpdateFn] = {
    "fedavg": fedavg_update,
    "reptile": reptile_update,
    "fomaml": fomaml_update,
    "maml": maml_update,
    "meta-sgd": meta_sgd_update,
}


def local_update(
    algorithm: str, fmodel: FunctionalModel, params: Params, episode: Episode, steps: int, lr: float
) -> LocalUpdate:
    """Dispatch to the named algorithm's local update."""
    try:
        update_fn = ALGORITHMS[algorithm]
    except KeyError:
        raise ConfigError("algorithm", algorithm, f"must be one of {sorted(ALGORITHMS)}") from None
    return update_fn(fmodel, params, episode, steps, lr)


# (parameters, support, steps) -> the parameters after that many more steps of some fine-tuning.
Adapter = Callable[[Params, Batch, int], Params]


def sgd_adapter(fmodel: FunctionalModel, inner_lr: StepSize) -> Adapter:
    """``adapt``'s plain SGD steps as an ``Adapter``."""
    return lambda params, support, steps: adapt(fmodel, params, support, steps, inner_lr)


def check_eval_steps(steps: Sequence[int]) -> None:
    if not steps or steps[0] != 0 or list(steps) != sorted(set(steps)):
        raise ConfigError("eval_steps", list(steps), "must be strictly increasing and start at 0")


def adaptation_curve(fmodel: FunctionalModel, start: Params, support: Batch, query: Batch, steps: Sequence[int],
                     step: Adapter) -> list[float]:
    """The query metric after each number of ``step``'s steps in ``steps`` (ascending, from 0) from ``start``.

    Adaptation is incremental, so the whole curve costs ``max(steps)`` steps."""
    check_eval_steps(steps)
    curve, adapted, done = [], start, 0
    for target in steps:
        adapted = step(adapted, support, target - done)
        done = target
        curve.append(fmodel.metric(adapted, query))
    return curve


def personalization_curve(
    fmodel: FunctionalModel,
    params: Params,
    support: Batch,
    query: Batch,
    steps: Sequence[int],
    inner_lr: StepSize,
) -> list[float]:
    """The query metric after each number of adaptation steps in ``steps`` (ascending, from 0)."""
    with torch.no_grad():
        start = fmodel.start(_detached(params), support)
    return adaptation_curve(fmodel, start, support, query, steps, sgd_adapter(fmodel, inner_lr))


def cross_validation_folds(support: Batch, objective: Objective, max_folds: int = 5) -> list[Tensor]:
    """Index sets that split a support set for cross-validation; empty when it cannot be split usefully.

    Classification folds are stratified (each example's rank within its class, modulo the fold count), so
    every class with two or more examples stays in every training part. A support set where every class has
    a single example (1-shot) cannot be split without removing a class from training: no folds.
    """
    _, y = support
    count = len(y)
    folds = min(max_folds, count)
    if folds < 2:
        return []
    if objective.class_targets and y.dim() == 1:  # one label an example: stratify by it
        _, inverse, per_class = torch.unique(y, return_inverse=True, return_counts=True)
        if int(per_class.max()) < 2:
            return []
        rank = torch.zeros(count, dtype=torch.long)
        seen: dict[int, int] = {}
        for index, label in enumerate(inverse.tolist()):
            rank[index] = seen.get(label, 0)
            seen[label] = rank[index].item() + 1
        assignment = rank % folds
    else:
        assignment = torch.arange(count) % folds
    folds_present = [f for f in range(folds) if bool((assignment == f).any())]
    return [torch.nonzero(assignment == f).flatten().to(y.device) for f in folds_present]


def keeps_adaptation(
    fmodel: FunctionalModel, params: Params, support: Batch, steps: int, inner_lr: StepSize, max_folds: int = 5
) -> bool:
    """The personalization guard: does adapting for ``steps`` help, judged on the support set alone?

    Cross-validation on the support set: for each fold, adapt on the rest and compare the fold's loss
    with and without adaptation. The device keeps the adapted model only if adaptation lowers the
    summed held-out loss, so personalization cannot make a device worse on average through overfitting
    or a badly chosen step size. It needs no query data, so a real device can run it. Where the support
    set cannot be split (1-shot), adaptation is kept: that is what few-shot models are trained for.
    """
    return guard_decisions(fmodel, params, support, [steps], inner_lr, max_folds)[0]


def guard_decisions(
    fmodel: FunctionalModel, params: Params, support: Batch, steps: Sequence[int], inner_lr: StepSize,
    max_folds: int = 5,
) -> list[bool]:
    """``keeps_adaptation`` for each step count in ``steps`` (ascending) at the cost of the largest alone."""
    return adaptation_guard(fmodel, support, steps, lambda rest: fmodel.start(params, rest),
                            sgd_adapter(fmodel, inner_lr), max_folds)


def adaptation_guard(
    fmodel: FunctionalModel, support: Batch, steps: Sequence[int], start: Callable[[Batch], Params],
    step: Adapter, max_folds: int = 5,
) -> list[bool]:
    """The guard for any fine-tuning ``step`` from ``start(rest of the support set)``: for each step count,
    does adapting lower the summed loss of support folds held out in turn? Each fold's adaptation continues
    from the previous step count instead of starting over."""
    folds = cross_validation_folds(support, fmodel.objective, max_folds)
    if not folds:
        return [True] * len(steps)
    x, y = support
    adapted_loss, base_loss = [0.0] * len(steps), 0.0
    for held in folds:
        keep = torch.ones(len(y), dtype=torch.bool, device=y.device)
        keep[held] = False
        held_batch, rest = (x[held], y[held]), (x[keep], y[keep])
        with torch.no_grad():
            unadapted = start(rest)
            base_loss += float(fmodel.loss(unadapted, held_batch)) * len(held)
        adapted, done = unadapted, 0
        for index, target in enumerate(steps):
            adapted = step(adapted, rest, target - done)
            done = target
            with torch.no_grad():
                adapted_loss[index] += float(fmodel.loss(adapted, held_batch)) * len(held)
    return [step == 0 or loss < base_loss for step, loss in zip(steps, adapted_loss, strict=True)]


def guarded_curve(
    fmodel: FunctionalModel, params: Params, support: Batch, curve: Sequence[float], steps: Sequence[int],
    inner_lr: StepSize,
) -> list[float]:
    """``curve`` as the guard would deliver it: at each step count, the adapted metric if the guard keeps
    adaptation, else the unadapted one (``curve[0]``)."""
    decisions = guard_decisions(fmodel, params, support, steps, inner_lr)
    return [value if kept else curve[0] for value, kept in zip(curve, decisions, strict=True)]


def check_update(update: Params, reference: Params) -> float:
    """Raise ``ValueError`` naming the problem if ``update`` does not fit ``reference`` or is not finite;
    return its global norm (computed for the check: callers that bound the norm take it from here).

    Used by a client before sending (SecAgg+ would turn a NaN into silent garbage) and by the server on
    every reply.
    """
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        raise ValueError(f"update keys differ from the model's: missing {missing}, unexpected {extra}")
    for name, ref in reference.items():
        value = update[name]
        if tuple(value.shape) != tuple(ref.shape):
            raise ValueError(f"update '{name}' has shape {tuple(value.shape)}, expected {tuple(ref.shape)}")
        if value.dtype != ref.dtype:
            raise ValueError(f"update '{name}' has dtype {value.dtype}, expected {ref.dtype}")
    norm = global_norm(update)
    if math.isfinite(norm):
        return norm  # NaN and Inf reach the sum of squares; one finite total clears every tensor at once
    for name, value in update.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"update '{name}' holds NaN or Inf")
    return norm  # finite values whose squares overflow float64 (beyond 1e154): the norm bounds refuse them


def global_norm(tensors: Params) -> float:
    # One norm kernel per tensor (in float64) and hypot's overflow-safe sum: a third of the squares-and-sums'
    # cost, which every reply pays twice (device and server).
    return math.hypot(*(float(torch.linalg.vector_norm(t if t.is_floating_point() else t.double(), dtype=torch.float64))
                        for t in tensors.values()))


def per_fedavg_update(fmodel: FunctionalModel, params: Params, episode: Episode, steps: int, lr: float) -> LocalUpdate:
    """Per-FedAvg, first-order (Fallah, Mokhtari & Ozdaglar, NeurIPS 2020, Algorithm 1 with the FO estimate):
    each of ``steps`` local steps takes ``θ_tmp = θ − α∇L_D(θ)``, then ``θ ← θ − β∇L_D'(θ_tmp)``; ``g = θ₀ − θ``.

    ``D`` is the round's support batch and ``D'`` its query batch: the episode sampler draws both afresh every
    round, from disjoint recordings, so they are the paper's two independent batches; the paper redraws them
    every step, which would need the device's rng inside the update (no backend passes it) and would keep the
    vectorized backend from computing the same update from the same episode. ``α = β =`` the inner lr: the
    held-out devices adapt with ``α``, the step the initialization was trained for, and one lr keeps the
    method's search space that of the other meta methods. The first-order estimate drops the Hessian term of
    ``∇F(θ) = (I − α∇²L_D(θ))∇L_D'(θ_tmp)``, as FOMAML does. The server averages the local models
    (``g = θ₀ − θ``, outer SGD with step 1), as the paper's server does.

    Metrics: the query loss after one support step from the received θ (the Per-FedAvg objective) and from
    the locally updated θ.
    """
    if fmodel.replaced:
        raise ConfigError("head_init", fmodel.head_init, "per-fedavg adapts a learned head; use head_init 'learned'")
    loss_grad = _first_order_grad(fmodel)
    received = _detached(params)

    def one_step_query_loss(theta: Params) -> float:
        return float(fmodel.loss(adapt(fmodel, theta, episode.support, 1, lr), episode.query))

    current = received
    for _ in range(steps):
        support_grad = loss_grad(current, episode.support)
        temporary = {name: p - lr * support_grad[name] for name, p in current.items()}
        query_grad = loss_grad(temporary, episode.query)
        current = {name: p - lr * query_grad[name] for name, p in current.items()}
    return LocalUpdate(
        _difference(received, current),
        episode.num_examples,
        {"loss-before": one_step_query_loss(received), "loss-after": one_step_query_loss(current)},
    )


# Registered here rather than in the table above, so that this algorithm merges apart from the others.
ALGORITHMS["per-fedavg"] = per_fedavg_update
