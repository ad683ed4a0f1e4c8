"""The console's sessions and CSRF tokens (``aiplatform.web.session``): what a cookie may carry,
when it stops being valid, and how a token is bound to one session."""

import os
import stat
import time

import pytest

from aiplatform.security.keys import ApiKey, Role, hash_key
from aiplatform.web.session import (
    CONSOLE_COOKIE,
    SHOP_COOKIE,
    Session,
    SessionCodec,
    cookie_options,
    current_key,
    load_secret,
    secret_path,
    signed_in,
)

ADMIN = ApiKey("ops", Role.admin, hash_key("aip_secret-admin-key"))
READER = ApiKey("analyst", Role.reader, hash_key("aip_secret-reader-key"))


@pytest.fixture()
def codec() -> SessionCodec:
    return SessionCodec(b"k" * 32)


def test_a_signed_in_session_round_trips_and_never_carries_the_key(codec):
    session = signed_in(ADMIN)
    value = codec.dumps(CONSOLE_COOKIE, session)
    assert "aip_secret-admin-key" not in value
    back = codec.loads(CONSOLE_COOKIE, value, max_age_s=60)
    assert back == session and back.signed_in and back.key_name == "ops" and back.role == Role.admin


def test_a_tampered_foreign_or_expired_cookie_is_no_session(codec):
    value = codec.dumps(CONSOLE_COOKIE, signed_in(READER))
    payload, _, signature = value.rpartition(".")
    other = "A" if signature[0] != "A" else "B"
    assert codec.loads(CONSOLE_COOKIE, f"{payload}.{other}{signature[1:]}", 60) is None
    assert codec.loads(CONSOLE_COOKIE, f"{payload[:-1]}{'A' if payload[-1] != 'A' else 'B'}.{signature}", 60) is None
    assert SessionCodec(b"x" * 32).loads(CONSOLE_COOKIE, value, 60) is None  # signed with another secret
    assert codec.loads(SHOP_COOKIE, value, 60) is None  # a shop cookie is not a console session
    assert codec.loads(CONSOLE_COOKIE, "", 60) is None and codec.loads(CONSOLE_COOKIE, None, 60) is None
    assert codec.loads(CONSOLE_COOKIE, "garbage", 60) is None
    time.sleep(1.1)
    assert codec.loads(CONSOLE_COOKIE, value, max_age_s=0) is None


def test_csrf_tokens_are_bound_to_one_session(codec):
    one, two = Session(), Session()
    token = codec.csrf_token(one)
    assert codec.csrf_ok(one, token)
    assert not codec.csrf_ok(two, token)  # another browser's token
    assert not codec.csrf_ok(one, "") and not codec.csrf_ok(one, None) and not codec.csrf_ok(None, token)
    assert not codec.csrf_ok(one, token[:-1] + ("0" if token[-1] != "0" else "1"))
    assert codec.csrf_token(one) == SessionCodec(b"k" * 32).csrf_token(one)  # every replica agrees
    assert codec.csrf_token(one) != SessionCodec(b"z" * 32).csrf_token(one)


def test_signing_in_starts_a_new_session_id():
    before = Session()
    after = signed_in(ADMIN)
    assert after.sid != before.sid and len(after.sid) >= 16


def test_a_session_stands_for_its_key_only_while_the_key_is_admitted():
    session = signed_in(ADMIN)
    assert current_key(session, [READER, ADMIN]) == ADMIN
    assert current_key(session, [READER]) is None  # revoked
    replaced = ApiKey("ops", Role.admin, hash_key("aip_another-key"))
    assert current_key(session, [replaced]) is None  # same name, new key: the old sessions end
    claims_admin = Session(key_name="analyst", role=int(Role.admin), sha256=READER.sha256)
    assert current_key(claims_admin, [READER]).role == Role.reader  # the cookie's role is never trusted
    demoted = ApiKey("ops", Role.reader, ADMIN.sha256)
    assert current_key(session, [demoted]).role == Role.reader  # the role is the key's role now
    assert current_key(Session(), [ADMIN]) is None and current_key(None, [ADMIN]) is None


def test_cookie_options_are_http_only_and_secure_over_tls():
    plain = cookie_options(https=False, max_age_s=10, same_site="strict")
    tls = cookie_options(https=True, max_age_s=10, same_site="strict")
    assert plain["httponly"] and tls["httponly"] and plain["samesite"] == "strict"
    assert not plain["secure"] and tls["secure"]


def test_the_secret_is_made_once_per_storage_root_and_kept_private(tmp_path):
    first = load_secret(str(tmp_path))
    assert len(first) == 32
    assert load_secret(str(tmp_path)) == first  # a second replica reads the same one
    assert stat.S_IMODE(os.stat(secret_path(str(tmp_path))).st_mode) == 0o600
    assert load_secret(str(tmp_path / "other")) != first
    with pytest.raises(ValueError):
        SessionCodec(b"short")
