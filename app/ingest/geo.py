"""The country of a client IP, offline, at ingest.

GeoIP2Fast reads its bundled data file (MaxMind GeoLite2 country data, CC BY-SA 4.0: see the
attribution in README.md) into memory once per process, about 0.1 s and 40 MB, and answers a
lookup in a few microseconds without any I/O. Only the two-letter country code leaves this
module; the IP is never stored, published or logged (docs/ingest.md, "Privacy").
"""

from __future__ import annotations

import re

from geoip2fast import GeoIP2Fast

#: IPv4 and IPv6 networks in one file.
DATA_FILE = "geoip2fast-ipv6.dat.gz"
_CODE = re.compile(r"^[A-Z]{2}$")


class Countries:
    def __init__(self) -> None:
        self._db = GeoIP2Fast(geoip2fast_data_file=DATA_FILE, verbose=False)

    def code(self, ip: str) -> str | None:
        """ISO 3166-1 alpha-2, or None for private, reserved, unknown or invalid addresses."""
        found = self._db.lookup(ip).country_code
        return found if isinstance(found, str) and _CODE.match(found) else None
