"""The functional core against explicitly unrolled autograd, written independently of torch.func."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metafleet.common.meta import (
    CLASSIFICATION,
    REGRESSION,
    Episode,
    FunctionalModel,
    adapt,
    check_update,
    cross_validation_folds,
    guard_decisions,
    guarded_curve,
    keeps_adaptation,
    local_update,
    personalization_curve,
)

pytestmark = pytest.mark.usefixtures("double_precision")


def _small_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))


def _explicit_forward(weights: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    w1, b1, w2, b2 = weights
    return torch.tanh(x @ w1.T + b1) @ w2.T + b2


def _episode() -> Episode:
    generator = torch.Generator().manual_seed(1)
    xs, xq = torch.randn(6, 2, generator=generator), torch.randn(9, 2, generator=generator)
    target = lambda x: torch.sin(x.sum(dim=1, keepdim=True))  # noqa: E731
    return Episode((xs, target(xs)), (xq, target(xq)))


def _unrolled(model: nn.Module, episode: Episode, steps: int, lr: float, create_graph: bool):
    """θ (leaf tensors), θ' after ``steps`` SGD steps, built with torch.autograd only."""
    theta = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    adapted = theta
    for _ in range(steps):
        loss = F.mse_loss(_explicit_forward(adapted, episode.support[0]), episode.support[1])
        grads = torch.autograd.grad(loss, adapted, create_graph=create_graph)
        adapted = [p - lr * g for p, g in zip(adapted, grads, strict=True)]
    return theta, adapted


@pytest.mark.parametrize("steps", [1, 3])
def test_maml_meta_gradient_equals_unrolled_second_order_autograd(steps):
    model, episode, lr = _small_mlp(), _episode(), 0.3
    fmodel = FunctionalModel(model, REGRESSION)
    update = local_update("maml", fmodel, fmodel.init_params(), episode, steps, lr)

    theta, adapted = _unrolled(model, episode, steps, lr, create_graph=True)
    query_loss = F.mse_loss(_explicit_forward(adapted, episode.query[0]), episode.query[1])
    expected = torch.autograd.grad(query_loss, theta)

    for (name, _), want in zip(model.named_parameters(), expected, strict=True):
        torch.testing.assert_close(update.pseudo_grad[name], want, atol=1e-5, rtol=1e-5)
    # The second-order terms matter here: the first-order answer must differ, or the test proves nothing.
    first_order = local_update("fomaml", fmodel, fmodel.init_params(), episode, steps, lr)
    assert any(
        not torch.allclose(first_order.pseudo_grad[name], update.pseudo_grad[name], atol=1e-4)
        for name in update.pseudo_grad
    )


def test_fomaml_is_query_gradient_at_adapted_parameters():
    model, episode, lr, steps = _small_mlp(), _episode(), 0.3, 3
    fmodel = FunctionalModel(model, REGRESSION)
    update = local_update("fomaml", fmodel, fmodel.init_params(), episode, steps, lr)

    _, adapted = _unrolled(model, episode, steps, lr, create_graph=False)
    adapted = [p.detach().requires_grad_(True) for p in adapted]
    query_loss = F.mse_loss(_explicit_forward(adapted, episode.query[0]), episode.query[1])
    expected = torch.autograd.grad(query_loss, adapted)
    for (name, _), want in zip(model.named_parameters(), expected, strict=True):
        torch.testing.assert_close(update.pseudo_grad[name], want, atol=1e-10, rtol=1e-8)


def test_reptile_one_step_moves_by_minus_inner_lr_times_support_gradient():
    model, episode, lr = _small_mlp(), _episode(), 0.3
    fmodel = FunctionalModel(model, REGRESSION)
    update = local_update("reptile", fmodel, fmodel.init_params(), episode, 1, lr)

    theta = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    support_loss = F.mse_loss(_explicit_forward(theta, episode.support[0]), episode.support[1])
    support_grad = torch.autograd.grad(support_loss, theta)
    for (name, _), g in zip(model.named_parameters(), support_grad, strict=True):
        movement = -update.pseudo_grad[name]  # the update is θ − θ'; the movement θ' − θ
        torch.testing.assert_close(movement, -lr * g, atol=1e-12, rtol=1e-10)


def test_fedavg_trains_on_support_and_query_together():
    model, episode, lr = _small_mlp(), _episode(), 0.3
    fmodel = FunctionalModel(model, REGRESSION)
    params = fmodel.init_params()
    update = local_update("fedavg", fmodel, params, episode, 2, lr)
    trained = adapt(fmodel, params, episode.union(), 2, lr)
    for name in params:
        torch.testing.assert_close(update.pseudo_grad[name], params[name] - trained[name])
    assert update.num_examples == 15
    assert update.metrics["loss-after"] < update.metrics["loss-before"]


