"""``metafleet personalize`` and ``metafleet predict``: the personalized model a device keeps and uses offline.

    metafleet predict --model /var/lib/metafleet/data/personal-model.pt --input windows.npy [--out predictions.npy]
    metafleet personalize --checkpoint /var/lib/metafleet/data/meta-model.pt --data /var/lib/metafleet/data

At the end of a deployed run every device receives the final meta-model and writes, into its data folder,
``meta-model.pt`` and ``personal-model.pt`` (``keep_final_models``), so ``predict`` works with nothing copied by
hand. ``personalize`` redoes the adaptation later, on new data: it adapts the meta-model (a device's
``meta-model.pt``, a run directory, or one checkpoint of it) with ``--steps`` SGD steps on the device's support
data, reports the query metric before and after, and keeps the adapted model only if the on-device guard
(cross-validation on the support set alone) says adaptation helps; ``--no-guard`` keeps it regardless.
``predict`` runs the kept model on an array of inputs (N × the model's input shape) and prints or saves the
predicted classes (or values, for regression). A user task's model is rebuilt from the task the file names
(the device's own task file), or from ``--task``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metafleet.common.config import RunConfig
from metafleet.common.data import ClientData
from metafleet.common.device_data import load_device_data
from metafleet.common.errors import DataError, MetafleetError
from metafleet.common.fleets import functional_model
from metafleet.common.meta import (
    FunctionalModel,
    Params,
    StepSize,
    adapt,
    check_update,
    keeps_adaptation,
    meta_parameters,
    split_learned_rates,
    step_sizes,
)
from metafleet.common.task import Task, fingerprint, load_task

FORMAT = "metafleet-personal-model-1"
META_FORMAT = "metafleet-meta-model-1"
META_MODEL_FILE, PERSONAL_MODEL_FILE = "meta-model.pt", "personal-model.pt"


def personalize_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metafleet personalize", description=__doc__.split("\n\n")[1])
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="the device's meta-model.pt, a run directory or one of its checkpoints")
    parser.add_argument("--data", type=Path, required=True, metavar="DIR", help="the device's data folder")
    parser.add_argument("--task", help="the task (default: the one the meta-model names)")
    parser.add_argument("--steps", type=int, default=5, help="adaptation steps k (default 5)")
    parser.add_argument("--inner-lr", type=float,
                        help="adaptation learning rate (default: the run's; a meta-sgd model's own learned "
                        "per-parameter rates)")
    parser.add_argument("--no-guard", action="store_true", help="keep the adapted model even if the guard declines")
    parser.add_argument("--out", type=Path,
                        help=f"where to write the personal model (default DIR/{PERSONAL_MODEL_FILE})")
    return parser


def _load_meta_model(path: Path, task: str | None = None) -> tuple[RunConfig, dict[str, torch.Tensor]]:
    if not path.exists():
        raise MetafleetError(f"{path} does not exist (give a device's {META_MODEL_FILE}, a run directory or one of "
                             "its checkpoints/*.pt)")
    if path.is_dir() and (path / META_MODEL_FILE).is_file() and not (path / "checkpoints").is_dir():
        path = path / META_MODEL_FILE
    if path.is_dir():
        checkpoints = sorted((path / "checkpoints").glob("*.pt"))
        if not checkpoints:
            raise MetafleetError(f"{path} holds no checkpoints/ (is it a run directory?)")
        checkpoint, config_file = checkpoints[-1], path / "config.json"
    else:
        checkpoint, config_file = path, path.parent.parent / "config.json"
    try:
        state = torch.load(checkpoint, weights_only=True, map_location="cpu")
        params = dict(state["params"])
    except Exception as error:  # noqa: BLE001 - any unreadable checkpoint gets the same clear message
        raise MetafleetError(f"{checkpoint} is not a readable metafleet checkpoint: {error}") from None
    if state.get("format") == META_FORMAT:
        values = dict(state["config"])
    else:
        if not config_file.is_file():
            raise MetafleetError(f"{config_file} is missing: copy the run's config.json beside its checkpoints/ folder")
        values = json.loads(config_file.read_text())
    if task or state.get("task"):
        values = {**values, "task": task or state["task"], "data": "", "held_out_devices": ""}
        values.pop("dataset", None)
    return RunConfig.from_dict(values), params


def personalize(fmodel: FunctionalModel, params: Params, data: ClientData, steps: int, inner_lr: StepSize,
                guard: bool = True) -> dict[str, Any]:
    """Adapt ``params`` (θ) on the device's support set; the chosen parameters and what was measured."""
    split = data.splits[0]
    # With prototype heads the unadapted model already reads the support set (its class means).
    with torch.no_grad():
        unadapted = fmodel.start(params, split.support)
    adapted = adapt(fmodel, unadapted, split.support, steps, inner_lr) if steps else unadapted
    before, after = (fmodel.metric(p, split.query) for p in (unadapted, adapted))
    kept = not guard or steps == 0 or keeps_adaptation(fmodel, params, split.support, steps, inner_lr)
    return {"params": adapted if kept else unadapted, "adapted": kept, "before": before, "after": after}


