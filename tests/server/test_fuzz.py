"""Schema fuzzing: schemathesis generates requests from the server's OpenAPI document and sends
them over loopback HTTP without a token, with the join token and with a client's token. No
request may get a 5xx (a bounded, derandomized run)."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import JOIN_TOKEN, ApiClient, small_spec

EXAMPLES = 80  # generated requests, each sent three times (no token, join token, client token)


def test_no_request_gets_a_5xx(live_server) -> None:  # type: ignore[no-untyped-def]
    srv = live_server(min_clients=2)
    client = ApiClient(srv.url, small_spec())
    schema = schemathesis.openapi.from_url(f"{srv.url}/v1/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 7
    tokens = {"none": {}, "join": ApiClient.auth(JOIN_TOKEN), "client": client.headers}
    seen: set[tuple[str, str]] = set()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=st.sampled_from(operations).flatmap(lambda op: op.as_strategy()))
    def no_5xx(case) -> None:  # type: ignore[no-untyped-def]
        seen.add((case.method, case.path))
        for kind, headers in tokens.items():
            response = case.call(base_url=srv.url, headers=headers)
            what = (kind, case.method, case.formatted_path, response.status_code, response.text)
            assert response.status_code < 500, what

    no_5xx()
    assert len(seen) >= len(operations) - 1, f"the run reached only {sorted(seen)}"
