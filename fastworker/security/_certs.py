"""CURVE certificates on disk, in ZeroMQ's own file format (``zmq.auth``).

The files are what ``zmq.auth.create_certificates`` writes and
``zmq.auth.load_certificate`` reads, so keys made here work with any other
ZeroMQ tool.  We write them ourselves only to create the secret file with
mode 0600 from the first byte: ``zmq.auth`` writes it world-readable under
the usual umask and leaves the chmod to the caller.
"""

from __future__ import annotations

import datetime
import os
import struct
from pathlib import Path

import zmq.auth
from zmq.utils import z85

from ..transport import CurveKeys

__all__ = [
    "CertificateError",
    "CurveKeys",
    "callback_key",
    "generate_certificate",
    "load_public_key",
    "load_public_keys",
    "load_secret_key",
    "secret_file_warning",
]

_BANNER = """#   ****  Generated on {when} by fastworker  ****
#   ZeroMQ CURVE {kind} Certificate
#   {advice}

"""


class CertificateError(ValueError):
    """A certificate file is missing, unreadable or holds no usable key."""


def _write(path: Path, text: str, mode: int, force: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    fd = os.open(path, flags, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        os.fchmod(f.fileno(), mode)  # O_CREAT's mode is masked by the umask
        f.write(text)


def _certificate(keys: CurveKeys, *, secret: bool) -> str:
    when = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    if secret:
        banner = _BANNER.format(
            when=when,
            kind="**Secret**",
            advice="DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.",
        )
    else:
        banner = _BANNER.format(
            when=when, kind="Public", advice="Copy it to the peers that must trust this key."
        )
    lines = [banner, "metadata\n", "curve\n", f'    public-key = "{keys.public.decode()}"\n']
    if secret:
        lines.append(f'    secret-key = "{keys.secret.decode()}"\n')
    return "".join(lines)


def generate_certificate(
    name: str, directory: str | os.PathLike[str], *, force: bool = False
) -> tuple[Path, Path]:
    """Write ``NAME.key`` (public, 0644) and ``NAME.key_secret`` (0600); their paths.

    Refuses to overwrite existing files unless ``force``: replacing a key
    silently locks out every peer that trusts the old one.
    """
    if not name or "/" in name or name.startswith("."):
        raise CertificateError(f"a key name must be a plain file name, not {name!r}")
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    keys = CurveKeys.generate()
    public_path = folder / f"{name}.key"
    secret_path = folder / f"{name}.key_secret"
    try:
        _write(secret_path, _certificate(keys, secret=True), 0o600, force)
        _write(public_path, _certificate(keys, secret=False), 0o644, force)
    except FileExistsError as exc:
        raise CertificateError(f"{exc.filename} exists; pass --force to replace it") from None
    return public_path, secret_path


def _load(path: str | os.PathLike[str]) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise CertificateError(f"cannot read a CURVE certificate from {path}: {exc}") from None
    if len(public) != 40 or (secret is not None and len(secret) != 40):
        raise CertificateError(f"{path} does not hold 40-character Z85 CURVE keys")
    return public, secret


def load_secret_key(path: str | os.PathLike[str]) -> CurveKeys:
    """The key pair in a secret certificate (``NAME.key_secret``)."""
    public, secret = _load(path)
    if secret is None:
        raise CertificateError(
            f"{path} holds no secret key: give the NAME.key_secret file, not NAME.key"
        )
    return CurveKeys(public, secret)


def load_public_key(path: str | os.PathLike[str]) -> bytes:
    """The public key in a certificate (either file of a pair)."""
    return _load(path)[0]


def load_public_keys(directory: str | os.PathLike[str]) -> frozenset[bytes]:
    """Every public key in the ``*.key`` files of ``directory``.

    A missing directory is an error (a typo must not mean "nobody"); an
    unreadable file in it is an error too, so a bad deploy is noticed at
    start or at reload rather than as refused peers.  So is a secret
    certificate (``*.key_secret``): a directory of public keys is copied and
    shared, and a secret there has leaked, or is about to.
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise CertificateError(f"{folder} is not a directory of public certificates")
    secrets = sorted(folder.glob("*.key_secret"))
    if secrets:
        raise CertificateError(
            f"a secret key in a public directory: {secrets[0]}; move every *.key_secret "
            "to its owner (only public *.key files belong here)"
        )
    return frozenset(load_public_key(path) for path in sorted(folder.glob("*.key")))


def secret_file_warning(path: str | os.PathLike[str]) -> str | None:
    """Why ``path``'s permissions let others read a secret key; None when they do not."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None  # reading it fails, with its own message
    if mode & 0o077:
        return (
            f"{path} can be read by group or others (mode {mode & 0o777:o}): anyone who "
            f"reads it can pose as this node; chmod 600 {path}"
        )
    return None


def callback_key(key: str | os.PathLike[str] | bytes) -> bytes:
    """A callback receiver's public key as the ``cbk`` option carries it (32 raw bytes).

    Takes the receiver's public certificate file, or its key in Z85 (40
    characters, as ``CallbackReceiver.public_key`` gives it).
    """
    if isinstance(key, bytes) and len(key) == 40:
        z85_key = key
    elif isinstance(key, str) and len(key) == 40 and not os.path.exists(key):
        z85_key = key.encode()
    elif isinstance(key, (str, os.PathLike)):
        z85_key = load_public_key(key)
    else:
        raise TypeError("callback_server_key must be a certificate path or a 40-character Z85 key")
    try:
        raw = z85.decode(z85_key)
    except (ValueError, KeyError, struct.error):
        raise CertificateError(f"{z85_key!r} is not a Z85 CURVE key") from None
    if len(raw) != 32:
        raise CertificateError("a CURVE public key is 32 bytes (40 Z85 characters)")
    return raw
