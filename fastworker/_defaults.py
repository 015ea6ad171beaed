"""Defaults that several packages must agree on, so each is written once."""

__all__ = ["DEFAULT_DISCOVERY_ADDRESS"]

# Where a node listens for Discovery and where workers and clients look for it
# when told nothing else: loopback, so a default node is never reachable from
# another machine by accident.
DEFAULT_DISCOVERY_ADDRESS = "tcp://127.0.0.1:5550"
