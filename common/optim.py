"""Outer (server) optimizers that apply an aggregated pseudo-gradient to the meta-parameters.

As in FedOpt (Reddi et al., ICLR 2021) and FedJAX, the weighted mean of the clients' pseudo-gradients is
treated as a gradient: ``θ ← θ − β·ḡ`` for SGD, or an Adam step on ``ḡ``. Their state is a plain dict of
tensors and numbers so that a checkpoint can hold it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from metafleet.common.errors import ConfigError
from metafleet.common.meta import Params


class OuterOptimizer(ABC):
    """Applies one aggregated pseudo-gradient; holds whatever state the rule needs between rounds."""

    def __init__(self, lr: float):
        if not lr > 0:
            raise ConfigError("outer_lr", lr, "must be > 0")
        self.lr = float(lr)

    @abstractmethod
    def step(self, params: Params, pseudo_grad: Params) -> Params:
        """Return the new parameters; ``params`` is not modified. A tensor ``pseudo_grad`` lacks keeps its
        value, and its optimizer state stays as it was."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class OuterSGD(OuterOptimizer):
    """``θ ← θ − lr·(ḡ + momentum·velocity)``; with ``lr = 1`` and no momentum Reptile/FedAvg average models."""

    def __init__(self, lr: float = 1.0, momentum: float = 0.0):
        super().__init__(lr)
        if not 0.0 <= momentum < 1.0:
            raise ConfigError("outer_momentum", momentum, "must be in [0, 1)")
        self.momentum = float(momentum)
        self.velocity: Params = {}

    def step(self, params: Params, pseudo_grad: Params) -> Params:
        direction = pseudo_grad
        if self.momentum:
            self.velocity = {
                name: self.momentum * self.velocity.get(name, torch.zeros_like(g)) + g
                for name, g in pseudo_grad.items()
            } | {name: v for name, v in self.velocity.items() if name not in pseudo_grad}
            direction = {name: self.velocity[name] for name in pseudo_grad}
        return {name: p - self.lr * direction[name] if name in direction else p for name, p in params.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "sgd", "lr": self.lr, "momentum": self.momentum, "velocity": dict(self.velocity)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _expect_kind(state, "sgd")
        self.lr, self.momentum = float(state["lr"]), float(state["momentum"])
        self.velocity = dict(state["velocity"])


class OuterAdam(OuterOptimizer):
    """Adam (Kingma & Ba, 2015) on the aggregated pseudo-gradient, as FedAdam does on the server."""

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(lr)
        for beta in betas:
            if not 0.0 <= beta < 1.0:
                raise ConfigError("outer_betas", betas, "each beta must be in [0, 1)")
        if not eps > 0:
            raise ConfigError("outer_eps", eps, "must be > 0")
        self.betas, self.eps = (float(betas[0]), float(betas[1])), float(eps)
        self.steps_taken = 0
        self.first_moment: Params = {}
        self.second_moment: Params = {}

    def step(self, params: Params, pseudo_grad: Params) -> Params:
        beta1, beta2 = self.betas
        self.steps_taken += 1
        new_params = {}
        for name, p in params.items():
            if name not in pseudo_grad:
                new_params[name] = p  # no device sent it (--selective-layers): neither it nor its moments move
                continue
            g = pseudo_grad[name]
            m = beta1 * self.first_moment.get(name, torch.zeros_like(g)) + (1 - beta1) * g
            v = beta2 * self.second_moment.get(name, torch.zeros_like(g)) + (1 - beta2) * g * g
            self.first_moment[name], self.second_moment[name] = m, v
            m_hat = m / (1 - beta1**self.steps_taken)
            v_hat = v / (1 - beta2**self.steps_taken)
            new_params[name] = p - self.lr * m_hat / (v_hat.sqrt() + self.eps)
        return new_params

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "adam",
            "lr": self.lr,
            "betas": self.betas,
            "eps": self.eps,
            "steps_taken": self.steps_taken,
            "first_moment": dict(self.first_moment),
            "second_moment": dict(self.second_moment),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _expect_kind(state, "adam")
        self.lr, self.eps = float(state["lr"]), float(state["eps"])
        self.betas = (float(state["betas"][0]), float(state["betas"][1]))
        self.steps_taken = int(state["steps_taken"])
        self.first_moment = dict(state["first_moment"])
        self.second_moment = dict(state["second_moment"])


def _expect_kind(state: dict[str, Any], kind: str) -> None:
    if state.get("kind") != kind:
        raise ValueError(f"optimizer state is for '{state.get('kind')}', cannot load it into '{kind}'")


OUTER_OPTIMIZERS = ("sgd", "adam")


def make_outer_optimizer(name: str, lr: float) -> OuterOptimizer:
    if name == "sgd":
        return OuterSGD(lr)
    if name == "adam":
        return OuterAdam(lr)
    raise ConfigError("outer_optimizer", name, f"must be one of {list(OUTER_OPTIMIZERS)}")
