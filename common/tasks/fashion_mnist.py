"""Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017) split over a fleet with Dirichlet label skew.

The images come from the Debian package ``dataset-fashion-mnist`` (version 0.0~git20200523.55506a9-1), which
ships the four gzipped IDX files of the upstream release under ``/usr/share/datasets/fashion-mnist``.
``scripts/fetch-fashion-mnist`` extracts the same package without root into ``<repo>/.data/fashion-mnist``.

The 60,000 training images are dealt to the clients with per-class Dirichlet(0.3) proportions, the
partition of Hsu et al. (2019) as implemented in NIID-Bench (Li et al., 2022): a client holds a few classes
in bulk and others barely, and personalization must learn its label mix. Each client's images are split
at random into a support pool and a query pool (an image is its own recording, so no example is in
both). The 10,000 official test images are not used: a held-out client's images are never trained on
either, which is what the official split is for, and one source per client keeps its query pool drawn
from its own label distribution.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from metafleet.common.config import RunConfig
from metafleet.common.data import ClientData, Fleet, Split, locate_data
from metafleet.common.errors import ConfigError, DataError
from metafleet.common.task import BenchmarkPlan, BenchmarkSetting, TaskDefaults
from metafleet.common.tasks.models import ConvNet4

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
REPO_DIR = Path(__file__).resolve().parents[2] / ".data" / "fashion-mnist"
INSTALL_HINT = (
    "run `scripts/fetch-fashion-mnist` in the metafleet checkout (no root needed), or as root "
    "`apt install dataset-fashion-mnist`, or point METAFLEET_FASHION_MNIST_DIR at a folder holding the four files"
)
# SHA-256 of the decompressed IDX bytes, so a copy gzipped differently (upstream's) or already unpacked
# (torchvision's raw/ folder) is accepted as long as it holds the same images.
IDX_FILES = {
    "train-images": ("train-images-idx3-ubyte", "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
    "train-labels": ("train-labels-idx1-ubyte", "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
    "test-images": ("t10k-images-idx3-ubyte", "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
    "test-labels": ("t10k-labels-idx1-ubyte", "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
}
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
NUM_CLASSES, SIDE = 10, 28
# Mean and standard deviation of all 60,000 training pixels after scaling to [0, 1]: fixed constants, so
# every device standardizes identically without exchanging statistics.
PIXEL_MEAN, PIXEL_STD = 0.2860, 0.3530
DIRICHLET_ALPHA = 0.3
MIN_EXAMPLES = 40  # so that support and query pools each keep at least 20 images
QUERY_CAP = 200  # evaluation runs the whole query pool; a few hundred images keep it quick
MAX_PARTITION_TRIES = 1000
# ConvNet4 at half its usual width: 28,650 parameters instead of 112,586. On one CPU thread it runs a
# 10-client round about 1.6x faster, and after 30 rounds it was no less accurate on held-out clients.
MODEL_WIDTH = 32

name = "fashion-mnist"
objective = "classification"
input_shape = (1, SIDE, SIDE)
num_classes = NUM_CLASSES
prototype_heads = True
sampling = "uniform"
clients_depend_on_seed = True  # the Dirichlet partition is drawn from the seed
# Chosen on training clients only (see docs/benchmarks.md); never tuned on held-out clients.
# head_finetune_lr and finetune_prox_lambda: chosen on fold 5's validation clients (docs/benchmarks.md).
defaults = TaskDefaults(shots=20, query_shots=20, inner_lr=0.05, eval_steps=(0, 1, 5), clients=100,
                        held_out_clients=10, head_finetune_lr=0.2, finetune_prox_lambda=5.0)
benchmark = BenchmarkPlan((BenchmarkSetting("20-shot (label skew)", {"shots": 20}),), rounds=60, folds=(0,),
                          seeds=(0, 1, 2), common={"eval_every": 20})


STIMULI_PER_CLASS = 2


def stimuli() -> np.ndarray:
    """--defense rsa's public stimulus set: the first two test-set images of each class, standardized as the
    devices' images are. No device holds them: the fleet is dealt from the training set."""
    images, labels = load_split("test")
    chosen = np.concatenate([np.flatnonzero(labels == label)[:STIMULI_PER_CLASS] for label in range(NUM_CLASSES)])
    pixels = images[chosen].astype(np.float32)[:, None] / 255.0
    return (pixels - PIXEL_MEAN) / PIXEL_STD


