"""Omniglot's two "background small" splits as a fleet: one client per alphabet (Lake et al., Science 2015).

The data is vendored in the repository at ``data/omniglot/`` (MIT license): ``images_background_small1.zip``
(Balinese, Early_Aramaic, Greek, Korean, Latin) and ``images_background_small2.zip`` (Greek,
Japanese_(katakana), Latin, Sanskrit, Tagalog). Greek and Latin are in both zips with byte-identical files,
so each is one client, read from the first zip that holds it: 8 alphabets, 242 characters, 4,840 drawings.

Clients are the alphabets in alphabetical order::

    0 Balinese (24 characters)      4 Korean (40)
    1 Early_Aramaic (22)            5 Latin (26)
    2 Greek (24)                    6 Sanskrit (42)
    3 Japanese_(katakana) (47)      7 Tagalog (17)

A class is one character of the client's alphabet. Each character was drawn once by each of 20 people
(the two digits after the underscore in ``<charid>_<drawer>.png``); support and query never share a drawing
because the two splits divide the drawers: drawers 1-10 support / 11-20 query, and the reverse. Images are
105x105 1-bit, resized to 28x28 with Lanczos antialiasing; ink is 1.0, background 0.0.

Only the alphabets a process asks for are decoded, once per process (about 0.3 ms per drawing).
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from metafleet.common.config import RunConfig
from metafleet.common.data import ClientData, Fleet, Split, locate_data
from metafleet.common.errors import ConfigError, DataError
from metafleet.common.task import BenchmarkPlan, BenchmarkSetting, TaskDefaults
from metafleet.common.tasks.models import ConvNet4

ENV_VAR = "METAFLEET_OMNIGLOT_DIR"
REPO_DATA_DIR = Path(__file__).resolve().parents[2] / "data" / "omniglot"
ZIP_NAMES = ("images_background_small1.zip", "images_background_small2.zip")
# Fixed, so that the server and the config check know the client count without reading any data.
ALPHABETS = (
    "Balinese", "Early_Aramaic", "Greek", "Japanese_(katakana)", "Korean", "Latin", "Sanskrit", "Tagalog",
)
# An episode on an alphabet smaller than ``ways`` uses all of its characters (Tagalog has 17, so a
# "20-way" episode there is 17-way); the largest alphabet bounds ``ways``.
MIN_CHARACTERS, MAX_CHARACTERS = 17, 47
DRAWERS = 20
SIDE = 28
ROTATIONS = (0, 1, 2, 3)  # quarter turns
FIX_HINT = (
    f"restore data/omniglot/ from the repository (git checkout -- data/omniglot), "
    f"or set {ENV_VAR} to a folder holding {' and '.join(ZIP_NAMES)}"
)

name = "omniglot"
objective = "classification"
input_shape = (1, SIDE, SIDE)
prototype_heads = True
sampling = "per-class"
# Chosen on training clients only (see docs/benchmarks.md); never tuned on held-out clients. The fine-tuning
# baselines' step sizes and pull (finetune_lr, head_finetune_lr, finetune_prox_lambda): on fold 2's alphabets.
defaults = TaskDefaults(shots=1, query_shots=5, inner_lr=0.1, eval_steps=(0, 1, 5, 10), clients=len(ALPHABETS),
                        held_out_clients=2, ways=5, eval_episodes=10, train_shots=5, meta_head_init="prototypes",
                        prototype_inner_lr=0.001, prototype_outer_lr=0.001, prototype_train_ways=20,
                        finetune_lr=0.3, head_finetune_lr=1.0, finetune_prox_lambda=0.1)
# Fold 2 holds out Early Aramaic and Katakana, the alphabets Omniglot's defaults were chosen on: the plan
# reports folds 0 and 1. (Folds no longer depend on the seed, so a second seed would test the same alphabets.)
benchmark = BenchmarkPlan(
    (BenchmarkSetting("5-way 1-shot", {"ways": 5, "shots": 1}),
     BenchmarkSetting("20-way 1-shot", {"ways": 20, "shots": 1})),
    rounds=100, folds=(0, 1), seeds=(0,), common={"eval_every": 50})


def make_model(ways: int = 0) -> ConvNet4:
    return ConvNet4(ways or 5)


def make_fleet(config: RunConfig, held_out: Sequence[int]) -> OmniglotFleet:
    if config.clients != len(ALPHABETS):
        raise ConfigError("clients", config.clients, f"must be {len(ALPHABETS)} for omniglot (one per alphabet)")
    if not 2 <= config.ways <= MAX_CHARACTERS:
        raise ConfigError(
            "ways", config.ways,
            f"must be in [2, {MAX_CHARACTERS}] for omniglot (the largest alphabet has {MAX_CHARACTERS} "
            "characters; 0 = all classes does not fit one model head across alphabets)",
        )
    if config.training_ways > MAX_CHARACTERS:
        raise ConfigError("train_ways", config.train_ways, f"must be at most {MAX_CHARACTERS} for omniglot")
    return OmniglotFleet(held_out, rotate_training=True)


_PNG = re.compile(r"[^/]+/(?P<alphabet>[^/]+)/(?P<character>character\d+)/\d+_(?P<drawer>\d\d)\.png")


def locate_omniglot_dir() -> Path:
    """The data folder: ``$METAFLEET_OMNIGLOT_DIR`` if set, else the repository's ``data/omniglot``
    (a non-editable install does not ship ``data/``)."""
    return locate_data(ENV_VAR, [REPO_DATA_DIR], lambda path: None if path.is_dir() else "is not a folder",
                       "Omniglot data", FIX_HINT)


@dataclass(frozen=True)
class _Member:
    name: str
    character: str
    drawer: int
    crc: int
    size: int


def _open_zip(path: Path) -> zipfile.ZipFile:
    if not path.is_file():
        raise DataError(f"{path} is missing; {FIX_HINT}")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise DataError(f"{path} is not a readable zip ({error}); {FIX_HINT}") from error


_INDEX_CACHE: dict[Path, dict[str, tuple[Path, list[_Member]]]] = {}
_ALPHABET_CACHE: dict[tuple[Path, str], tuple[torch.Tensor, np.ndarray, np.ndarray]] = {}


def index_alphabets(root: Path) -> dict[str, tuple[Path, list[_Member]]]:
    """For each alphabet, the zip it is read from and its drawings, from the zips' directories alone.

    An alphabet found in both zips must have the same files with the same CRC-32 and size in each; a
    difference means these are not the expected files, and silently keeping either copy would hide that.
    """
    root = root.resolve()
    if root in _INDEX_CACHE:
        return _INDEX_CACHE[root]
    index: dict[str, tuple[Path, list[_Member]]] = {}
    for zip_name in ZIP_NAMES:
        path = root / zip_name
        with _open_zip(path) as archive:
            found: dict[str, list[_Member]] = {}
            for info in archive.infolist():
                match = _PNG.fullmatch(info.filename)
                if match is None:
                    continue
                member = _Member(info.filename, match["character"], int(match["drawer"]), info.CRC, info.file_size)
                found.setdefault(match["alphabet"], []).append(member)
        for alphabet, members in found.items():
            if alphabet not in index:
                index[alphabet] = (path, members)
                continue
            first_path, first = index[alphabet]
            if _content(first) != _content(members):
                raise DataError(
                    f"alphabet {alphabet} differs between {first_path} and {path} (expected identical copies); "
                    f"{FIX_HINT}"
                )
    if tuple(sorted(index)) != ALPHABETS:
        raise DataError(f"{root} holds the alphabets {sorted(index)}, expected {list(ALPHABETS)}; {FIX_HINT}")
    for alphabet, (path, members) in index.items():
        drawers: dict[str, set[int]] = {}
        for member in members:
            drawers.setdefault(member.character, set()).add(member.drawer)
        for character, found_drawers in drawers.items():
            if found_drawers != set(range(1, DRAWERS + 1)):
                raise DataError(
                    f"{path}: {alphabet}/{character} has drawers {sorted(found_drawers)}, expected 1..{DRAWERS}; "
                    f"{FIX_HINT}"
                )
    _INDEX_CACHE[root] = index
    return index


def _content(members: list[_Member]) -> set[tuple[str, int, int]]:
    # The path below the split folder: the two zips name their top folder differently.
    return {(m.name.split("/", 1)[1], m.crc, m.size) for m in members}


def _decode(data: bytes, image_module) -> np.ndarray:
    with image_module.open(io.BytesIO(data)) as image:
        # "L" first: resizing a 1-bit image would not antialias. uint8 output keeps Lanczos ringing in range.
        small = image.convert("L").resize((SIDE, SIDE), image_module.Resampling.LANCZOS)
        return 1.0 - np.asarray(small, dtype=np.float32) / 255.0


def load_alphabet(root: Path, alphabet: str) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """(images (n, 1, 28, 28) float32 with ink 1.0, character labels 0..c-1, drawers 1..20), cached per process."""
    root = root.resolve()
    key = (root, alphabet)
    if key in _ALPHABET_CACHE:
        return _ALPHABET_CACHE[key]
    try:
        from PIL import Image
    except ImportError as error:
        raise DataError("reading Omniglot needs Pillow: pip install 'metafleet[data]'") from error
    path, members = index_alphabets(root)[alphabet]
    characters = sorted({m.character for m in members})
    label_of = {character: label for label, character in enumerate(characters)}
    members = sorted(members, key=lambda m: (m.character, m.drawer))
    images = np.empty((len(members), 1, SIDE, SIDE), dtype=np.float32)
    with _open_zip(path) as archive:
        for i, member in enumerate(members):
            try:
                images[i, 0] = _decode(archive.read(member.name), Image)
            except Exception as error:  # a damaged member: name it, not a zlib or PIL traceback
                raise DataError(f"{path}: {member.name} could not be read as a PNG ({error}); {FIX_HINT}") from error
    labels = np.array([label_of[m.character] for m in members])
    drawers = np.array([m.drawer for m in members])
    result = (torch.from_numpy(images), labels, drawers)
    _ALPHABET_CACHE[key] = result
    return result


def _rotated(batch: tuple[torch.Tensor, torch.Tensor], num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each character also rotated by 90, 180 and 270 degrees, each rotation a new class (k * num_classes + c)."""
    x, y = batch
    return (torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in ROTATIONS]),
            torch.cat([y + k * num_classes for k in ROTATIONS]))


