import shutil
import zipfile

import numpy as np
import pytest
import torch

from metafleet.common.config import RunConfig
from metafleet.common.errors import ConfigError, DataError
from metafleet.common.task import load_task
from metafleet.common.tasks import omniglot
from metafleet.common.tasks.omniglot import ALPHABETS, ENV_VAR, ZIP_NAMES, OmniglotFleet, load_alphabet

CHARACTERS = {
    "Balinese": 24, "Early_Aramaic": 22, "Greek": 24, "Japanese_(katakana)": 47,
    "Korean": 40, "Latin": 26, "Sanskrit": 42, "Tagalog": 17,
}


@pytest.fixture(scope="module")
def fleet():
    return OmniglotFleet()


def _copy_data(tmp_path, replace=None, truncate=None):
    """A copy of the data folder; ``replace`` maps (zip name, member) to new bytes, ``truncate`` a zip name."""
    target = tmp_path / "omniglot"
    target.mkdir()
    for name in ZIP_NAMES:
        source = omniglot.REPO_DATA_DIR / name
        changes = {member: data for (zip_name, member), data in (replace or {}).items() if zip_name == name}
        if name == truncate:
            (target / name).write_bytes(source.read_bytes()[: source.stat().st_size // 2])
        elif changes:
            with zipfile.ZipFile(source) as src, zipfile.ZipFile(target / name, "w") as dst:
                for info in src.infolist():
                    dst.writestr(info, changes.get(info.filename, src.read(info.filename)))
        else:
            shutil.copy(source, target / name)
    return target


def test_clients_are_the_eight_alphabets_in_alphabetical_order(fleet):
    assert fleet.num_clients == 8
    assert list(ALPHABETS) == sorted(CHARACTERS)
    assert [fleet.alphabet(i) for i in range(8)] == list(ALPHABETS)
    for client_id, alphabet in enumerate(ALPHABETS):
        client = fleet.client(client_id)
        assert client.num_classes == CHARACTERS[alphabet]
        assert all(len(split.support[0]) == len(split.query[0]) == 10 * client.num_classes for split in client.splits)
    with pytest.raises(DataError, match="clients 0..7"):
        fleet.client(8)


def test_greek_and_latin_are_identical_in_both_zips_and_kept_once(fleet):
    zips = [zipfile.ZipFile(omniglot.REPO_DATA_DIR / name) for name in ZIP_NAMES]
    for alphabet in ("Greek", "Latin"):
        contents = [
            {n.split("/", 1)[1]: z.read(n) for n in z.namelist() if n.split("/")[1] == alphabet and n.endswith(".png")}
            for z in zips
        ]
        assert len(contents[0]) == 20 * CHARACTERS[alphabet] and contents[0] == contents[1]
    total = sum(len(load_alphabet(fleet.root, a)[0]) for a in ALPHABETS)
    assert total == 20 * sum(CHARACTERS.values()) == 4840


def test_a_duplicate_alphabet_that_differs_between_the_zips_is_an_error(tmp_path):
    with zipfile.ZipFile(omniglot.REPO_DATA_DIR / ZIP_NAMES[1]) as archive:
        member = next(n for n in archive.namelist() if "/Greek/" in n and n.endswith(".png"))
        other = next(n for n in archive.namelist() if "/Latin/" in n and n.endswith(".png"))
        replacement = archive.read(other)
    root = _copy_data(tmp_path, replace={(ZIP_NAMES[1], member): replacement})
    with pytest.raises(DataError, match="alphabet Greek differs"):
        OmniglotFleet(root=root)


def test_support_and_query_never_share_a_drawing(fleet):
    for client_id in range(fleet.num_clients):
        images, labels, drawers = load_alphabet(fleet.root, ALPHABETS[client_id])
        client = fleet.client(client_id)
        first, second = client.splits
        torch.testing.assert_close(first.support[0], images[torch.from_numpy(drawers <= 10)])
        torch.testing.assert_close(first.query[0], images[torch.from_numpy(drawers > 10)])
        assert first.support[0] is second.query[0] and first.query[0] is second.support[0]
        # Independently of drawer numbers: no image of a support pool occurs in its query pool.
        support = {x.numpy().tobytes() for x in first.support[0]}
        assert not support & {x.numpy().tobytes() for x in first.query[0]}
        # 10 drawings of every character in each pool.
        assert (np.bincount(first.support[1].numpy()) == 10).all()
        assert (np.bincount(first.query[1].numpy()) == 10).all()


@pytest.mark.parametrize(("client_id", "ways"), [(7, 5), (3, 20)])
def test_episode_shapes(fleet, client_id, ways):
    client = fleet.client(client_id)
    rng = np.random.default_rng(0)
    episode = client.sample_episode(rng, shots=1, query_shots=5, ways=ways)
    assert episode.support[0].shape == (ways, 1, 28, 28) and episode.support[0].dtype == torch.float32
    assert sorted(episode.support[1].tolist()) == list(range(ways))
    assert episode.query[0].shape == (5 * ways, 1, 28, 28)
    assert (np.bincount(episode.query[1].numpy(), minlength=ways) == 5).all()
    support = {x.numpy().tobytes() for x in episode.support[0]}
    assert not support & {x.numpy().tobytes() for x in episode.query[0]}
    evaluation = client.evaluation_episodes(shots=1, seed=0, ways=ways)
    assert len(evaluation) == 2
    assert all(e.support[0].shape[0] == ways and e.query[0].shape[0] == 10 * ways for e in evaluation)
    logits = omniglot.make_model(ways)(episode.query[0])
    assert logits.shape == (5 * ways, ways)


def test_pixels_are_ink_one_on_background_zero(fleet):
    images, _, _ = load_alphabet(fleet.root, "Latin")
    assert images.dtype == torch.float32 and images.shape == (520, 1, 28, 28)
    assert images.min() == 0.0 and images.max() == 1.0
    # Strokes are thin: mostly background, and glyphs are centred, so the border holds far less ink.
    assert 0.02 < images.mean() < 0.2
    assert images[:, :, 0, :].mean() < images.mean() / 5
    # Antialiased: grey levels exist, not only 0 and 1.
    assert ((images > 0.1) & (images < 0.9)).float().mean() > 0.01


def test_build_checks_clients_and_ways():
    config = RunConfig.resolve(dataset="omniglot", clients=8, held_out_clients=2, ways=5, train_ways=0)
    fleet = omniglot.make_fleet(config, [0, 1])
    assert fleet.num_clients == 8 and fleet.held_out == [0, 1]
    with pytest.raises(ConfigError, match="'clients'.*must be 8"):
        omniglot.make_fleet(config.replace(clients=9), [0, 1])
    for ways in (0, 48):
        with pytest.raises(ConfigError, match="'ways'"):
            omniglot.make_fleet(config.replace(ways=ways), [0, 1])
    with pytest.raises(ConfigError, match="'train_ways'.*at most 47"):
        omniglot.make_fleet(config.replace(train_ways=48), [0, 1])


def test_twenty_way_on_an_alphabet_of_seventeen_uses_all_its_characters(fleet):
    episode = fleet.client(7).sample_episode(np.random.default_rng(0), shots=1, query_shots=2, ways=20)
    assert sorted(episode.support[1].tolist()) == list(range(17))


def test_a_truncated_zip_is_a_data_error_naming_it(tmp_path, monkeypatch):
    root = _copy_data(tmp_path, truncate=ZIP_NAMES[0])
    monkeypatch.setenv(ENV_VAR, str(root))
    with pytest.raises(DataError, match=f"{ZIP_NAMES[0]} is not a readable zip"):
        OmniglotFleet()


def test_a_missing_zip_is_a_data_error_naming_it(tmp_path):
    root = _copy_data(tmp_path)
    (root / ZIP_NAMES[1]).unlink()
    with pytest.raises(DataError, match=f"{ZIP_NAMES[1]} is missing"):
        OmniglotFleet(root=root)


def test_an_unreadable_png_is_a_data_error_naming_it(tmp_path):
    with zipfile.ZipFile(omniglot.REPO_DATA_DIR / ZIP_NAMES[0]) as archive:
        member = next(n for n in archive.namelist() if "/Balinese/" in n and n.endswith(".png"))
    root = _copy_data(tmp_path, replace={(ZIP_NAMES[0], member): b"not a png"})
    fleet = OmniglotFleet(root=root)
    fleet.client(1)  # other alphabets still load: decoding is per alphabet
    with pytest.raises(DataError, match=f"{ZIP_NAMES[0]}: {member} could not be read as a PNG"):
        fleet.client(0)


def test_a_missing_folder_is_a_data_error_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "absent"))
    with pytest.raises(DataError, match=f"{ENV_VAR}=.*absent is not a folder.*set {ENV_VAR}"):
        OmniglotFleet()
    monkeypatch.delenv(ENV_VAR)
    monkeypatch.setattr(omniglot, "REPO_DATA_DIR", tmp_path / "no-repo-data")
    expected = f"found no Omniglot data \\({ENV_VAR} is not set; looked in .*no-repo-data\\).*git checkout"
    with pytest.raises(DataError, match=expected):
        OmniglotFleet()


