import gzip
import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from metafleet.common.config import RunConfig
from metafleet.common.errors import ConfigError, DataError
from metafleet.common.fleets import split_clients
from metafleet.common.tasks import fashion_mnist
from metafleet.common.tasks.fashion_mnist import (
    FashionMnistFleet,
    dirichlet_partition,
    load_split,
    locate_fashion_mnist_dir,
    support_query_split,
)
from metafleet.common.tasks.models import count_parameters

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fetch-fashion-mnist"


@pytest.fixture(scope="module")
def train_labels():
    # No skip when the data is absent: CI runs scripts/fetch-fashion-mnist first, so a DataError here is a
    # real failure, and its message says how to fetch the data.
    return load_split("train")[1]


def test_the_fetched_files_are_the_release_the_script_and_loader_pin():
    folder = locate_fashion_mnist_dir()
    images, labels = load_split("train")
    test_images, test_labels = load_split("test")
    assert images.shape == (60000, 28, 28) and test_images.shape == (10000, 28, 28)
    assert np.bincount(labels).tolist() == [6000] * 10 and np.bincount(test_labels).tolist() == [1000] * 10
    assert os.access(SCRIPT, os.X_OK)
    pinned = {name: sha256 for sha256, name in re.findall(r"([0-9a-f]{64})  ([\w.-]+)", SCRIPT.read_text())}
    assert len(pinned) == 4
    for name, sha256 in pinned.items():
        if (folder / name).is_file():  # an unpacked copy is checked by the loader alone
            assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == sha256, name


def test_partition_deals_every_image_at_most_once_with_label_skew(train_labels):
    partition = dirichlet_partition(train_labels, 100, seed=0)
    assert len(partition) == 100
    dealt = np.concatenate(partition)
    assert len(dealt) == len(np.unique(dealt)) == len(train_labels)
    assert min(len(indices) for indices in partition) >= fashion_mnist.MIN_EXAMPLES
    top_share = [np.bincount(train_labels[i], minlength=10).max() / len(i) for i in partition]
    assert np.mean(top_share) > 0.35  # an IID split gives about 0.1 + noise
    classes_held = [np.count_nonzero(np.bincount(train_labels[i], minlength=10) >= 5) for i in partition]
    assert np.mean(classes_held) < 8


def test_partition_is_determined_by_the_seed(train_labels):
    first = dirichlet_partition(train_labels, 100, seed=3)
    again = dirichlet_partition(train_labels, 100, seed=3)
    other = dirichlet_partition(train_labels, 100, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_too_many_clients_for_the_minimum_is_a_config_error(train_labels):
    with pytest.raises(ConfigError, match="clients.*at most 1500"):
        dirichlet_partition(train_labels, 1501, seed=0)


def test_support_and_query_pools_are_disjoint_and_capped(train_labels):
    partition = dirichlet_partition(train_labels, 100, seed=0)
    for client_id, indices in enumerate(partition):
        support, query = support_query_split(indices, 0, client_id)
        assert not set(support.tolist()) & set(query.tolist())
        assert sorted(support.tolist() + query.tolist()) == indices.tolist()
        assert 20 <= len(query) <= fashion_mnist.QUERY_CAP and len(support) >= len(query)


def test_fleet_clients_are_standardized_uniform_and_label_skewed():
    config = RunConfig.resolve(dataset="fashion-mnist", clients=100, held_out_clients=10)
    fleet = fashion_mnist.make_fleet(config, split_clients(config)[1])
    assert fleet.num_clients == 100
    client = fleet.client(7)
    assert client.sampling == "uniform" and client.num_classes == 10 and len(client.splits) == 1
    (xs, ys), (xq, yq) = client.splits[0].support, client.splits[0].query
    assert xs.shape[1:] == (1, 28, 28) and xs.dtype == torch.float32 and ys.dtype == torch.int64
    mean, std = fashion_mnist.PIXEL_MEAN, fashion_mnist.PIXEL_STD
    assert xs.min() >= -mean / std - 1e-5 and xs.max() <= (1 - mean) / std + 1e-5 and xs.max() > 1.5
    # Both pools follow the client's own label mix, which is what personalization has to pick up.
    assert np.bincount(ys, minlength=10).argmax() == np.bincount(yq, minlength=10).argmax()
    assert np.bincount(yq, minlength=10).max() / len(yq) > 0.3
    episode = client.sample_episode(np.random.default_rng(0), 20, 15)
    assert len(episode.support[1]) == 20 and len(episode.query[1]) == 15
    torch.testing.assert_close(FashionMnistFleet(100, seed=0).client(7).splits[0].query[0], xq)
    assert fashion_mnist.make_model(5)(xq[:2]).shape == (2, 10)


def test_the_model_has_the_parameter_count_its_docstring_states():
    stated = re.search(r"([\d,]+) parameters", fashion_mnist.make_model.__doc__).group(1)
    assert count_parameters(fashion_mnist.make_model()) == int(stated.replace(",", ""))


def test_ways_other_than_all_classes_is_refused():
    with pytest.raises(ConfigError, match="ways"):
        fashion_mnist.make_fleet(RunConfig.resolve(dataset="fashion-mnist", ways=5), [])


def _copy_of_the_test_split(tmp_path: Path) -> Path:
    source = locate_fashion_mnist_dir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / name).write_bytes(
            (source / name).read_bytes()
            if (source / name).is_file()
            else gzip.compress((source / name[:-3]).read_bytes(), compresslevel=1)
        )
    return tmp_path


def test_a_truncated_file_is_named(tmp_path):
    folder = _copy_of_the_test_split(tmp_path)
    path = folder / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:100_000])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz is truncated or corrupt.*fetch-fashion-mnist"):
        load_split("test", folder)


def test_altered_images_fail_the_checksum_and_are_named(tmp_path):
    folder = _copy_of_the_test_split(tmp_path)
    path = folder / "t10k-images-idx3-ubyte.gz"
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[5000] ^= 0xFF
    path.write_bytes(gzip.compress(bytes(raw), compresslevel=1))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz is not the Fashion-MNIST release"):
        load_split("test", folder)


def test_a_header_that_disagrees_with_the_size_is_named(tmp_path):
    folder = _copy_of_the_test_split(tmp_path)
    path = folder / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-10]))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz holds 9990 data bytes.*\(10000,\)"):
        load_split("test", folder)


def test_a_missing_folder_names_the_files_and_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("METAFLEET_FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"METAFLEET_FASHION_MNIST_DIR=.*nowhere lacks train-images-idx3-ubyte\.gz"):
        locate_fashion_mnist_dir()
    monkeypatch.delenv("METAFLEET_FASHION_MNIST_DIR")
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", tmp_path / "system")
    monkeypatch.setattr(fashion_mnist, "REPO_DIR", tmp_path / "repo")
    expected = r"found no Fashion-MNIST.*fetch-fashion-mnist.*apt install dataset-fashion-mnist"
    with pytest.raises(DataError, match=expected):
        FashionMnistFleet(10)
