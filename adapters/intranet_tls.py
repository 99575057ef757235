"""A node's identity on the intranet channel, and the TLS contexts that pin peers by it.

Theory of operation
-------------------
Each node owns one TLS key pair and certificate, kept in its home folder; no runtime CA exists,
so no CA secret has to be stored or handed out. Either:

- **generated** (the default, :func:`load_or_create_identity`): on first start the node makes an
  RSA-2048 key and a self-signed X.509 v3 certificate (SAN = the node name; digital signature
  and key encipherment; server and client authentication) that passes ``shir cert check``. The
  key is written as an encrypted PKCS#8 PEM (mode 0600) under a random 32-byte passphrase, and
  the passphrase is kept only protected by the node's :class:`~shir.adapters.protect.Protector`
  (DPAPI on Windows, the portable AES-GCM key file elsewhere), so the key file alone opens
  nowhere, and copied to another machine not even with its passphrase file;
- **the user's own** (:func:`identity_from_files`): a certificate and key the user gives, checked
  with the product's certificate rules (:func:`shir.adapters.certs.check_certificate`, as
  ``shir cert check`` does); a certificate with an error is refused with the findings.

What a node publishes through the log is public: its intranet address and the SHA-256 of its
certificate (:attr:`IntranetIdentity.fingerprint`, 64 hex digits). Peers *pin* exactly the
fingerprints of the runtime's currently registered nodes, so membership follows the log and a
removed node is refused at once.

Pinning with the standard library's ``ssl``: a client does not verify a chain (``CERT_NONE``)
and instead compares the server certificate's fingerprint with the pin after the handshake
(the handshake itself proves the server holds that certificate's key). A server must ask for a
client certificate, and ``ssl`` then verifies it against trust anchors, so the server's context
trusts the certificates of current members only (:meth:`IntranetIdentity.server_context`); a node
hands its certificate over first in an *introduction* (see :mod:`shir.adapters.intranet`), which
the server accepts only for a certificate whose fingerprint is pinned. TLS 1.2 is the floor;
two shir nodes negotiate TLS 1.3.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import secrets
import ssl
from collections.abc import Iterable
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shir.adapters.certs import (
    MAX_CERT_FILE_BYTES,
    CertificateUnreadable,
    Severity,
    check_certificate,
    load_certificates,
)
from shir.adapters.protect import (
    CredentialError,
    Protector,
    default_protector,
    write_file_atomically,
)
from shir.core.errors import ShirError

__all__ = [
    "CERT_VALIDITY_DAYS",
    "IDENTITY_DIR",
    "IdentityError",
    "IntranetError",
    "IntranetIdentity",
    "cert_fingerprint",
    "certificate_problem",
    "create_identity",
    "identity_from_files",
    "load_or_create_identity",
]

log = logging.getLogger("shir.adapters.intranet")

IDENTITY_DIR = "intranet"  # under the node's home folder
_CERT_FILE = "node.crt"
_KEY_FILE = "node.key"
_PASS_FILE = "node.key.pass"
_PASS_ENTROPY = b"shir/intranet/key-passphrase/v1"  # binds the protected blob to its purpose
CERT_VALIDITY_DAYS = 3650
_RSA_BITS = 2048  # the product's rules: RSA (no CNG/EC keys), at least 2048 bits


class IntranetError(ShirError):
    """The intranet channel could not do what was asked; the message says why and what to do."""


class IdentityError(IntranetError):
    """The node's intranet certificate or key cannot be created, read or used."""


def cert_fingerprint(der: bytes) -> str:
    """The SHA-256 of a DER certificate as 64 lowercase hex digits: what the log pins."""
    return hashlib.sha256(bytes(der)).hexdigest()


def certificate_problem(der: bytes, now: dt.datetime) -> str | None:
    """Why a peer's certificate is unusable under the product's rules, or ``None``.

    Only errors count (expired, not yet valid, weak key or signature, missing key usages); trust
    and names are replaced by the fingerprint pin.
    """
    try:
        cert = x509.load_der_x509_certificate(bytes(der))
    except ValueError:
        return "the certificate cannot be parsed"
    errors = [f.message for f in check_certificate(cert, now=now) if f.severity is Severity.ERROR]
    return "; ".join(errors) if errors else None


