"""SSE framing (server/api/sse.py) under hypothesis: every payload is one well-formed event."""
from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from server.api.sse import sse


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4)))
def test_sse_framing_round_trips_any_json(data):
    """One event per payload, whatever its text holds (newlines, `data:` lines, unicode)."""
    frame = sse(data).decode()
    assert frame.startswith("data: ") and frame.endswith("\n\n") and frame.count("\n") == 2
    assert json.loads(frame[len("data: "):-2]) == data
