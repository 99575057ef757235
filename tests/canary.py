"""The secret every credential test uses, so a leak anywhere is one ``in`` check away.

Tests use :data:`CANARY` as credential plaintext and as backup password;
``test_no_secret_leaks.py`` asserts it never shows up in messages, reprs, logs, output or
files (other than as ciphertext).
"""

from __future__ import annotations

CANARY = "canary-s3cr3t-9f1c"
CANARY_BYTES = CANARY.encode("utf-8")
