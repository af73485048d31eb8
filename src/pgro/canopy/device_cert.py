"""The self-signed device certificate pgro presents to canopy over mTLS (§2.1, §2.2, §8).

Canopy identifies a device by the public key (SPKI) of its client certificate, not by any
CA chain, so the private key is the device's identity: it is enrolled in canopy once
(role `backup-restore`) and must stay the same. The certificate around it is disposable:
self-signed, CN and SAN `device.local`, valid from one minute ago for 6 days, and
rebuilt here whenever it is missing, unreadable, made for another key, older than 5
days, or within a day of expiry.

The reference builds the certificate once, when its client is built, and never renews it,
so a long-lived operator would present an expired certificate after 6 days (§9.5);
`ensure_device_certificate` is called again as the client runs (see `DeviceIdentity`).

The key comes from the configuration: the operator reads the PEM from the Secret named by
`CANOPY_DEVICE_CERT_SECRET`, as the reference does, and has no key without it (one made in
a pod would change at every restart); `pgro run` takes `--canopy-device-key`, else
generates one in its state directory on first use and keeps it. Either way the key must
be enrolled in canopy (`spki_sha256` gives its fingerprint).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pgro.clock import utcnow

COMMON_NAME: Final = "device.local"
CERT_BACKDATE: Final = timedelta(minutes=1)
CERT_VALIDITY: Final = timedelta(days=6)
CERT_RENEW_AFTER: Final = timedelta(days=5)
CERT_RENEW_BEFORE_EXPIRY: Final = timedelta(days=1)

CERT_FILE: Final = "device.crt"
KEY_FILE: Final = "device.key"
KEY_MODE: Final = 0o600
DIRECTORY_MODE: Final = 0o700


class DeviceCertificateError(Exception):
    """The device key cannot be used; the message says which key and what to do."""


def load_device_key(pem: bytes, source: str) -> ec.EllipticCurvePrivateKey:
    """A P-256 private key from PEM (PKCS#8 or SEC1); `source` names it in errors."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as error:
        # The message of `cryptography` never quotes the key material; keep only its kind.
        raise DeviceCertificateError(
            f"the canopy device key in {source} is not an unencrypted PEM private key "
            f"({type(error).__name__}); provide the P-256 private key PEM enrolled in "
            "canopy for this device"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        kind = (
            f"an EC {key.curve.name} key"
            if isinstance(key, ec.EllipticCurvePrivateKey)
            else f"a {type(key).__name__.lstrip('_')}"
        )
        raise DeviceCertificateError(
            f"the canopy device key in {source} is {kind}; canopy device certificates use "
            "P-256 (secp256r1) EC keys: provide the P-256 key enrolled for this device"
        )
    return key


def generate_device_key() -> bytes:
    """A new P-256 private key, PKCS#8 PEM. It must be enrolled in canopy before use."""
    key = ec.generate_private_key(ec.SECP256R1())
    return _key_pem(key)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _spki(public_key: ec.EllipticCurvePublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def spki_sha256(key_pem: bytes) -> str:
    """Hex SHA-256 of the key's SubjectPublicKeyInfo: what canopy knows the device by."""
    key = load_device_key(key_pem, "the given PEM")
    return hashlib.sha256(_spki(key.public_key())).hexdigest()


def build_certificate(key: ec.EllipticCurvePrivateKey, now: datetime) -> bytes:
    """A self-signed client certificate for `key`, PEM: CN and SAN `device.local`,
    valid from `now − 1 min` to `now + 6 days`."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, COMMON_NAME)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1 or 1)
        .not_valid_before(now - CERT_BACKDATE)
        .not_valid_after(now + CERT_VALIDITY)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(COMMON_NAME)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


def renewal_reason(
    cert_pem: bytes | None, key: ec.EllipticCurvePrivateKey, now: datetime
) -> str | None:
    """Why the certificate must be rebuilt now, or None to keep it."""
    if cert_pem is None:
        return "missing"
    try:
        certificate = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        return "unreadable"
    cert_spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if cert_spki != _spki(key.public_key()):
        return "made for another key"
    not_before = certificate.not_valid_before_utc
    not_after = certificate.not_valid_after_utc
    if now < not_before:
        return "not valid yet (the clock went back)"
    if now - (not_before + CERT_BACKDATE) >= CERT_RENEW_AFTER:
        return f"older than {CERT_RENEW_AFTER.days} days"
    if not_after - now <= CERT_RENEW_BEFORE_EXPIRY:
        return "expiring within a day" if now < not_after else "expired"
    return None


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)  # the umask may have narrowed or the file system widened it
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _settle_key(key_path: Path, key_pem: bytes | None) -> ec.EllipticCurvePrivateKey:
    on_disk = _read(key_path)
    if key_pem is not None:
        key = load_device_key(key_pem, "the operator's configuration")
        current = None
        if on_disk is not None:
            try:
                current = load_device_key(on_disk, str(key_path))
            except DeviceCertificateError:
                current = None
        if current is None or _spki(current.public_key()) != _spki(key.public_key()):
            _write_atomically(key_path, _key_pem(key), KEY_MODE)
        elif key_path.stat().st_mode & 0o777 != KEY_MODE:
            os.chmod(key_path, KEY_MODE)
        return key
    if on_disk is None:
        generated = generate_device_key()
        _write_atomically(key_path, generated, KEY_MODE)
        return load_device_key(generated, str(key_path))
    try:
        key = load_device_key(on_disk, str(key_path))
    except DeviceCertificateError as error:
        # Replacing it would silently change the device's identity in canopy.
        raise DeviceCertificateError(
            f"{error}. Restore the enrolled key to {key_path}, or delete the file to "
            "generate a new key (which must then be enrolled in canopy)"
        ) from None
    if key_path.stat().st_mode & 0o777 != KEY_MODE:
        os.chmod(key_path, KEY_MODE)
    return key


def ensure_device_certificate(
    directory: Path, now: datetime, *, key_pem: bytes | None = None
) -> tuple[Path, Path]:
    """`(cert_path, key_path)` of a usable device certificate in `directory`.

    The key file (mode 0600) is taken from `key_pem` when given (rewritten only if it
    differs), else kept from an earlier call, else generated. The certificate is rebuilt
    when `renewal_reason` says so. Raises `DeviceCertificateError` for an unusable key.
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"now {now!r} has no timezone; pass an aware datetime")
    now = now.astimezone(UTC)
    directory.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
    cert_path, key_path = directory / CERT_FILE, directory / KEY_FILE
    key = _settle_key(key_path, key_pem)
    if renewal_reason(_read(cert_path), key, now) is not None:
        _write_atomically(cert_path, build_certificate(key, now), 0o644)
    return cert_path, key_path


class DeviceIdentity:
    """A device certificate kept current for a long-lived client.

    `ensure()` is cheap when nothing is due (it reads two small files); it returns the
    paths and whether the certificate changed since the previous call, so the client can
    load the new one for its next connections.
    """

    def __init__(
        self,
        directory: Path,
        *,
        key_pem: bytes | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.directory = directory
        self._key_pem = key_pem
        self._clock = clock
        self._lock = threading.Lock()
        self._last_cert: bytes | None = None

    def ensure(self) -> tuple[Path, Path, bool]:
        with self._lock:
            cert_path, key_path = ensure_device_certificate(
                self.directory, self._clock(), key_pem=self._key_pem
            )
            cert = cert_path.read_bytes()
            changed = cert != self._last_cert
            self._last_cert = cert
            return cert_path, key_path, changed

    def fingerprint(self) -> str:
        """The SPKI SHA-256 to enrol in canopy."""
        _, key_path, _ = self.ensure()
        return spki_sha256(key_path.read_bytes())
