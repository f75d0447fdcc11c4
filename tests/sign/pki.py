"""A test PKI for QEMU TLS migrations: per host a directory laid out like libvirt's
``migrate_tls_x509_cert_dir``: ``ca-cert.pem``, ``server-cert.pem``/``server-key.pem``,
``client-cert.pem``/``client-key.pem``."""
from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _usage(ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, key_cert_sign=ca, crl_sign=ca, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         encipher_only=False, decipher_only=False)


def make_pki(out: Path, *hosts: str) -> dict[str, Path]:
    """A fresh CA, and for each host a directory with the CA and that host's server and
    client certificates (named for the host, also valid for 127.0.0.1)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"test migration CA {out.name}")])

    def builder(name: x509.Name, pub: object) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(name).issuer_name(ca_name).public_key(pub)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=30)))

    ca = (builder(ca_name, ca_key.public_key())
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(_usage(True), critical=True).sign(ca_key, hashes.SHA256()))
    dirs = {}
    for host in hosts:
        d = out / host
        d.mkdir(parents=True, exist_ok=True)
        (d / "ca-cert.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        for role, eku in (("server", ExtendedKeyUsageOID.SERVER_AUTH), ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
            k = _key()
            cert = (builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]), k.public_key())
                    .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                    .add_extension(_usage(False), critical=True)
                    .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
                    .add_extension(x509.SubjectAlternativeName(
                        [x509.DNSName(host), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                        critical=False)
                    .sign(ca_key, hashes.SHA256()))
            (d / f"{role}-cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            keyfile = d / f"{role}-key.pem"
            keyfile.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
            keyfile.chmod(0o600)
        dirs[host] = d
    return dirs
