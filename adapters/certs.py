"""Inter-node certificate rules: check the TLS certificate of the intranet channel, and explain.

The product's rules for the certificate that secures communication between a runtime's nodes:

- it must be an X.509 **v3** certificate, preferably issued by a public certification authority;
- **every node must trust it** (its issuer is in each node's trusted roots);
- only the **last Subject Alternative Name** entry is used; all others are ignored, so a
  certificate for ``node1`` and ``node2`` (in that order) works only on ``node2``;
- any key size Windows Server 2012 R2 accepts for TLS; certificates whose keys are kept by
  **CNG** (Windows Cryptography Next Generation key storage) are not supported.

:func:`check_certificate` applies these rules plus the ones any TLS peer enforces (validity
period, usable key and signature algorithms, key usages a mutual-TLS peer needs), and returns
one :class:`Finding` per problem, each in words a user can act on. ``shir cert check`` prints
them. Nothing here reads the clock: ``now`` is an argument.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import warnings
from collections.abc import Iterator, Sequence

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import ExtendedKeyUsageOID

__all__ = [
    "MAX_CERT_FILE_BYTES",
    "CertificateUnreadable",
    "Finding",
    "Severity",
    "check_certificate",
    "load_certificates",
]

MAX_CERT_FILE_BYTES = 1024 * 1024  # a certificate chain is kilobytes: refuse to parse more
MIN_RSA_BITS = 2048  # below this, TLS stacks (and Windows' own policy) refuse the key
EXPIRY_WARNING_DAYS = 30
_WEAK_HASHES = ("md5", "sha1")


class CertificateUnreadable(ValueError):
    """The file holds no certificate shir can read."""


class Severity(enum.Enum):
    """How much a finding matters: an error makes the certificate unusable."""

    ERROR = "error"
    WARNING = "warning"


@attrs.frozen
class Finding:
    """One problem with a certificate: which rule, how bad, and what to do."""

    rule: str
    severity: Severity
    message: str


def load_certificates(data: bytes) -> list[x509.Certificate]:
    """Parse one or more PEM certificates, or one DER certificate, from ``data``."""
    if len(data) > MAX_CERT_FILE_BYTES:
        raise CertificateUnreadable(
            f"the file is {len(data)} bytes; a certificate file is at most "
            f"{MAX_CERT_FILE_BYTES} bytes: is this the right file?"
        )
    try:
        if b"-----BEGIN" in data:
            if b"PRIVATE KEY-----" in data and b"CERTIFICATE-----" not in data:
                raise CertificateUnreadable(
                    "the file holds a private key, not a certificate: give the certificate "
                    "(PEM 'BEGIN CERTIFICATE') and keep the key file private"
                )
            with _quietly():
                return x509.load_pem_x509_certificates(data)
        with _quietly():
            return [x509.load_der_x509_certificate(data)]
    except CertificateUnreadable:
        raise
    except ValueError as exc:
        raise CertificateUnreadable(
            "no X.509 certificate could be read (expected PEM 'BEGIN CERTIFICATE' blocks or one "
            f"DER certificate): {exc}"
        ) from None


@contextlib.contextmanager
def _quietly() -> Iterator[None]:
    """Loading, cryptography warns (with a line of our source) about what is wrong in a
    certificate, e.g. a serial number that is not positive: ``check_certificate`` reports it
    as a finding instead."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        yield


