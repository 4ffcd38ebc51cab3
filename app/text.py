"""Characters that do not show as themselves, in one place for every role that meets them.

Ingest refuses them raw in URLs (app.ingest.events), the gateway's live aggregates show them as
U+FFFD in sources decoded from `utm_source` (app.gateway.aggregates), and the dashboard's
`source()` does the same in JavaScript (app/static/dashboard.html, held to this class by
tests/test_text.py). One class, so that what ingest lets through and what a viewer is shown
cannot drift apart.
"""

from __future__ import annotations

import re

#: C0 controls, DEL and C1 controls (U+009B is a terminal's CSI), the soft hyphen, and every
#: invisible format character: the Arabic letter mark, the Mongolian vowel separator,
#: zero-width ones, the bidirectional marks, embeddings, overrides and isolates (an outside
#: test showed a referrer host as google.com with U+202E), the word joiner and friends, the
#: BOM. As the body of a character class, written so that Python and JavaScript read it alike.
UNSHOWN_CLASS = r"\x00-\x1f\x7f-\x9f\xad\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u206f\ufeff"

UNSHOWN = re.compile(f"[{UNSHOWN_CLASS}]")
