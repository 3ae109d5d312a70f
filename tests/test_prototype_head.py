"""Prototype heads (Proto-MAML): where adaptation starts for N-way episodes, checked against ProtoNets
written directly with torch.cdist, independently of the functional core."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metafleet.common.config import RunConfig
from metafleet.common.errors import ConfigError
from metafleet.common.meta import (
    CLASSIFICATION,
    REGRESSION,
    Episode,
    FunctionalModel,
    local_update,
    personalization_curve,
    prototype_head,
)

pytestmark = pytest.mark.usefixtures("double_precision")


class _Classifier(nn.Module):
    def __init__(self, ways: int = 3):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.head = nn.Linear(6, ways)

    def forward(self, x):
        return self.head(self.features(x))


def _setup(ways: int = 3, shots: int = 2, queries: int = 4):
    torch.manual_seed(0)
    fmodel = FunctionalModel(_Classifier(ways), CLASSIFICATION, head_init="prototypes")
    generator = torch.Generator().manual_seed(3)
    support_y = torch.arange(ways).repeat_interleave(shots)
    query_y = torch.arange(ways).repeat_interleave(queries)
    episode = Episode((torch.randn(len(support_y), 4, generator=generator), support_y),
                      (torch.randn(len(query_y), 4, generator=generator), query_y))
    return fmodel, episode


def _protonet_logits(module: _Classifier, episode: Episode, ways: int) -> torch.Tensor:
    (xs, ys), (xq, _) = episode.support, episode.query
    embedded_support, embedded_query = module.features(xs), module.features(xq)
    prototypes = torch.stack([embedded_support[ys == k].mean(0) for k in range(ways)])
    return -torch.cdist(embedded_query, prototypes) ** 2


def test_prototype_head_ranks_classes_by_distance_to_the_class_means():
    fmodel, episode = _setup()
    params = prototype_head(fmodel, fmodel.init_params(), episode.support)
    logits = fmodel.forward(params, episode.query[0])
    expected = _protonet_logits(fmodel.module, episode, 3)
    # 2c·f − |c|² = |f|² − |f − c|²: the same softmax as ProtoNets' −|f − c|² (a per-row constant apart).
    torch.testing.assert_close(logits - logits.mean(1, keepdim=True), expected - expected.mean(1, keepdim=True))


def test_a_class_missing_from_the_support_set_never_wins():
    fmodel, episode = _setup(ways=4)
    two_classes = episode.support[1] < 2
    support = (episode.support[0][two_classes], episode.support[1][two_classes])
    params = prototype_head(fmodel, fmodel.init_params(), support)
    predicted = fmodel.forward(params, episode.query[0]).argmax(1)
    assert set(predicted.tolist()) <= {0, 1}
    assert torch.isfinite(params["head.bias"]).all()


@pytest.mark.parametrize("algorithm", ["fomaml", "maml"])
def test_with_no_inner_steps_fomaml_and_maml_send_the_protonet_gradient(algorithm):
    fmodel, episode = _setup()
    theta = [p.detach().clone().requires_grad_(True) for p in fmodel.module.features.parameters()]
    module = _Classifier()
    with torch.no_grad():
        for target, value in zip(module.features.parameters(), theta, strict=True):
            target.copy_(value)
    loss = F.cross_entropy(_protonet_logits(module, episode, 3), episode.query[1])
    expected = torch.autograd.grad(loss, list(module.features.parameters()))
    update = local_update(algorithm, fmodel, fmodel.init_params(), episode, 0, 0.1).pseudo_grad
    for (name, _), grad in zip(module.features.named_parameters(), expected, strict=True):
        torch.testing.assert_close(update[f"features.{name}"], grad)
    # θ's own head is never used, so nothing moves it.
    assert not update["head.weight"].any() and not update["head.bias"].any()


def test_maml_differentiates_through_the_prototypes_and_the_inner_steps():
    fmodel, episode = _setup()
    params = fmodel.init_params()
    update = local_update("maml", fmodel, params, episode, 2, 0.3).pseudo_grad
    name, direction = "features.0.weight", torch.randn_like(params["features.0.weight"])

    def meta_loss(shift: float) -> float:
        moved = {**params, name: params[name] + shift * direction}
        adapted = fmodel.start(moved, episode.support)
        for _ in range(2):
            grads = torch.func.grad(fmodel.loss)(adapted, episode.support)
            adapted = {k: v - 0.3 * grads[k] for k, v in adapted.items()}
        return float(fmodel.loss(adapted, episode.query))

    numeric = (meta_loss(1e-6) - meta_loss(-1e-6)) / 2e-6
    assert float((update[name] * direction).sum()) == pytest.approx(numeric, rel=1e-5)


def test_reptile_moves_the_features_and_leaves_the_replaced_head_alone():
    fmodel, episode = _setup()
    update = local_update("reptile", fmodel, fmodel.init_params(), episode, 3, 0.5).pseudo_grad
    assert update["features.0.weight"].abs().sum() > 0
    assert not update["head.weight"].any() and not update["head.bias"].any()


def test_zero_steps_of_personalization_is_the_prototype_classifier():
    fmodel, episode = _setup()
    curve = personalization_curve(fmodel, fmodel.init_params(), episode.support, episode.query, [0, 3], 0.5)
    expected = _protonet_logits(fmodel.module, episode, 3).argmax(1)
    assert curve[0] == pytest.approx(float((expected == episode.query[1]).double().mean()))


def test_prototype_heads_need_a_head_on_features():
    with pytest.raises(ConfigError, match="head_init"):
        FunctionalModel(nn.Sequential(nn.Linear(4, 3)), CLASSIFICATION, head_init="prototypes")
    with pytest.raises(ConfigError, match="head_init"):
        FunctionalModel(_Classifier(), REGRESSION, head_init="prototypes")
    with pytest.raises(ConfigError, match="head_init"):
        RunConfig.resolve(dataset="shakespeare", head_init="prototypes")
    with pytest.raises(ConfigError, match="head_init"):
        RunConfig.resolve(dataset="omniglot", head_init="nearest")
    assert RunConfig.resolve(dataset="watch", head_init="prototypes").head_init == "prototypes"


def test_omniglot_meta_methods_default_to_prototype_heads_with_their_inner_lr():
    meta = RunConfig.resolve(dataset="omniglot", algorithm="fomaml")
    assert (meta.head_init, meta.inner_lr, meta.outer_optimizer, meta.outer_lr) == ("prototypes", 0.001, "adam", 0.001)
    assert RunConfig.resolve(dataset="omniglot", algorithm="fomaml", outer_optimizer="sgd").outer_lr == 1.0
    # FedAvg trains a head whose labels mean nothing across episodes; it keeps the learned head and its lr.
    fedavg = RunConfig.resolve(dataset="omniglot", algorithm="fedavg")
    assert (fedavg.head_init, fedavg.inner_lr) == ("learned", 0.1)
    learned = RunConfig.resolve(dataset="omniglot", algorithm="reptile", head_init="learned")
    assert (learned.inner_lr, learned.outer_lr) == (0.1, 0.01)
    assert RunConfig.resolve(dataset="omniglot", algorithm="reptile", inner_lr=0.01).inner_lr == 0.01
    assert RunConfig.resolve(dataset="watch", algorithm="reptile").head_init == "learned"
    # A run directory from before head_init existed resumes as it was trained: learned head.
    old = {k: v for k, v in RunConfig.resolve(dataset="omniglot", algorithm="reptile", head_init="learned",
                                               inner_lr=0.1).to_dict().items() if k != "head_init"}
    assert RunConfig.from_dict(old).head_init == "learned"
    five_way = RunConfig.resolve(dataset="omniglot", algorithm="fomaml", train_ways=0)
    session5 = {k: v for k, v in five_way.to_dict().items() if k != "train_ways"}
    assert RunConfig.from_dict(session5).training_ways == 5


def test_prototype_heads_train_on_more_ways_than_they_are_tested_on():
    meta = RunConfig.resolve(dataset="omniglot", algorithm="reptile")
    assert (meta.ways, meta.train_ways, meta.training_ways, meta.head_ways) == (5, 20, 20, 20)
    assert RunConfig.resolve(dataset="omniglot", algorithm="fedavg").training_ways == 5
    assert RunConfig.resolve(dataset="omniglot", algorithm="reptile", ways=20).head_ways == 20
    assert RunConfig.resolve(dataset="omniglot", algorithm="reptile", ways=30).train_ways == 0
    with pytest.raises(ConfigError, match="train_ways.*'prototypes'"):
        RunConfig.resolve(dataset="omniglot", algorithm="reptile", head_init="learned", train_ways=20)
    with pytest.raises(ConfigError, match="train_ways.*>= ways"):
        RunConfig.resolve(dataset="omniglot", algorithm="reptile", train_ways=3)