def _utc(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def _verify_signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Is ``cert`` signed by ``issuer``'s key (and named by it)?"""
    if cert.issuer != issuer.subject:
        return False
    key = issuer.public_key()
    sig, data = cert.signature, cert.tbs_certificate_bytes
    try:
        if isinstance(key, rsa.RSAPublicKey):
            algorithm = cert.signature_hash_algorithm
            if algorithm is None:
                return False
            key.verify(sig, data, padding.PKCS1v15(), algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            algorithm = cert.signature_hash_algorithm
            if algorithm is None:
                return False
            key.verify(sig, data, ec.ECDSA(algorithm))
        elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            key.verify(sig, data)
        else:
            return False
    except InvalidSignature:
        return False
    return True


def _san_dns_names(cert: x509.Certificate) -> list[str] | None:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    return [str(v) for v in ext.value.get_values_for_type(x509.DNSName)] + [
        str(v) for v in ext.value.get_values_for_type(x509.IPAddress)
    ]


def _name_matches(pattern: str, name: str) -> bool:
    pattern, name = pattern.lower().rstrip("."), name.lower().rstrip(".")
    if pattern.startswith("*."):  # a wildcard covers exactly one leftmost label
        head, _, rest = name.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == name


def check_certificate(
    cert: x509.Certificate,
    *,
    now: dt.datetime,
    nodes: Sequence[str] = (),
    trusted: Sequence[x509.Certificate] = (),
    chain: Sequence[x509.Certificate] = (),
) -> list[Finding]:
    """Check ``cert`` against the inter-node rules; return the findings (empty: usable).

    ``nodes`` are the FQDNs of the machines that will present it; ``trusted`` the roots every
    node trusts (empty: the check can only tell whether it is self-signed); ``chain`` any
    intermediates sent with it.
    """
    out: list[Finding] = []

    def err(rule: str, message: str) -> None:
        out.append(Finding(rule, Severity.ERROR, message))

    def warn(rule: str, message: str) -> None:
        out.append(Finding(rule, Severity.WARNING, message))

    if cert.version is not x509.Version.v3:
        err("x509-v3", f"the certificate is X.509 {cert.version.name}; the intranet channel needs "
            "an X.509 v3 certificate: issue a new one (any current CA or tool issues v3)")

    now = _utc(now)
    not_before, not_after = _utc(cert.not_valid_before_utc), _utc(cert.not_valid_after_utc)
    if now < not_before:
        err("validity", f"the certificate is not valid before {not_before:%Y-%m-%d %H:%M} UTC: "
            "check the machine clocks, or wait until then")
    elif now >= not_after:
        err("validity", f"the certificate expired on {not_after:%Y-%m-%d %H:%M} UTC: "
            "renew it and install the new one on every node")
    elif not_after - now < dt.timedelta(days=EXPIRY_WARNING_DAYS):
        warn("validity", f"the certificate expires on {not_after:%Y-%m-%d} (in "
             f"{(not_after - now).days} days): renew it before then on every node")

    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            err("key-size", f"the RSA key has {key.key_size} bits; use at least {MIN_RSA_BITS}")
    elif isinstance(key, ec.EllipticCurvePublicKey):
        # Windows keeps every elliptic-curve TLS key in CNG, which the channel cannot use.
        err("cng-key", f"the key is elliptic-curve ({key.curve.name}); on Windows such keys are "
            "held by CNG key storage, which the intranet channel does not support: issue the "
            "certificate with an RSA key from a legacy (CSP) provider")
    elif isinstance(key, dsa.DSAPublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        err("key-type", f"the key type ({type(key).__name__.removesuffix('PublicKey').lstrip('_')})"
            " is not accepted for TLS by Windows Server 2012 R2: use an RSA key")

    with _quietly():
        serial = cert.serial_number
    if serial <= 0:
        warn("serial", f"the serial number is {'zero' if serial == 0 else 'negative'}, which "
             "RFC 5280 forbids and newer TLS libraries refuse: reissue the certificate")

    algorithm = cert.signature_hash_algorithm
    if algorithm is not None and algorithm.name in _WEAK_HASHES:
        err("signature", f"the certificate is signed with {algorithm.name.upper()}, which TLS "
            "peers reject: reissue it signed with SHA-256 or stronger")

    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        ku = None
    if ku is not None and not (ku.digital_signature or ku.key_encipherment):
        err("key-usage", "the key usage allows neither digital signature nor key encipherment, "
            "so no TLS handshake can use it: reissue it with 'Digital Signature' and "
            "'Key Encipherment'")
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    if eku is not None:
        missing = [n for n, oid in (("Server Authentication", ExtendedKeyUsageOID.SERVER_AUTH),
                                    ("Client Authentication", ExtendedKeyUsageOID.CLIENT_AUTH))
                   if oid not in eku]
        if missing:
            err("extended-key-usage", "nodes authenticate each other both ways, but the "
                f"certificate's extended key usage lacks {' and '.join(missing)}: reissue it "
                "with both")
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is not None and bc.ca:
        warn("ca-certificate", "this is a CA certificate; give the nodes a certificate issued "
             "by the CA, not the CA's own")

    names = _san_dns_names(cert)
    if names is None:
        cn = [str(a.value) for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
        effective = cn[-1] if cn else None
        warn("san", "the certificate has no Subject Alternative Name; TLS clients match the "
             "SAN, not the subject's common name: add the node's FQDN as its SAN")
    else:
        effective = names[-1] if names else None
        if len(names) > 1:
            warn("last-san-only", f"the certificate has {len(names)} SAN entries; only the last "
                 f"one ({effective}) is used and the others are ignored, so it serves only the "
                 f"machine named {effective}: use one certificate per node, or one wildcard")
    for node in nodes:
        if effective is None or not _name_matches(effective, node):
            err("node-name", f"node {node!r} cannot use this certificate: its effective name "
                f"(the last SAN entry) is {effective!r}; issue a certificate whose last SAN "
                "entry is the node's FQDN")

    self_signed = _verify_signed_by(cert, cert)
    if trusted:
        pool = [*chain, *trusted]
        current, ok = cert, False
        for _ in range(8):  # chains are short; bound the walk
            if any(current == t or _verify_signed_by(current, t) for t in trusted):
                ok = True
                break
            nxt = next((c for c in pool if c != current and _verify_signed_by(current, c)), None)
            if nxt is None:
                break
            current = nxt
        if not ok:
            err("trust", f"no trusted root given signs this certificate (issuer: "
                f"{cert.issuer.rfc4514_string()}): every node must trust its issuer; install the "
                "issuing CA in each node's trusted root store, or give its intermediates")
    elif self_signed:
        warn("trust", "the certificate is self-signed: every node must trust it explicitly "
             "(install it in each node's trusted roots); a public CA's certificate is recommended")
    else:
        warn("trust", f"trust was not checked (no --ca given): make sure every node trusts "
             f"the issuer {cert.issuer.rfc4514_string()}")
    return out


def sha256_fingerprint(cert: x509.Certificate) -> str:
    """The certificate's SHA-256 fingerprint, as hex pairs."""
    return cert.fingerprint(hashes.SHA256()).hex(":")
