"""``shir cert check FILE [--node NAME ...] [--ca FILE ...] [--json]``: explain a certificate.

Exit codes: 0 usable (warnings may be printed), 1 unusable (at least one error), 2 bad input
(a file that cannot be read or holds no certificate).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

from shir.adapters.certs import (
    MAX_CERT_FILE_BYTES,
    CertificateUnreadable,
    Severity,
    check_certificate,
    load_certificates,
    sha256_fingerprint,
)

__all__ = ["add_commands"]


def _read(path: Path, what: str) -> list[Any]:
    try:
        if path.stat().st_size > MAX_CERT_FILE_BYTES:
            raise CertificateUnreadable(f"{what} {path} is larger than {MAX_CERT_FILE_BYTES} bytes")
        data = path.read_bytes()
    except OSError as exc:
        raise CertificateUnreadable(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        return load_certificates(data)
    except CertificateUnreadable as exc:  # name the file: the user may have given several
        raise CertificateUnreadable(f"{what} {path}: {exc}") from None


def _cmd_check(args: argparse.Namespace) -> int:
    try:
        certs = _read(args.file, "certificate file")
        trusted = [c for f in args.ca for c in _read(f, "CA file")]
    except CertificateUnreadable as exc:
        print(f"shir cert check: error: {exc}", file=sys.stderr)
        return 2
    cert, chain = certs[0], certs[1:]
    findings = check_certificate(cert, now=dt.datetime.now(dt.UTC), nodes=args.node,
                                 trusted=trusted, chain=chain)
    usable = not any(f.severity is Severity.ERROR for f in findings)
    if args.json:
        doc: dict[str, Any] = {
            "file": str(args.file),
            "subject": cert.subject.rfc4514_string(),
            "sha256": sha256_fingerprint(cert),
            "usable": usable,
            "findings": [{"rule": f.rule, "severity": f.severity.value, "message": f.message}
                         for f in findings],
        }
        print(json.dumps(doc, indent=2))
    else:
        print(f"{args.file}: {cert.subject.rfc4514_string()} (sha256 {sha256_fingerprint(cert)})")
        for f in findings:
            print(f"  {f.severity.value:7} [{f.rule}] {f.message}")
        print("usable for the intranet channel" if usable
              else "NOT usable for the intranet channel: fix the errors above")
    return 0 if usable else 1


def _fqdn(text: str) -> str:
    """``--node``: a name a certificate can be matched against (bad input, not a finding)."""
    if not text or len(text) > 253 or any(c.isspace() or ord(c) < 32 for c in text):
        raise argparse.ArgumentTypeError(
            f"{text[:60]!r} is not a node's name: give its FQDN (node1.contoso.com), at most "
            "253 characters, no spaces"
        )
    return text


def add_commands(subparsers: Any) -> None:
    """Add ``cert check`` to an ``add_subparsers()`` result."""
    cert = subparsers.add_parser(
        "cert", help="check the intranet channel's TLS certificate against the product's rules")
    commands = cert.add_subparsers(dest="cert_command", metavar="COMMAND")
    commands.required = True
    check = commands.add_parser(
        "check", help="explain whether a certificate can secure the inter-node channel",
        description="Exit 0 usable, 1 unusable (errors printed), 2 unreadable input.")
    check.add_argument("file", type=Path, help="the certificate (PEM, possibly with its chain, "
                       "or DER)")
    check.add_argument("--node", action="append", default=[], metavar="FQDN", type=_fqdn,
                       help="a node that will present it (repeat for each node)")
    check.add_argument("--ca", action="append", default=[], type=Path, metavar="FILE",
                       help="a root every node trusts (repeat); without it trust is not checked")
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.set_defaults(handler=_cmd_check)
