"""Keep credentials out of everything the tracker logs.

A key can reach a logged value by accident (an env var expanded into a path, a URL with a
token, a config key named ``api_key``), so redaction works on values as well as key names.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

REDACTED = "***"

# Env names that hold credentials by convention (WANDB_API_KEY, HF_TOKEN, AWS_SECRET_ACCESS_KEY...).
_SECRET_NAME = re.compile(r"(?:^|_)(?:KEY|TOKEN|SECRET)$|PASSWORD|PASSWD", re.IGNORECASE)
# Short values ("1", "true") would redact half the config if matched as substrings.
_MIN_SECRET_LEN = 6


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of env vars whose names mark them as credentials, longest first."""
    environ = os.environ if environ is None else environ
    found = {v for k, v in environ.items() if is_secret_name(k) and len(v) >= _MIN_SECRET_LEN}
    # Longest first so a secret that contains another is replaced whole.
    return sorted(found, key=len, reverse=True)


def scrub(value: Any, secrets: list[str] | None = None) -> Any:
    """A copy of ``value`` with secret env values and secret-named keys replaced by ``***``."""
    secrets = secret_values() if secrets is None else secrets
    return _scrub(value, secrets)


def _scrub(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, str):
        for s in secrets:
            value = value.replace(s, REDACTED)
        return value
    if isinstance(value, Mapping):
        return {
            k: (REDACTED if isinstance(k, str) and is_secret_name(k) and v not in (None, "") else _scrub(v, secrets))
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(_scrub(v, secrets) for v in value)
    return value