@attrs.frozen(repr=False)
class IntranetIdentity:
    """A node's certificate and (encrypted) key on disk, with what opens the key in memory.

    ``fingerprint`` is what the node publishes; the key passphrase is never printed.
    """

    cert_path: Path
    key_path: Path
    cert_der: bytes
    source: str  # "generated" or "user"
    _password: bytes | None = attrs.field(alias="password", eq=False)

    @property
    def fingerprint(self) -> str:
        """:func:`cert_fingerprint` of this node's certificate."""
        return cert_fingerprint(self.cert_der)

    def __repr__(self) -> str:
        return f"IntranetIdentity(fingerprint={self.fingerprint[:16]}..., source={self.source})"

    def _load_into(self, ctx: ssl.SSLContext) -> None:
        secret = self._password
        try:
            ctx.load_cert_chain(self.cert_path, self.key_path,
                                password=(lambda: secret) if secret is not None else None)
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or "unusable"
            raise IdentityError(
                f"cannot load the intranet certificate {self.cert_path} with its key "
                f"{self.key_path} ({reason}): give the key that belongs to this certificate, "
                "or move the folder aside to generate a new identity"
            ) from None

    def client_context(self, *, present_certificate: bool = True) -> ssl.SSLContext:
        """A client context: TLS 1.2+, no chain verification (the caller pins the fingerprint),
        presenting this node's certificate unless ``present_certificate`` is false."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = False  # identity is the pinned fingerprint, not a host name
        ctx.verify_mode = ssl.CERT_NONE
        if present_certificate:
            self._load_into(ctx)
        return ctx

    def server_context(self, trusted_ders: Iterable[bytes]) -> ssl.SSLContext:
        """A server context: TLS 1.2+, this node's certificate, asking every client for its
        certificate and accepting only one of ``trusted_ders`` (or none, for an introduction)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self._load_into(ctx)
        # OPTIONAL: a client without a certificate may only introduce itself; one whose
        # certificate is not trusted fails the handshake
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ders = list(trusted_ders)
        if ders:
            ctx.load_verify_locations(cadata=b"".join(ders))
        return ctx


def _read_bounded(path: Path, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CERT_FILE_BYTES + 1)
    except OSError as exc:
        raise IdentityError(f"cannot read {what} {path}: {exc.strerror}") from None
    if len(data) > MAX_CERT_FILE_BYTES:
        raise IdentityError(f"{what} {path} is over {MAX_CERT_FILE_BYTES} bytes: wrong file?")
    return data


def identity_from_files(
    cert_path: Path, key_path: Path, *, password: bytes | None = None, fqdn: str | None = None,
    now: dt.datetime | None = None,
) -> IntranetIdentity:
    """The user's own certificate (PEM, leaf first) and key, checked by the certificate rules.

    ``password`` opens an encrypted key file; ``fqdn``, when given, is the machine's name, which
    must be the certificate's last SAN entry (the product's rule). Raises
    :class:`IdentityError` naming each rule the certificate breaks, or what is wrong with the
    files; warnings are logged.
    """
    cert_path, key_path = Path(cert_path), Path(key_path)
    try:
        certs = load_certificates(_read_bounded(cert_path, "certificate file"))
    except CertificateUnreadable as exc:
        raise IdentityError(f"certificate file {cert_path}: {exc}") from None
    if not certs:
        raise IdentityError(f"certificate file {cert_path} holds no certificate")
    findings = check_certificate(certs[0], now=now or dt.datetime.now(dt.UTC),
                                 nodes=[fqdn] if fqdn else (), chain=certs[1:])
    errors = [f"[{f.rule}] {f.message}" for f in findings if f.severity is Severity.ERROR]
    if errors:
        raise IdentityError(f"the intranet certificate {cert_path} cannot be used: "
                            + "; ".join(errors))
    for f in findings:
        if f.severity is Severity.WARNING and f.rule != "trust":  # trust: the pin replaces it
            log.warning("intranet certificate %s: [%s] %s", cert_path, f.rule, f.message)
    der = certs[0].public_bytes(serialization.Encoding.DER)
    identity = IntranetIdentity(cert_path, key_path, der, "user", password=password)
    identity.client_context()  # fails now, with a clear message, if the key does not fit
    return identity


