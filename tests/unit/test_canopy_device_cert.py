"""The mTLS device certificate: built, kept, renewed, and usable in a real TLS handshake."""

from __future__ import annotations

import hashlib
import ipaddress
import socket
import ssl
import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pgro.canopy.device_cert import (
    CERT_FILE,
    KEY_FILE,
    DeviceCertificateError,
    DeviceIdentity,
    ensure_device_certificate,
    generate_device_key,
    spki_sha256,
)

NOW = datetime(2026, 7, 1, 12, 0, tzinfo=UTC)


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def spki(certificate: x509.Certificate) -> bytes:
    return certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_first_call_builds_a_p256_key_and_a_device_local_certificate(tmp_path: Path) -> None:
    cert_path, key_path = ensure_device_certificate(tmp_path / "canopy", NOW)
    assert (cert_path.name, key_path.name) == (CERT_FILE, KEY_FILE)
    assert mode(key_path) == 0o600
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    cert = load_cert(cert_path)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "device.local"
    assert cert.issuer == cert.subject
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["device.local"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
    assert cert.not_valid_before_utc == NOW - timedelta(minutes=1)
    assert cert.not_valid_after_utc == NOW + timedelta(days=6)
    assert spki(cert) == key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_a_fresh_certificate_is_kept(tmp_path: Path) -> None:
    cert_path, _ = ensure_device_certificate(tmp_path, NOW)
    before = cert_path.read_bytes()
    for later in (timedelta(hours=1), timedelta(days=4, hours=23)):
        ensure_device_certificate(tmp_path, NOW + later)
        assert cert_path.read_bytes() == before


@pytest.mark.parametrize(
    "later",
    [
        timedelta(days=5),  # at least every 5 days
        timedelta(days=6, seconds=30),  # expiring (in 30 s)
        timedelta(days=30),  # long expired
        -timedelta(hours=1),  # the clock went back before not_before
    ],
    ids=["five-days-old", "expiring", "expired", "clock-went-back"],
)
def test_the_certificate_is_rebuilt_but_the_key_kept(tmp_path: Path, later: timedelta) -> None:
    cert_path, key_path = ensure_device_certificate(tmp_path, NOW)
    key_before = key_path.read_bytes()
    old = load_cert(cert_path)
    ensure_device_certificate(tmp_path, NOW + later)
    new = load_cert(cert_path)
    assert new.serial_number != old.serial_number
    assert new.not_valid_before_utc == NOW + later - timedelta(minutes=1)
    assert key_path.read_bytes() == key_before
    assert spki(new) == spki(old)


@pytest.mark.parametrize("content", [b"", b"garbage", b"-----BEGIN CERTIFICATE-----\nAAAA\n"])
def test_an_unreadable_or_missing_certificate_is_rebuilt(tmp_path: Path, content: bytes) -> None:
    cert_path, _ = ensure_device_certificate(tmp_path, NOW)
    cert_path.write_bytes(content)
    ensure_device_certificate(tmp_path, NOW)
    assert load_cert(cert_path).not_valid_before_utc == NOW - timedelta(minutes=1)
    cert_path.unlink()
    ensure_device_certificate(tmp_path, NOW)
    assert cert_path.exists()


def test_a_configured_key_replaces_the_file_and_the_certificate_follows(tmp_path: Path) -> None:
    cert_path, key_path = ensure_device_certificate(tmp_path, NOW)
    enrolled = generate_device_key()
    ensure_device_certificate(tmp_path, NOW + timedelta(minutes=5), key_pem=enrolled)
    assert key_path.read_bytes() == enrolled
    assert mode(key_path) == 0o600
    enrolled_key = serialization.load_pem_private_key(enrolled, password=None)
    assert spki(load_cert(cert_path)) == enrolled_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # The same key again: nothing rewritten.
    cert_before = cert_path.read_bytes()
    ensure_device_certificate(tmp_path, NOW + timedelta(minutes=6), key_pem=enrolled)
    assert cert_path.read_bytes() == cert_before


def test_a_sec1_key_from_a_secret_is_accepted(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    sec1 = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    assert b"EC PRIVATE KEY" in sec1
    cert_path, _ = ensure_device_certificate(tmp_path, NOW, key_pem=sec1)
    assert spki(load_cert(cert_path)) == key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.mark.parametrize(
    ("key_pem", "says"),
    [
        (_pem(ec.generate_private_key(ec.SECP384R1())), "EC secp384r1 key"),
        (_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)), "RSAPrivateKey"),
        (b"-----BEGIN PRIVATE KEY-----\nnot base64 at all\n-----END PRIVATE KEY-----\n", "PEM"),
    ],
    ids=["p384", "rsa", "garbage"],
)
def test_an_unusable_configured_key_is_refused(tmp_path: Path, key_pem: bytes, says: str) -> None:
    with pytest.raises(DeviceCertificateError) as error:
        ensure_device_certificate(tmp_path, NOW, key_pem=key_pem)
    message = str(error.value)
    assert says in message
    assert "P-256" in message
    assert "operator's configuration" in message
    assert b"PRIVATE KEY" not in message.encode()
    assert not (tmp_path / KEY_FILE).exists()