def personal_model_record(config: RunConfig, fmodel: FunctionalModel, result: dict[str, Any], steps: int,
                          inner_lr: StepSize) -> dict[str, Any]:
    return {"format": FORMAT, "dataset": config.dataset, "task": config.task, "ways": config.head_ways,
            "head_init": config.head_init, "fingerprint": fingerprint(fmodel.module), "steps": steps,
            # A meta-sgd model adapted with its learned rates, which its meta-model.pt keeps.
            "inner_lr": inner_lr if not isinstance(inner_lr, dict) else "learned", "adapted": result["adapted"],
            "query_metric": {"name": fmodel.objective.metric_name, "before": result["before"],
                             "after": result["after"]},
            "params": {k: v.detach().cpu().clone() for k, v in result["params"].items()}}


def _atomic_save(record: dict[str, Any], path: Path) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        torch.save(record, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def keep_final_models(config: RunConfig, fmodel: FunctionalModel, params: Params, data: ClientData,
                      folder: Path) -> dict[str, Any]:
    """What a deployed device does with the run's final meta-model: writes it and its personal model (adapted
    for the run's largest evaluated step count, guarded) into its data folder."""
    steps = config.eval_steps[-1]
    theta, inner_lr = step_sizes(params, config.adaptation_lr)
    result = personalize(fmodel, theta, data, steps, inner_lr)
    _atomic_save({"format": META_FORMAT, "config": config.to_dict(), "task": config.task,
                  "fingerprint": fingerprint(fmodel.module),
                  "params": {k: v.detach().cpu().clone() for k, v in params.items()}}, folder / META_MODEL_FILE)
    _atomic_save(personal_model_record(config, fmodel, result, steps, inner_lr), folder / PERSONAL_MODEL_FILE)
    return {"kept": True, "adapted": bool(result["adapted"]), "before": float(result["before"]),
            "after": float(result["after"])}


def personalize_command(argv: list[str]) -> int:
    args = personalize_parser().parse_args(argv)
    if args.steps < 0:
        raise MetafleetError("--steps must be >= 0")
    config, params = _load_meta_model(args.checkpoint, args.task)
    _, data = load_device_data(args.data, task=config.task_definition)
    fmodel = functional_model(config)
    try:
        check_update(params, meta_parameters(config.algorithm, fmodel.init_params(), config.inner_lr))
    except ValueError as error:
        raise MetafleetError(f"the meta-model does not fit task {config.dataset}'s model: {error}") from None
    # --inner-lr is the user's explicit choice, over a meta-sgd model's learned rates too.
    theta, inner_lr = (split_learned_rates(params)[0], args.inner_lr) if args.inner_lr else step_sizes(
        params, config.adaptation_lr)
    result = personalize(fmodel, theta, data, args.steps, inner_lr, guard=not args.no_guard)
    decision = ("kept the adapted model" if result["adapted"]
                else "the guard kept the meta-model (adaptation did not help on the support set)")
    print(f"query {fmodel.objective.metric_name}: {result['before']:.4f} before, {result['after']:.4f} after "
          f"{args.steps} steps; {decision}", file=sys.stderr)
    out = args.out or args.data / PERSONAL_MODEL_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save(personal_model_record(config, fmodel, result, args.steps, inner_lr), out)
    print(f"wrote {out}")
    return 0


def predict_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metafleet predict", description="Run a personal model on inputs.")
    parser.add_argument("--model", type=Path, required=True,
                        help=f"a personal model: a device's {PERSONAL_MODEL_FILE} (or its data folder), or what "
                        "metafleet personalize wrote")
    parser.add_argument("--input", type=Path, required=True, help=".npy array: N × the model's input shape")
    parser.add_argument("--task", help="the task (default: the one the model names)")
    parser.add_argument("--out", type=Path, help=".npy file for the predictions (default: print them)")
    return parser


def _personal_task(personal: dict[str, Any], override: str | None) -> Task:
    return load_task(override or personal.get("task") or personal["dataset"])


def predict_command(argv: list[str]) -> int:
    args = predict_parser().parse_args(argv)
    path = args.model / PERSONAL_MODEL_FILE if args.model.is_dir() else args.model
    try:
        personal = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # noqa: BLE001
        raise MetafleetError(f"{path} is not a readable personal model: {error}") from None
    if not isinstance(personal, dict) or personal.get("format") != FORMAT:
        raise MetafleetError(f"{path} is not a personal model written by metafleet")
    task = _personal_task(personal, args.task)
    module = task.make_model(personal["ways"])
    if personal.get("fingerprint") and fingerprint(module) != personal["fingerprint"]:
        raise MetafleetError(f"task {task.name}'s model (fingerprint {fingerprint(module)}) is not the one {path} was "
                             f"trained as ({personal['fingerprint']}); give the task it was made with (--task)")
    fmodel = FunctionalModel(module, task.objective)
    try:
        inputs = np.load(args.input, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DataError(f"{args.input} is not a readable .npy array: {error}") from None
    if not isinstance(inputs, np.ndarray):
        raise DataError(f"{args.input} is an .npz archive; give one .npy array (N × the model's input shape)")
    if task.input_shape is not None and (
            inputs.ndim != len(task.input_shape) + 1 or tuple(inputs.shape[1:]) != tuple(task.input_shape)):
        raise DataError(f"{args.input} has shape {inputs.shape}; the model takes N × {task.input_shape}")
    if inputs.dtype.kind not in "fiub" or (inputs.dtype.kind == "f" and not np.isfinite(inputs).all()):
        raise DataError(f"{args.input} holds NaN, Inf or non-numeric values")
    # Token ids stay integers (an embedding's input); measurements become float32.
    tensor = torch.from_numpy(inputs.astype(np.int64 if np.issubdtype(inputs.dtype, np.integer) else np.float32))
    try:
        with torch.no_grad():
            outputs = fmodel.forward(personal["params"], tensor)
    except Exception as error:  # noqa: BLE001 - inputs the model cannot take: one line
        raise DataError(f"the model cannot take {args.input} (shape {inputs.shape}): {type(error).__name__}: "
                        f"{error}") from None
    if outputs.dim() == 3:  # a sequence model: the prediction for what follows each input is its last step's
        outputs = outputs[:, -1]
    classify = task.objective.class_targets
    predictions = outputs.argmax(-1).numpy() if classify else outputs.squeeze(-1).numpy()
    if args.out:
        np.save(args.out, predictions)
        print(f"wrote {len(predictions)} predictions to {args.out}")
    else:
        print("\n".join(str(value) for value in predictions.tolist()))
    return 0
