"""``--http-address``: Prometheus /metrics, a JSON API and a live dashboard (optional extra).

Install with ``pip install 'fastworker[dashboard]'`` (Starlette, Hypercorn,
prometheus_client).  Only ``_address`` is imported without them: the node
checks the address before anything else; the rest is imported by the control
plane when it is asked to serve HTTP.
"""

from ._address import HttpStartError as HttpStartError
from ._address import check_http_address as check_http_address
from ._address import parse_http_address as parse_http_address

__all__ = ["HttpStartError", "check_http_address", "parse_http_address"]
