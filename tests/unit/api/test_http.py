"""What every route shares (pipeline/api/http.py): the 403 of a customer-restricted key."""

from __future__ import annotations

import pytest

from meterstream.api.http import unrestricted
from meterstream.api.keys import ApiKey
from meterstream.errors import Denied, MeterstreamError


def _key(customer_id: str | None) -> ApiKey:
    return ApiKey("k1", "billing", "hash", "2026-09-01T00:00:00Z", customer_id=customer_id)


def test_a_customer_restricted_key_is_refused_with_403() -> None:
    with pytest.raises(Denied) as denied:
        unrestricted(_key("acme"), "run SQL")
    assert (denied.value.status, denied.value.error) == (
        403,
        "a key restricted to one customer cannot run SQL",
    )
    assert isinstance(denied.value, MeterstreamError)


@pytest.mark.parametrize("key", [None, _key(None)])
def test_no_key_or_an_unrestricted_key_passes(key: ApiKey | None) -> None:
    unrestricted(key, "run SQL")
