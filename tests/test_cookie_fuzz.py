"""Hostile sticky cookies: never an exception, never a 500, never pinned past the TTL."""

from __future__ import annotations

import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from itsdangerous import TimestampSigner

from replicated_core.sticky import (
    CLOCK_SKEW,
    MAX_COOKIE_LENGTH,
    StickyCodec,
    StickyToken,
    cluster_tag,
)

SECRET = "test-secret-key"
SALT = "replicated.token.replicated_sticky"
CLUSTER = cluster_tag("7715402930155626841")
COOKIE = "replicated_sticky"
FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _signed(payload, secret=SECRET, stamp=None, cluster=CLUSTER):
    """A token as itsdangerous signs it: "t" without a cluster, anything else with one."""

    class Signer(TimestampSigner):
        def get_timestamp(self):
            return int(time.time()) if stamp is None else stamp

    body = "-.t" if payload == "t" else f"{cluster}.{payload}"
    return Signer(secret, salt=SALT).sign(body).decode()


def _codec(secret_key=SECRET):
    codec = StickyCodec(secret_key)
    codec.cluster = CLUSTER  # as the router sets it, from its first connection
    return codec


payloads = st.text(max_size=40) | st.sampled_from(["t", "0", "ff", "f" * 16, "f" * 17, "-1"])


@FUZZ
@given(st.text(max_size=600) | st.binary(max_size=600).map(lambda b: b.decode("latin-1")))
def test_random_values_never_raise_and_never_count(value):
    assert _codec().loads(value, max_age=30) is None


@FUZZ
@given(payloads)
def test_signed_payloads_of_any_shape_are_checked(payload):
    """Even correctly signed, only "t" or a WAL position in hex (64 bits) is a token."""
    token = _codec().loads(_signed(payload), max_age=30)
    hex_position = 0 < len(payload) <= 16 and set(payload) <= set("0123456789abcdef")
    if payload == "t":
        assert token == StickyToken()
    elif hex_position:
        assert token == StickyToken(int(payload, 16))
    else:
        assert token is None


@FUZZ
@given(st.integers(min_value=-(2**70), max_value=2**70))
def test_absurd_positions_are_refused(lsn):
    payload = format(lsn, "x")
    token = _codec().loads(_signed(payload), max_age=30)
    assert (token is not None) == (0 <= lsn < 2**64)


@FUZZ
@given(st.integers(min_value=-(2**40), max_value=2**40))
def test_a_cookie_lives_no_longer_than_the_ttl(offset):
    """Whatever stamp a cookie carries (the signer's key leaked, say), it is honoured
    only while its age is within [-skew, TTL] in whole seconds: a forged cookie pins its
    sender for the TTL plus one second plus the clock-skew allowance at most."""
    now = int(time.time())
    stamp = now + offset
    if stamp < 0:
        return
    token = _codec().loads(_signed("t", stamp=stamp), max_age=30)
    age = time.time() - stamp
    if token is not None:
        assert -CLOCK_SKEW <= age < 31


@given(st.floats(min_value=0, max_value=0.999), st.floats(min_value=0, max_value=0.999))
def test_a_cookie_lives_at_least_the_ttl(signed_within, read_after):
    """The stamp is in whole seconds: a cookie signed late in a second and read within
    the TTL is still honoured (else a writer could lose its stickiness at once)."""
    codec = _codec()
    signed_at = 1_800_000_000 + signed_within
    with _clock(signed_at):
        value = codec.dumps(StickyToken())
    with _clock(signed_at + read_after):
        assert codec.loads(value, max_age=1) == StickyToken()


class _clock:
    """``time.time()`` fixed at ``now`` while in the block."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __enter__(self) -> None:
        self.real = time.time
        time.time = lambda: self.now

    def __exit__(self, *exc: object) -> None:
        time.time = self.real


@FUZZ
@given(payloads)
def test_another_apps_key_is_never_accepted(payload):
    assert _codec().loads(_signed(payload, secret="another-app"), max_age=30) is None


def test_oversized_values_are_not_even_verified():
    valid = _signed("t")
    assert _codec().loads(valid + "=" * MAX_COOKIE_LENGTH, max_age=30) is None


cookie_headers = st.lists(
    st.text(
        alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=";,"),
        max_size=300,
    )
    | st.sampled_from([_signed("t"), _signed("-5"), _signed("t", secret="x")]),
    min_size=1,
    max_size=6,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(values=cookie_headers)
def test_the_flask_app_answers_every_cookie_header(flask_app, values):
    header = "; ".join(f"{COOKIE}={value}" for value in values)
    response = flask_app.test_client().get("/who", headers={"Cookie": header})
    assert response.status_code == 200
    assert response.text in {"replica", "primary"}


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(values=cookie_headers)
async def test_the_quart_app_answers_every_cookie_header(quart_app, values):
    header = "; ".join(f"{COOKIE}={value}" for value in values)
    response = await quart_app.test_client().get("/who", headers={"Cookie": header})
    assert response.status_code == 200
    assert quart_app.errors == []