class OmniglotFleet(Fleet):
    """The 8 alphabets of Omniglot's background-small splits as clients 0..7, in alphabetical order.

    In a run (``build``) a training alphabet's characters also appear rotated by 90, 180 and 270 degrees as
    new characters, the augmentation of Santoro et al. (2016) that MAML and Reptile use: 6 training alphabets
    of about 180 characters become about 720 classes to meta-learn from. Held-out alphabets are evaluated as
    drawn.
    """

    name = "omniglot"
    input_shape = (1, SIDE, SIDE)
    # Per client (an alphabet's character count); the model's head has ``config.head_ways`` outputs.
    num_classes = None

    def __init__(self, held_out: Sequence[int] = (), root: Path | None = None, rotate_training: bool = False):
        self.root = root if root is not None else locate_omniglot_dir()
        # Reads only the zips' directories, so a missing or corrupt zip fails here, before any training.
        self._index = index_alphabets(self.root)
        self.held_out = sorted(held_out)
        self.rotate_training = rotate_training

    @property
    def num_clients(self) -> int:
        return len(ALPHABETS)

    def alphabet(self, client_id: int) -> str:
        self.check_client_id(client_id)
        return ALPHABETS[client_id]

    def client(self, client_id: int) -> ClientData:
        images, labels, drawers = load_alphabet(self.root, self.alphabet(client_id))
        first = torch.from_numpy(drawers <= DRAWERS // 2)
        y = torch.from_numpy(labels).long()
        first_half, second_half = (images[first], y[first]), (images[~first], y[~first])
        splits, num_classes = (Split(first_half, second_half), Split(second_half, first_half)), int(labels.max()) + 1
        if self.rotate_training and client_id not in self.held_out:
            splits = tuple(Split(_rotated(s.support, num_classes), _rotated(s.query, num_classes)) for s in splits)
            num_classes *= len(ROTATIONS)
        data = ClientData(client_id, splits, num_classes)
        data.validate(self.input_shape)
        return data
