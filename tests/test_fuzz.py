"""Fuzzing the HTTP API from its own OpenAPI document (issue 10): schemathesis generates
requests for every operation (valid and invalid ones) against the real app over a tiny
model; no case may get a 5xx, an undocumented status, or a body that breaks the documented
shape. `WORKMEM_FUZZ_EXAMPLES` sets the cases per operation and mode (default below)."""
from __future__ import annotations

import os

import pytest
import schemathesis
from schemathesis import GenerationMode
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import (
    content_type_conformance, not_a_server_error, response_schema_conformance, status_code_conformance,
)

from tests.server_fixtures import make_app, running_engine

EXAMPLES = int(os.environ.get("WORKMEM_FUZZ_EXAMPLES", "50"))  # per operation and mode (~900 cases, ~35 s)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def app(tiny_checkpoint):
    with running_engine(tiny_checkpoint("llama"), max_model_len=64, num_kv_blocks=64, block_size=8) as engine:
        yield make_app(engine, max_tokens_default=4)


def test_api_holds_its_contract(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    cases = 0
    operations = [result.ok() for result in schema.get_all_operations()]
    for operation in operations:
        for mode in GenerationMode:  # schema-valid requests, then invalid ones

            @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                      derandomize=True)
            @given(case=operation.as_strategy(generation_mode=mode))
            def holds(case) -> None:
                nonlocal cases
                cases += 1
                case.call_and_validate(checks=CHECKS)

            try:
                holds()
            except Unsatisfiable:  # an operation without inputs has no invalid requests
                assert mode is GenerationMode.NEGATIVE
    print(f"schemathesis: {cases} cases over {len(operations)} operations")
    assert len(operations) >= 14 and cases >= len(operations) * 2
