"""The node's CURVE flags: which keys each role uses, and the loopback-only default.

See design/security.md.  Checked before anything starts, so a wrong path or a
missing flag is one clear line and exit code 1, never a half-secured node.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

import attrs

from ..security import (
    CertificateError,
    is_loopback_endpoint,
    load_public_key,
    load_public_keys,
    load_secret_key,
    secret_file_warning,
)
from ..transport import CurveKeys

__all__ = ["NodeSecurity", "SecurityError", "add_security_arguments", "node_security"]

# How a node hands its own worker processes their key pair and the server's
# public key: in the child's environment (readable only by the same user),
# never on the command line (readable by everybody in ps).
_OWN_WORKER_KEYS_ENV = "_FASTWORKER_OWN_WORKER_KEYS"


class SecurityError(ValueError):
    """A security flag problem, reported as one line."""


def add_security_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("security (design/security.md)")
    group.add_argument(
        "--curve-secret-key",
        metavar="FILE",
        help="this node's secret certificate (NAME.key_secret): on a control plane it turns "
        "CURVE on for every socket; on a worker node it is the workers' own key",
    )
    group.add_argument(
        "--curve-server-key",
        metavar="FILE",
        help="worker nodes: the control plane's public certificate (its NAME.key)",
    )
    group.add_argument(
        "--client-keys",
        metavar="DIR",
        help="control plane: directory of the clients' public certificates (*.key); "
        "reloaded on SIGHUP",
    )
    group.add_argument(
        "--worker-keys",
        metavar="DIR",
        help="control plane: directory of the worker nodes' public certificates (*.key); "
        "reloaded on SIGHUP (a --role all node's own workers need none)",
    )
    group.add_argument(
        "--insecure",
        action="store_true",
        help="allow binding non-loopback addresses without CURVE: anyone who can reach "
        "the ports can submit, read and run tasks",
    )


@attrs.frozen
class NodeSecurity:
    """What the node's parts get: the control plane's and the workers' CURVE settings."""

    server: CurveKeys | None = None  # the control plane's own pair
    client_keys_dir: str | None = None
    worker_keys_dir: str | None = None
    worker: CurveKeys | None = None  # the worker processes' pair
    server_public: bytes | None = None  # what the workers check the control plane against
    own_workers: bool = False  # worker.public is trusted without a --worker-keys file
    # Problems worth a warning at start, not a refusal (a secret file others can read).
    warnings: tuple[str, ...] = ()

    def worker_env(self) -> dict[str, str]:
        """Environment entries that give this node's worker processes their keys."""
        if self.worker is None or self.server_public is None:
            return {}
        parts = (self.worker.public, self.worker.secret, self.server_public)
        return {_OWN_WORKER_KEYS_ENV: " ".join(p.decode() for p in parts)}


def _secret(path: str, flag: str) -> CurveKeys:
    try:
        return load_secret_key(path)
    except CertificateError as exc:
        raise SecurityError(f"{flag}: {exc}") from None


def _public(path: str, flag: str) -> bytes:
    try:
        return load_public_key(path)
    except CertificateError as exc:
        raise SecurityError(f"{flag}: {exc}") from None


def _directory(path: str | None, flag: str, *, if_empty: str | None) -> str | None:
    """``path`` once its keys load (the control plane loads them again, as at each reload).

    ``if_empty``: why an empty directory is refused (None: it is not).
    """
    if path is None:
        return None
    try:
        keys = load_public_keys(path)
    except CertificateError as exc:
        raise SecurityError(f"{flag}: {exc}") from None
    if not keys and if_empty is not None:
        raise SecurityError(f"{flag}: {path} holds no public certificate (*.key): {if_empty}")
    return path


def _warnings(*secret_files: str) -> tuple[str, ...]:
    found = (secret_file_warning(path) for path in secret_files)
    return tuple(warning for warning in found if warning is not None)


def node_security(
    args: argparse.Namespace, environ: Mapping[str, str] = os.environ
) -> NodeSecurity:
    """Check the flags against the role; the keys each part runs with."""
    if args.worker_process:
        return _worker_process(args, environ)
    serves = args.role in ("all", "control-plane")
    if not serves and (args.client_keys or args.worker_keys):
        raise SecurityError("--client-keys and --worker-keys belong to a control plane")
    if args.role == "worker":
        if bool(args.curve_secret_key) != bool(args.curve_server_key):
            raise SecurityError(
                "a worker node needs both --curve-secret-key (its own NAME.key_secret) and "
                "--curve-server-key (the control plane's NAME.key), or neither"
            )
        if args.curve_secret_key is None:
            return NodeSecurity()
        return NodeSecurity(
            worker=_secret(args.curve_secret_key, "--curve-secret-key"),
            server_public=_public(args.curve_server_key, "--curve-server-key"),
            warnings=_warnings(args.curve_secret_key),
        )
    if args.curve_server_key:
        raise SecurityError(
            "--curve-server-key is for worker nodes; a control plane's own key is "
            "--curve-secret-key"
        )
    if args.curve_secret_key is None:
        if args.client_keys or args.worker_keys:
            raise SecurityError("--client-keys and --worker-keys need --curve-secret-key")
        _check_loopback(args)
        return NodeSecurity()
    if args.client_keys is None:
        raise SecurityError(
            "--curve-secret-key needs --client-keys DIR: without it no client could connect"
        )
    own = args.role == "all" and args.workers > 0
    if args.worker_keys is None and not own:
        raise SecurityError(
            "--curve-secret-key without worker processes of its own needs --worker-keys DIR: "
            "without it no worker could join"
        )
    server = _secret(args.curve_secret_key, "--curve-secret-key")
    return NodeSecurity(
        server=server,
        client_keys_dir=_directory(
            args.client_keys, "--client-keys", if_empty="no client could connect"
        ),
        worker_keys_dir=_directory(
            args.worker_keys,
            "--worker-keys",
            if_empty=None if own else "no worker could join",
        ),
        # A fresh pair per node start for its own worker processes: nothing on disk.
        worker=CurveKeys.generate() if own else None,
        server_public=server.public if own else None,
        own_workers=own,
        warnings=_warnings(args.curve_secret_key),
    )


def _check_loopback(args: argparse.Namespace) -> None:
    if args.insecure:
        return
    for flag, address in (
        ("--discovery-address", args.discovery_address),
        ("--client-address", args.client_address),
        ("--worker-address", args.worker_address),
    ):
        if address is not None and not is_loopback_endpoint(address):
            raise SecurityError(
                f"{flag} {address} is reachable from other machines, and without "
                "--curve-secret-key anyone there could submit, read and run tasks: give the "
                "CURVE flags (python -m fastworker.keys generate; design/security.md), or "
                "--insecure to accept that"
            )


def _worker_process(args: argparse.Namespace, environ: Mapping[str, str]) -> NodeSecurity:
    own = environ.get(_OWN_WORKER_KEYS_ENV)
    if own:
        public, secret, server = (part.encode() for part in own.split(" "))
        return NodeSecurity(worker=CurveKeys(public, secret), server_public=server)
    if args.curve_secret_key and args.curve_server_key:
        return NodeSecurity(
            worker=_secret(args.curve_secret_key, "--curve-secret-key"),
            server_public=_public(args.curve_server_key, "--curve-server-key"),
        )
    return NodeSecurity()
