"""How a held-out device fine-tunes the model it receives: the baselines users would pick instead of
meta-learning, each an evaluation-time variant of adapting FedAvg's model.

- ``full`` (``fedavg+ft``): plain SGD on every parameter (``metafleet.common.meta.adapt``);
- ``head`` (``fedavg+head-ft``, FedPer / FedRep style: Arivazhagan et al. 2019, Collins et al., ICML 2021):
  the body stays as the fleet learnt it and only the head adapts, so a few support examples cannot
  overwrite the shared representation;
- ``prox`` (``fedavg+prox-ft``, Ditto style: Li et al., ICML 2021): SGD on every parameter for the support
  loss plus ``(λ/2)·‖w − θ‖²``, a pull towards the received model θ, so the personal model stays near the
  global one by as much as λ says.

They differ only in the step, so one FedAvg training run is evaluated with all three on the same devices
(the evaluation message names the fine-tunings; ``metafleet.client.app``). The ``full`` mode keeps going
through ``meta.personalization_curve`` and ``meta.guarded_curve``, so its numbers stay those of earlier runs;
the other two go through the same incremental curve and cross-validation guard (``meta.adaptation_curve``,
``meta.adaptation_guard``) with their own step function.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from metafleet.common.errors import ConfigError
from metafleet.common.meta import (
    Adapter,
    Batch,
    FunctionalModel,
    Params,
    _first_order_grad_and_loss,
    adaptation_curve,
    adaptation_guard,
)

# The prefix of a mode's metric keys (step-N, guarded-step-N) in evaluation replies and metrics.jsonl;
# "full" keeps the unprefixed keys every earlier run wrote.
METRIC_PREFIXES = {"full": "", "head": "head-ft-", "prox": "prox-ft-"}
# The evaluation message's config key naming the fine-tunings, comma-separated; a message without it comes
# from a server that knows only "full".
FINETUNES_KEY = "finetunes"


def head_adapt(fmodel: FunctionalModel, params: Params, support: Batch, steps: int, lr: float,
               head: frozenset[str]) -> Params:
    """``steps`` SGD steps on the parameters named in ``head``; every other tensor takes part in no
    arithmetic, so the body comes back bit-identical by construction, not by rounding luck."""
    if steps < 0:
        raise ConfigError("eval_steps", steps, "must be >= 0")
    missing = sorted(head - set(params))
    if not head or missing:
        raise ConfigError("head", sorted(head), f"must name some of the model's parameters (unknown: {missing})")
    params = {name: t.detach() for name, t in params.items()}
    for _ in range(steps):
        with torch.enable_grad():
            # Only the head's tensors are leaves: the body's gradient is never computed (a conv body's
            # backward is most of a step's cost).
            leaves = {name: params[name].detach().requires_grad_(True) for name in sorted(head)}
            loss = fmodel.loss({**params, **leaves}, support)
            grads = torch.autograd.grad(loss, list(leaves.values()))
        params = {**params, **{name: (leaves[name] - lr * g).detach()
                               for (name, g) in zip(leaves, grads, strict=True)}}
    return params


def proximal_adapt(fmodel: FunctionalModel, params: Params, support: Batch, steps: int, lr: float,
                   prox_lambda: float, anchor: Params) -> Params:
    """``steps`` SGD steps on ``L(w) + (λ/2)·‖w − anchor‖²``: the loss gradient plus ``λ(w − anchor)``.

    The pull is added to the loss gradient rather than differentiated with it, so λ = 0 adds exact zeros and
    the steps are bit for bit those of plain fine-tuning (the tests hold it to that)."""
    if steps < 0:
        raise ConfigError("eval_steps", steps, "must be >= 0")
    if not 0 <= prox_lambda < float("inf"):
        raise ConfigError("prox_lambda", prox_lambda, "must be a finite number >= 0")
    params = {name: t.detach() for name, t in params.items()}
    anchor = {name: t.detach() for name, t in anchor.items()}
    for _ in range(steps):
        grads, _ = _first_order_grad_and_loss(fmodel, params, support)
        params = {name: p - lr * (grads[name] + prox_lambda * (p - anchor[name])) for name, p in params.items()}
    return params


def adapter(mode: str, fmodel: FunctionalModel, anchor: Params, lr: float, *, head: frozenset[str] = frozenset(),
            prox_lambda: float = 0.0) -> Adapter:
    """The step function of fine-tuning ``mode`` from the received model ``anchor`` (prox's pull target)."""
    if mode == "head":
        return lambda params, support, steps: head_adapt(fmodel, params, support, steps, lr, head)
    if mode == "prox":
        return lambda params, support, steps: proximal_adapt(fmodel, params, support, steps, lr, prox_lambda, anchor)
    # "full" has no adapter here: it goes through meta.personalization_curve (see the module docstring).
    raise ConfigError("eval_finetunes", mode, "must be 'head' or 'prox' here")


def finetuned_and_guarded(fmodel: FunctionalModel, params: Params, support: Batch, query: Batch,
                          steps: Sequence[int], adapt: Adapter) -> tuple[list[float], list[float]]:
    """(the plain curve, the curve as the guard delivers it: the adapted metric where it keeps adaptation,
    else the unadapted one)."""
    curve = adaptation_curve(fmodel, {name: t.detach() for name, t in params.items()}, support, query, steps, adapt)
    decisions = adaptation_guard(fmodel, support, steps, lambda rest: params, adapt)
    return curve, [value if kept else curve[0] for value, kept in zip(curve, decisions, strict=True)]
