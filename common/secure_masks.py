"""SecAgg+ masks from a cryptographic stream keyed by the whole seed, in place of Flower 1.42's generator.

Flower 1.42's ``flwr.common.secure_aggregation.secaggplus_utils.pseudo_rand_gen`` XOR-folds each 32-byte seed
(a device's private mask seed, and every pairwise key from ECDH) to 32 bits and draws the mask from numpy's
Mersenne Twister: two seeds that fold alike give the same mask, and 2^32 seeds can be searched (Flower issue
#7522). ``pseudo_rand_gen`` here derives a 256-bit ChaCha20 key from the whole seed with HKDF-SHA256 and reads
the mask from ChaCha20's keystream (both from ``cryptography``; nothing cryptographic is written here), uniform
over ``[0, num_range)``: a power-of-two range takes the low bits of 32-bit words (no bias), any other range
rejects the words above the largest multiple of it.

Flower's device mod (``secaggplus_mod``) and server workflow (``secaggplus_workflow``) import the function by
name, so ``bind`` rebinds that name in each module (and, for the upload, the device's encoding of its
masked vector as 32-bit words and the server's widening of them back to int64): the device does it in
``metafleet.client.app``, the server in ``metafleet.server.secure``. ``bind`` refuses a module whose function
is not Flower 1.42's (a Flower that changed under metafleet, tests/test_secure_masks.py). Both sides name
``MASK_GENERATOR``: a device at discovery (the server refuses another) and the server in the protocol's
setup stage (``MASK_GENERATOR_KEY``; a device refuses another): masks from two generators would not cancel,
and the sum would be garbage.

The name is the protocol's version. v2 also shares each device's pairwise secret key as its raw 48-byte
P-384 scalar (``private_key_to_scalar_bytes``) where Flower shares its 306-byte PEM, and splits secrets
without a padding block: the same key and seed, but five 16-byte Shamir chunks a device instead of 23,
every round on every device and on the server for every dropout; and the server reconstructs each secret
from exactly the threshold's number of shares, as pycryptodome's ``Shamir.combine`` asks ("pass exactly as
many shares as they are required, and no more"), where Flower passes every share it received. Shares,
threshold, curve and stages are Flower's.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MASK_GENERATOR = "metafleet-secagg-v2 (HKDF-SHA256/ChaCha20 masks, raw-scalar key shares)"
MASK_GENERATOR_KEY = "metafleet-mask-generator"
FLOWER_GENERATOR = "Flower's own (numpy's Mersenne Twister seeded with 32 bits of the seed)"
FLOWER_MODULE = "flwr.common.secure_aggregation.secaggplus_utils"
_INFO = b"metafleet SecAgg+ mask v1"
_NONCE = bytes(16)  # one key per seed, used for one stream: a fixed nonce repeats nothing
_MAX_DRAWS = 64  # rejection rounds; each keeps more than half of the words, so 64 never run out in practice


def _stream(seed: bytes):  # noqa: ANN202 - cryptography's CipherContext
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(seed)
    return Cipher(algorithms.ChaCha20(key, _NONCE), mode=None).encryptor()


def _words(stream, count: int) -> np.ndarray:  # noqa: ANN001
    return np.frombuffer(stream.update(bytes(4 * count)), dtype="<u4")


def mask_values(seed: bytes, num_range: int, count: int) -> np.ndarray:
    """``count`` integers uniform over ``[0, num_range)`` from ``seed``'s stream (int64)."""
    if not 2 <= num_range <= 2**32:
        raise ValueError(f"num_range must be in [2, 2**32], got {num_range}")
    stream = _stream(seed)
    if num_range & (num_range - 1) == 0:
        return (_words(stream, count) & np.uint32(num_range - 1)).astype(np.int64)
    limit = (2**32 // num_range) * num_range  # words at or above it would favour the low residues
    kept: list[np.ndarray] = []
    missing = count
    for _ in range(_MAX_DRAWS):
        if missing <= 0:
            break
        words = _words(stream, missing + missing // 2 + 16)
        accepted = words[words < limit][:missing]
        kept.append(accepted)
        missing -= len(accepted)
    if missing > 0:
        raise RuntimeError("the mask stream ran out of accepted words")
    return (np.concatenate(kept) % np.uint32(num_range)).astype(np.int64) if kept else np.empty(0, np.int64)


def pseudo_rand_gen(seed: bytes, num_range: int, dimensions_list: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """Flower's ``pseudo_rand_gen`` contract (one int64 array a shape, values in ``[0, num_range)``), from a
    stream keyed by the whole seed."""
    sizes = [int(np.prod(shape, dtype=np.int64)) for shape in dimensions_list]
    values = mask_values(bytes(seed), num_range, sum(sizes))
    output, start = [], 0
    for shape, size in zip(dimensions_list, sizes, strict=True):
        output.append(values[start:start + size].reshape(shape))
        start += size
    return output


def narrow_masked_words(array: np.ndarray) -> bytes:
    """Flower's ``ndarray_to_bytes`` for the device's masked vector, as 32-bit words where they fit: the
    values lie in [0, modulus) and the modulus is at most 2^32, so int64 doubled every upload."""
    if array.dtype == np.int64 and array.size and 0 <= int(array.min()) and int(array.max()) < 2**32:
        array = array.astype("<u4")
    return _FLOWERS["ndarray_to_bytes"](array)


def widen_masked_words(data: bytes) -> np.ndarray:
    """Flower's ``bytes_to_ndarray`` for the server's sum of masked vectors: 32-bit words back to int64, so
    that adding many of them cannot overflow (any modulus, not only 2^32, then stays exact)."""
    array = _FLOWERS["bytes_to_ndarray"](data)
    return array.astype(np.int64) if array.dtype == np.uint32 else array


def create_shares_serially(secret: bytes, threshold: int, num: int) -> list[bytes]:
    """Flower's ``create_shares`` (pycryptodome's Shamir splits, Flower's share format: a 4-byte index, then a
    16-byte share per chunk) without the thread pool Flower starts for every call, and without the padding
    block: both secrets SecAgg+ shares (the 32-byte mask seed, the 48-byte key scalar) fill whole chunks, and
    PKCS#7 padding added a fourth of the Shamir work. Any other length is refused."""
    from Crypto.Protocol.SecretSharing import Shamir

    if not secret or len(secret) % 16:
        raise ValueError(f"metafleet's SecAgg+ shares whole 16-byte chunks; got a {len(secret)}-byte secret")
    shares = [bytearray(index.to_bytes(4, "little", signed=False)) for index in range(1, num + 1)]
    for start in range(0, len(secret), 16):
        for index, share in Shamir.split(threshold, num, secret[start:start + 16], ssss=False):
            shares[index - 1] += share
    return [bytes(share) for share in shares]


_RECONSTRUCTION_THRESHOLD: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "metafleet_reconstruction_threshold", default=None)


@contextlib.contextmanager
def reconstruction_threshold(threshold: int) -> Iterator[None]:
    """While the server's SecAgg+ workflow runs, reconstruct every secret from ``threshold`` shares (the
    workflow itself refuses fewer): Lagrange interpolation's cost grows with the number of shares passed."""
    token = _RECONSTRUCTION_THRESHOLD.set(threshold)
    try:
        yield
    finally:
        _RECONSTRUCTION_THRESHOLD.reset(token)


def combine_shares_serially(share_list: list[bytes]) -> bytes:
    """Flower's ``combine_shares`` without its thread pool (the server calls it for every device a round),
    from the threshold's number of shares where the server set it (``reconstruction_threshold``)."""
    from Crypto.Protocol.SecretSharing import Shamir

    threshold = _RECONSTRUCTION_THRESHOLD.get()
    if threshold is not None:
        share_list = share_list[:threshold]
    lengths = {len(share) for share in share_list}
    if len(lengths) != 1 or (length := lengths.pop()) < 20 or (length - 4) % 16:
        raise ValueError("Failed to combine shares: they are not whole 16-byte chunks of one secret")
    indexed = [(int.from_bytes(share[:4], "little", signed=False), share) for share in share_list]
    return b"".join(
        Shamir.combine([(index, share[4 + 16 * chunk:20 + 16 * chunk]) for index, share in indexed], ssss=False)
        for chunk in range((length - 4) >> 4))


_CURVE = ec.SECP384R1()  # Flower 1.42's generate_key_pairs (pinned in tests/test_secure_masks.py)
_SCALAR_BYTES = (_CURVE.key_size + 7) // 8
_PEM_START = b"-----BEGIN"


def private_key_to_scalar_bytes(private_key: ec.EllipticCurvePrivateKey) -> bytes:
    """The device's secret keys as their raw scalar (48 bytes on P-384), not Flower's PEM (306 bytes): the
    pairwise key is Shamir-shared every round, and its size sets the number of shared chunks."""
    if private_key.curve.name != _CURVE.name:
        raise ValueError(f"SecAgg+ keys are expected on {_CURVE.name}, got {private_key.curve.name}")
    return private_key.private_numbers().private_value.to_bytes(_SCALAR_BYTES, "big")


@functools.lru_cache(maxsize=32)
def _cached_private_key(private_key_bytes: bytes) -> Any:
    if private_key_bytes.startswith(_PEM_START):
        return _FLOWERS["bytes_to_private_key"](private_key_bytes)
    if len(private_key_bytes) != _SCALAR_BYTES:
        raise ValueError(f"a SecAgg+ secret key is {_SCALAR_BYTES} bytes, got {len(private_key_bytes)}")
    return ec.derive_private_key(int.from_bytes(private_key_bytes, "big"), _CURVE)


def bytes_to_private_key_once(private_key_bytes: bytes) -> Any:
    """Flower's ``bytes_to_private_key`` for both encodings (a raw scalar, Flower's PEM), parsed once per key:
    SecAgg+ parses a device's own secret key again for every neighbour (PEM parsing was a tenth of a round)."""
    return _cached_private_key(bytes(private_key_bytes))


# Flower's own functions, kept by bind for the replacements that wrap them (common never imports flwr).
_FLOWERS: dict[str, Callable[..., Any]] = {}
_REPLACEMENTS = {
    "pseudo_rand_gen": (pseudo_rand_gen, FLOWER_MODULE, ["seed", "num_range", "dimensions_list"]),
    "ndarray_to_bytes": (narrow_masked_words, "flwr.compat.common.parameter", ["ndarray"]),
    "bytes_to_ndarray": (widen_masked_words, "flwr.compat.common.parameter", ["tensor"]),
    "create_shares": (create_shares_serially, "flwr.common.secure_aggregation.crypto.shamir",
                      ["secret", "threshold", "num"]),
    "combine_shares": (combine_shares_serially, "flwr.common.secure_aggregation.crypto.shamir", ["share_list"]),
    "bytes_to_private_key": (bytes_to_private_key_once, "flwr.supercore.primitives.asymmetric",
                             ["private_key_bytes"]),
    "private_key_to_bytes": (private_key_to_scalar_bytes, "flwr.supercore.primitives.asymmetric",
                             ["private_key"]),
}


def bind(module: ModuleType, names: Sequence[str] = ("pseudo_rand_gen",)) -> None:
    """Make ``module`` (Flower's secaggplus_mod or secaggplus_workflow) call metafleet's versions of
    ``names``: the mask generator, and the masked vector's 32-bit encoding (device) and decoding (server)."""
    for name in names:
        replacement, flower_module, parameters = _REPLACEMENTS[name]
        current = getattr(module, name, None)
        if current is replacement:
            continue
        found = list(inspect.signature(current).parameters) if callable(current) else []
        if getattr(current, "__module__", None) != flower_module or found != parameters:
            raise RuntimeError(
                f"{module.__name__}.{name} is not Flower 1.42's ({current!r}); metafleet cannot replace it safely "
                "on this Flower version (pin flwr==1.42.*)")
        _FLOWERS[name] = current
        setattr(module, name, replacement)