def make_model(ways: int = 0) -> ConvNet4:
    """ConvNet4 of width 32 with 10 outputs whatever ``ways`` is (uniform episodes keep the 10 original
    labels): 28,650 parameters."""
    return ConvNet4(NUM_CLASSES, width=MODEL_WIDTH)


def make_fleet(config: RunConfig, held_out: Sequence[int]) -> FashionMnistFleet:
    # The partition ignores ``held_out``, so every fold of a cross-validation sees the same clients.
    if config.ways not in (0, NUM_CLASSES):
        raise ConfigError("ways", config.ways, "must be 0 for fashion-mnist (uniform episodes keep all 10 labels)")
    return FashionMnistFleet(config.clients, config.seed)


def _has_file(folder: Path, stem: str) -> bool:
    return (folder / f"{stem}.gz").is_file() or (folder / stem).is_file()


def _missing(folder: Path) -> list[str]:
    return [f"{stem}.gz" for stem, _ in IDX_FILES.values() if not _has_file(folder, stem)]


def locate_fashion_mnist_dir() -> Path:
    """The data folder: METAFLEET_FASHION_MNIST_DIR if set, else the Debian package's, else ``<repo>/.data``."""

    def problem(folder: Path) -> str | None:
        missing = _missing(folder)
        return f"lacks {', '.join(missing)}" if missing else None

    return locate_data("METAFLEET_FASHION_MNIST_DIR", [SYSTEM_DIR, REPO_DIR], problem, "Fashion-MNIST", INSTALL_HINT)


