"""The source agent's pure parts (consumers.agent), without services.

Auto-pull's policy match. What needs a database or a broker is in
tests/integration.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import pytest

from consumers.agent.auto_pull import approves
from foundation import keys as keycodec

# -- auto-pull: which new master rows a policy approves ------------------------------------------------------------

ROW = {"subject": "mouse-7", "session": 3, "rig": "B"}


def test_a_row_with_every_value_of_the_policy_is_approved() -> None:
    assert approves({"subject": "mouse-7", "session": 3}, ROW)


def test_a_row_differing_in_one_value_of_the_policy_is_not_approved() -> None:
    assert not approves({"subject": "mouse-7", "session": 4}, ROW)
    assert not approves({"subject": "mouse-8", "session": 3}, ROW)


def test_an_empty_policy_approves_every_row() -> None:
    """`auto_pull=True` registers the policy {}."""
    assert approves({}, ROW)


def test_an_attribute_the_row_lacks_matches_no_value_not_even_null() -> None:
    assert not approves({"surgeon": "ann"}, ROW)
    assert not approves({"surgeon": None}, ROW)
    assert approves({"note": None}, {**ROW, "note": None})


@pytest.mark.parametrize(
    ("value", "policy_value"),
    [
        (Decimal("5"), 5),  # a whole decimal (bigint unsigned, decimal(n,0)) as Avro gives it
        (Decimal("1.50"), "1.50"),
        (dt.datetime(2024, 2, 29, 12, 30), "2024-02-29 12:30:00"),
        (dt.date(2024, 2, 29), "2024-02-29"),
        (b"\x00\xff", {"$b64": "AP8="}),
    ],
    ids=["whole-decimal", "decimal", "datetime", "date", "bytes"],
)
def test_values_are_compared_as_keys_compare_them(value: Any, policy_value: Any) -> None:
    assert keycodec.plain({"v": value})["v"] == policy_value
    assert approves({"v": policy_value}, {**ROW, "v": value})


def test_a_number_and_its_text_are_different_values() -> None:
    assert not approves({"session": "3"}, ROW)
