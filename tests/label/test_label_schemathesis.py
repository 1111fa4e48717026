"""Property-based conformance of the API to its own OpenAPI schema (schemathesis), with a valid token.

All default checks run (no 5xx, status codes, content types, response schemas, headers, Allow on 405, auth
really enforced, schema-violating requests rejected) except `positive_data_acceptance`: a ranking that fits the
schema is still refused with 422 unless it is a permutation of the task's K indices, which no schema can say.

The app and its database are built at import time because schemathesis parametrizes tests from a schema
object (its fixture-based loader does not work with pytest 9).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is a test-only tool: pip install schemathesis")
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance

from instructrl.label.app import create_app
from instructrl.label.store import add_labeler, enqueue_tasks

_dir = tempfile.TemporaryDirectory(prefix="label-schemathesis.")
DB = str(Path(_dir.name) / "label.db")
enqueue_tasks(DB, [f"prompt {i}" for i in range(50)], [[f"r{i}.{j}" for j in range(3)] for i in range(50)])
TOKEN = add_labeler(DB, "fuzzer")
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(DB, max_labelers_per_task=2))


@schema.auth()
class BearerToken:
    """Every generated call carries the labeler's token (schemathesis still probes calls without it)."""

    def get(self, case, context):
        return TOKEN

    def set(self, case, data, context):
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


@schema.parametrize()
@settings(max_examples=int(os.environ.get("SCHEMATHESIS_EXAMPLES", "40")), deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema(case):
    case.call_and_validate(excluded_checks=[positive_data_acceptance])
