"""The baselines users would pick instead of meta-learning: head-only and proximal fine-tuning of FedAvg's
model, and Per-FedAvg. Each adapts only what it says, checked on real models, by hand on tiny ones, and
through the real ServerApp and ClientApp."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from metafleet.common.config import RunConfig
from metafleet.common.errors import ConfigError, MetafleetError
from metafleet.common.finetune import adapter, finetuned_and_guarded, head_adapt, proximal_adapt
from metafleet.common.fleets import functional_model, make_fleet, make_model, split_clients
from metafleet.common.meta import REGRESSION, Episode, FunctionalModel, adapt, local_update
from metafleet.common.task import TaskError, load_task
from metafleet.common.training import client_finetuning, training_episode, training_rng
from metafleet.common.vectorized import batched_updates
from tests.flower_messages import device_context, instruction


def _watch_like(dataset: str = "fashion-mnist"):
    """A conv body and a linear head (the bundled classifiers' shape), a trained-ish θ and one episode."""
    config = RunConfig.resolve(dataset=dataset, algorithm="fedavg", shots=5, query_shots=5)
    fmodel = functional_model(config)
    torch.manual_seed(0)
    params = {name: t + 0.01 * torch.randn_like(t) for name, t in fmodel.init_params().items()}
    episode = training_episode(make_fleet(config).client(0), config, training_rng(config, 1, 0))
    return config, fmodel, params, episode


def test_head_only_fine_tuning_leaves_every_body_parameter_bit_identical():
    config, fmodel, params, episode = _watch_like()
    head = config.task_definition.head_names(fmodel.module)
    assert head == {"head.weight", "head.bias"}
    adapted = head_adapt(fmodel, params, episode.support, 5, 0.1, head)
    for name, value in params.items():
        if name in head:
            assert not torch.equal(adapted[name], value), name
        else:
            assert torch.equal(adapted[name], value), name
    assert fmodel.loss(adapted, episode.support) < fmodel.loss(params, episode.support)


def test_head_only_fine_tuning_is_plain_fine_tuning_of_the_head_alone():
    """The same steps as meta.adapt would take if the body were a constant: a one-layer check by hand."""
    torch.manual_seed(1)
    module = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
    fmodel = FunctionalModel(module, REGRESSION)
    params = fmodel.init_params()
    x, y = torch.randn(6, 2), torch.randn(6, 1)
    features = torch.tanh(x @ params["0.weight"].T + params["0.bias"])
    w, b = params["2.weight"].clone(), params["2.bias"].clone()
    for _ in range(2):
        residual = features @ w.T + b - y  # d mean((f w + b - y)^2) = 2/n f^T r
        w, b = w - 0.05 * (2 / 6) * residual.T @ features, b - 0.05 * (2 / 6) * residual.sum(0)
    adapted = head_adapt(fmodel, params, (x, y), 2, 0.05, frozenset({"2.weight", "2.bias"}))
    torch.testing.assert_close(adapted["2.weight"], w)
    torch.testing.assert_close(adapted["2.bias"], b)
    assert torch.equal(adapted["0.weight"], params["0.weight"])


def test_proximal_fine_tuning_with_lambda_zero_is_plain_fine_tuning_bit_for_bit():
    _, fmodel, params, episode = _watch_like()
    plain = adapt(fmodel, params, episode.support, 3, 0.05)
    proximal = proximal_adapt(fmodel, params, episode.support, 3, 0.05, 0.0, params)
    assert all(torch.equal(proximal[name], plain[name]) for name in plain)


def test_proximal_fine_tuning_pulls_towards_the_received_model_as_hand_computed():
    """L(w) = mean((w x − y)²) on one weight: each step is w − lr·(L'(w) + λ(w − θ))."""
    fmodel = FunctionalModel(nn.Linear(1, 1, bias=False), REGRESSION)
    theta = {"weight": torch.tensor([[0.5]])}
    x, y = torch.tensor([[1.0], [2.0]]), torch.tensor([[2.0], [3.0]])
    w, lr, lam = 0.5, 0.1, 2.0
    for _ in range(3):
        derivative = (2 * (w * 1 - 2) * 1 + 2 * (w * 2 - 3) * 2) / 2
        w = w - lr * (derivative + lam * (w - 0.5))
    adapted = proximal_adapt(fmodel, theta, (x, y), 3, lr, lam, theta)
    assert float(adapted["weight"]) == pytest.approx(w, rel=1e-6)
    # The pull keeps the personal model nearer θ than plain fine-tuning's.
    plain = adapt(fmodel, theta, (x, y), 3, lr)
    assert abs(float(adapted["weight"]) - 0.5) < abs(float(plain["weight"]) - 0.5)


def test_per_fedavg_update_matches_a_hand_computation():
    """θ_tmp = θ − α L_D'(θ), θ ← θ − β L_D'(θ_tmp) with α = β, on w·x with mean squared error; g = θ₀ − θ."""
    fmodel = FunctionalModel(nn.Linear(1, 1, bias=False), REGRESSION)
    support = (torch.tensor([[1.0], [2.0]]), torch.tensor([[2.0], [4.0]]))  # L_D(w) = 2.5 (w − 2)²
    query = (torch.tensor([[3.0]]), torch.tensor([[3.0]]))  # L_D'(w) = 9 (w − 1)²
    lr, w0 = 0.05, 0.0
    w = w0
    for _ in range(2):
        temporary = w - lr * 5 * (w - 2)
        w = w - lr * 18 * (temporary - 1)
    update = local_update("per-fedavg", fmodel, {"weight": torch.tensor([[w0]])}, Episode(support, query), 2, lr)
    assert float(update.pseudo_grad["weight"]) == pytest.approx(w0 - w, rel=1e-6)
    assert update.num_examples == 3

    def objective(value: float) -> float:  # the Per-FedAvg objective: the query loss after one support step
        return 9 * (value - lr * 5 * (value - 2) - 1) ** 2

    assert update.metrics["loss-before"] == pytest.approx(objective(w0), rel=1e-6)
    assert update.metrics["loss-after"] == pytest.approx(objective(w), rel=1e-6)
    assert update.metrics["loss-after"] < update.metrics["loss-before"]


def test_per_fedavg_config_defaults_and_refusals():
    config = RunConfig.resolve(dataset="sinusoid", algorithm="per-fedavg")
    assert (config.outer_optimizer, config.outer_lr, config.secagg_range, config.head_init) == ("sgd", 1.0, 8.0,
                                                                                              "learned")
    assert RunConfig.resolve(dataset="omniglot", algorithm="per-fedavg").head_init == "learned"
    with pytest.raises(ConfigError, match="head_init.*'learned' for per-fedavg"):
        RunConfig.resolve(dataset="omniglot", algorithm="per-fedavg", head_init="prototypes")
    with pytest.raises(ConfigError, match="eval_finetunes.*distinct names"):
        RunConfig.resolve(dataset="sinusoid", eval_finetunes="full,head,head")
    with pytest.raises(ConfigError, match="eval_finetunes.*must include 'full'"):
        RunConfig.resolve(dataset="sinusoid", eval_finetunes="head,prox")
    with pytest.raises(ConfigError, match="prox_lambda.*>= 0"):
        RunConfig.resolve(dataset="sinusoid", prox_lambda=-1.0)


def test_a_task_whose_head_cannot_be_told_gets_one_clear_error(tmp_path):
    task_file = tmp_path / "scaled.py"
    task_file.write_text(
        "import torch\nfrom torch import nn\n\n"
        "class Scaled(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.body = nn.Linear(1, 1)\n"
        "        self.scale = nn.Parameter(torch.ones(1))\n"
        "    def forward(self, x):\n"
        "        return self.body(x) * self.scale\n\n"
        "def make_model():\n    return Scaled()\n\nobjective = 'regression'\n")
    task = load_task(str(task_file))
    with pytest.raises(TaskError, match="cannot tell the model's head.*\\['scale'\\] may act after.*declare "
                       "head_parameters"):
        task.head_names(task.make_model())
    normed = tmp_path / "normed.py"
    normed.write_text("from torch import nn\n\ndef make_model():\n    return nn.Sequential(nn.Linear(1, 4), "
                      "nn.LayerNorm(4))\n\nobjective = 'regression'\n")
    task = load_task(str(normed))
    with pytest.raises(TaskError, match="last parameter '1.bias' is not in an nn.Linear"):
        task.head_names(task.make_model())
    declared = tmp_path / "declared.py"
    declared.write_text(task_file.read_text() + "head_parameters = ('scale',)\n")
    task = load_task(str(declared))
    assert task.head_names(task.make_model()) == {"scale"}
    wrong = tmp_path / "wrong.py"
    wrong.write_text(task_file.read_text() + "head_parameters = ('head.weight',)\n")
    task = load_task(str(wrong))
    with pytest.raises(TaskError, match="unknown: \\['head.weight'\\]"):
        task.head_names(task.make_model())
    # The MLP's output layer is the Linear holding its last parameter.
    sinusoid = RunConfig.resolve(dataset="sinusoid")
    assert sinusoid.task_definition.head_names(make_model(sinusoid)) == {"net.4.weight", "net.4.bias"}


def test_a_fine_tuning_curve_starts_at_the_unadapted_model_and_the_guard_is_its_own():
    config, fmodel, params, episode = _watch_like()
    head = config.task_definition.head_names(fmodel.module)
    for mode in ("head", "prox"):
        curve, guarded = finetuned_and_guarded(fmodel, params, episode.support, episode.query, (0, 1, 3),
                                               adapter(mode, fmodel, params, 0.05, head=head, prox_lambda=1.0))
        assert curve[0] == fmodel.metric(params, episode.query)
        assert all(g in (c, curve[0]) for g, c in zip(guarded, curve, strict=True))
    with pytest.raises(ConfigError, match="eval_finetunes"):
        adapter("full", fmodel, params, 0.05)


def test_per_fedavg_batched_updates_are_each_device_s_own():
    config = RunConfig.resolve(dataset="sinusoid", algorithm="per-fedavg", inner_steps=3)
    fmodel = functional_model(config)
    params = fmodel.init_params()
    fleet = make_fleet(config)
    episodes = [training_episode(fleet.client(i), config, training_rng(config, 1, i)) for i in range(3)]
    single = [local_update("per-fedavg", fmodel, params, e, 3, config.inner_lr) for e in episodes]
    batched = batched_updates("per-fedavg", fmodel, params, episodes, 3, config.inner_lr)
    for one, many in zip(single, batched, strict=True):
        for name in one.pseudo_grad:
            torch.testing.assert_close(many.pseudo_grad[name], one.pseudo_grad[name], rtol=1e-4, atol=1e-6)
        assert many.metrics["loss-after"] == pytest.approx(one.metrics["loss-after"], rel=1e-4)


def _evaluations(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if row["phase"] == "evaluate"]


@pytest.mark.slow
def test_one_fedavg_run_is_evaluated_with_all_three_fine_tunings_through_the_federated_path(tmp_path):
    from metafleet.simulations.cli import simulate

    small = dict(dataset="sinusoid", clients=12, held_out_clients=3, clients_per_round=4, rounds=2, eval_every=2,
                 eval_steps=(0, 1, 5))
    config = RunConfig.resolve(**small, algorithm="fedavg", eval_finetunes="full,head,prox", prox_lambda=5.0,
                               head_adapt_lr=0.05)
    simulate(config, tmp_path / "fedavg", backend="inprocess")
    final = _evaluations(tmp_path / "fedavg")[-1]
    assert final["round"] == 2 and final["clients"] == 3
    for prefix in ("", "head-ft-", "prox-ft-"):
        for kind in ("", "guarded-"):
            assert len(final[f"clients-{prefix}{kind}step-5"]) == 3
        # 0 steps is the received model, whatever the fine-tuning.
        assert final[f"clients-{prefix}step-0"] == final["clients-step-0"]
    assert final["clients-head-ft-step-5"] != final["clients-step-5"]
    assert final["clients-prox-ft-step-5"] != final["clients-step-5"]

    # What each device reported is what its fine-tuning computes on its own evaluation episodes.
    fleet, fmodel = make_fleet(config), functional_model(config)
    params = torch.load(sorted((tmp_path / "fedavg" / "checkpoints").glob("*.pt"))[-1], weights_only=True)["params"]
    head = config.task_definition.head_names(fmodel.module)
    client = final["client-ids"][0]
    for mode, prefix in (("head", "head-ft-"), ("prox", "prox-ft-"), ("full", "")):
        plain, _ = client_finetuning(fmodel, params, fleet.client(client), config, mode, head)
        assert plain == pytest.approx([final[f"clients-{prefix}step-{s}"][0] for s in (0, 1, 5)], rel=1e-5)

    # A run that names no fine-tuning keeps the keys every earlier run wrote, and no others.
    plain_run = RunConfig.resolve(**small, algorithm="fedavg")
    simulate(plain_run, tmp_path / "plain", backend="inprocess")
    keys = set(_evaluations(tmp_path / "plain")[-1])
    assert "clients-step-5" in keys and not any("-ft-" in key for key in keys)
    assert _evaluations(tmp_path / "plain")[-1]["clients-step-5"] == final["clients-step-5"]


@pytest.mark.slow
def test_per_fedavg_trains_through_the_federated_path_on_every_backend(tmp_path):
    from metafleet.simulations.cli import simulate

    config = RunConfig.resolve(dataset="sinusoid", algorithm="per-fedavg", clients=12, held_out_clients=3,
                               clients_per_round=4, rounds=3, eval_every=3)
    summaries = {b: simulate(config, tmp_path / b, backend=b) for b in ("inprocess", "vectorized")}
    assert all(s["rounds_completed"] == 3 for s in summaries.values())
    finals = [_evaluations(tmp_path / b)[-1] for b in ("inprocess", "vectorized")]
    assert finals[1]["mean-step-5"] == pytest.approx(finals[0]["mean-step-5"], rel=1e-4)
    train = [json.loads(line) for line in (tmp_path / "inprocess" / "metrics.jsonl").read_text().splitlines()
             if '"train"' in line]
    assert all(row["accepted"] == 4 for row in train)


def test_the_client_refuses_a_fine_tuning_it_does_not_know():
    from flwr.app import ConfigRecord, MessageType, RecordDict

    from metafleet.client.app import evaluate
    from metafleet.common.records import to_array_record

    config = RunConfig.resolve(dataset="sinusoid", clients=12, held_out_clients=3, clients_per_round=4)
    params = functional_model(config).init_params()
    content = RecordDict({"arrays": to_array_record(params),
                          "config": ConfigRecord({"server-round": 1, "finetunes": "full,lora"})})
    held_out = split_clients(config)[1][0]
    with pytest.raises(MetafleetError, match="fine-tunings \\['lora'\\]"):
        evaluate(instruction(content, MessageType.EVALUATE), device_context(held_out, config.to_run_config()))


def test_the_server_keeps_each_fine_tuning_s_curves_and_drops_a_reply_that_lacks_one():
    from flwr.app import MetricRecord, RecordDict

    from metafleet.server.app import initial_params
    from metafleet.server.strategy import make_strategy
    from tests.flower_messages import reply_from

    config = RunConfig.resolve(dataset="sinusoid", algorithm="fedavg", eval_steps="0,5", eval_finetunes="full,head")
    strategy = make_strategy(config, initial_params(config))
    plain = {"num-examples": 1, "step-0": 2.0, "step-5": 1.0, "guarded-step-0": 2.0, "guarded-step-5": 1.0}
    head = {"head-ft-step-0": 2.0, "head-ft-step-5": 1.5, "head-ft-guarded-step-0": 2.0, "head-ft-guarded-step-5": 2.0}
    replies = [reply_from(1, RecordDict({"metrics": MetricRecord({**plain, **head, "client-id": 4})})),
               reply_from(2, RecordDict({"metrics": MetricRecord({**plain, "client-id": 6})}))]
    result = strategy.aggregate_evaluate(10, replies)
    assert result["client-ids"] == [4] and result["clients-head-ft-step-5"] == [1.5]
    assert result["mean-head-ft-guarded-step-5"] == 2.0 and result["mean-step-5"] == 1.0
    assert "head-ft-step-N" in strategy.rejections[0].reason
