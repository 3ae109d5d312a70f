"""The learning options shared by ``metafleet simulate`` and ``metafleet server``: one flag per RunConfig field."""

from __future__ import annotations

import argparse
from dataclasses import fields

from metafleet.common.config import RunConfig
from metafleet.common.meta import ALGORITHMS
from metafleet.common.selective import SELECTIVE_DEFAULT
from metafleet.common.tasks import BUILTIN_TASKS


def add_learning_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", choices=list(BUILTIN_TASKS),
                        help="a built-in task with its own data (default sinusoid); the same as --task NAME")
    parser.add_argument("--task", metavar="TASK",
                        help="the task: a built-in's name, FILE.py, package.module or package.module:attr "
                        "(make_model() and objective; see metafleet.common.task)")
    parser.add_argument("--data", metavar="FLEET_DIR",
                        help="a folder fleet: FLEET_DIR/<device>/data.npz (or data.csv), one folder a device; "
                        "the fleet's size is its device count")
    parser.add_argument("--held-out-devices", metavar="NAME,...",
                        help="devices of a folder fleet held out by name (default: --fold picks them)")
    parser.add_argument("--algorithm", choices=sorted(ALGORITHMS), default="reptile",
                        help="fedavg, reptile, fomaml, maml (second order), or meta-sgd (maml that also "
                        "meta-learns one inner learning rate per parameter, starting at --inner-lr; held-out "
                        "devices adapt with the learned rates). Default reptile")
    parser.add_argument("--clients", type=int, help="fleet size, held-out clients included")
    parser.add_argument("--held-out-clients", type=int, help="clients never trained on (default: a tenth, min 1)")
    parser.add_argument("--clients-per-round", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--inner-steps", type=int, help="local adaptation steps k")
    parser.add_argument("--inner-lr", type=float, help="inner (adaptation) learning rate; meta-sgd's rates start at it")
    parser.add_argument("--adapt-lr", type=float,
                        help="step size of held-out devices' personalization (default: --inner-lr; for fedavg's "
                        "fine-tuning, which the meta methods' inner lr does not bind; not for meta-sgd, which "
                        "adapts with its learned rates)")
    parser.add_argument("--eval-finetunes", metavar="MODE,...",
                        help="how held-out devices fine-tune, comma-separated: full (every parameter, default), "
                        "head (the head alone, the body kept), prox (every parameter, pulled towards the received "
                        "model by --prox-lambda); one run evaluates each")
    parser.add_argument("--head-adapt-lr", type=float, help="head-only fine-tuning's step size (default: --adapt-lr)")
    parser.add_argument("--prox-lambda", type=float,
                        help="proximal fine-tuning's pull λ: the loss plus (λ/2)·‖w − θ‖² (default: the task's)")
    parser.add_argument("--outer-optimizer", choices=["sgd", "adam"])
    parser.add_argument("--outer-lr", type=float, help="meta learning rate")
    parser.add_argument("--shots", type=int, help="support examples per class (points, for regression)")
    parser.add_argument("--query-shots", type=int)
    parser.add_argument("--train-shots", type=int,
                        help="support examples per class in training episodes (default: --shots, used in evaluation)")
    parser.add_argument("--head-init", choices=["learned", "prototypes"],
                        help="where adaptation starts: the learned head, or one set from the support set's class "
                        "prototypes (Proto-MAML; wants a small --inner-lr such as 0.001). Default: prototypes for "
                        "omniglot's meta methods (with inner and outer lr 0.001), learned otherwise")
    parser.add_argument("--ways", type=int, help="classes per episode (0: all of the client's classes)")
    parser.add_argument("--train-ways", type=int,
                        help="classes per training episode (default: --ways; 20 for omniglot's prototype heads)")
    parser.add_argument("--fold", type=int, help="which block of clients is held out (folds cover every client)")
    parser.add_argument("--eval-every", type=int, help="personalization evaluation every E rounds")
    parser.add_argument("--eval-steps", help="comma-separated adaptation steps to report, from 0")
    parser.add_argument("--eval-episodes", type=int, help="evaluation episodes per support/query split of a device")
    parser.add_argument("--secure-aggregation", action="store_true", default=None,
                        help="aggregate updates with Flower's SecAgg+: the server sees only their mean")
    parser.add_argument("--secagg-clipping-range", type=float,
                        help="SecAgg+ value range: update values beyond ± this are clamped "
                        "(default: 8 for fedavg/reptile deltas, 64 for fomaml/maml/meta-sgd gradients)")
    parser.add_argument("--secagg-shares", type=int, help="key shares per client (default: all sampled, at most 11)")
    parser.add_argument("--secagg-threshold", type=int, help="shares needed to unmask (default: a majority)")
    parser.add_argument("--dp-noise-multiplier", type=float,
                        help="client-level differential privacy: Gaussian noise σ (0: off)")
    parser.add_argument("--dp-clip-norm", type=float, help="differential privacy: L2 bound C of every update")
    parser.add_argument("--dp-delta", type=float, help="differential privacy: the δ epsilon is reported at")
    parser.add_argument("--dp-mode", choices=["central", "distributed"],
                        help="who adds the noise: central (the server, to the mean it learnt: protects against "
                        "whoever sees the model) or distributed (each device a share before SecAgg+ masks: protects "
                        "against the server too; needs --secure-aggregation). Default central")
    parser.add_argument("--defense", metavar="NAME",
                        help="aggregation against poisoned devices: none (default), median, trimmed-mean[:B], "
                        "krum[:F], multi-krum[:F], rsa[:cluster|consensus|consensus-cluster] (Cedar's "
                        "representational-similarity weighting; "
                        "plain path only), or norm-bound[:C] (devices clip to C; the only one with "
                        "--secure-aggregation, where C is required)")
    parser.add_argument("--rsa-stimuli", metavar="FILE.npz",
                        help="--defense rsa's public stimulus set: an array x of a few inputs per class from data no "
                        "device holds (default: the task's own stimuli(), where it has one)")
    parser.add_argument("--compress", metavar="KIND",
                        help="what devices send up: none (default), q8 (unbiased 8-bit) or topk:F (the largest "
                        "fraction F of each tensor, the rest kept on the device for the next round); plain path only")
    parser.add_argument("--selective-layers", type=float, nargs="?", const=SELECTIVE_DEFAULT, metavar="SHARE",
                        help="Cedar's layer-wise upload: each device sends only its layers that changed most since it "
                        f"last sent them, SHARE of the model's parameters a round (default {SELECTIVE_DEFAULT}); the "
                        "rest waits on the device. Combines with --compress q8; plain path only")
    parser.add_argument("--seed", type=int)


def add_attack_arguments(parser: argparse.ArgumentParser) -> None:
    """Simulation only: a real device has no switch that makes it attack."""
    parser.add_argument("--attack", metavar="KIND",
                        help="poisoned training devices: label-flip, sign-flip[:S] (default S 10), scale, noise or "
                        "backdoor (metafleet.simulations.attacks)")
    parser.add_argument("--attackers", type=float, metavar="FRACTION",
                        help="the share of the training devices that attack from the first round")


def config_from_arguments(args: argparse.Namespace) -> RunConfig:
    """Every RunConfig field with a flag of the same name; flags left out fall back to the defaults."""
    return RunConfig.resolve(**{f.name: getattr(args, f.name) for f in fields(RunConfig) if hasattr(args, f.name)})
