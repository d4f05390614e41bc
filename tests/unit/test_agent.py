"""The source agent's pure parts (consumers.agent), without services.

Auto-pull's policy match, the SQL the helper-table gateway makes of each
acknowledgement rule, and the registrations refused before anything is
made. What needs a database or a broker (the helper table created, rows
locked, a link published, the capture told) is in tests/integration
(test_pull.py, test_switch.py, test_states.py).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from decimal import Decimal
from typing import Any

import pytest

from consumers.agent.auto_pull import approves
from consumers.agent.errors import Refused
from consumers.agent.helper_table import ack_statements
from consumers.agent.registration import MAX_IDENTIFIER, check
from consumers.integrity import ACK_RULES, Acked
from foundation import keys as keycodec
from foundation.config import Settings
from foundation.links import LinkSpec
from foundation.sql import KEYS_PER_STATEMENT

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


# -- the helper-table gateway: acknowledgement rules as guarded statements -----------------------------------------

LINK = LinkSpec.new("lab", "recording", "lab_link", "outbound", "copy")
ONE_KEY = dataclasses.replace(LINK, primary_key=("id",))
TWO_KEYS = dataclasses.replace(LINK, primary_key=("subject", "session"))
HELPER = "`lab_link`.`outbound`"

# (acked, rule's index in ACK_RULES) -> the statement for the keys {"id": 1}, {"id": 2}
EXPECTED = {
    (Acked.ARRIVED, 0): (
        f"UPDATE {HELPER} SET `process`=%s WHERE (`id`) IN ((%s), (%s)) AND `process`=%s",
        ["NONE", 1, 2, "PULL"],
    ),
    (Acked.DEPRECATE, 0): (
        f"UPDATE {HELPER} SET `process`=%s, `is_deprecated`='TRUE' WHERE (`id`) IN ((%s), (%s))"
        " AND `process`=%s AND `is_flagged`=%s",
        ["NONE", 1, 2, "PULL", "TRUE"],
    ),
    (Acked.DELETED, 0): (
        f"UPDATE {HELPER} SET `process`=%s, `is_deprecated`='TRUE' WHERE (`id`) IN ((%s), (%s))"
        " AND `process`=%s AND `is_flagged`=%s",
        ["NONE", 1, 2, "DELETE", "TRUE"],
    ),
    (Acked.DELETED, 1): (
        f"DELETE FROM {HELPER} WHERE (`id`) IN ((%s), (%s)) AND `process`=%s",
        [1, 2, "DELETE"],
    ),
}


def test_every_acknowledgement_rule_has_its_expected_statement() -> None:
    assert sorted(EXPECTED, key=str) == sorted(
        ((acked, i) for acked, rules in ACK_RULES.items() for i in range(len(rules))), key=str
    )


@pytest.mark.parametrize(("acked", "index"), list(EXPECTED), ids=[f"{a.name}-{i}" for a, i in EXPECTED])
def test_an_acknowledgement_rule_is_one_statement_guarded_by_the_state_it_expects(acked: Acked, index: int) -> None:
    rule = ACK_RULES[acked][index]
    keys = [keycodec.encode({"id": 1}), keycodec.encode({"id": 2})]
    assert ack_statements(ONE_KEY, rule, keys) == [EXPECTED[(acked, index)]]


def test_a_composite_key_is_named_attribute_by_attribute_in_primary_key_order() -> None:
    rule = ACK_RULES[Acked.ARRIVED][0]
    keys = [keycodec.encode({"subject": "m1", "session": 1}), keycodec.encode({"subject": "m2", "session": 2})]
    [(sql, params)] = ack_statements(TWO_KEYS, rule, keys)
    assert "(`subject`, `session`) IN ((%s, %s), (%s, %s))" in sql
    assert params == ["NONE", "m1", 1, "m2", 2, "PULL"]


def test_many_keys_are_cut_into_statements_of_at_most_keys_per_statement() -> None:
    rule = ACK_RULES[Acked.DELETED][1]
    keys = [keycodec.encode({"id": i}) for i in range(2 * KEYS_PER_STATEMENT + 5)]
    statements = ack_statements(ONE_KEY, rule, keys)
    assert [len(params) - 1 for _, params in statements] == [KEYS_PER_STATEMENT, KEYS_PER_STATEMENT, 5]
    assert [p for _, params in statements for p in params[:-1]] == list(range(2 * KEYS_PER_STATEMENT + 5))
    assert all(params[-1] == "DELETE" for _, params in statements)


def test_no_keys_make_no_statement() -> None:
    assert ack_statements(ONE_KEY, ACK_RULES[Acked.ARRIVED][0], []) == []


def test_a_key_given_as_bytes_is_a_bytes_parameter() -> None:
    [(_, params)] = ack_statements(ONE_KEY, ACK_RULES[Acked.ARRIVED][0], [keycodec.encode({"id": b"\x00\xff"})])
    assert params == ["NONE", b"\x00\xff", "PULL"]


# -- registrations refused before anything is made ---------------------------------------------------------------

SITE = Settings.from_env({"DJLINK_ALLOWED_SCHEMAS": "lab*"})


def test_a_link_of_an_allowed_schema_is_not_refused() -> None:
    check(SITE, LINK, None)


def test_a_schema_not_on_the_allow_list_is_refused_naming_the_setting() -> None:
    other = LinkSpec.new("clinic", "recording", "lab_link", "outbound", "copy")
    with pytest.raises(Refused, match=r"source schema 'clinic' is not shared .* DJLINK_ALLOWED_SCHEMAS"):
        check(SITE, other, None)


def test_a_source_site_allowing_nothing_refuses_every_link() -> None:
    with pytest.raises(Refused, match="DJLINK_ALLOWED_SCHEMAS"):
        check(Settings.from_env({}), LINK, None)


@pytest.mark.parametrize("what", ["helper schema", "helper table"])
def test_a_helper_name_longer_than_mariadb_allows_is_refused(what: str) -> None:
    long = "h" * (MAX_IDENTIFIER + 1)
    names = (long, "outbound") if what == "helper schema" else ("lab_link", long)
    with pytest.raises(Refused, match=rf"the {what} name 'h+' has 65 characters; MariaDB allows 64"):
        check(SITE, LinkSpec.new("lab", "recording", *names, "copy"), None)


def test_a_helper_name_of_exactly_the_limit_is_not_refused() -> None:
    check(SITE, LinkSpec.new("lab", "recording", "lab_link", "h" * MAX_IDENTIFIER, "copy"), None)


def test_registering_the_same_link_again_is_not_refused() -> None:
    check(SITE, LINK, LINK)


@pytest.mark.parametrize(
    "second",
    [
        LinkSpec.new("lab", "recording", "lab_link", "outbound", "other_copy"),
        LinkSpec.new("lab", "session", "lab_link", "outbound", "copy"),
        LinkSpec.new("lab2", "recording", "lab_link", "outbound", "copy"),
    ],
    ids=["another-destination", "another-table", "another-schema"],
)
def test_a_second_link_through_the_same_helper_table_is_refused(second: LinkSpec) -> None:
    with pytest.raises(Refused, match=r"helper table lab_link\.outbound already keeps the state of lab\.recording"):
        check(SITE, second, LINK)