class _ScaledInput(nn.Module):
    """A model whose forward depends on a buffer, which the functional core must pass through."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.tensor([2.0, -1.0]))
        self.linear = nn.Linear(2, 3)

    def forward(self, x):
        return self.linear(x * self.scale)


def test_buffers_are_used_and_left_untouched():
    torch.manual_seed(0)
    module = _ScaledInput()
    fmodel = FunctionalModel(module, CLASSIFICATION)
    x = torch.randn(5, 2)
    torch.testing.assert_close(fmodel.forward(fmodel.init_params(), x), module(x))
    episode = Episode((x, torch.tensor([0, 1, 2, 0, 1])), (x, torch.tensor([0, 1, 2, 0, 1])))
    local_update("maml", fmodel, fmodel.init_params(), episode, 2, 0.1)
    torch.testing.assert_close(module.scale, torch.tensor([2.0, -1.0]))


def test_adaptation_leaves_the_module_and_the_given_parameters_unchanged():
    model, episode = _small_mlp(), _episode()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    fmodel = FunctionalModel(model, REGRESSION)
    params = fmodel.init_params()
    for algorithm in ("fedavg", "reptile", "fomaml", "maml"):
        local_update(algorithm, fmodel, params, episode, 3, 0.1)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[name])
        torch.testing.assert_close(params[name], before[name])


def test_personalization_curve_starts_unadapted_and_improves_on_support_task():
    model, episode = _small_mlp(), _episode()
    fmodel = FunctionalModel(model, REGRESSION)
    params = fmodel.init_params()
    curve = personalization_curve(fmodel, params, episode.support, episode.support, [0, 1, 5], 0.1)
    assert curve[0] == pytest.approx(fmodel.metric(params, episode.support))
    assert curve[2] < curve[0]
    with pytest.raises(ValueError, match="eval_steps"):
        personalization_curve(fmodel, params, episode.support, episode.query, [1, 5], 0.1)


def test_check_update_names_each_problem():
    reference = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
    check_update({"w": torch.ones(2, 3), "b": torch.ones(3)}, reference)
    cases = [
        ({"w": torch.ones(2, 3)}, "missing \\['b'\\]"),
        ({"w": torch.ones(2, 3), "b": torch.ones(3), "x": torch.ones(1)}, "unexpected \\['x'\\]"),
        ({"w": torch.ones(3, 2), "b": torch.ones(3)}, "'w' has shape \\(3, 2\\)"),
        ({"w": torch.ones(2, 3), "b": torch.tensor([1.0, float("nan"), 0.0])}, "'b' holds NaN"),
        ({"w": torch.ones(2, 3, dtype=torch.float16), "b": torch.ones(3)}, "'w' has dtype"),
    ]
    for update, message in cases:
        with pytest.raises(ValueError, match=message):
            check_update(update, reference)


def test_cross_validation_folds_keep_every_class_in_training_and_refuse_one_shot():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    folds = cross_validation_folds((torch.zeros(10, 2), labels), CLASSIFICATION, max_folds=5)
    assert sorted(torch.cat(folds).tolist()) == list(range(10))
    for held in folds:
        rest = set(range(10)) - set(held.tolist())
        assert {int(labels[i]) for i in rest} == {0, 1, 2}
    assert cross_validation_folds((torch.zeros(3, 2), torch.tensor([0, 1, 2])), CLASSIFICATION) == []
    regression = cross_validation_folds((torch.zeros(7, 1), torch.zeros(7, 1)), REGRESSION, max_folds=3)
    assert [len(f) for f in regression] == [3, 2, 2]


def test_guard_keeps_helpful_adaptation_and_refuses_a_diverging_one():
    torch.manual_seed(0)
    fmodel = FunctionalModel(nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 1)), REGRESSION)
    params = fmodel.init_params()
    x = torch.linspace(-5, 5, 20).unsqueeze(1)
    support = (x, 3.0 * torch.sin(x) + 2.0)  # far from the initialization: a few steps help a lot
    assert keeps_adaptation(fmodel, params, support, steps=5, inner_lr=0.01)
    assert not keeps_adaptation(fmodel, params, support, steps=5, inner_lr=50.0)
    assert keeps_adaptation(fmodel, params, support, steps=0, inner_lr=50.0)
    for lr in (0.01, 0.5, 50.0):  # the incremental decisions equal one independent decision per step count
        independent = [keeps_adaptation(fmodel, params, support, steps=k, inner_lr=lr) for k in (0, 1, 5)]
        assert guard_decisions(fmodel, params, support, [0, 1, 5], inner_lr=lr) == independent
    curve = [9.0, 1.0, 0.5]
    assert guarded_curve(fmodel, params, support, curve, [0, 1, 5], inner_lr=50.0) == [9.0, 9.0, 9.0]


def test_first_order_adaptation_equals_the_torch_func_path_for_an_lstm():
    torch.manual_seed(0)

    class TinyCharModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(10, 4)
            self.lstm = nn.LSTM(4, 8, batch_first=True)
            self.head = nn.Linear(8, 10)

        def forward(self, x):
            return self.head(self.lstm(self.embedding(x))[0][:, -1])

    fmodel = FunctionalModel(TinyCharModel(), CLASSIFICATION)
    params = fmodel.init_params()
    support = (torch.randint(0, 10, (6, 12)), torch.randint(0, 10, (6,)))
    eager = adapt(fmodel, params, support, steps=3, inner_lr=0.5)
    transformed = adapt(fmodel, params, support, steps=3, inner_lr=0.5, differentiable=True)
    for name in params:
        torch.testing.assert_close(eager[name], transformed[name].detach())
        assert not eager[name].requires_grad


def test_check_update_returns_the_norm_and_finds_inf_in_any_tensor():
    reference = {"w": torch.zeros(2), "b": torch.zeros(1)}
    assert check_update({"w": torch.tensor([3.0, 4.0]), "b": torch.tensor([12.0])}, reference) == pytest.approx(13.0)
    with pytest.raises(ValueError, match="'w' holds NaN or Inf"):
        check_update({"w": torch.tensor([float("inf"), 0.0]), "b": torch.tensor([1.0])}, reference)
    # Finite values whose squares overflow are not called NaN: the norm (inf) is left to the norm bounds.
    huge = {"w": torch.tensor([1e200, 0.0], dtype=torch.float64), "b": torch.zeros(1, dtype=torch.float64)}
    assert check_update(huge, {k: v.clone() for k, v in huge.items()}) == float("inf")
