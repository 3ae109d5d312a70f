import torch

from metafleet.common.optim import OuterAdam, OuterSGD, make_outer_optimizer
from metafleet.common.training import weighted_mean


def _gradients(seed: int, count: int):
    generator = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(3, 2, generator=generator), "b": torch.randn(2, generator=generator)}
            for _ in range(count)]


def test_sgd_with_unit_step_on_reptile_differences_averages_the_client_models():
    theta = {"w": torch.zeros(2)}
    client_models = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])]
    differences = [{"w": theta["w"] - m} for m in client_models]
    new = OuterSGD(lr=1.0).step(theta, weighted_mean(differences, [1, 1]))
    torch.testing.assert_close(new["w"], torch.tensor([2.0, 4.0]))


def test_weighted_mean_uses_example_counts():
    mean = weighted_mean([{"w": torch.tensor([0.0])}, {"w": torch.tensor([4.0])}], [3, 1])
    torch.testing.assert_close(mean["w"], torch.tensor([1.0]))


def test_adam_matches_torch_adam():
    start = _gradients(0, 1)[0]
    ours = OuterAdam(lr=0.01)
    params = {k: v.clone() for k, v in start.items()}
    reference = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    torch_adam = torch.optim.Adam(reference.values(), lr=0.01)
    for gradient in _gradients(1, 5):
        params = ours.step(params, gradient)
        for name, tensor in reference.items():
            tensor.grad = gradient[name].clone()
        torch_adam.step()
    for name in params:
        torch.testing.assert_close(params[name], reference[name].detach())


def test_state_round_trip_continues_exactly_where_it_stopped():
    for name in ("sgd", "adam"):
        gradients = _gradients(2, 6)
        uninterrupted = make_outer_optimizer(name, 0.05)
        params_a = _gradients(3, 1)[0]
        for g in gradients:
            params_a = uninterrupted.step(params_a, g)

        first = make_outer_optimizer(name, 0.05)
        params_b = _gradients(3, 1)[0]
        for g in gradients[:3]:
            params_b = first.step(params_b, g)
        resumed = make_outer_optimizer(name, 0.05)
        resumed.load_state_dict(first.state_dict())
        for g in gradients[3:]:
            params_b = resumed.step(params_b, g)
        for key in params_a:
            torch.testing.assert_close(params_a[key], params_b[key])


def test_sgd_momentum_accumulates():
    optimizer = OuterSGD(lr=1.0, momentum=0.5)
    params = {"w": torch.zeros(1)}
    params = optimizer.step(params, {"w": torch.ones(1)})
    params = optimizer.step(params, {"w": torch.ones(1)})
    torch.testing.assert_close(params["w"], torch.tensor([-2.5]))
