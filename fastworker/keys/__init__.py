"""``python -m fastworker.keys generate NAME --dir DIR``: make a CURVE key pair.

Writes ``NAME.key`` (the public certificate, to copy to the peers that must
trust it) and ``NAME.key_secret`` (mode 0600, stays with its owner), in
ZeroMQ's certificate format.  See design/security.md for which key goes where.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..security import CertificateError, generate_certificate

__all__ = ["build_parser", "main"]


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog="python -m fastworker.keys", description="Manage fastworker's CURVE keys."
    )
    commands = parser.add_subparsers(dest="keys_command", required=True)
    generate = commands.add_parser(
        "generate", help="write NAME.key (public) and NAME.key_secret (secret, mode 0600)"
    )
    generate.add_argument("name", help="file name stem, e.g. server, client-web, worker-a")
    generate.add_argument("--dir", default=".", help="directory to write into (default: .)")
    generate.add_argument(
        "--force", action="store_true", help="replace existing files of that name"
    )
    return parser


def run(args: argparse.Namespace) -> int:
    """Carry out parsed ``keys`` arguments; the exit code."""
    try:
        public, secret = generate_certificate(args.name, args.dir, force=args.force)
    except (CertificateError, OSError) as exc:
        print(f"fastworker keys: {exc}", file=sys.stderr)
        return 1
    print(f"public key: {public}")
    print(f"secret key: {secret}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))
