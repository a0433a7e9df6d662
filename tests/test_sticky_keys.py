"""Which keys sign and check sticky cookies: ``SECRET_KEY`` signs, it and every key of
``SECRET_KEY_FALLBACKS`` check (a rotation keeps clients sticky), and a cookie of our
shape that no key matches is reported once, since it most likely means the servers
do not share one ``SECRET_KEY``. itsdangerous is the reference for the format."""

from __future__ import annotations

import logging

import pytest
from itsdangerous import BadSignature, TimestampSigner

from replicated_core.sticky import StickyCodec, StickyToken, cluster_tag

COOKIE = "replicated_sticky"
SALT = "replicated.token.replicated_sticky"
CLUSTER = cluster_tag("7715402930155626841")

KEY_MISMATCH_WARNING = (
    "A consistency token (sticky cookie or token header) came signed with a key this "
    "app does not have, so it was ignored and its client may read from a replica that "
    "has not caught up with its write. Most likely the app servers or their workers do "
    "not all have the same SECRET_KEY, or SECRET_KEY was changed without keeping the "
    "old key in SECRET_KEY_FALLBACKS, or the token was made by another app (another "
    "REPLICATED_COOKIE_NAME). Give every server and worker the same SECRET_KEY, and "
    "list the keys it replaces in SECRET_KEY_FALLBACKS. (Logged once.)"
)

# Not of our shape: ignored without a word, whoever sent them.
GARBLED = [
    "garbage",
    "t.x.y",
    "W251bGxd.invalid.signature",
    "t.AAAAAAAAAAAAAAA.YmFkc2lnbmF0dXJlYmFkc2lnbmF0dXJl",  # a stamp of 11 bytes
    "t.Z0X1YQ.c2hvcnQ",  # a signature too short for HMAC-SHA1
    "zz.Z0X1YQ.YmFkc2lnbmF0dXJlYmFkc2lnbmF0dXJlYQ",  # not a position
    "t.Z0X1YQ.YmFkc2lnbmF0dXJlYmFkc2lnbmF0dXJlYQ.extra",
    "a" * 150,
]


def _signed(payload, secret):
    """A token as itsdangerous signs it: "t" without a cluster, a position with ours."""
    body = "-.t" if payload == "t" else f"{CLUSTER}.{payload}"
    return TimestampSigner(secret, salt=SALT).sign(body).decode()


def _codec(secret_key, **options):
    codec = StickyCodec(secret_key, **options)
    codec.cluster = CLUSTER  # as the router sets it, from its first connection
    return codec


def _jar_value(client):
    """The sticky cookie in a Quart test client's jar."""
    (value,) = [c.value for c in client.cookie_jar if c.name == COOKIE]
    return value


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# -- the codec -----------------------------------------------------------------


@pytest.mark.parametrize("payload", ["t", "16b3748"])
def test_a_cookie_signed_with_a_fallback_key_is_honoured(payload):
    codec = _codec("new-key", fallbacks=["older-key", "old-key"])
    expected = StickyToken() if payload == "t" else StickyToken(int(payload, 16))
    for secret in ("new-key", "old-key", "older-key"):
        assert codec.loads(_signed(payload, secret), max_age=30) == expected
    assert codec.loads(_signed(payload, "unknown-key"), max_age=30) is None


def test_new_cookies_are_signed_with_the_current_key_only():
    value = _codec("new-key", fallbacks=["old-key"]).dumps(StickyToken(0x16B3748))
    assert TimestampSigner("new-key", salt=SALT).unsign(value) == f"{CLUSTER}.16b3748".encode()
    with pytest.raises(BadSignature):
        TimestampSigner("old-key", salt=SALT).unsign(value)


def test_a_single_fallback_key_given_as_a_string_is_one_key():
    codec = _codec("new-key", fallbacks="old-key")
    assert codec.loads(_signed("t", "old-key"), max_age=30) == StickyToken()
    assert codec.loads(_signed("t", "o"), max_age=30) is None


def test_a_key_mismatch_is_reported_once(caplog):
    codec = _codec("this-servers-key")
    with caplog.at_level(logging.WARNING, logger="replicated"):
        assert codec.loads(_signed("t", "another-servers-key"), max_age=30) is None
        assert codec.loads(_signed("ff", "a-third-key"), max_age=30) is None
    assert _warnings(caplog) == [KEY_MISMATCH_WARNING]


