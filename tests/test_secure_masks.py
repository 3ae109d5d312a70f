"""SecAgg+ masks from metafleet's cryptographic generator on both sides, and the two sides agreeing on it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation import secaggplus_utils
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

import metafleet.server.secure  # noqa: F401 - binds the server's generator
from metafleet.client import app as client_module
from metafleet.common.secure_masks import MASK_GENERATOR, bind, mask_values, pseudo_rand_gen
from tests.test_secure_aggregation import CONFIG, Fleet

SHAPES = [(64, 3), (), (5,)]


def _folding_alike() -> tuple[bytes, bytes]:
    """Two different 32-byte seeds whose 4-byte words XOR to the same 32 bits (what Flower folds them to)."""
    first = bytes(np.random.default_rng(7).integers(0, 256, 32, dtype=np.uint8))
    flip = bytes([0x5A, 0x11, 0xC3, 0x2E])
    second = bytes(a ^ b for a, b in zip(first[:4], flip, strict=True)) + bytes(
        a ^ b for a, b in zip(first[4:8], flip, strict=True)) + first[8:]
    return first, second


def test_seeds_that_fold_alike_give_unrelated_masks_on_the_device_and_on_the_server():
    import sys

    # The modules (the package re-exports a function under the device module's name).
    secaggplus_mod = sys.modules["flwr.client.mod.secure_aggregation.secaggplus_mod"]
    secaggplus_workflow = sys.modules["flwr.server.workflow.secure_aggregation.secaggplus_workflow"]

    first, second = _folding_alike()
    assert first != second
    flower = [secaggplus_utils.pseudo_rand_gen(seed, 2**32, SHAPES) for seed in (first, second)]
    assert all(np.array_equal(a, b) for a, b in zip(*flower, strict=True)), "Flower's fold: identical masks"
    for side in (secaggplus_mod, secaggplus_workflow):
        assert side.pseudo_rand_gen is pseudo_rand_gen
        masks = [side.pseudo_rand_gen(seed, 2**32, SHAPES) for seed in (first, second)]
        a, b = (np.concatenate([m.ravel() for m in mask]) for mask in masks)
        assert (a == b).mean() < 0.01 and abs(np.corrcoef(a.astype(float), b.astype(float))[0, 1]) < 0.2
        assert [m.shape for m in masks[0]] == SHAPES and all(m.dtype == np.int64 for m in masks[0])
    # The same seed gives the same mask on both sides: what makes them cancel.
    assert all(np.array_equal(x, y) for x, y in zip(pseudo_rand_gen(first, 2**32, SHAPES),
                                                    secaggplus_workflow.pseudo_rand_gen(first, 2**32, SHAPES),
                                                    strict=True))


@pytest.mark.parametrize("num_range", [2**32, 2**22, 1000, 3])
def test_a_mask_stream_is_uniform_over_its_range(num_range):
    values = mask_values(b"metafleet-uniformity-check-seed!", num_range, 200_000)
    assert values.min() >= 0 and values.max() < num_range
    bins = min(num_range, 16)
    counts = np.bincount((values * bins // num_range).astype(np.int64), minlength=bins)
    expected = len(values) / bins
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 2 * bins + 30, (chi2, counts)  # far above the 99.9 % quantile of chi2(bins - 1) would fail
    assert abs(values.mean() / (num_range - 1) - 0.5) < 0.01


def test_bind_refuses_a_flower_whose_generator_changed():
    import inspect
    import types

    # Pinned: what the replacement stands in for (fails when Flower changes the function under it).
    assert list(inspect.signature(secaggplus_utils.pseudo_rand_gen).parameters) == ["seed", "num_range",
                                                                                      "dimensions_list"]
    changed = types.ModuleType("flwr_like")
    changed.pseudo_rand_gen = lambda seed, num_range, dimensions_list, extra=0: []
    with pytest.raises(RuntimeError, match="pseudo_rand_gen is not Flower 1.42's"):
        bind(changed)


def test_a_device_refuses_a_server_with_another_mask_generator():
    fleet = Fleet()
    node = next(iter(fleet.grid.contexts))
    setup = ConfigRecord({Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 5, Key.SHARE_NUMBER: 5, Key.THRESHOLD: 3,
                          Key.CLIPPING_RANGE: 8.0, Key.TARGET_RANGE: 2**22, Key.MOD_RANGE: 2**32})
    message = Message(RecordDict({RECORD_KEY_CONFIGS: setup}), node, "train")
    (reply,) = fleet.grid.send_and_receive([message])
    assert reply.has_error()
    assert "the server's SecAgg+ masks come from Flower's own" in reply.error.reason
    assert MASK_GENERATOR in reply.error.reason


def test_the_server_refuses_a_device_with_another_mask_generator_at_discovery_and_trains_with_the_others(tmp_path):
    from metafleet.common.fleets import split_clients
    from metafleet.server.app import run_meta_training
    from metafleet.simulations.inprocess import InProcessGrid, device_contexts

    refused = 1000 + split_clients(CONFIG)[0][0]  # a training device (node 1000 + client id)

    def flower_device_mod(msg, context, call_next):
        reply = call_next(msg, context)
        if context.node_id == refused and msg.metadata.message_type == "query" and not reply.has_error():
            del reply.content.config_records["info"]["mask-generator"]  # as a device without metafleet's masks
        return reply

    app = ClientApp(mods=[flower_device_mod, client_module.secure_aggregation_mod])
    app.query()(client_module.query)
    app.train()(client_module.train)
    app.evaluate()(client_module.evaluate)
    config = CONFIG.replace(clients_per_round=4, rounds=2, eval_every=2)
    grid = InProcessGrid(app, device_contexts(config.to_run_config(), range(config.clients)))
    summary = run_meta_training(grid, {**config.to_run_config(), "out-dir": str(tmp_path / "run")})
    assert summary["rounds_completed"] == 2 and summary["rounds_skipped"] == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["accepted"] for row in rows if row["phase"] == "train"] == [4, 4]
    trained = {reply.metadata.src_node_id for reply in grid.replies if reply.metadata.message_type == "train"}
    assert refused not in trained and len(trained) >= 4


def test_masked_vectors_travel_as_32_bit_words_and_the_sum_stays_exact():
    from flwr.common import bytes_to_ndarray

    from metafleet.common.training import weighted_mean
    from tests.test_secure_aggregation import STEP, _flat

    fleet = Fleet()
    theta = fleet.run_round()
    words = [bytes_to_ndarray(item) for reply in fleet.grid.replies
             for record in reply.content.config_records.values() for value in record.values()
             for item in (value if isinstance(value, list) else [value])
             if isinstance(item, bytes) and item[:6] == b"\x93NUMPY"]
    assert words and all(array.dtype == np.uint32 for array in words)
    (mean, _), = fleet.received
    expected = weighted_mean(list(fleet.plaintext_updates(1, theta).values()), [1.0] * 5)
    assert (_flat(mean) - _flat(expected)).abs().max().item() < STEP


def test_shares_keep_flowers_format_without_the_padding_block_and_any_threshold_of_them_recovers_the_secret():
    import os

    from flwr.common.secure_aggregation.crypto import shamir

    from metafleet.common.secure_masks import combine_shares_serially, create_shares_serially

    for secret in (os.urandom(32), os.urandom(48)):  # the mask seed, a P-384 key scalar
        ours, flowers = create_shares_serially(secret, 3, 5), shamir.create_shares(secret, 3, 5)
        assert [share[:4] for share in ours] == [share[:4] for share in flowers]  # the same indices
        assert [len(share) for share in ours] == [4 + len(secret)] * 5  # Flower's pad added a whole chunk
        assert [len(share) for share in flowers] == [4 + len(secret) + 16] * 5
        assert combine_shares_serially(ours[1:4]) == secret == combine_shares_serially([ours[4], ours[0], ours[2]])
    with pytest.raises(ValueError, match="whole 16-byte chunks"):
        create_shares_serially(b"not a multiple of sixteen", 3, 5)
    with pytest.raises(ValueError, match="Failed to combine shares"):
        combine_shares_serially([ours[0], ours[1][:-1], ours[2]])


def test_the_server_reconstructs_from_exactly_the_threshold_of_shares():
    import os

    from metafleet.common.secure_masks import combine_shares_serially, create_shares_serially, reconstruction_threshold

    secret = os.urandom(32)
    shares = create_shares_serially(secret, 3, 6)
    # A sixth share that does not lie on the polynomial: interpolating through every share, as Flower's
    # combine does, gives garbage; the threshold's first three alone give the secret (and cost less).
    shares[5] = shares[5][:4] + bytes(32)
    assert combine_shares_serially(shares) != secret
    with reconstruction_threshold(3):
        assert combine_shares_serially(shares) == secret
    assert combine_shares_serially(shares) != secret  # the setting ends with the block


def test_secret_keys_are_shared_as_their_raw_scalar_and_read_back_in_either_encoding():
    import sys

    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.supercore.primitives import asymmetric

    from metafleet.common.secure_masks import bytes_to_private_key_once, private_key_to_scalar_bytes

    secaggplus_mod = sys.modules["flwr.client.mod.secure_aggregation.secaggplus_mod"]
    assert secaggplus_mod.private_key_to_bytes is private_key_to_scalar_bytes
    # Pinned: the curve Flower's SecAgg+ draws its keys on (the scalar's length depends on it).
    private_key, _ = asymmetric.generate_key_pairs()
    assert private_key.curve.name == "secp384r1"
    raw = private_key_to_scalar_bytes(private_key)
    assert len(raw) == 48
    value = private_key.private_numbers().private_value
    assert bytes_to_private_key_once(raw).private_numbers().private_value == value
    pem = asymmetric.private_key_to_bytes(private_key)
    assert len(pem) > 300 and bytes_to_private_key_once(pem).private_numbers().private_value == value
    with pytest.raises(ValueError, match="48 bytes"):
        bytes_to_private_key_once(raw[:-1])
    with pytest.raises(ValueError, match="secp384r1"):
        private_key_to_scalar_bytes(ec.generate_private_key(ec.SECP256R1()))
