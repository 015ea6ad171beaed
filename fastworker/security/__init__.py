"""CURVE keys and the ZAP authenticator (see design/security.md)."""

from ._certs import (
    CertificateError,
    CurveKeys,
    generate_certificate,
    load_public_key,
    load_public_keys,
    load_secret_key,
)

__all__ = [
    "CertificateError",
    "CurveKeys",
    "generate_certificate",
    "load_public_key",
    "load_public_keys",
    "load_secret_key",
]
