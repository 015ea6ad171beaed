"""CURVE keys and the ZAP authenticator (see design/security.md)."""

from ._bind import is_loopback_endpoint
from ._certs import (
    CertificateError,
    CurveKeys,
    callback_key,
    generate_certificate,
    load_public_key,
    load_public_keys,
    load_secret_key,
    secret_file_warning,
)
from ._keyring import CLIENT, DISCOVERY, WORKER, KeyRing
from ._zap import ReloadKeys, ZapHandler

__all__ = [
    "CLIENT",
    "DISCOVERY",
    "WORKER",
    "CertificateError",
    "CurveKeys",
    "KeyRing",
    "ReloadKeys",
    "ZapHandler",
    "callback_key",
    "generate_certificate",
    "is_loopback_endpoint",
    "load_public_key",
    "load_public_keys",
    "load_secret_key",
    "secret_file_warning",
]