@pytest.mark.parametrize("value", GARBLED)
def test_a_garbled_value_is_ignored_silently(caplog, value):
    codec = _codec("this-servers-key")
    with caplog.at_level(logging.DEBUG, logger="replicated"):
        assert codec.loads(value, max_age=30) is None
    assert _warnings(caplog) == []


def test_a_value_signed_right_but_not_a_token_is_ignored_silently(caplog):
    codec = _codec("this-servers-key")
    with caplog.at_level(logging.DEBUG, logger="replicated"):
        assert codec.loads(_signed("not-a-position", "this-servers-key"), max_age=30) is None
    assert _warnings(caplog) == []


# -- through the adapters --------------------------------------------------------


def test_flask_a_rotation_keeps_writers_on_the_primary(flask_app_factory, caplog):
    app = flask_app_factory(
        REPLICATED_STICKY_MODE="time",
        SECRET_KEY="new-key",
        SECRET_KEY_FALLBACKS=["old-key"],
    )
    client = app.test_client()
    with caplog.at_level(logging.WARNING, logger="replicated"):
        client.set_cookie(COOKIE, _signed("t", "old-key"))
        assert client.get("/who").text == "primary"
        client.post("/items", data={"name": "after the rotation"})
    value = client.get_cookie(COOKIE).value
    assert TimestampSigner("new-key", salt=SALT).unsign(value) == b"-.t"
    assert client.get("/who").text == "primary"
    assert _warnings(caplog) == []


async def test_quart_a_rotation_keeps_writers_on_the_primary(quart_app_factory, caplog):
    app = quart_app_factory(
        REPLICATED_STICKY_MODE="time",
        SECRET_KEY="new-key",
        SECRET_KEY_FALLBACKS=["old-key"],
    )
    client = app.test_client()
    async with app.test_app():
        with caplog.at_level(logging.WARNING, logger="replicated"):
            client.set_cookie("localhost", COOKIE, _signed("t", "old-key"))
            first = await (await client.get("/who")).get_data(as_text=True)
            await client.post("/items", form={"name": "after the rotation"})
        value = _jar_value(client)
        second = await (await client.get("/who")).get_data(as_text=True)
    assert (first, second) == ("primary", "primary")
    assert TimestampSigner("new-key", salt=SALT).unsign(value) == b"-.t"
    assert _warnings(caplog) == []


def test_flask_servers_with_different_keys_are_reported_once(flask_app_factory, caplog):
    """One server signs, another with its own SECRET_KEY checks: the writer reads
    from the replica, and the log says why."""
    signing = flask_app_factory(REPLICATED_STICKY_MODE="time", SECRET_KEY="worker-1-key")
    checking = flask_app_factory(REPLICATED_STICKY_MODE="time", SECRET_KEY="worker-2-key")
    writer = signing.test_client()
    writer.post("/items", data={"name": "on worker 1"})
    value = writer.get_cookie(COOKIE).value
    reader = checking.test_client()
    reader.set_cookie(COOKIE, value)
    with caplog.at_level(logging.WARNING, logger="replicated"):
        assert reader.get("/who").text == "replica"
        assert reader.get("/who").text == "replica"
        for garbled in GARBLED:
            reader.set_cookie(COOKIE, garbled)
            assert reader.get("/who").text == "replica"
    assert _warnings(caplog) == [KEY_MISMATCH_WARNING]


async def test_quart_servers_with_different_keys_are_reported_once(quart_app_factory, caplog):
    signing = quart_app_factory(REPLICATED_STICKY_MODE="time", SECRET_KEY="worker-1-key")
    checking = quart_app_factory(REPLICATED_STICKY_MODE="time", SECRET_KEY="worker-2-key")
    async with signing.test_app(), checking.test_app():
        writer = signing.test_client()
        await writer.post("/items", form={"name": "on worker 1"})
        reader = checking.test_client()
        reader.set_cookie("localhost", COOKIE, _jar_value(writer))
        with caplog.at_level(logging.WARNING, logger="replicated"):
            answers = [await (await reader.get("/who")).get_data(as_text=True) for _ in "ab"]
    assert answers == ["replica", "replica"]
    assert _warnings(caplog) == [KEY_MISMATCH_WARNING]
