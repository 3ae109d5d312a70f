"""The task API: what a fleet learns, written by the user in one Python file or module.

A task is a Python file (``--task path/to/task.py``), a module (``--task package.module``) or an object in one
(``--task package.module:attr``) that defines at least::

    def make_model() -> torch.nn.Module: ...   # or make_model(ways) where episodes choose the head's size
    objective = "classification"                # or "regression", or Objective(...) / a (loss, metric) pair

Everything else is optional:

``name``
    a short name for run directories and reports (default: the file's or module's name);
``input_shape``, ``num_classes``
    one example's shape and a classifier's class count (default: read off the fleet's data and the model's
    output size);
``read_device(folder) -> DeviceArrays``
    reads one device's folder (default: ``data.npz`` with ``support_x, support_y, query_x, query_y``, or
    ``data.csv``; see ``metafleet.common.folder_fleet``);
``augment(x, rng) -> x``
    transforms the inputs of training devices' episodes (never of evaluation), ``rng`` a numpy Generator;
``defaults``
    a ``TaskDefaults`` (or a dict of its fields): inner lr, inner steps, shots, outer lr, evaluation steps...;
``prototype_heads``
    True where the model is ``head(features(x))`` with a linear head, so ``--head-init prototypes`` applies;
``head_parameters``
    the names of the parameters head-only fine-tuning adapts (``fedavg+head-ft``); default: those of the
    model's ``head`` submodule, else those of the ``nn.Linear`` that holds the model's last parameter;
``sampling``
    ``"uniform"`` (default: an episode takes ``shots`` examples in all, a device's label mix kept) or
    ``"per-class"`` (``shots`` examples of each class, the few-shot protocol; declare ``num_classes``);
``window``
    ``(length, stride)``: the rows of a device's ``data.csv`` are time steps, cut into windows of ``length``
    rows within each group;
``make_fleet(config, held_out) -> Fleet``
    the task's own data, where it has any (the built-in tasks, in ``metafleet.common.tasks``, use it);
``benchmark``
    a ``BenchmarkPlan``: what ``metafleet bench personalization`` runs for this task;
``stimuli() -> array``
    a few inputs per class from data that no device holds, in the model's input shape: the public stimulus
    set of ``--defense rsa`` (a user's server may give a file instead, ``--rsa-stimuli FILE.npz``);
``clients_depend_on_seed``
    True where ``make_fleet`` deals its data from the seed (then a client of one seed is another device than
    its namesake of another).

The model must run as a pure function of its parameters (``torch.func``): a BatchNorm tracking running
statistics, or any layer that updates a buffer in place during forward, is refused (use GroupNorm or
LayerNorm). Server and devices agree on the model by ``fingerprint``: its parameter names, shapes and dtypes.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from metafleet.common.errors import MetafleetError
from metafleet.common.meta import CLASSIFICATION, REGRESSION, Objective
from metafleet.common.tasks import BUILTIN_TASKS

__all__ = [
    "BenchmarkPlan", "BenchmarkSetting", "CLASSIFICATION", "DeviceArrays", "Objective", "REGRESSION", "Task",
    "TaskDefaults", "TaskError", "fingerprint", "load_task",
]
SAMPLINGS = ("per-class", "uniform")
OBJECTIVES = {"classification": CLASSIFICATION, "regression": REGRESSION}
REQUIRED_HINT = ("a task defines make_model() -> torch.nn.Module and objective = \"classification\" or "
                 "\"regression\" (metafleet new NAME writes an example)")


class TaskError(MetafleetError):
    """A task that cannot be loaded or does not fit its data; the message names the task and the problem."""


@dataclass(frozen=True)
class TaskDefaults:
    """A task's learning defaults; every field a command-line flag may override."""

    shots: int = 10
    query_shots: int = 10
    inner_lr: float = 0.01
    inner_steps: int = 5
    # The meta methods' Adam server lr (0: 0.01); FedAvg keeps its SGD step of 1, i.e. model averaging.
    outer_lr: float = 0.0
    eval_steps: tuple[int, ...] = (0, 1, 5)
    clients: int = 0  # 0: the fleet's own device count
    held_out_clients: int = 0  # 0: a tenth of the clients, at least 1
    clients_per_round: int = 0  # 0: 10, or every training client where there are fewer
    ways: int = 0
    eval_episodes: int = 1
    train_shots: int = 0
    # Where the meta methods' adaptation starts (fedavg always keeps its learned head), and the inner and
    # Adam server lrs and training ways that go with a prototype head (0: the usual defaults).
    meta_head_init: str = "learned"
    prototype_inner_lr: float = 0.0
    prototype_outer_lr: float = 0.0
    prototype_train_ways: int = 0
    # FedAvg's fine-tuning step size on held-out devices (0: inner_lr), chosen on validation clients.
    finetune_lr: float = 0.0
    # Head-only fine-tuning's step size (0: finetune_lr), and proximal fine-tuning's pull λ towards the
    # received model, both chosen on validation clients (scripts/tune-adapt-lr). λ = 1 where a task has not
    # tuned it: Ditto's middle value (Li et al., ICML 2021, tried 0.01 to 2).
    head_finetune_lr: float = 0.0
    finetune_prox_lambda: float = 1.0
    # Per-FedAvg's α = β (0: inner_lr), chosen on validation clients: its two steps a local step, the server
    # then taking the whole mean step, diverge at a step the other methods train well with (sinusoid's 0.02).
    per_fedavg_inner_lr: float = 0.0