def read_idx(path: Path, expected_sha256: str | None = None) -> np.ndarray:
    """An IDX file (gzipped or not) as a uint8 array, or ``DataError`` naming the file and what is wrong."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise DataError(f"{path} is truncated or corrupt ({error}); {INSTALL_HINT}") from error
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic number); {INSTALL_HINT}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path} has a truncated IDX header; {INSTALL_HINT}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) - header != int(np.prod(shape)):
        raise DataError(
            f"{path} holds {len(raw) - header} data bytes, but its header announces shape {shape}; {INSTALL_HINT}"
        )
    if expected_sha256 is not None:
        digest = hashlib.sha256(raw).hexdigest()
        if digest != expected_sha256:
            raise DataError(
                f"{path} is not the Fashion-MNIST release (SHA-256 {digest} of its IDX bytes); {INSTALL_HINT}"
            )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_split(split: str = "train", folder: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, 28, 28) uint8, labels (n,) int64) of ``split`` ("train" or "test"), checksums verified.

    Read once per process and folder: a simulation builds the fleet for many virtual devices.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    return _load_split(split, (folder or locate_fashion_mnist_dir()).resolve())


@functools.lru_cache(maxsize=4)
def _load_split(split: str, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    arrays = []
    for kind in ("images", "labels"):
        stem, sha256 = IDX_FILES[f"{split}-{kind}"]
        path = folder / f"{stem}.gz"
        if not path.is_file():
            path = folder / stem
        if not path.is_file():
            raise DataError(f"{folder / f'{stem}.gz'} does not exist; {INSTALL_HINT}")
        arrays.append(read_idx(path, sha256))
    images, labels = arrays
    if images.shape[1:] != (SIDE, SIDE) or labels.shape != images.shape[:1]:
        raise DataError(
            f"{folder}: {split} images of shape {images.shape} do not match labels of shape "
            f"{labels.shape}; {INSTALL_HINT}"
        )
    return images, labels.astype(np.int64)


def dirichlet_partition(
    labels: np.ndarray,
    num_clients: int,
    seed: int,
    alpha: float = DIRICHLET_ALPHA,
    min_examples: int = MIN_EXAMPLES,
) -> list[np.ndarray]:
    """Indices of each client's examples: per class, Dirichlet(alpha) shares over the clients.

    NIID-Bench's procedure: a client that already holds its fair share (n / clients) takes no more of later
    classes, and the whole draw is repeated until every client has ``min_examples``. ``RandomState`` rather
    than ``Generator``: NumPy freezes its streams, so every device computes the same partition whatever its
    NumPy version.
    """
    total = len(labels)
    if num_clients * min_examples > total:
        raise ConfigError(
            "clients",
            num_clients,
            f"must be at most {total // min_examples} (each client needs {min_examples} of the {total} images)",
        )
    rng = np.random.RandomState([seed, 5150])
    classes = [np.flatnonzero(labels == k) for k in range(int(labels.max()) + 1)]
    for _ in range(MAX_PARTITION_TRIES):
        owned: list[list[int]] = [[] for _ in range(num_clients)]
        for members in classes:
            members = members.copy()
            rng.shuffle(members)
            shares = rng.dirichlet(np.full(num_clients, alpha))
            shares *= np.array([len(indices) < total / num_clients for indices in owned])
            cuts = (np.cumsum(shares / shares.sum()) * len(members)).astype(int)[:-1]
            for indices, part in zip(owned, np.split(members, cuts), strict=True):
                indices.extend(part.tolist())
        if min(len(indices) for indices in owned) >= min_examples:
            return [np.sort(np.asarray(indices, dtype=np.int64)) for indices in owned]
    raise ConfigError(
        "clients",
        num_clients,
        f"gave some client fewer than {min_examples} images in "
        f"{MAX_PARTITION_TRIES} Dirichlet({alpha}) draws; use fewer clients",
    )


def support_query_split(indices: np.ndarray, seed: int, client_id: int) -> tuple[np.ndarray, np.ndarray]:
    """A client's (support, query) index arrays: a random half (at most ``QUERY_CAP``) is the query pool."""
    order = np.random.RandomState([seed, client_id, 3]).permutation(len(indices))
    query_size = min(len(indices) // 2, QUERY_CAP)
    return np.sort(indices[order[query_size:]]), np.sort(indices[order[:query_size]])


class FashionMnistFleet(Fleet):
    """``clients`` devices (default 100) holding label-skewed shares of the 60,000 training images.

    Pixels are scaled to [0, 1] and standardized with the fixed constants PIXEL_MEAN and PIXEL_STD.
    Sampling is ``uniform``: an episode takes ``shots`` support and ``query_shots`` query images in all,
    labels kept, so the skew a client's episodes show is its own.
    """

    name = "fashion-mnist"
    input_shape = (1, SIDE, SIDE)
    num_classes = NUM_CLASSES
    sampling = "uniform"

    def __init__(self, num_clients: int = 100, seed: int = 0, folder: Path | None = None):
        self.images, self.labels = load_split("train", folder)
        self.seed = seed
        self.partition = dirichlet_partition(self.labels, num_clients, seed)

    @property
    def num_clients(self) -> int:
        return len(self.partition)

    def _batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = self.images[indices].astype(np.float32)[:, None] / 255.0
        standardized = (pixels - PIXEL_MEAN) / PIXEL_STD
        return torch.from_numpy(standardized), torch.from_numpy(self.labels[indices])

    def client(self, client_id: int) -> ClientData:
        self.check_client_id(client_id)
        support, query = support_query_split(self.partition[client_id], self.seed, client_id)
        data = ClientData(client_id, (Split(self._batch(support), self._batch(query)),), NUM_CLASSES, "uniform")
        data.validate(self.input_shape)
        return data
