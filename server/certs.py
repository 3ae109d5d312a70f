"""``metafleet certs``: the certificates and keys a deployed fleet needs, made with the ``cryptography`` package.

    metafleet certs --out certs --hosts server.example.org,10.0.0.5 --devices pi-kitchen,pi-garage

writes into ``certs/``:
- ``ca.pem`` / ``ca.key``: a certificate authority (the key stays on the machine that made it);
- ``server.pem`` / ``server.key``: the SuperLink's TLS certificate, signed by the CA, valid for every
  given host name and IP address (subject alternative names; localhost and 127.0.0.1 are always added);
- ``devices/NAME.key`` / ``devices/NAME.pub``: one key pair per device, the OpenSSH-format NIST P-384
  EC keys that Flower's SuperNode authentication accepts; the server registers the ``.pub`` files, each
  device keeps its ``.key``.

An existing key is never overwritten: run it again with more ``--devices`` to add devices, and the CA and
the server certificate stay as they are.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from metafleet.common.errors import MetafleetError

DEVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
VALID_DAYS = 825  # the longest validity that browsers' and most TLS stacks' policies still accept


def certs_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metafleet certs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("certs"), help="folder for the files (default certs/)")
    parser.add_argument("--hosts", default="", help="comma-separated DNS names and IP addresses of the server")
    parser.add_argument("--devices", default="", help="comma-separated device names: one key pair each")
    return parser


def certs_command(argv: list[str]) -> int:
    args = certs_parser().parse_args(argv)
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    for name in devices:
        if not DEVICE_NAME.match(name):
            raise MetafleetError(f"device name {name!r} must be letters, digits, '.', '_' or '-' (at most 63)")
    if len(set(devices)) != len(devices):
        raise MetafleetError("a device name is given twice")
    for line in make_certificates(args.out, hosts, devices):
        print(line)
    return 0


def make_certificates(out: Path, hosts: list[str], devices: list[str]) -> list[str]:
    """Create whatever is missing; returns one line per file, saying whether it was created or kept."""
    out.mkdir(parents=True, exist_ok=True)
    report = []
    ca_cert_file, ca_key_file = out / "ca.pem", out / "ca.key"
    if ca_key_file.exists() != ca_cert_file.exists():
        raise MetafleetError(f"{out} holds only one of ca.pem and ca.key; restore the other or move both away")
    if ca_key_file.exists():
        ca_key = serialization.load_pem_private_key(ca_key_file.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(ca_cert_file.read_bytes())
        report.append(f"kept    {ca_cert_file} (existing CA)")
    else:
        ca_key = ec.generate_private_key(ec.SECP384R1())
        ca_cert = _ca_certificate(ca_key)
        _write_private(ca_key_file, _pem_private(ca_key))
        ca_cert_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        report.append(f"created {ca_cert_file} and {ca_key_file} (keep ca.key off the devices)")

    server_cert_file, server_key_file = out / "server.pem", out / "server.key"
    if server_key_file.exists():
        report.append(f"kept    {server_cert_file} (existing server key; delete server.* to reissue)")
    else:
        server_key = ec.generate_private_key(ec.SECP384R1())
        server_cert = _server_certificate(server_key, ca_key, ca_cert, hosts)
        _write_private(server_key_file, _pem_private(server_key))
        server_cert_file.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
        names = ", ".join(sorted(set(hosts) | {"localhost", "127.0.0.1"}))
        report.append(f"created {server_cert_file} for {names}")

    device_dir = out / "devices"
    device_dir.mkdir(exist_ok=True)
    for name in devices:
        key_file, pub_file = device_dir / f"{name}.key", device_dir / f"{name}.pub"
        if key_file.exists():
            report.append(f"kept    {key_file} (existing device key)")
            continue
        key = ec.generate_private_key(ec.SECP384R1())
        _write_private(key_file, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
        pub_file.write_bytes(key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + f" {name}\n".encode())
        report.append(f"created {key_file} and {pub_file}")
    return report


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_private(path: Path, data: bytes) -> None:
    # Created readable by the owner only, and never over an existing file (O_EXCL).
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return builder.not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(
        now + datetime.timedelta(days=VALID_DAYS))


def _ca_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "metafleet CA")])
    builder = _validity(x509.CertificateBuilder().subject_name(name).issuer_name(name))
    return (
        builder.public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )


def _server_certificate(key, ca_key, ca_cert: x509.Certificate, hosts: list[str]) -> x509.Certificate:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([*hosts, "localhost", "127.0.0.1"]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    common_name = hosts[0] if hosts else "localhost"
    builder = _validity(x509.CertificateBuilder()
                        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
                        .issuer_name(ca_cert.subject))
    return (
        builder.public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