@dataclass(frozen=True)
class BenchmarkSetting:
    """One table of a benchmark: a label and the config values it fixes (shots, ways...)."""

    label: str
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BenchmarkPlan:
    """The runs behind a task's personalization benchmark (``metafleet bench personalization``)."""

    settings: tuple[BenchmarkSetting, ...] = (BenchmarkSetting("default"),)
    rounds: int = 50
    folds: tuple[int, ...] = (0,)
    seeds: tuple[int, ...] = (0, 1)
    common: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DeviceArrays:
    """One device's data as a reader returns it: support and query examples that share no recording."""

    support_x: np.ndarray
    support_y: np.ndarray
    query_x: np.ndarray
    query_y: np.ndarray
    # The task the file says it is for (data.npz's ``task``, or ``dataset`` in older files), if it says.
    task_name: str | None = None


@dataclass(frozen=True, eq=False)
class Task:
    """A loaded task: ``load_task`` builds it from the user's file or module (see the module docstring)."""

    name: str
    spec: str
    build_model: Callable[..., nn.Module]
    objective: Objective
    input_shape: tuple[int, ...] | None = None
    num_classes: int | None = None
    read_device: Callable[[Path], DeviceArrays] | None = None
    augment: Callable[[torch.Tensor, np.random.Generator], torch.Tensor] | None = None
    defaults: TaskDefaults = TaskDefaults()
    prototype_heads: bool = False
    sampling: str = "uniform"
    window: tuple[int, int] | None = None
    make_fleet: Callable[..., Any] | None = None
    benchmark: BenchmarkPlan | None = None
    stimuli: Callable[[], Any] | None = None
    # True where the seed deals the task's own data (a generated or randomly partitioned fleet): client 3 of
    # seed 0 and client 3 of seed 1 are then different devices, not one device measured twice.
    clients_depend_on_seed: bool = False
    # The parameters head-only fine-tuning adapts (None: found by ``head_names``).
    head_parameters: tuple[str, ...] | None = None

    @property
    def regression(self) -> bool:
        return not self.objective.class_targets

    def make_model(self, ways: int = 0) -> nn.Module:
        """A fresh model (``ways`` head outputs, where ``make_model`` takes the argument), checked to run
        functionally."""
        try:
            takes_ways = _takes_argument(self.build_model)
            model = self.build_model(ways) if takes_ways else self.build_model()
        except MetafleetError:
            raise
        except Exception as error:  # noqa: BLE001 - a user's code: one line, not its traceback
            raise TaskError(f"task {self.name}: make_model() failed: {type(error).__name__}: {error}") from None
        if not isinstance(model, nn.Module):
            raise TaskError(f"task {self.name}: make_model() returned {type(model).__name__}, not a torch.nn.Module")
        check_functional(model, self.name)
        return model

    def head_names(self, model: nn.Module) -> frozenset[str]:
        """The parameters of ``model`` that head-only fine-tuning adapts: the task's ``head_parameters``, else
        the ``head`` submodule's (the bundled models are ``head(features(x))``), else those of the
        ``nn.Linear`` holding the last parameter (an MLP's output layer). Anything else is a model whose head
        cannot be told from its structure: one error, saying what to declare."""
        names = [name for name, _ in model.named_parameters()]
        if self.head_parameters is not None:
            unknown = sorted(set(self.head_parameters) - set(names))
            if unknown or not self.head_parameters:
                raise TaskError(f"task {self.name}: head_parameters {list(self.head_parameters)} must name some of "
                                f"the model's parameters {names}" + (f"; unknown: {unknown}" if unknown else ""))
            return frozenset(self.head_parameters)
        head = getattr(model, "head", None)
        if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
            return frozenset(f"head.{name}" for name, _ in head.named_parameters())
        # A root module's own parameters come first in named_parameters() but may act last (an output scale),
        # so the last parameter names the output layer only where the root has none of its own.
        own = [name for name, _ in model.named_parameters(recurse=False)]
        if names and (not own or isinstance(model, nn.Linear)):
            owner_name = names[-1].rpartition(".")[0]
            owner = model.get_submodule(owner_name) if owner_name else model
            if isinstance(owner, nn.Linear):
                return frozenset(f"{owner_name}.{name}" for name, _ in owner.named_parameters())
        why = (f"its own parameters {own} may act after any layer" if own
               else f"its last parameter {names[-1]!r} is not in an nn.Linear" if names else "it has no parameters")
        raise TaskError(f"task {self.name}: cannot tell the model's head for head-only fine-tuning (no 'head' "
                        f"submodule, and {why}); declare "
                        "head_parameters = (\"name.weight\", ...) in the task")

    def episode_examples(self, config: Any) -> int:
        """Examples in one training episode: every client's aggregation weight, and so SecAgg+'s max weight."""
        per_class = config.training_shots + config.query_shots
        if self.sampling == "uniform" or (self.num_classes is None and not config.training_ways):
            return per_class
        return per_class * (config.training_ways or self.num_classes)


