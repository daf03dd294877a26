"""Access rules as a table: who may use the bot where, read from the settings."""

from __future__ import annotations

from datetime import date

import pytest

from core.access import AccessRules, dm_refusal_key
from core.config import Settings
from core.errors import ConfigError


def rules(**env: str) -> AccessRules:
    return AccessRules.from_settings(Settings.from_mapping(env))


CHANNEL, OTHER_CHANNEL, USER, OTHER_USER = "C1", "C2", "U1", "U2"


@pytest.mark.parametrize(
    ("env", "channel", "user", "direct", "refusal"),
    [
        # Nothing set: everyone, everywhere, DMs too.
        ({}, CHANNEL, USER, False, None),
        ({}, "D1", USER, True, None),
        # ALLOWED_CHANNELS limits channels (a thread's channel is its parent), not DMs.
        ({"ALLOWED_CHANNELS": "C1, C3"}, CHANNEL, USER, False, None),
        ({"ALLOWED_CHANNELS": "C1, C3"}, OTHER_CHANNEL, USER, False, "channel"),
        ({"ALLOWED_CHANNELS": "C1"}, "D1", USER, True, None),
        # ALLOWED_USERS limits people everywhere, DMs included.
        ({"ALLOWED_USERS": "U1"}, CHANNEL, USER, False, None),
        ({"ALLOWED_USERS": "U1"}, CHANNEL, OTHER_USER, False, "user"),
        ({"ALLOWED_USERS": "U1"}, "D1", OTHER_USER, True, "user"),
        # Blocked wins over allowed, in channels and DMs.
        ({"BLOCKED_USERS": "U1"}, CHANNEL, USER, False, "user"),
        ({"BLOCKED_USERS": "U1", "ALLOWED_USERS": "U1,U2"}, CHANNEL, USER, False, "user"),
        ({"BLOCKED_USERS": "U1", "ALLOWED_USERS": "U1,U2"}, CHANNEL, OTHER_USER, False, None),
        ({"BLOCKED_USERS": "U1"}, "D1", USER, True, "user"),
        # ALLOW_DMS=false turns DMs away, and only DMs.
        ({"ALLOW_DMS": "false"}, "D1", USER, True, "dm"),
        ({"ALLOW_DMS": "false"}, CHANNEL, USER, False, None),
        # A blocked person's DM is silence, not the DM refusal.
        ({"ALLOW_DMS": "false", "BLOCKED_USERS": "U1"}, "D1", USER, True, "user"),
        # An entry may name its platform; then it matches there only.
        ({"ALLOWED_CHANNELS": "slack:C1"}, CHANNEL, USER, False, None),
        ({"BLOCKED_USERS": "discord:U1"}, CHANNEL, USER, False, None),
    ],
)
def test_the_rules_table(
    env: dict[str, str], channel: str, user: str, direct: bool, refusal: str | None
) -> None:
    access = rules(**env)
    assert access.refusal("slack", channel, user, direct) == refusal
    assert access.allows("slack", channel, user, direct) is (refusal is None)


def test_admin_users_are_matched_by_id_or_platform_and_id() -> None:
    access = rules(ADMIN_USERS="U1, discord:42")
    assert access.is_admin("slack", "U1") and access.is_admin("discord", "42")
    assert not access.is_admin("slack", "42") and not access.is_admin("slack", "U2")
    assert not rules().is_admin("slack", "U1")


def test_a_dm_refusal_is_remembered_per_person_and_day() -> None:
    today, tomorrow = date(2025, 3, 1), date(2025, 3, 2)
    assert dm_refusal_key("U1", today) == "dm-refusal:U1:2025-03-01"
    assert dm_refusal_key("U1", today) != dm_refusal_key("U1", tomorrow)
    assert dm_refusal_key("U1", today) != dm_refusal_key("U2", today)


def test_unset_or_empty_lists_restrict_nothing() -> None:
    settings = Settings.from_mapping({"ALLOWED_CHANNELS": " , ", "ALLOWED_USERS": ""})
    assert settings.allowed_channels is None and settings.allowed_users is None
    assert settings.allow_dms is True and settings.blocked_users == ()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ALLOWED_CHANNELS", "#general"),
        ("ALLOWED_CHANNELS", "C1 C2"),
        ("ALLOWED_USERS", "@alice"),
        ("BLOCKED_USERS", "<@U1>"),
        ("ADMIN_USERS", "U1,@bob"),
        ("ALLOW_DMS", "sometimes"),
    ],
)
def test_a_bad_access_setting_is_one_line_naming_it(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Settings.from_mapping({name: value})
    assert raised.value.setting == name
    assert str(raised.value).startswith(name) and "\n" not in str(raised.value)
