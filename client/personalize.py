"""``metafleet personalize`` and ``metafleet predict``: the personalized model a device keeps and uses offline.

    metafleet personalize --checkpoint runs/watch --data /var/lib/metafleet/data --steps 5 --out personal.pt
    metafleet predict --model personal.pt --input windows.npy [--out predictions.npy]

``personalize`` adapts the meta-model (a run directory, or one checkpoint file of it) with ``--steps`` SGD
steps on the device's support data, reports the query metric before and after, and keeps the adapted model
only if the on-device guard (cross-validation on the support set alone) says adaptation helps; ``--no-guard``
keeps it regardless. ``predict`` runs the kept model on an array of inputs (N × the model's input shape)
and prints or saves the predicted classes (or values, for regression).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from metafleet.common.config import RunConfig
from metafleet.common.device_data import load_device_data
from metafleet.common.errors import DataError, MetafleetError
from metafleet.common.fleets import fleet_class, functional_model
from metafleet.common.meta import FunctionalModel, adapt, check_update, keeps_adaptation

FORMAT = "metafleet-personal-model-1"


def personalize_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metafleet personalize", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a run directory or one of its checkpoints")
    parser.add_argument("--data", type=Path, required=True, metavar="DIR", help="folder holding the device's data.npz")
    parser.add_argument("--steps", type=int, default=5, help="adaptation steps k (default 5)")
    parser.add_argument("--inner-lr", type=float, help="adaptation learning rate (default: the run's)")
    parser.add_argument("--no-guard", action="store_true", help="keep the adapted model even if the guard declines")
    parser.add_argument("--out", type=Path, required=True, help="where to write the personal model (.pt)")
    return parser


def _load_meta_model(path: Path) -> tuple[RunConfig, dict[str, torch.Tensor]]:
    if not path.exists():
        raise MetafleetError(f"{path} does not exist (give a run directory or one of its checkpoints/*.pt)")
    if path.is_dir():
        checkpoints = sorted((path / "checkpoints").glob("*.pt"))
        if not checkpoints:
            raise MetafleetError(f"{path} holds no checkpoints/ (is it a run directory?)")
        checkpoint, config_file = checkpoints[-1], path / "config.json"
    else:
        checkpoint, config_file = path, path.parent.parent / "config.json"
    if not config_file.is_file():
        raise MetafleetError(f"{config_file} is missing: copy the run's config.json beside its checkpoints/ folder")
    config = RunConfig.from_dict(json.loads(config_file.read_text()))
    try:
        state = torch.load(checkpoint, weights_only=True, map_location="cpu")
        params = dict(state["params"])
    except Exception as error:  # noqa: BLE001 - any unreadable checkpoint gets the same clear message
        raise MetafleetError(f"{checkpoint} is not a readable metafleet checkpoint: {error}") from None
    return config, params


def personalize_command(argv: list[str]) -> int:
    args = personalize_parser().parse_args(argv)
    if args.steps < 0:
        raise MetafleetError("--steps must be >= 0")
    config, params = _load_meta_model(args.checkpoint)
    dataset, data = load_device_data(args.data)
    if dataset != config.dataset:
        raise DataError(f"the device's data is for '{dataset}', the meta-model was trained on '{config.dataset}'")
    fmodel = functional_model(config)
    try:
        check_update(params, fmodel.init_params())
    except ValueError as error:
        raise MetafleetError(f"the checkpoint does not fit the {config.dataset} model: {error}") from None
    inner_lr = args.inner_lr or config.adaptation_lr
    split = data.splits[0]
    # With prototype heads the unadapted model already reads the support set (its class means).
    with torch.no_grad():
        unadapted = fmodel.start(params, split.support)
    adapted = adapt(fmodel, unadapted, split.support, args.steps, inner_lr) if args.steps else unadapted
    before, after = (fmodel.metric(p, split.query) for p in (unadapted, adapted))
    kept = args.no_guard or args.steps == 0 or keeps_adaptation(fmodel, params, split.support, args.steps, inner_lr)
    chosen = adapted if kept else unadapted
    name = fmodel.objective.metric_name
    decision = ("kept the adapted model" if kept
                else "the guard kept the meta-model (adaptation did not help on the support set)")
    print(f"query {name}: {before:.4f} before, {after:.4f} after {args.steps} steps; {decision}", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": FORMAT, "dataset": config.dataset, "ways": config.head_ways, "steps": args.steps,
                "inner_lr": inner_lr, "adapted": kept, "query_metric": {"name": name, "before": before,
                                                                        "after": after},
                "params": {k: v.detach().clone() for k, v in chosen.items()}}, args.out)
    print(f"wrote {args.out}")
    return 0


def predict_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metafleet predict", description="Run a personal model on inputs.")
    parser.add_argument("--model", type=Path, required=True, help="what metafleet personalize wrote")
    parser.add_argument("--input", type=Path, required=True, help=".npy array: N × the model's input shape")
    parser.add_argument("--out", type=Path, help=".npy file for the predictions (default: print them)")
    return parser


def predict_command(argv: list[str]) -> int:
    args = predict_parser().parse_args(argv)
    try:
        personal = torch.load(args.model, weights_only=True, map_location="cpu")
    except Exception as error:  # noqa: BLE001
        raise MetafleetError(f"{args.model} is not a readable personal model: {error}") from None
    if not isinstance(personal, dict) or personal.get("format") != FORMAT:
        raise MetafleetError(f"{args.model} is not a personal model written by metafleet personalize")
    fleet = fleet_class(personal["dataset"])
    fmodel = FunctionalModel(fleet.make_model(personal["ways"]), fleet.objective)
    try:
        inputs = np.load(args.input, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DataError(f"{args.input} is not a readable .npy array: {error}") from None
    if not isinstance(inputs, np.ndarray):
        raise DataError(f"{args.input} is an .npz archive; give one .npy array (N × {fleet.input_shape})")
    if inputs.ndim != len(fleet.input_shape) + 1 or tuple(inputs.shape[1:]) != tuple(fleet.input_shape):
        raise DataError(f"{args.input} has shape {inputs.shape}; the model takes N × {fleet.input_shape}")
    if not np.isfinite(inputs).all():
        raise DataError(f"{args.input} holds NaN or Inf")
    # Character ids stay integers (an embedding's input); measurements become float32.
    tensor = torch.from_numpy(inputs.astype(np.int64 if np.issubdtype(inputs.dtype, np.integer) else np.float32))
    with torch.no_grad():
        outputs = fmodel.forward(personal["params"], tensor)
    if outputs.dim() == 3:  # a sequence model: the prediction for what follows each input is its last step's
        outputs = outputs[:, -1]
    classify = fleet.objective.metric_name == "accuracy"
    predictions = outputs.argmax(-1).numpy() if classify else outputs.squeeze(-1).numpy()
    if args.out:
        np.save(args.out, predictions)
        print(f"wrote {len(predictions)} predictions to {args.out}")
    else:
        print("\n".join(str(value) for value in predictions.tolist()))
    return 0
