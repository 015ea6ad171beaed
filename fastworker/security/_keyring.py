"""Which CURVE public keys may act in which role, reloadable while running.

One ``KeyRing`` per control plane.  The ZAP handler consults it at each
handshake and the actors at each message, so a key removed by a reload is
refused from then on: new connections fail their handshake, and messages on
connections it made earlier are dropped.
"""

from __future__ import annotations

import logging
import os

from ._certs import load_public_keys

__all__ = ["CLIENT", "DISCOVERY", "WORKER", "KeyRing"]

log = logging.getLogger("fastworker.security")

# ZAP domains: one per control-plane socket; the domain says which roles may connect.
CLIENT = "client"  # the gateway: clients only
WORKER = "worker"  # the scheduler: workers only
DISCOVERY = "discovery"  # both; each message is then checked against its sender's role


class KeyRing:
    """The public keys of clients and of workers, from certificate directories.

    ``own_workers`` are keys the node made for its own worker processes
    (never on disk); they survive reloads.
    """

    def __init__(
        self,
        client_keys_dir: str | os.PathLike[str] | None,
        worker_keys_dir: str | os.PathLike[str] | None,
        *,
        own_workers: frozenset[bytes] = frozenset(),
    ) -> None:
        self._client_dir = client_keys_dir
        self._worker_dir = worker_keys_dir
        self._own_workers = own_workers
        self.clients: frozenset[bytes] = frozenset()
        self.workers: frozenset[bytes] = frozenset(own_workers)
        self.reload()

    def reload(self) -> None:
        """Read both directories again; on any error keep the old keys and raise.

        All or nothing: half a reload (new clients, old workers) would be a
        state nobody configured.
        """
        clients = load_public_keys(self._client_dir) if self._client_dir else frozenset()
        workers = load_public_keys(self._worker_dir) if self._worker_dir else frozenset()
        self.clients, self.workers = clients, workers | self._own_workers
        log.info("CURVE keys loaded: %d client keys, %d worker keys", len(clients), len(workers))

    def is_client(self, key: bytes) -> bool:
        return key in self.clients

    def is_worker(self, key: bytes) -> bool:
        return key in self.workers

    def allows(self, domain: str, key: bytes) -> bool:
        """May ``key`` (Z85) complete a handshake on a socket of ``domain``?"""
        if domain == CLIENT:
            return key in self.clients
        if domain == WORKER:
            return key in self.workers
        if domain == DISCOVERY:
            return key in self.clients or key in self.workers
        return False

    def callback(self, domain: str, key: bytes) -> bool:
        """pyzmq's credentials-provider hook (``Authenticator.configure_curve_callback``)."""
        return self.allows(domain, key)
