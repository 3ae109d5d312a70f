"""The typed, validated run configuration shared by the CLI, the ServerApp and the ClientApp.

One ``RunConfig`` describes a run completely; ``config.json`` in a run directory is its ``to_dict()``.
Flower's ``run_config`` carries it as flat dash-separated keys (``to_run_config`` / ``from_run_config``),
since Flower's config records hold only scalars.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from metafleet.common.compression import Compression
from metafleet.common.errors import ConfigError
from metafleet.common.meta import ALGORITHMS, HEAD_INITS
from metafleet.common.optim import OUTER_OPTIMIZERS
from metafleet.common.robust import Attack, Defense
from metafleet.common.task import Task, load_task
from metafleet.common.tasks import BUILTIN_TASKS

# Run-config keys for the server process only (where to write, whether to resume, whether devices get the
# final model), with their defaults; devices ignore them.
SERVER_OPTION_DEFAULTS = {"out-dir": "", "resume": False, "node-wait-seconds": 120.0, "round-timeout": 600.0,
                          "deliver-models": False, "reply-poll-seconds": 0.0}

# FedAvg keeps its classical server (SGD with step 1 on θ − θ', i.e. model averaging). The meta methods
# use Adam on the server: their pseudo-gradients (Reptile's θ − θ' after a few small steps, or query
# gradients) are small and uneven across layers, and Adam makes a fixed round budget count. For a
# like-for-like baseline give fedavg the same server: --outer-optimizer adam.
# Per-FedAvg's server averages the devices' local models, as FedAvg's does (Fallah et al. 2020, Algorithm 1).
# Meta-SGD's learned rates are stored as log α (metafleet.common.meta.with_learned_rates): Adam's steps of about
# its lr a round then change each rate by about that fraction.
ALGORITHM_OUTER_OPTIMIZER = {"fedavg": "sgd", "reptile": "adam", "fomaml": "adam", "maml": "adam",
                             "meta-sgd": "adam", "per-fedavg": "sgd"}
OUTER_LR_DEFAULTS = {"sgd": 1.0, "adam": 0.01}
# SecAgg+'s value range by what clients send. At the initial θ, on four clients of sinusoid, watch, omniglot
# and fashion-mnist, model deltas (fedavg, reptile) stayed below 0.2, so Flower's default 8 never clamps
# them; query gradients (fomaml, maml) reached 4.8 and exceed 8 on some sinusoid tasks, so they get 64
# (quantization step 3e-5, still far below their size). Meta-SGD sends maml's θ gradient and, beside it, the
# gradient for log α; at the initial θ on four clients the latter peaked at 0.57 on sinusoid (θ's: 3.1), 0.0024
# on watch (0.14) and 0.16 on fashion-mnist (5.1), so maml's range serves both.
# Per-FedAvg sends a model delta too (β times a few query gradients), so it gets the deltas' range.
SECAGG_RANGE_DEFAULTS = {"fedavg": 8.0, "reptile": 8.0, "fomaml": 64.0, "maml": 64.0, "meta-sgd": 64.0,
                         "per-fedavg": 8.0}
# SecAgg+'s quantization: values in ±range become integers in [0, 2^22], a step of 2·range/2^22.
SECAGG_QUANTIZATION_RANGE = 2**22
DP_MODES = ("central", "distributed")
# How a held-out device adapts the model it receives (metafleet.common.finetune): every step on every
# parameter, the head alone, or every parameter pulled towards the received model.
FINETUNES = ("full", "head", "prox")
# Algorithms whose adaptation starts from a learned head: FedAvg's model is not meta-trained, and
# Per-FedAvg's update has no prototype variant.
LEARNED_HEAD_ALGORITHMS = ("fedavg", "per-fedavg")


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run. Build it with ``RunConfig.resolve(...)``, which validates it."""

    # The task's name (a built-in's, or a user task's ``name``): what reports and run directories call it.
    dataset: str = "sinusoid"
    # What loads the task (``metafleet.common.task.load_task``): a built-in's name, a file's absolute path, or
    # package.module[:attr]; "" before resolving means the built-in named by ``dataset``.
    task: str = ""
    # A folder fleet (FLEET/<device>/data.npz or data.csv, absolute); "" for a task's own data (built-ins).
    data: str = ""
    # Devices of a folder fleet held out by name, comma-separated ("" : the fold decides).
    held_out_devices: str = ""
    algorithm: str = "reptile"
    clients: int = 0
    held_out_clients: int = 0
    clients_per_round: int = 10
    rounds: int = 50
    inner_steps: int = 5
    inner_lr: float = 0.0
    outer_optimizer: str = ""
    outer_lr: float = 0.0
    shots: int = 0
    query_shots: int = 0
    # Support examples per class in meta-training episodes (0: ``shots``). Evaluation always adapts on
    # ``shots``: Reptile's authors train 1-shot Omniglot models on 10-shot episodes (``--train-shots``).
    train_shots: int = 0
    # Where adaptation starts: "learned" (θ as it is) or "prototypes" (θ with its linear head set from the
    # support set's class means, Proto-MAML's head; for N-way episodes, whose labels mean nothing across
    # episodes, so a learned head can only start at chance). Omniglot's meta methods default to it, with the
    # far smaller inner lr it wants (0.001, by the training clients' query loss; 0.1 breaks it) and an Adam
    # server lr of 0.001 (chosen on fold 2, which the benchmark does not report).
    head_init: str = ""
    # Classes per training episode (0: ``ways``). ProtoNets train on more ways than they are tested on
    # (Snell et al. 2017); the model's head gets max(ways, train_ways) outputs, and a prototype head leaves
    # the rows of classes an episode lacks out of the prediction.
    train_ways: int = 0
    # Step size of the held-out devices' adaptation (0: inner_lr). A meta method's initialization is
    # meta-trained for steps of inner_lr, so it keeps 0; FedAvg's model was never trained to be fine-tuned,
    # and its fine-tuning lr is a choice of its own (the benchmark's is chosen on validation clients).
    adapt_lr: float = 0.0
    # The fine-tunings held-out devices evaluate, comma-separated (FINETUNES): "full" adapts every parameter
    # with adapt_lr; "head" only the head's (task.head_names) with head_adapt_lr (0: adapt_lr); "prox" every
    # parameter with adapt_lr on the loss plus (prox_lambda/2)·‖w − θ‖², θ the received model. One training
    # run evaluates all it names, so the benchmark trains FedAvg once for its three fine-tuned baselines.
    eval_finetunes: str = "full"
    head_adapt_lr: float = 0.0
    prox_lambda: float = 0.0
    eval_every: int = 10
    eval_steps: tuple[int, ...] = field(default_factory=tuple)
    min_replies: int = 1
    max_update_norm: float = 1e4
    secure_aggregation: bool = False
    # SecAgg+ (Flower's SecAggPlusWorkflow): every value of an update must lie in ±secagg_clipping_range
    # (the client clamps and says so); values are quantized in steps of 2·range/2^22. 0 picks it by what
    # the algorithm sends (SECAGG_RANGE_DEFAULTS). Shares: how many
    # neighbours hold a share of each client's mask keys (0: every sampled client, at most 11); threshold:
    # how many of them must survive to unmask (0: a majority of the shares).
    secagg_clipping_range: float = 0.0
    secagg_shares: int = 0
    secagg_threshold: int = 0
    # Differential privacy (client-level, DP-FedAvg of McMahan et al., ICLR 2018): with a noise multiplier
    # > 0 every client clips its update to dp_clip_norm, the mean is unweighted, and the server adds
    # Gaussian noise of std noise_multiplier·clip_norm/clients to it; epsilon at dp_delta is reported.
    dp_noise_multiplier: float = 0.0
    dp_clip_norm: float = 1.0
    dp_delta: float = 1e-5
    # Who adds the noise: "central", the server, to the mean it has learnt (protects against whoever sees the
    # model, not against the server); "distributed", every device a share of it before SecAgg+ masks, on
    # SecAgg+'s lattice (the distributed discrete Gaussian), so the server only ever sees a noised sum. Each
    # device adds std σ·Δ/sqrt(min_replies), so any min_replies devices' shares make up the whole noise.
    dp_mode: str = "central"
    seed: int = 0
    # Classes per episode; 0 means every class the client has (and regression ignores it).
    ways: int = 0
    # Evaluation episodes per split of a held-out client: more than one where an episode sees only a few
    # of the client's classes (Omniglot's 5 of 17-47 characters), so one draw would be noise.
    eval_episodes: int = 0
    # Which block of the seeded client permutation is held out: folds 0..clients//held_out_clients-1
    # together hold out every client once (leave-clients-out cross-validation).
    fold: int = 0
    # Poisoned devices, in simulation only (metafleet.simulations.attacks; a device has no such setting):
    # the attack, and the share of the training devices that run it from the first round.
    attack: str = "none"
    attackers: float = 0.0
    # The server's aggregation rule against them (metafleet.server.defenses); norm-bound:C also makes every
    # honest device clip its update to C before sending.
    defense: str = "none"
    # rsa's public stimulus set: an .npz file holding ``x``, a few inputs per class from data no device holds
    # (empty: the task's own ``stimuli()``).
    rsa_stimuli: str = ""
    # What a device sends up instead of its float32 update (metafleet.common.compression).
    compress: str = "none"
    # Cedar's layer-wise selective upload (metafleet.common.selective): the share of the model's parameters a
    # device sends a round, its layers that changed most since it last sent them; 0 sends every layer.
    selective_layers: float = 0.0

    @classmethod
    def resolve(cls, **values: Any) -> RunConfig:
        """Fill dataset and algorithm defaults for every value left out (or None), then validate."""
        given = {key: value for key, value in values.items() if value is not None}
        unknown = sorted(set(given) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(unknown[0], given[unknown[0]], "is not a known config field")
        if not given.get("task") and given.get("dataset", cls.dataset) not in BUILTIN_TASKS:
            raise ConfigError("dataset", given["dataset"], f"must be one of {list(BUILTIN_TASKS)} (the built-in tasks; "
                              "a task of your own is task FILE.py or package.module)")
        task = load_task(given.get("task") or given.get("dataset") or cls.dataset)
        if given.get("task") and given.get("dataset") not in (None, task.name):
            raise ConfigError("dataset", given["dataset"], f"names another task than task {given['task']!r} "
                              f"({task.name!r}); give one of the two")
        given["task"], given["dataset"] = task.spec, task.name
        if given.get("data"):
            _resolve_fleet(given)
        algorithm = given.get("algorithm", cls.algorithm)
        if algorithm not in ALGORITHMS:
            raise ConfigError("algorithm", algorithm, f"must be one of {sorted(ALGORITHMS)}")
        defaults = task.defaults
        filled: dict[str, Any] = {
            "clients": defaults.clients,
            "shots": defaults.shots,
            "query_shots": defaults.query_shots,
            "inner_lr": defaults.inner_lr,
            "inner_steps": defaults.inner_steps,
            "eval_steps": defaults.eval_steps,
            "ways": defaults.ways,
            "eval_episodes": defaults.eval_episodes,
            "train_shots": defaults.train_shots,
            "head_init": defaults.meta_head_init if algorithm not in LEARNED_HEAD_ALGORITHMS else "learned",
            "prox_lambda": defaults.finetune_prox_lambda,
            "outer_optimizer": ALGORITHM_OUTER_OPTIMIZER[algorithm],
        }
        filled.update(given)
        if not filled["clients"]:
            raise ConfigError("clients", 0, f"must be given: task {task.name} has no fleet of its own (give a folder "
                              "fleet with --data FLEET_DIR, or the number of devices with --clients N)")
        if filled["head_init"] == "prototypes":
            if "inner_lr" not in given and defaults.prototype_inner_lr:
                filled["inner_lr"] = defaults.prototype_inner_lr
            if "train_ways" not in given and filled["ways"] <= defaults.prototype_train_ways:
                filled["train_ways"] = defaults.prototype_train_ways
        if algorithm == "per-fedavg" and "inner_lr" not in given and defaults.per_fedavg_inner_lr:
            filled["inner_lr"] = defaults.per_fedavg_inner_lr
        if algorithm == "fedavg" and "adapt_lr" not in given and defaults.finetune_lr:
            filled["adapt_lr"] = defaults.finetune_lr
        if algorithm == "fedavg" and "head_adapt_lr" not in given and defaults.head_finetune_lr:
            filled["head_adapt_lr"] = defaults.head_finetune_lr
        if "held_out_clients" not in given:
            # A task's default holds for its own fleet size, or for any where it names none (a folder fleet's).
            filled["held_out_clients"] = (
                defaults.held_out_clients
                if defaults.held_out_clients and defaults.clients in (0, filled["clients"])
                else max(1, filled["clients"] // 10)
            )
        if "clients_per_round" not in given:
            training = filled["clients"] - filled["held_out_clients"]
            filled["clients_per_round"] = max(1, min(defaults.clients_per_round or 10, training))
        if "min_replies" not in given and filled.get("secure_aggregation"):
            filled["min_replies"] = 2
        if "outer_lr" not in given:
            filled["outer_lr"] = OUTER_LR_DEFAULTS.get(filled["outer_optimizer"], 0.0)
            if filled["outer_optimizer"] == "adam" and defaults.outer_lr:
                filled["outer_lr"] = defaults.outer_lr
            prototype_adam = filled["head_init"] == "prototypes" and filled["outer_optimizer"] == "adam"
            if prototype_adam and defaults.prototype_outer_lr:
                filled["outer_lr"] = defaults.prototype_outer_lr
        if isinstance(filled["eval_steps"], str):
            filled["eval_steps"] = _parse_int_list("eval_steps", filled["eval_steps"])
        filled["eval_steps"] = tuple(filled["eval_steps"])
        config = cls(**filled)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the first field whose value is invalid."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected = {"int": int, "float": (int, float), "str": str, "bool": bool}.get(str(f.type))
            if expected is not None and (
                not isinstance(value, expected) or (expected is not bool and isinstance(value, bool))
            ):
                raise ConfigError(f.name, value, f"must be of type {f.type}")
        task = self.task_definition
        if self.algorithm not in ALGORITHMS:
            raise ConfigError("algorithm", self.algorithm, f"must be one of {sorted(ALGORITHMS)}")
        if self.outer_optimizer not in OUTER_OPTIMIZERS:
            raise ConfigError("outer_optimizer", self.outer_optimizer, f"must be one of {list(OUTER_OPTIMIZERS)}")
        _require(self, "clients", self.clients >= 2, "must be >= 2")
        _require(self, "held_out_clients", 1 <= self.held_out_clients < self.clients, "must be in [1, clients)")
        training = self.clients - self.held_out_clients
        _require(self, "clients_per_round", 1 <= self.clients_per_round <= training,
                 f"must be in [1, {training}] (the number of training clients)")
        _require(self, "rounds", self.rounds >= 1, "must be >= 1")
        _require(self, "inner_steps", self.inner_steps >= 1, "must be >= 1")
        _require(self, "inner_lr", _finite_positive(self.inner_lr), "must be a finite number > 0")
        _require(self, "outer_lr", _finite_positive(self.outer_lr), "must be a finite number > 0")
        _require(self, "shots", self.shots >= 1, "must be >= 1")
        _require(self, "query_shots", self.query_shots >= 1, "must be >= 1")
        _require(self, "train_shots", self.train_shots >= 0, "must be >= 0 (0: the same as shots)")
        _require(self, "adapt_lr", self.adapt_lr == 0 or _finite_positive(self.adapt_lr),
                 "must be 0 (the same as inner_lr) or a finite number > 0")
        _require(self, "adapt_lr", self.adapt_lr == 0 or self.algorithm != "meta-sgd",
                 "does not apply to meta-sgd: held-out devices adapt with its learned per-parameter rates "
                 "(inner_lr is where they start)")
        _require(self, "train_ways", self.train_ways == 0 or (self.ways >= 2 and self.train_ways >= self.ways),
                 "must be 0 (the same as ways) or >= ways, and needs ways >= 2")
        _require(self, "train_ways", self.train_ways == 0 or self.train_ways == self.ways
                 or self.head_init == "prototypes",
                 "can exceed ways only with head_init 'prototypes' (a learned head would score classes an "
                 "evaluation episode lacks)")
        _require(self, "head_init", self.head_init in HEAD_INITS, f"must be one of {list(HEAD_INITS)}")
        _require(self, "head_init", self.head_init == "learned" or self.algorithm != "per-fedavg",
                 "must be 'learned' for per-fedavg (its update has no prototype-head variant)")
        _require(self, "eval_finetunes", bool(self.finetune_modes) and set(self.finetune_modes) <= set(FINETUNES)
                 and len(set(self.finetune_modes)) == len(self.finetune_modes),
                 f"must be distinct names from {list(FINETUNES)}, comma-separated")
        # The plain curve is what the summary, the report and the progress line read.
        _require(self, "eval_finetunes", "full" in self.finetune_modes, "must include 'full'")
        _require(self, "eval_finetunes", self.finetune_modes == ("full",) or self.head_init == "learned",
                 "'head' and 'prox' fine-tune a learned head; with head_init 'prototypes' evaluate 'full' only")
        _require(self, "eval_finetunes", self.finetune_modes == ("full",) or self.algorithm != "meta-sgd",
                 "'head' and 'prox' fine-tune with one step size; meta-sgd's devices adapt with its learned rates "
                 "(evaluate 'full' only)")
        _require(self, "head_adapt_lr", self.head_adapt_lr == 0 or _finite_positive(self.head_adapt_lr),
                 "must be 0 (the same as adapt_lr) or a finite number > 0")
        _require(self, "prox_lambda", 0 <= self.prox_lambda < float("inf"), "must be a finite number >= 0")
        _require(self, "head_init", self.head_init != "prototypes" or task.prototype_heads,
                 f"'prototypes' needs a classifier with a linear head, which task {task.name} does not declare "
                 "(prototype_heads = True)")
        _require(self, "held_out_devices", not self.held_out_devices or (self.data and self.fold == 0),
                 "needs a folder fleet (data) and fold 0: named devices replace the fold's choice")
        _require(self, "eval_every", self.eval_every >= 1, "must be >= 1")
        steps = list(self.eval_steps)
        _require(self, "eval_steps", bool(steps) and steps[0] == 0 and steps == sorted(set(steps)),
                 "must be strictly increasing integers starting at 0")
        _require(self, "min_replies", 1 <= self.min_replies <= self.clients_per_round,
                 "must be in [1, clients_per_round]")
        _require(self, "max_update_norm", _finite_positive(self.max_update_norm), "must be a finite number > 0")
        _require(self, "secagg_clipping_range", 0 <= self.secagg_clipping_range < float("inf"),
                 "must be 0 (automatic) or a finite number > 0")
        if self.secure_aggregation:
            _require(self, "clients_per_round", self.clients_per_round >= 3,
                     "must be >= 3 with secure aggregation (SecAgg+ needs more than 2 clients a round)")
            _require(self, "min_replies", self.min_replies >= 2,
                     "must be >= 2 with secure aggregation (one survivor's 'aggregate' is its own update)")
        shares = self.secagg_shares or self.secagg_auto_shares
        _require(self, "secagg_shares", self.secagg_shares == 0 or 3 <= self.secagg_shares <= self.clients_per_round,
                 f"must be 0 (automatic) or in [3, {self.clients_per_round}] (clients_per_round)")
        _require(self, "secagg_shares",
                 self.secagg_shares in (0, self.clients_per_round) or self.secagg_shares % 2 == 1,
                 "must be odd unless it equals clients_per_round (SecAgg+ neighbourhoods are symmetric)")
        _require(self, "secagg_threshold", self.secagg_threshold == 0 or 2 <= self.secagg_threshold < shares,
                 f"must be 0 (a majority) or in [2, {shares}) (the number of shares)")
        _require(self, "dp_noise_multiplier", 0 <= self.dp_noise_multiplier < float("inf"),
                 "must be a finite number >= 0")
        _require(self, "dp_clip_norm", _finite_positive(self.dp_clip_norm), "must be a finite number > 0")
        _require(self, "dp_delta", 0 < self.dp_delta < 1, "must be in (0, 1)")
        _require(self, "dp_mode", self.dp_mode in DP_MODES, f"must be one of {list(DP_MODES)}")
        _require(self, "dp_mode", self.dp_mode == "central" or (self.secure_aggregation and self.differential_privacy),
                 "'distributed' needs secure aggregation and a noise multiplier > 0 (each device's share of the "
                 "noise is too small to show its update to the server alone)")
        self._validate_robustness()
        _require(self, "seed", isinstance(self.seed, int) and 0 <= self.seed < 2**63,
                 "must be an integer in [0, 2^63) (numpy's generators take no negative seed)")
        _require(self, "ways", self.ways == 0 or self.ways >= 2, "must be 0 (all classes) or >= 2")
        _require(self, "eval_episodes", 1 <= self.eval_episodes <= 100, "must be in [1, 100]")
        _require(self, "fold", 0 <= self.fold < self.folds,
                 f"must be in [0, {self.folds}) ({self.clients} clients, {self.held_out_clients} held out per fold)")

    def _validate_robustness(self) -> None:
        for name, parse in (("attack", Attack.parse), ("defense", Defense.parse), ("compress", Compression.parse)):
            try:
                parse(getattr(self, name))
            except ValueError as error:
                raise ConfigError(name, getattr(self, name), str(error)) from None
        attack, defense = self.attack_definition, self.defense_definition
        _require(self, "attackers", 0 <= self.attackers < 1, "must be a share of the training devices in [0, 1)")
        _require(self, "attackers", (self.attackers > 0) == attack.active,
                 "and attack go together: --attack KIND --attackers FRACTION (> 0)")
        _require(self, "attack", attack.kind != "backdoor" or not self.task_definition.regression,
                 "backdoor relabels triggered inputs to a class: it needs a classification task")
        _require(self, "defense", not (defense.needs_plaintext and self.secure_aggregation),
                 "reads every device's update, which secure aggregation hides from the server; with "
                 "--secure-aggregation use --defense norm-bound:C (devices clip before masking)")
        _require(self, "defense", not (defense.kind == "norm-bound" and self.secure_aggregation
                                       and defense.device_bound is None),
                 "needs its bound with secure aggregation, as norm-bound:C: the server cannot see the updates' "
                 "norms, so every device clips to C before masking")
        _require(self, "defense", defense.kind in ("none", "norm-bound") or not self.differential_privacy,
                 "with differential privacy: the accountant's guarantee is for the mean of clipped updates")
        _require(self, "compress", self.compress in ("", "none") or not self.secure_aggregation,
                 "saves nothing under secure aggregation: SecAgg+ sends every value as a 32-bit masked word")
        if defense.kind == "rsa":
            _require(self, "rsa_stimuli", bool(self.rsa_stimuli) or self.task_definition.stimuli is not None,
                     f"is needed for --defense rsa: task {self.task_definition.name} has no stimuli() of its own; give "
                     "--rsa-stimuli FILE.npz (an array x: a few inputs per class from data no device holds)")
            _require(self, "defense", not self.selective_layers,
                     "judges each device's whole adapted model; with --selective-layers a device sends only some "
                     "of its layers")
        _require(self, "selective_layers", 0 <= self.selective_layers < 1,
                 "must be the share of the model's parameters a device sends, in (0, 1), or 0 (every layer)")
        if self.selective_layers:
            _require(self, "selective_layers", not self.secure_aggregation,
                     "saves nothing under secure aggregation: SecAgg+ masks every coordinate, so a skipped layer "
                     "would still travel (as masked zeros, with a count per layer) at full size")
            _require(self, "selective_layers", not self.differential_privacy,
                     "with differential privacy: each layer would average over a different number of devices, "
                     "which the accountant does not cover")
            _require(self, "selective_layers", self.compression.kind != "topk",
                     "with topk: top-k already chooses what to send; combine --selective-layers with q8")

    @property
    def attack_definition(self) -> Attack:
        return Attack.parse(self.attack)

    @property
    def defense_definition(self) -> Defense:
        return _parsed_defense(self.defense)

    @property
    def compression(self) -> Compression:
        return _parsed_compression(self.compress)

    @property
    def task_definition(self) -> Task:
        """The loaded task (once per process)."""
        return load_task(self.task or self.dataset)

    @property
    def held_out_names(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.held_out_devices.split(",") if name.strip())

    @property
    def folds(self) -> int:
        return self.clients // self.held_out_clients if self.held_out_clients else 1

    @property
    def secagg_range(self) -> float:
        return self.secagg_clipping_range or SECAGG_RANGE_DEFAULTS[self.algorithm]

    @property
    def secagg_auto_shares(self) -> int:
        # Each client's key shares go to its neighbours; more shares survive more dropouts but cost
        # O(shares) messages and Shamir work per client. Flower wants an odd count below the sample size.
        sampled = self.clients_per_round
        return sampled if sampled <= 11 else 11

    @property
    def secagg_share_count(self) -> int:
        return self.secagg_shares or self.secagg_auto_shares

    @property
    def secagg_threshold_count(self) -> int:
        return self.secagg_threshold or max(2, self.secagg_share_count // 2 + 1)

    @property
    def differential_privacy(self) -> bool:
        return self.dp_noise_multiplier > 0

    @property
    def distributed_dp(self) -> bool:
        return self.differential_privacy and self.dp_mode == "distributed"

    @property
    def secagg_step(self) -> float:
        """SecAgg+'s quantization step: the lattice distributed DP's noise lives on."""
        return 2 * self.secagg_range / SECAGG_QUANTIZATION_RANGE

    @property
    def training_shots(self) -> int:
        return self.train_shots or self.shots

    @property
    def adaptation_lr(self) -> float:
        return self.adapt_lr or self.inner_lr

    @property
    def finetune_modes(self) -> tuple[str, ...]:
        return tuple(mode.strip() for mode in self.eval_finetunes.split(",") if mode.strip())

    @property
    def head_adaptation_lr(self) -> float:
        return self.head_adapt_lr or self.adaptation_lr

    @property
    def training_ways(self) -> int:
        return self.train_ways or self.ways

    @property
    def head_ways(self) -> int:
        """Outputs of the model's head (0: the dataset's fixed class count)."""
        return max(self.ways, self.train_ways)

    @property
    def training_clients(self) -> int:
        return self.clients - self.held_out_clients

    def replace(self, **changes: Any) -> RunConfig:
        config = dataclasses.replace(self, **changes)
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["eval_steps"] = list(self.eval_steps)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        # Run directories written before head_init and train_ways existed adapted from the learned head and
        # trained on `ways`-way episodes; a resume must not switch them to a later default.
        # Likewise, runs from before adapt_lr adapted held-out devices with inner_lr.
        return cls.resolve(**{"head_init": "learned", "train_ways": 0, "adapt_lr": 0.0, **data})

    def to_run_config(self) -> dict[str, Any]:
        """Flower's flat ``run_config``: dash-separated keys, scalar values only."""
        flat = {key.replace("_", "-"): value for key, value in self.to_dict().items()}
        flat["eval-steps"] = ",".join(str(s) for s in self.eval_steps)
        return flat

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any], task: str | None = None) -> RunConfig:
        """The config a run's devices read; ``task`` is a deployed device's own task (its copy of the file),
        used in place of the server's path, with the device's own folder in place of the server's fleet."""
        learning = {k: v for k, v in run_config.items() if k not in SERVER_OPTION_DEFAULTS}
        if task:
            learning = {**learning, "task": task, "data": "", "held-out-devices": ""}
            learning.pop("dataset", None)
        return cls.resolve(**{key.replace("-", "_"): value for key, value in learning.items()})


def _resolve_fleet(given: dict[str, Any]) -> None:
    """A folder fleet decides the client count, and named held-out devices the held-out count."""
    from metafleet.common.folder_fleet import fleet_devices

    folder = str(Path(given["data"]).expanduser().resolve())
    devices = fleet_devices(folder)
    given["data"] = folder
    if given.get("clients") not in (None, len(devices)):
        raise ConfigError("clients", given["clients"], f"must be {len(devices)}, the devices in {folder} (or left out)")
    given["clients"] = len(devices)
    names = [name.strip() for name in str(given.get("held_out_devices", "")).split(",") if name.strip()]
    if names:
        unknown = sorted(set(names) - set(devices))
        if unknown:
            raise ConfigError("held_out_devices", given["held_out_devices"], f"names devices {unknown} that {folder} "
                              "does not hold")
        if given.get("held_out_clients") not in (None, len(names)):
            raise ConfigError("held_out_clients", given["held_out_clients"],
                              f"must be {len(names)}, the devices named held out (or left out)")
        given["held_out_clients"] = len(names)
        given["held_out_devices"] = ",".join(sorted(set(names)))


def _require(config: RunConfig, name: str, ok: bool, requirement: str) -> None:
    if not ok:
        raise ConfigError(name, getattr(config, name), requirement)


def _finite_positive(value: float) -> bool:
    return value > 0 and value != float("inf")


def _parse_int_list(name: str, text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(name, text, "must be comma-separated integers") from None


# Asked for on every training reply, on both sides: parsed once per value (both results are frozen).
@lru_cache(maxsize=64)
def _parsed_defense(text: str) -> Defense:
    return Defense.parse(text)


@lru_cache(maxsize=64)
def _parsed_compression(text: str) -> Compression:
    return Compression.parse(text)
