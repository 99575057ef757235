"""The inter-node certificate rules, table-driven over certificates built with ``cryptography``."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shir.adapters.certs import (
    CertificateUnreadable,
    Severity,
    check_certificate,
    load_certificates,
)

NOW = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
_KEYS: dict[tuple[str, int], object] = {}


def _rsa(bits: int = 2048) -> rsa.RSAPrivateKey:
    key = _KEYS.get(("rsa", bits))
    if key is None:
        key = _KEYS[("rsa", bits)] = rsa.generate_private_key(65537, bits)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@attrs.frozen
class Spec:
    """What to build: a leaf for node FQDNs, signed by the test CA unless ``self_signed``."""

    sans: tuple[str, ...] = ("node1.contoso.test",)
    days_before: int = 30
    days_after: int = 365
    key: str = "rsa2048"
    self_signed: bool = False
    eku: tuple[str, ...] | None = ("server", "client")
    key_usage: bool = True
    ca: bool = False


def _ca() -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = _rsa(3072)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("shir test CA")).issuer_name(_name("shir test CA"))
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(NOW - dt.timedelta(days=400))
        .not_valid_after(NOW + dt.timedelta(days=4000))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


CA, CA_KEY = _ca()


def build(spec: Spec) -> x509.Certificate:
    if spec.key == "ec":
        key: object = ec.generate_private_key(ec.SECP256R1())
    else:
        key = _rsa(int(spec.key.removeprefix("rsa")))
    public = key.public_key()  # type: ignore[attr-defined]
    b = (
        x509.CertificateBuilder().subject_name(_name(spec.sans[0] if spec.sans else "nobody"))
        .issuer_name(_name(spec.sans[0]) if spec.self_signed else CA.subject)
        .public_key(public).serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=spec.days_before))
        .not_valid_after(NOW + dt.timedelta(days=spec.days_after))
    )
    if spec.sans:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(s) for s in spec.sans]),
                            critical=False)
    if spec.eku is not None:
        oids = {"server": ExtendedKeyUsageOID.SERVER_AUTH,
                "client": ExtendedKeyUsageOID.CLIENT_AUTH}
        b = b.add_extension(x509.ExtendedKeyUsage([oids[e] for e in spec.eku]), critical=False)
    b = b.add_extension(
        x509.KeyUsage(digital_signature=spec.key_usage, content_commitment=False,
                      key_encipherment=spec.key_usage, data_encipherment=False,
                      key_agreement=False, key_cert_sign=not spec.key_usage, crl_sign=False,
                      encipher_only=False, decipher_only=False), critical=True)
    if spec.ca:
        b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    signer = key if spec.self_signed else CA_KEY
    return b.sign(signer, hashes.SHA256())  # type: ignore[arg-type]


def _v1() -> x509.Certificate:
    """A v1 certificate: cryptography builds only v3, so patch the DER's version field away."""
    der = build(Spec(sans=(), eku=None, key_usage=True)).public_bytes(serialization.Encoding.DER)
    # TBSCertificate starts with [0] EXPLICIT INTEGER 2 (v3): a0 03 02 01 02. Remove it (v1 is
    # the DEFAULT) and fix the enclosing lengths; the signature no longer matches, which the
    # version rule does not need.
    marker = bytes.fromhex("a003020102")
    i = der.index(marker)
    body = der[:i] + der[i + 5:]
    return _reencode_lengths(body)


def _reencode_lengths(der: bytes) -> x509.Certificate:
    # outer SEQUENCE (30 82 LL LL) and TBS SEQUENCE (30 82 LL LL): both shrank by 5 bytes
    out = bytearray(der)
    for pos in (0, 4):
        assert out[pos] == 0x30 and out[pos + 1] == 0x82
        n = int.from_bytes(out[pos + 2:pos + 4], "big") - 5
        out[pos + 2:pos + 4] = n.to_bytes(2, "big")
    return x509.load_der_x509_certificate(bytes(out))


Case = tuple[str, Callable[[], x509.Certificate], tuple[str, ...], bool, set[str]]
# (id, certificate, nodes, trust the CA?, the rules expected as errors)
CASES: list[Case] = [
    ("good", lambda: build(Spec()), ("node1.contoso.test",), True, set()),
    ("v1", _v1, (), False, {"x509-v3"}),
    ("expired", lambda: build(Spec(days_before=400, days_after=-1)), (), True, {"validity"}),
    ("not-yet-valid", lambda: build(Spec(days_before=-2)), (), True, {"validity"}),
    ("weak-rsa-1024", lambda: build(Spec(key="rsa1024")), (), True, {"key-size"}),
    ("ec-key-is-cng", lambda: build(Spec(key="ec")), (), True, {"cng-key"}),
    ("wrong-san-order", lambda: build(Spec(sans=("node1.contoso.test", "node2.contoso.test"))),
     ("node1.contoso.test",), True, {"node-name"}),
    ("last-san-is-node", lambda: build(Spec(sans=("node1.contoso.test", "node2.contoso.test"))),
     ("node2.contoso.test",), True, set()),
    ("wildcard", lambda: build(Spec(sans=("*.contoso.test",))),
     ("node3.contoso.test",), True, set()),
    ("wildcard-one-label-only", lambda: build(Spec(sans=("*.contoso.test",))),
     ("a.b.contoso.test",), True, {"node-name"}),
    ("untrusted-self-signed", lambda: build(Spec(self_signed=True)), (), True, {"trust"}),
    ("server-auth-only", lambda: build(Spec(eku=("server",))), (), True, {"extended-key-usage"}),
    ("no-key-usage-for-tls", lambda: build(Spec(key_usage=False)), (), True, {"key-usage"}),
    ("no-san-node", lambda: build(Spec(sans=())), ("node1.contoso.test",), True, {"node-name"}),
]


