"""Throwaway TLS certificates and SuperNode keys for a loopback deployment (``cryptography``, no openssl CLI).

What a Flower deployment needs, written as files into one folder:
  - ``ca.crt``: a self-signed CA; the SuperLink gets it as ``--ssl-ca-certfile``, the SuperNodes
    and the ``flwr`` CLI as their root certificate;
  - ``server.pem`` / ``server.key``: the SuperLink's certificate, signed by the CA, valid for
    ``localhost`` and ``127.0.0.1``;
  - ``node-<k>.key`` / ``node-<k>.pub``: one NIST P-384 key pair per SuperNode in OpenSSH format
    (what ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register`` read).
These are for tests and demonstrations on one machine: they live one day and are never committed.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedsp.errors import FedSPError

LOOPBACK_NAMES = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class Certificates:
    """Paths of the TLS files of one deployment."""

    ca: Path
    server_cert: Path
    server_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey, fmt: serialization.PrivateFormat) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    path.write_bytes(data)
    path.chmod(0o600)


def make_certificates(folder: Path, hosts: tuple[str, ...] = LOOPBACK_NAMES, days: int = 1) -> Certificates:
    """A CA and a server certificate for ``hosts`` (names or IP addresses), written into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    # 1) the CA: self-signed, allowed to sign certificates only
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedsp loopback CA"))
        .issuer_name(_name("fedsp loopback CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    # 2) the server: its names as subject alternative names, signed by the CA
    alt_names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt_names.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    certs = Certificates(folder / "ca.crt", folder / "server.pem", folder / "server.key")
    certs.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    certs.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(certs.server_key, server_key, serialization.PrivateFormat.PKCS8)
    return certs


def check_certificates(certs: Certificates, host: str = "127.0.0.1") -> Certificates:
    """Given TLS files, checked before any process starts: they exist, parse, match, and name ``host``."""
    for label, path in (
        ("CA certificate", certs.ca),
        ("server certificate", certs.server_cert),
        ("server key", certs.server_key),
    ):
        if not Path(path).is_file():
            raise FedSPError(f"{label} file {str(path)!r} does not exist")
    ca = _load(certs.ca, "CA certificate", x509.load_pem_x509_certificate)
    server = _load(certs.server_cert, "server certificate", x509.load_pem_x509_certificate)
    key = _load(certs.server_key, "server key", lambda data: serialization.load_pem_private_key(data, None))
    try:
        server.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise FedSPError(
            f"server certificate {str(certs.server_cert)!r} is not signed by the CA in "
            f"{str(certs.ca)!r}: SuperNodes would refuse the SuperLink"
        ) from None
    if key.public_key().public_numbers() != server.public_key().public_numbers():
        raise FedSPError(
            f"server key {str(certs.server_key)!r} does not belong to the certificate "
            f"{str(certs.server_cert)!r}"
        )
    try:
        names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names = x509.SubjectAlternativeName([])
    valid = {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} | set(
        names.get_values_for_type(x509.DNSName)
    )
    if host not in valid:
        raise FedSPError(
            f"server certificate {str(certs.server_cert)!r} is not valid for {host} "
            f"(it names {sorted(valid) or 'no host'})"
        )
    return Certificates(
        Path(certs.ca).resolve(), Path(certs.server_cert).resolve(), Path(certs.server_key).resolve()
    )


def _load(path: Path, label: str, parse):  # noqa: ANN001, ANN202
    try:
        return parse(Path(path).read_bytes())
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise FedSPError(f"{label} file {str(path)!r} is not a PEM {label} ({err})") from None


def make_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's P-384 key pair in OpenSSH format: (``<name>.key``, ``<name>.pub``)."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / f"{name}.key", folder / f"{name}.pub"
    _write_key(private, key, serialization.PrivateFormat.OpenSSH)
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    return private, public


def probe_superlink(address: str, ca: Path, timeout_s: float = 5.0) -> None:
    """A TLS handshake with the SuperLink at ``host:port``, verified against ``ca``: one line if it fails.

    What a SuperNode or ``flwr`` would find out later, and say less clearly (a SuperNode retries an
    unreachable SuperLink for ever): nobody listening, a server without TLS, a certificate that ``ca``
    does not verify or that does not name ``host``.
    """
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise FedSPError(f"SuperLink address {address!r} is not host:port")
    if not Path(ca).is_file():
        raise FedSPError(f"CA certificate file {str(ca)!r} does not exist")
    _load(Path(ca), "CA certificate", x509.load_pem_x509_certificate)
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
            with context.wrap_socket(sock, server_hostname=host):
                return
    except ssl.SSLCertVerificationError as err:
        raise FedSPError(
            f"the SuperLink at {address} presented a certificate that the CA in {str(ca)!r} "
            f"does not accept ({err.verify_message}): wrong CA certificate?"
        ) from None
    except ssl.SSLError as err:
        raise FedSPError(
            f"the SuperLink at {address} did not complete a TLS handshake ({err.reason}): "
            f"is it running with --insecure?"
        ) from None
    except TimeoutError:
        raise FedSPError(
            f"cannot reach the SuperLink at {address}: no answer within {timeout_s:.0f} s"
        ) from None
    except OSError as err:
        raise FedSPError(
            f"cannot reach the SuperLink at {address} ({err.strerror or err}): "
            f"is flower-superlink running there?"
        ) from None