def create_identity(folder: Path, node_name: str, protector: Protector, *,
                    not_before: dt.datetime, not_after: dt.datetime) -> IntranetIdentity:
    """Generate a key pair and self-signed certificate for ``node_name`` into ``folder``.

    The key is an encrypted PKCS#8 PEM (mode 0600) whose random passphrase is stored only
    protected by ``protector``. The certificate file is written last, so a crash part-way leaves
    no certificate and the next start generates again.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = rsa.generate_private_key(public_exponent=65537, key_size=_RSA_BITS)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_name[:64])])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_encipherment=True, content_commitment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(_dns_label(node_name))]),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    passphrase = secrets.token_bytes(32)
    pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.BestAvailableEncryption(passphrase))
    try:
        write_file_atomically(folder / _PASS_FILE, protector.protect(passphrase, _PASS_ENTROPY))
    except CredentialError as exc:
        raise IdentityError(f"cannot protect the intranet key's passphrase: {exc}") from None
    write_file_atomically(folder / _KEY_FILE, pem_key)
    write_file_atomically(folder / _CERT_FILE, cert.public_bytes(serialization.Encoding.PEM),
                          mode=0o644)
    der = cert.public_bytes(serialization.Encoding.DER)
    log.info("generated intranet certificate %s (sha256 %s)", folder / _CERT_FILE,
             cert_fingerprint(der))
    return IntranetIdentity(folder / _CERT_FILE, folder / _KEY_FILE, der, "generated",
                        password=passphrase)


def _dns_label(name: str) -> str:
    """A DNS name for the SAN made from a node name (which may hold any printable text)."""
    label = "".join(c if c.isascii() and (c.isalnum() or c in "-.") else "-" for c in name)
    return label.strip("-.")[:63] or "shir-node"


def load_or_create_identity(home: Path, node_name: str, *, protector: Protector | None = None,
                            now: dt.datetime | None = None) -> IntranetIdentity:
    """The node's generated identity in ``home/intranet``, created on first use.

    A generated certificate that expired (or breaks another rule) is replaced by a new one,
    whose fingerprint the node publishes by being removed and registered again. An identity that
    cannot be opened (damaged files, another machine's protector) raises :class:`IdentityError`
    saying how to start afresh.
    """
    folder = Path(home) / IDENTITY_DIR
    protector = protector or default_protector(Path(home))
    now = now or dt.datetime.now(dt.UTC)
    if (folder / _CERT_FILE).exists():
        try:
            identity = _load_generated(folder, protector, now)
        except (IdentityError, CredentialError) as exc:
            raise IdentityError(
                f"the node's intranet identity in {folder} cannot be used: {exc}; move the "
                "folder aside, remove the node from the runtime and start it again to "
                "generate and publish a new one"
            ) from None
        if identity is not None:
            return identity
    return create_identity(folder, node_name, protector, not_before=now - dt.timedelta(hours=1),
                           not_after=now + dt.timedelta(days=CERT_VALIDITY_DAYS))


def _load_generated(
    folder: Path, protector: Protector, now: dt.datetime
) -> IntranetIdentity | None:
    """The identity kept in ``folder``, or ``None`` if its certificate is no longer usable."""
    cert_path = folder / _CERT_FILE
    try:
        cert = x509.load_pem_x509_certificate(_read_bounded(cert_path, "certificate file"))
    except ValueError:
        raise IdentityError(f"the certificate {cert_path} is damaged") from None
    passphrase = protector.unprotect(_read_bounded(folder / _PASS_FILE, "key passphrase file"),
                                     _PASS_ENTROPY)
    der = cert.public_bytes(serialization.Encoding.DER)
    problem = certificate_problem(der, now)
    if problem is not None:
        log.warning("intranet certificate %s is no longer usable (%s); generating a new one",
                    cert_path, problem)
        return None
    identity = IntranetIdentity(cert_path, folder / _KEY_FILE, der, "generated",
                                password=passphrase)
    identity.client_context()  # the key must open and fit its certificate
    return identity
