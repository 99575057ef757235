"""Windows DPAPI as a :class:`~shir.adapters.protect.Protector` (what the product itself uses).

**Not run here.** This module imports on every platform, but DPAPI exists only on Windows: the
code below was written against the documented ``crypt32`` signatures and has never been
executed on the Linux machine this project is developed on. The shared contract tests
(``tests/protector_contract.py``) run it on Windows and are skipped elsewhere.

Blob layout::

    b"SHD" | version (1 byte, = 1) | scope (1 byte: 0 user, 1 machine) | DPAPI blob

The small header lets a user-scope protector refuse a machine-scope blob (and vice versa) with
:class:`~shir.adapters.protect.WrongKey`, and tells a DPAPI blob from a portable one, which
DPAPI alone cannot do: ``CryptUnprotectData`` opens any blob the caller may open, whatever
scope the caller meant.
"""

from __future__ import annotations

import sys
from typing import Any, Literal

import attrs

from shir.adapters.protect import (
    ByteReader,
    ProtectorUnavailable,
    TamperedCiphertext,
    WrongKey,
)

__all__ = ["DpapiProtector"]

CRYPTPROTECT_UI_FORBIDDEN = 0x1  # never show a prompt: the node runs as a service
CRYPTPROTECT_LOCAL_MACHINE = 0x4  # any account on this machine may unprotect

_MAGIC = b"SHD"
_VERSION = 1
_SCOPES: dict[str, int] = {"user": 0, "machine": 1}


def _check_scope(_instance: object, _attribute: object, value: str) -> None:
    if value not in _SCOPES:
        raise ValueError(f"DPAPI scope must be 'user' or 'machine', not {value!r}")


def _check_platform(_instance: object, _attribute: object, _value: str) -> None:
    if sys.platform != "win32":
        raise ProtectorUnavailable(
            f"DPAPI exists only on Windows and this is {sys.platform!r}; use "
            "shir.adapters.protect.PortableProtector (or default_protector(data_dir), which "
            "picks the right one)"
        )


@attrs.frozen
class DpapiProtector:
    """Protects secrets with ``CryptProtectData`` from ``crypt32.dll`` (Windows only).

    ``scope="user"`` (the default) binds blobs to the current Windows account; ``"machine"``
    (``CRYPTPROTECT_LOCAL_MACHINE``) lets any account on this machine open them. Prompts are
    forbidden (``CRYPTPROTECT_UI_FORBIDDEN``). The entropy is passed as DPAPI's optional
    entropy. Constructing one off Windows raises
    :class:`~shir.adapters.protect.ProtectorUnavailable`.

    Untested here: the project's development machine runs Linux, so this class has only been
    checked for importing and for refusing construction.
    """

    scope: Literal["user", "machine"] = attrs.field(
        default="user", validator=[_check_scope, _check_platform]
    )

    @property
    def name(self) -> str:
        """``"dpapi-user"`` or ``"dpapi-machine"``."""
        return f"dpapi-{self.scope}"

    def protect(self, plaintext: bytes, entropy: bytes = b"") -> bytes:
        """Encrypt ``plaintext`` with DPAPI for this account (or machine)."""
        flags = CRYPTPROTECT_UI_FORBIDDEN
        if self.scope == "machine":
            flags |= CRYPTPROTECT_LOCAL_MACHINE
        blob = _call_dpapi("protect", bytes(plaintext), bytes(entropy), flags)
        return _MAGIC + bytes([_VERSION, _SCOPES[self.scope]]) + blob

    def unprotect(self, blob: bytes, entropy: bytes = b"") -> bytes:
        """Decrypt a blob made by :meth:`protect` with the same scope and entropy."""
        reader = ByteReader(blob, "the DPAPI-protected blob", TamperedCiphertext)
        if reader.take(len(_MAGIC)) != _MAGIC:
            raise reader.fail(
                "was not made by the DPAPI protector (bad magic); it may come from the "
                "portable protector or be another kind of file"
            )
        version = reader.u8()
        if version != _VERSION:
            raise reader.fail(
                f"has format version {version}; this shir reads version {_VERSION}: upgrade "
                "shir, or the blob is damaged"
            )
        scope = reader.u8()
        if scope != _SCOPES[self.scope]:
            other = "machine" if scope == 1 else "user" if scope == 0 else f"unknown ({scope})"
            raise WrongKey(
                f"the blob was protected with DPAPI {other} scope, not {self.scope} scope; open "
                f"it with DpapiProtector(scope={other!r}) or set the secret again"
            )
        return _call_dpapi("unprotect", reader.rest(), bytes(entropy), CRYPTPROTECT_UI_FORBIDDEN)


def _call_dpapi(
    operation: Literal["protect", "unprotect"], data: bytes, entropy: bytes, flags: int
) -> bytes:
    """Run ``CryptProtectData``/``CryptUnprotectData`` on ``data`` and free DPAPI's output."""
    if sys.platform != "win32":  # construction already refused; keeps type checkers honest
        raise ProtectorUnavailable("DPAPI exists only on Windows")
    import ctypes
    import ctypes.wintypes  # only importable in full on Windows

    class DataBlob(ctypes.Structure):
        _fields_ = [
            ("cbData", ctypes.wintypes.DWORD),
            ("pbData", ctypes.POINTER(ctypes.c_char)),
        ]

    def blob_of(raw: bytes) -> tuple[DataBlob, Any]:
        buffer = ctypes.create_string_buffer(raw, max(len(raw), 1))  # kept alive by the caller
        return DataBlob(len(raw), ctypes.cast(buffer, ctypes.POINTER(ctypes.c_char))), buffer

    crypt32 = ctypes.WinDLL("crypt32", use_last_error=True)
    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    p_blob = ctypes.POINTER(DataBlob)
    function = crypt32.CryptProtectData if operation == "protect" else crypt32.CryptUnprotectData
    function.argtypes = [
        p_blob,  # pDataIn
        ctypes.c_void_p,  # szDataDescr (LPCWSTR in) / ppszDataDescr (LPWSTR* out): unused
        p_blob,  # pOptionalEntropy
        ctypes.c_void_p,  # pvReserved
        ctypes.c_void_p,  # pPromptStruct
        ctypes.wintypes.DWORD,  # dwFlags
        p_blob,  # pDataOut
    ]
    function.restype = ctypes.wintypes.BOOL
    kernel32.LocalFree.argtypes = [ctypes.c_void_p]
    kernel32.LocalFree.restype = ctypes.c_void_p

    data_in, data_buffer = blob_of(data)
    entropy_blob, entropy_buffer = blob_of(entropy)
    data_out = DataBlob()
    ok = function(
        ctypes.byref(data_in),
        None,
        ctypes.byref(entropy_blob) if entropy else None,
        None,
        None,
        flags,
        ctypes.byref(data_out),
    )
    del data_buffer, entropy_buffer
    if not ok:
        code = ctypes.get_last_error()
        if operation == "unprotect":
            raise TamperedCiphertext(
                f"DPAPI could not unprotect the blob (Windows error {code}): it was altered, "
                "protected by another account or machine, or for another purpose (entropy); "
                "set the secret again or restore it from a backup"
            )
        raise ProtectorUnavailable(f"DPAPI could not protect the secret (Windows error {code})")
    try:
        return ctypes.string_at(data_out.pbData, data_out.cbData) if data_out.cbData else b""
    finally:
        if data_out.pbData:  # a NULL pointer is falsy
            # DPAPI allocates the output with LocalAlloc: wipe it, then hand it back
            ctypes.memset(data_out.pbData, 0, data_out.cbData)
            kernel32.LocalFree(data_out.pbData)