@pytest.mark.parametrize(("case_id", "make", "nodes", "trust", "errors"), CASES,
                         ids=[c[0] for c in CASES])
def test_certificate_rules(case_id: str, make: Callable[[], x509.Certificate],
                           nodes: tuple[str, ...], trust: bool, errors: set[str]) -> None:
    findings = check_certificate(make(), now=NOW, nodes=nodes, trusted=[CA] if trust else [])
    got = {f.rule for f in findings if f.severity is Severity.ERROR}
    assert got == errors, [f.message for f in findings]
    for f in findings:  # every finding says what to do
        assert f.message and any(w in f.message for w in (":", "use", "install", "renew"))


def test_warnings_explain_the_last_san_rule_and_self_signed_trust() -> None:
    two = build(Spec(sans=("node1.contoso.test", "node2.contoso.test")))
    msgs = {f.rule: f.message for f in check_certificate(two, now=NOW, trusted=[CA])}
    last = msgs["last-san-only"]
    assert "node2.contoso.test" in last and "only the last" in last
    own = build(Spec(self_signed=True))
    (trust,) = [f for f in check_certificate(own, now=NOW) if f.rule == "trust"]
    assert trust.severity is Severity.WARNING and "self-signed" in trust.message
    soon = build(Spec(days_after=10))
    assert any(f.rule == "validity" and f.severity is Severity.WARNING
               for f in check_certificate(soon, now=NOW, trusted=[CA]))
    ca_leaf = build(Spec(ca=True))
    assert any(f.rule == "ca-certificate" for f in check_certificate(ca_leaf, now=NOW))


def test_unreadable_inputs_are_named() -> None:
    with pytest.raises(CertificateUnreadable, match=r"no X\.509 certificate"):
        load_certificates(b"not a certificate")
    key_pem = _rsa().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption())
    with pytest.raises(CertificateUnreadable, match="private key"):
        load_certificates(key_pem)
    with pytest.raises(CertificateUnreadable, match="at most"):
        load_certificates(b"x" * (2 * 1024 * 1024))


def _shir(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shir.adapters.cli", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def test_cert_check_cli(tmp_path: Path) -> None:
    good = tmp_path / "node1.pem"
    good.write_bytes(build(Spec()).public_bytes(serialization.Encoding.PEM))
    ca = tmp_path / "ca.pem"
    ca.write_bytes(CA.public_bytes(serialization.Encoding.PEM))
    ok = _shir("cert", "check", str(good), "--node", "node1.contoso.test", "--ca", str(ca))
    assert ok.returncode == 0, ok.stderr
    assert "usable for the intranet channel" in ok.stdout
    bad = _shir("cert", "check", str(good), "--node", "node9.contoso.test", "--ca", str(ca),
                "--json")
    assert bad.returncode == 1
    doc = json.loads(bad.stdout)
    assert doc["usable"] is False and doc["findings"][0]["rule"] == "node-name"
    missing = _shir("cert", "check", str(tmp_path / "nope.pem"))
    assert missing.returncode == 2 and "cannot read certificate file" in missing.stderr
    assert "Traceback" not in missing.stderr
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    out = _shir("cert", "check", str(junk))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"certificate file {junk}: no X.509 certificate" in out.stderr  # names the file
    out = _shir("cert", "check", str(good), "--ca", str(junk))
    assert out.returncode == 2 and f"CA file {junk}: no X.509 certificate" in out.stderr


def test_a_sha1_signature_is_an_error() -> None:
    # made once with `openssl req -x509 -sha1` (cryptography refuses to sign with SHA-1)
    (cert,) = load_certificates((Path(__file__).parent / "data/sha1-self-signed.pem").read_bytes())
    findings = check_certificate(cert, now=cert.not_valid_before_utc + dt.timedelta(days=1))
    assert {f.rule for f in findings if f.severity is Severity.ERROR} == {"signature"}


@pytest.mark.parametrize("node", ["", "a b", "x" * 300])
def test_a_node_name_that_is_no_host_name_is_bad_input_not_an_unusable_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], node: str
) -> None:
    from shir.adapters.cli import main

    good = tmp_path / "node1.pem"
    good.write_bytes(build(Spec()).public_bytes(serialization.Encoding.PEM))
    assert main(["cert", "check", str(good), "--node", node]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "argument --node" in err and "not a node's name" in err


def test_a_serial_number_that_is_not_positive_is_a_finding_not_library_noise(
    tmp_path: Path,
) -> None:
    # Old CAs (some in the system bundle) carry serial 0; cryptography warns about it on load,
    # with a line of shir's source. The check reports it as a finding instead.
    der = CA.public_bytes(serialization.Encoding.DER)
    one = b"\xa0\x03\x02\x01\x02\x02\x01\x01"  # [0] version v3, then serialNumber INTEGER 1
    assert der.count(one) == 1
    zero = tmp_path / "zero.der"
    zero.write_bytes(der.replace(one, one[:-1] + b"\x00"))
    run = _shir("cert", "check", str(zero))
    assert "Warning" not in run.stderr and "certs.py" not in run.stderr
    assert "warning [serial] the serial number is zero" in run.stdout
