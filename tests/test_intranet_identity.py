"""A node's intranet identity: generated once in its home and protected, or the user's own."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from shir.adapters.certs import Severity, check_certificate
from shir.adapters.cli import main
from shir.adapters.intranet import EnvelopeMessage, Intranet, Peer
from shir.adapters.intranet_tls import (
    IdentityError,
    cert_fingerprint,
    create_identity,
    identity_from_files,
    load_or_create_identity,
)
from shir.adapters.intranet_wire import ProtocolError
from shir.adapters.protect import PortableProtector

NOW = dt.datetime.now(dt.UTC)


def protector(home: Path, machine: str = "m1") -> PortableProtector:
    return PortableProtector(home / "protector.key", machine_id=machine)


def test_a_generated_identity_is_made_once_and_kept(tmp_path: Path) -> None:
    first = load_or_create_identity(tmp_path, "node-1", protector=protector(tmp_path))
    again = load_or_create_identity(tmp_path, "node-1", protector=protector(tmp_path))
    assert again.fingerprint == first.fingerprint and len(first.fingerprint) == 64
    assert first.source == "generated" and first.fingerprint[:16] in repr(first)
    folder = tmp_path / "intranet"
    assert {p.name for p in folder.iterdir()} == {"node.crt", "node.key", "node.key.pass"}
    assert (folder / "node.key").stat().st_mode & 0o777 == 0o600
    assert (folder / "node.key.pass").stat().st_mode & 0o777 == 0o600
    assert b"ENCRYPTED PRIVATE KEY" in (folder / "node.key").read_bytes()


def test_a_generated_certificate_passes_the_certificate_rules(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    identity = load_or_create_identity(tmp_path, "node 1/ü", protector=protector(tmp_path))
    cert = x509.load_der_x509_certificate(identity.cert_der)
    findings = check_certificate(cert, now=NOW, nodes=["node-1"])
    assert [f for f in findings if f.severity is Severity.ERROR] == []
    assert main(["cert", "check", str(identity.cert_path)]) == 0
    assert "usable for the intranet channel" in capsys.readouterr().out


def test_the_identity_does_not_open_on_another_machine(tmp_path: Path) -> None:
    load_or_create_identity(tmp_path, "node-1", protector=protector(tmp_path, "m1"))
    with pytest.raises(IdentityError, match=r"cannot be used: .*move the folder aside"):
        load_or_create_identity(tmp_path, "node-1", protector=protector(tmp_path, "m2"))
    (tmp_path / "intranet" / "node.key.pass").unlink()
    with pytest.raises(IdentityError, match="cannot read key passphrase file"):
        load_or_create_identity(tmp_path, "node-1", protector=protector(tmp_path, "m1"))


def test_an_expired_generated_certificate_is_replaced(tmp_path: Path) -> None:
    old = create_identity(tmp_path / "intranet", "node-1", protector(tmp_path),
                          not_before=NOW - dt.timedelta(days=9), not_after=NOW - dt.timedelta(1))
    new = load_or_create_identity(tmp_path, "node-1", protector=protector(tmp_path))
    assert new.fingerprint != old.fingerprint
    assert load_or_create_identity(tmp_path, "n", protector=protector(tmp_path)) == new


def test_a_damaged_certificate_file_says_what_to_do(tmp_path: Path) -> None:
    load_or_create_identity(tmp_path, "node-1", protector=protector(tmp_path))
    (tmp_path / "intranet" / "node.crt").write_bytes(b"-----BEGIN CERTIFICATE-----\nxx\n")
    with pytest.raises(IdentityError, match=r"node.crt is damaged; move the folder aside"):
        load_or_create_identity(tmp_path, "node-1", protector=protector(tmp_path))


def _user_cert(folder: Path, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
               password: bytes | None = None) -> tuple[Path, Path]:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node1.contoso.com")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - dt.timedelta(days=1))
            .not_valid_after(NOW + dt.timedelta(days=90))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("node1.contoso.com")]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / "user.pem", folder / "user.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password
        else serialization.NoEncryption())
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8, encryption))
    return cert_path, key_path


def test_the_users_own_certificate_works_on_the_channel(tmp_path: Path) -> None:
    cert_path, key_path = _user_cert(tmp_path / "u", rsa.generate_private_key(65537, 2048),
                                     password=b"pw")
    user = identity_from_files(cert_path, key_path, password=b"pw")
    assert user.source == "user"
    assert user.fingerprint == cert_fingerprint(
        x509.load_pem_x509_certificate(cert_path.read_bytes()).public_bytes(
            serialization.Encoding.DER))
    generated = load_or_create_identity(tmp_path / "g", "g", protector=protector(tmp_path / "g"))
    got: list[tuple[str, EnvelopeMessage]] = []
    with Intranet("u", user, port=0, check_interval_s=None) as u, \
            Intranet("g", generated, port=0, check_interval_s=None,
                     on_envelope=lambda s, m: got.append((s, m))) as g:
        directory = {"u": Peer(u.address, user.fingerprint),
                     "g": Peer(g.address, generated.fingerprint)}
        u.set_peers(directory)
        g.set_peers(directory)
        u.send_envelope("g", EnvelopeMessage("c1", 1, b"sealed"))
        assert g.check_peer("u")
    assert got == [("u", EnvelopeMessage("c1", 1, b"sealed"))]


def test_a_user_certificate_breaking_a_rule_is_refused_naming_it(tmp_path: Path) -> None:
    cert_path, key_path = _user_cert(tmp_path, ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(IdentityError, match=r"cannot be used: \[cng-key\]"):
        identity_from_files(cert_path, key_path)


def test_a_user_certificate_must_name_the_machine_last(tmp_path: Path) -> None:
    cert_path, key_path = _user_cert(tmp_path, rsa.generate_private_key(65537, 2048))
    assert identity_from_files(cert_path, key_path, fqdn="node1.contoso.com").source == "user"
    with pytest.raises(IdentityError, match=r"\[node-name\] node 'node2.contoso.com' cannot"):
        identity_from_files(cert_path, key_path, fqdn="node2.contoso.com")


def test_a_user_key_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    cert_path, _ = _user_cert(tmp_path / "one", rsa.generate_private_key(65537, 2048))
    _, other_key = _user_cert(tmp_path / "two", rsa.generate_private_key(65537, 2048))
    with pytest.raises(IdentityError, match="give the key that belongs to this certificate"):
        identity_from_files(cert_path, other_key)
    with pytest.raises(IdentityError, match="cannot read certificate file"):
        identity_from_files(tmp_path / "missing.pem", other_key)
    with pytest.raises(IdentityError, match="holds a private key, not a certificate"):
        identity_from_files(other_key, other_key)


def test_envelope_messages_round_trip_and_hide_their_bytes() -> None:
    m = EnvelopeMessage("sql-1", 2**63, b"\x00secret-bytes")
    assert EnvelopeMessage.decode(m.encode()) == m
    assert "secret" not in repr(m) and "<13 bytes>" in repr(m)
    for bad in (b"", b"\x00\x00", b"\x00\x05abc", b"\x00\x01\xff" + bytes(8)):
        with pytest.raises(ProtocolError):
            EnvelopeMessage.decode(bad)
    with pytest.raises(ProtocolError, match="ids are 1-128 bytes"):
        EnvelopeMessage("", 1, b"").encode()