def _takes_argument(function: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in parameters)


def check_functional(model: nn.Module, task_name: str) -> None:
    """Refuse layers the functional core cannot run: it treats buffers as constants, so running statistics
    would never update (and batch statistics of a 5-example support set are noise)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            raise TaskError(
                f"task {task_name}: layer '{name}' is {type(module).__name__} tracking running statistics, which "
                "functional meta-learning cannot update and which few-shot support sets make noisy; use "
                "nn.GroupNorm or nn.LayerNorm (or track_running_stats=False)")
    for name, parameter in model.named_parameters():
        if not parameter.is_floating_point():
            raise TaskError(f"task {task_name}: parameter '{name}' is {parameter.dtype}, not a floating-point tensor")


def check_buffers_unchanged(model: nn.Module, x: torch.Tensor, task_name: str) -> None:
    """Refuse a model whose forward changes a buffer in place (a running average, a step counter)."""
    before = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
    if not before:
        return
    with torch.no_grad():
        model(x)
    for name, buffer in model.named_buffers():
        if name in before and not torch.equal(before[name], buffer):
            raise TaskError(
                f"task {task_name}: the model's forward updates buffer '{name}' in place, which functional "
                "meta-learning treats as a constant; keep state in parameters, or use GroupNorm/LayerNorm in "
                "place of a norm with running statistics")


def fingerprint(model: nn.Module) -> str:
    """What server and devices compare to know they run the same model: a digest of every parameter's name,
    shape and dtype, in order."""
    description = ";".join(f"{name}:{tuple(p.shape)}:{p.dtype}" for name, p in model.named_parameters())
    return hashlib.sha256(description.encode()).hexdigest()[:16]


def canonical_spec(spec: str) -> str:
    """The spec as every process of a run can load it: a built-in's name, a file's absolute path, or a module."""
    spec = str(spec).strip()
    if not spec:
        raise TaskError("the task is empty: give a built-in task's name, FILE.py, package.module or "
                        "package.module:attr")
    if spec in BUILTIN_TASKS:
        return spec
    if spec.endswith(".py") or "/" in spec or Path(spec).is_file():
        path = Path(spec).expanduser()
        if not path.is_file():
            raise TaskError(f"task file {spec} does not exist")
        return str(path.resolve())
    return spec


def load_task(spec: str) -> Task:
    """The task ``spec`` names (built-in name, FILE.py, package.module or package.module:attr), loaded once
    per process; ``TaskError`` naming the task and the problem."""
    return _load_task(canonical_spec(spec))


@lru_cache(maxsize=32)
def _load_task(spec: str) -> Task:
    source = _import(BUILTIN_TASKS.get(spec, spec))
    if isinstance(source, Task):
        return source
    default_name = spec if spec in BUILTIN_TASKS else _default_name(spec)
    return task_from_namespace(source, spec, default_name)


def _default_name(spec: str) -> str:
    if spec.endswith(".py"):
        path = Path(spec)
        return path.parent.name if path.stem == "task" and path.parent.name else path.stem
    return spec.split(":")[-1].rsplit(".", 1)[-1]


def _import(spec: str) -> Any:
    module_part, _, attribute = spec.partition(":") if not spec.endswith(".py") else (spec, "", "")
    try:
        if module_part.endswith(".py"):
            module = _import_file(Path(module_part))
        else:
            module = _import_module(module_part)
    except MetafleetError:
        raise
    except ModuleNotFoundError as error:
        raise TaskError(f"task {spec}: cannot import {error.name!r} ({error}); give a file path, or put the "
                        "module's folder on PYTHONPATH") from None
    except SyntaxError as error:
        raise TaskError(f"task {spec}: syntax error in {error.filename} line {error.lineno}: {error.msg}") from None
    except Exception as error:  # noqa: BLE001 - a user's module: one line, not its traceback
        raise TaskError(f"task {spec}: importing it failed: {type(error).__name__}: {error}") from None
    if not attribute:
        return module
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise TaskError(f"task {spec}: module {module_part} has no attribute {attribute!r}") from None


def _import_module(name: str) -> types.ModuleType:
    """``name`` as ``python -m`` would find it: the working folder counts too (a console script's sys.path
    lacks it, and a user runs ``--task mypackage.task`` from the project's folder)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        here = str(Path.cwd())
        if here in sys.path or not (error.name and name.startswith(error.name)):
            raise
        sys.path.append(here)
        return importlib.import_module(name)


def _import_file(path: Path) -> types.ModuleType:
    # A unique module name per file, registered in sys.modules so that dataclasses and pickling inside the
    # user's file work as in any module.
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    module_name = f"metafleet_task_{path.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise TaskError(f"task {path} cannot be loaded as a Python file")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module
    try:
        loader_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def task_from_namespace(source: Any, spec: str, default_name: str) -> Task:
    """A Task from the attributes of a module or object (the task API), each checked."""
    name = str(getattr(source, "name", default_name))
    where = f"task {name}" if name == spec else f"task {name} ({spec})"
    build_model = getattr(source, "make_model", None)
    if not callable(build_model):
        raise TaskError(f"{where} has no make_model(): {REQUIRED_HINT}")
    if not hasattr(source, "objective"):
        raise TaskError(f"{where} has no objective: {REQUIRED_HINT}")
    values: dict[str, Any] = {
        "name": name, "spec": spec, "build_model": build_model,
        "objective": _objective(source.objective, source, where),
    }
    for attribute in ("read_device", "augment", "make_fleet", "stimuli"):
        value = getattr(source, attribute, None)
        if value is not None and not callable(value):
            raise TaskError(f"{where}: {attribute} must be a function, got {type(value).__name__}")
        values[attribute] = value
    if getattr(source, "input_shape", None) is not None:
        values["input_shape"] = _shape(source.input_shape, where)
    if getattr(source, "num_classes", None) is not None:
        values["num_classes"] = _positive_int(source.num_classes, "num_classes", where)
    values["defaults"] = _defaults(getattr(source, "defaults", None), where)
    values["prototype_heads"] = bool(getattr(source, "prototype_heads", False))
    values["clients_depend_on_seed"] = bool(getattr(source, "clients_depend_on_seed", False))
    head_parameters = getattr(source, "head_parameters", None)
    if head_parameters is not None:
        if not isinstance(head_parameters, (tuple, list)) or not all(isinstance(n, str) for n in head_parameters):
            raise TaskError(f"{where}: head_parameters must be a sequence of parameter names, got {head_parameters!r}")
        values["head_parameters"] = tuple(head_parameters)
    sampling = getattr(source, "sampling", "uniform")
    if sampling not in SAMPLINGS:
        raise TaskError(f"{where}: sampling must be one of {list(SAMPLINGS)}, got {sampling!r}")
    values["sampling"] = sampling
    if sampling == "per-class" and values["objective"].class_targets is False:
        raise TaskError(f"{where}: per-class sampling needs class labels; a regression task samples uniformly")
    window = getattr(source, "window", None)
    if window is not None:
        if not (isinstance(window, (tuple, list)) and len(window) == 2 and all(
                isinstance(v, int) and v >= 1 for v in window)):
            raise TaskError(f"{where}: window must be (length, stride), two integers >= 1, got {window!r}")
        values["window"] = (int(window[0]), int(window[1]))
    benchmark = getattr(source, "benchmark", None)
    if benchmark is not None and not isinstance(benchmark, BenchmarkPlan):
        raise TaskError(f"{where}: benchmark must be a metafleet.common.task.BenchmarkPlan")
    values["benchmark"] = benchmark
    return Task(**values)


def _objective(value: Any, source: Any, where: str) -> Objective:
    if isinstance(value, Objective):
        return value
    if isinstance(value, str):
        if value not in OBJECTIVES:
            raise TaskError(f"{where}: objective must be \"classification\" or \"regression\" (or a (loss, metric) "
                            f"pair), got {value!r}")
        return OBJECTIVES[value]
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(callable(v) for v in value):
        loss, metric = value
        return Objective(
            getattr(metric, "__name__", "metric").strip("_"), loss, metric,
            higher_is_better=bool(getattr(source, "higher_is_better", False)),
            class_targets=bool(getattr(source, "class_targets", False)),
        )
    raise TaskError(f"{where}: objective must be \"classification\", \"regression\", an Objective or a "
                    f"(loss, metric) pair of functions, got {value!r}")


def _shape(value: Any, where: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise TaskError(f"{where}: input_shape must be a tuple of positive integers, got {value!r}") from None
    if not shape or min(shape) < 1:
        raise TaskError(f"{where}: input_shape must be a tuple of positive integers, got {value!r}")
    return shape


def _positive_int(value: Any, attribute: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TaskError(f"{where}: {attribute} must be an integer >= 1, got {value!r}")
    return value


def _defaults(value: Any, where: str) -> TaskDefaults:
    if value is None:
        return TaskDefaults()
    if isinstance(value, TaskDefaults):
        return value
    if isinstance(value, dict):
        known = {f.name for f in fields(TaskDefaults)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise TaskError(f"{where}: defaults has unknown fields {unknown} (known: {sorted(known)})")
        given = dict(value)
        if "eval_steps" in given:
            given["eval_steps"] = tuple(given["eval_steps"])
        return TaskDefaults(**given)
    raise TaskError(f"{where}: defaults must be a TaskDefaults or a dict, got {type(value).__name__}")