def test_a_run_rotates_training_alphabets_into_new_characters_and_leaves_held_out_ones_as_drawn():
    config = RunConfig.resolve(dataset="omniglot")
    fleet = omniglot.make_fleet(config, [2, 7])
    plain = OmniglotFleet().client(0)
    training, held_out = fleet.client(0), fleet.client(2)
    assert training.num_classes == 4 * plain.num_classes == 96
    assert held_out.num_classes == OmniglotFleet().client(2).num_classes == 24
    (x, y), (x0, y0) = training.splits[0].support, plain.splits[0].support
    for quarter_turns in range(4):
        rotated = y == y0[0] + quarter_turns * plain.num_classes
        assert torch.equal(x[rotated][0], torch.rot90(x0[0], quarter_turns, dims=(1, 2)))
    # Support and query still come from different drawers after rotation: no drawing in both.
    support = {row.numpy().tobytes() for row in x}
    assert not support & {row.numpy().tobytes() for row in training.splits[0].query[0]}
    assert config.training_shots == 5 and config.shots == 1


def test_training_episodes_take_train_shots_and_evaluation_takes_shots():
    from metafleet.common.fleets import functional_model
    from metafleet.common.training import client_train

    config = RunConfig.resolve(dataset="omniglot", algorithm="reptile", inner_steps=1)
    fleet = omniglot.make_fleet(config, [2, 7])
    fmodel = functional_model(config)
    update = client_train(fmodel, fmodel.init_params(), fleet.client(0), config, np.random.default_rng(0))
    # Prototype heads train on 20-way episodes (train_ways) of 5 drawings (train_shots) and 5 queries each.
    assert update.num_examples == (5 + 5) * 20 == load_task("omniglot").episode_examples(config)
    evaluation = fleet.client(2).evaluation_episodes(config.shots, config.seed, config.ways, per_split=1)
    assert all(len(episode.support[1]) == 5 for episode in evaluation)  # 1 shot of 5 ways
