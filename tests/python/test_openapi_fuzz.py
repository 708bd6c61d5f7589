"""HTTP fuzzing of every route from the router's own OpenAPI document (schemathesis), against the live
router + shard of conftest.py: no 5xx, no hang, status codes and bodies as the document says.

Generations stay short: a body the router would accept gets its token budget bounded before it is sent
(values past every limit are kept, so the refusals are still exercised)."""
import json

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

import pytest

# Per-request limit: a hang (a stream that never ends, a request stuck in the queue) fails the case.
TIMEOUT_S = 60
# Token budgets the schema allows but that would make generation long on 2 CPU cores.
BOUNDED = 4
MAX_EXAMPLES = 10
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
LIMIT_FIELDS = ("max_new_tokens", "max_tokens", "max_completion_tokens")


def _bound(body):
    """Bound the token budget of an object that looks like a request (or its `parameters`): small
    positives stay, as do refusals (0, negatives, past the context, wrong types)."""
    if not isinstance(body, dict):
        return
    for field in LIMIT_FIELDS:
        value = body.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and BOUNDED < value <= 100_000:
            body[field] = BOUNDED
    # An absent budget means "whatever the context leaves": give each route's own field one.
    if "inputs" in body:
        if not isinstance(body.get("parameters"), dict):
            body["parameters"] = {}
        body["parameters"].setdefault("max_new_tokens", BOUNDED)
        _bound(body["parameters"])
    elif "prompt" in body:
        body.setdefault("max_tokens", BOUNDED)
    elif "messages" in body and "max_tokens" not in body:
        body.setdefault("max_completion_tokens", BOUNDED)


# schemathesis's pytest plugin (`from_fixture`) predates pytest 9: each operation runs under Hypothesis
# here instead, positive (schema-valid) and negative (schema-breaking) cases alike.
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_route_from_the_openapi_document(base_url, mode):
    schema = schemathesis.openapi.from_url(base_url + "/api-doc/openapi.json")
    failures = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                  derandomize=True, database=None, phases=[Phase.explicit, Phase.generate])
        def run(case):
            _bound(case.body)
            response = case.call(base_url=base_url, timeout=TIMEOUT_S)
            checks = CHECKS
            if response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
                # The document describes each event's `data` (as TGI's does); schemathesis reads an SSE
                # schema as the event envelope. Each `data` must still be JSON (or OpenAI's `[DONE]`).
                checks = [c for c in CHECKS if c is not response_schema_conformance]
                for line in response.text.splitlines():
                    if line.startswith("data:") and line[5:].strip() != "[DONE]":
                        assert isinstance(json.loads(line[5:]), dict), line
            case.validate_response(response, checks=checks)

        try:
            run()
        except Unsatisfiable:
            continue  # negative mode on an operation without inputs: nothing to break
        except BaseException as e:  # noqa: B036 -- every operation runs; the failures are reported together
            failures.append(f"{operation.method.upper()} {operation.path}: {e}")
    assert operations >= 13, f"the document lists {operations} operations"
    assert not failures, "\n\n".join(failures)