def test_a_corrupt_key_file_is_not_silently_replaced(tmp_path: Path) -> None:
    (tmp_path / KEY_FILE).write_bytes(b"half a key")
    with pytest.raises(DeviceCertificateError, match="delete the file to generate a new key"):
        ensure_device_certificate(tmp_path, NOW)
    assert (tmp_path / KEY_FILE).read_bytes() == b"half a key"


def test_a_key_file_with_loose_permissions_is_tightened(tmp_path: Path) -> None:
    _, key_path = ensure_device_certificate(tmp_path, NOW)
    key_path.chmod(0o644)
    ensure_device_certificate(tmp_path, NOW)
    assert mode(key_path) == 0o600


def test_naive_now_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="timezone"):
        ensure_device_certificate(tmp_path, datetime(2026, 7, 1))


def test_spki_fingerprint_is_what_the_certificate_carries(tmp_path: Path) -> None:
    cert_path, key_path = ensure_device_certificate(tmp_path, NOW)
    assert (
        spki_sha256(key_path.read_bytes()) == hashlib.sha256(spki(load_cert(cert_path))).hexdigest()
    )


def test_device_identity_reports_renewals(tmp_path: Path) -> None:
    clock = [NOW]
    identity = DeviceIdentity(tmp_path, clock=lambda: clock[0])
    assert identity.ensure()[2] is True
    clock[0] = NOW + timedelta(days=1)
    assert identity.ensure()[2] is False
    clock[0] = NOW + timedelta(days=5)
    assert identity.ensure()[2] is True
    assert len(identity.fingerprint()) == 64


# -- a real handshake --------------------------------------------------------------------------


def make_server_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed server certificate for 127.0.0.1 / localhost (test servers)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "server.crt", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(_pem(key))
    return cert_path, key_path


def mtls_server_context(server_dir: Path, trusted_client_cert: Path) -> ssl.SSLContext:
    """A server that requires a client certificate, trusting exactly the device's one
    (canopy keys on the SPKI instead; trusting the certificate is the closest plain TLS)."""
    server_cert, server_key = make_server_certificate(server_dir)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(server_cert, server_key)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=str(trusted_client_cert))
    return context


def test_a_tls_handshake_with_the_device_certificate_works(tmp_path: Path) -> None:
    cert_path, key_path = ensure_device_certificate(tmp_path / "device", datetime.now(UTC))
    server_context = mtls_server_context(tmp_path / "server", cert_path)
    seen: dict[str, object] = {}
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with server_context.wrap_socket(conn, server_side=True) as tls:
                    seen["peer"] = tls.getpeercert(binary_form=True)
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError) as error:
                seen["error"] = error

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        client_context = ssl.create_default_context(cafile=str(tmp_path / "server" / "server.crt"))
        client_context.load_cert_chain(cert_path, key_path)
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            client_context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            assert tls.recv(2) == b"ok"
        thread.join(timeout=10)
    assert "error" not in seen
    peer = seen["peer"]
    assert isinstance(peer, bytes)
    assert spki(x509.load_der_x509_certificate(peer)) == spki(load_cert(cert_path))


def test_a_server_refuses_a_client_without_the_certificate(tmp_path: Path) -> None:
    cert_path, _ = ensure_device_certificate(tmp_path / "device", datetime.now(UTC))
    server_context = mtls_server_context(tmp_path / "server", cert_path)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with server_context.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError):
                conn.close()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        client_context = ssl.create_default_context(cafile=str(tmp_path / "server" / "server.crt"))
        # TLS 1.3 reports the missing certificate on the first read, as an alert.
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED"),
            client_context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.recv(2)
        thread.join(timeout=10)
