"""Generated sinusoid regression fleet, the MAML paper's setting (Finn et al., 2017, sec. 5.1).

Client ``i`` is the function ``A·sin(x − φ)`` with amplitude A ~ U[0.1, 5.0] and phase φ ~ U[0, π], and
private points x ~ U[−5, 5]. Clients are generated on demand from ``(seed, i)``, so a fleet of 10,000
costs nothing until a client is asked for.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from metafleet.common.config import RunConfig
from metafleet.common.data import ClientData, Fleet, Split
from metafleet.common.task import BenchmarkPlan, BenchmarkSetting, TaskDefaults
from metafleet.common.tasks.models import SinusoidMLP

name = "sinusoid"
objective = "regression"
input_shape = (1,)
clients_depend_on_seed = True  # each client's sinusoid is drawn from (seed, client)
# fedavg+head-ft's lr and fedavg+prox-ft's λ: the best mean MSE after 10 steps on validation clients (fold 5
# of seed 0, which the benchmark never reports; docs/benchmarks.md, "Baselines"): head lr 0.05 of
# 0.2/0.1/0.05/0.02/0.01, λ 2 of 0.01/0.1/0.5/1/2/5/10 at the fine-tuning lr (the inner lr, 0.02).
# Per-FedAvg's α = β: 0.005 of 0.02/0.005/0.002, the best after 10 steps on fold 1 (5-shot, 1,000 devices,
# 5,000 rounds); at 0.02 its updates blew up (docs/benchmarks.md, "Per-FedAvg's step size").
defaults = TaskDefaults(shots=10, query_shots=10, inner_lr=0.02, eval_steps=(0, 1, 5, 10), clients=200,
                        held_out_clients=20, head_finetune_lr=0.05, finetune_prox_lambda=2.0,
                        per_fedavg_inner_lr=0.005)
benchmark = BenchmarkPlan((BenchmarkSetting("10-shot"),), rounds=100, folds=(0,), seeds=(0, 1),
                          common={"clients": 200, "clients_per_round": 25, "inner_steps": 3, "eval_every": 50})


def stimuli() -> np.ndarray:
    """--defense rsa's public stimulus set: 20 evenly spaced points of the input range (devices draw theirs
    at random)."""
    return np.linspace(-5.0, 5.0, 20, dtype=np.float32)[:, None]


def make_model() -> SinusoidMLP:
    return SinusoidMLP()


def make_fleet(config: RunConfig, held_out: Sequence[int]) -> SinusoidFleet:
    return SinusoidFleet(config.clients, seed=config.seed)


class SinusoidFleet(Fleet):
    name = "sinusoid"
    input_shape = (1,)
    num_classes = None
    sampling = "uniform"

    def __init__(self, num_clients: int, seed: int = 0, points_per_pool: int = 50):
        if num_clients < 1:
            raise ValueError(f"a fleet needs at least one client, got {num_clients}")
        self._num_clients = num_clients
        self.seed = seed
        self.points_per_pool = points_per_pool

    @property
    def num_clients(self) -> int:
        return self._num_clients

    def task_parameters(self, client_id: int) -> tuple[float, float]:
        rng = np.random.default_rng([self.seed, client_id, 1])
        return float(rng.uniform(0.1, 5.0)), float(rng.uniform(0.0, np.pi))

    def client(self, client_id: int) -> ClientData:
        self.check_client_id(client_id)
        amplitude, phase = self.task_parameters(client_id)
        rng = np.random.default_rng([self.seed, client_id, 2])

        def pool() -> tuple[torch.Tensor, torch.Tensor]:
            x = rng.uniform(-5.0, 5.0, size=(self.points_per_pool, 1))
            y = amplitude * np.sin(x - phase)
            return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)

        data = ClientData(client_id, (Split(pool(), pool()),), num_classes=None)
        data.validate(self.input_shape)
        return data
