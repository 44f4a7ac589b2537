"""hq.permissions: the reference's permission lists, token format and where credentials come from."""

import hashlib
import os

import pytest

from hq import permissions as perms


def test_token_hash_is_bitbakes_format_and_checks_in_constant_time():
    stored = perms.hash_token("s3cret", salt="0011223344556677")
    assert stored == "sha256:0011223344556677:" + hashlib.sha256(b"0011223344556677s3cret").hexdigest()
    assert perms.token_matches("s3cret", stored)
    assert not perms.token_matches("s3cret ", stored)
    assert not perms.token_matches("s3cret", "garbage")
    assert not perms.token_matches("s3cret", "nosuchalgo:00:00")
    a, b = perms.hash_token("x"), perms.hash_token("x")
    assert a != b and perms.token_matches("x", a) and perms.token_matches("x", b)  # salted


def test_new_tokens_are_64_characters_of_bitbakes_alphabet():
    tokens = {perms.new_token() for _ in range(50)}
    assert len(tokens) == 50
    alphabet = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._")
    assert all(len(t) == 64 and set(t) <= alphabet for t in tokens)


def test_permission_lists_as_the_reference():
    assert perms.parse_list(["@report", "@read", "@none"]) == ["@read", "@report"]
    assert perms.shown(["@all"]) == ["@all", "@db-admin", "@read", "@report", "@user-admin"]
    with pytest.raises(perms.BadPermissions, match="^Unexpected type for permissions$"):
        perms.parse_list("@read")
    with pytest.raises(perms.BadPermissions, match="^Unknown permissions @bogus, @x$"):
        perms.parse_list(["@x", "@bogus", "@read"])


@pytest.mark.parametrize("text", ["@all", "@user-admin", "@read @all", "@everything"])
def test_anonymous_may_not_get_user_admin_or_all(text):
    with pytest.raises(ValueError, match="are not allowed for anonymous users"):
        perms.parse_anon(text)


def test_anonymous_permissions_parse_like_bitbake_hashserv():
    assert perms.parse_anon("@read,@report") == {"@read", "@report"}
    assert perms.parse_anon("@read @db-admin") == {"@read", "@db-admin"}
    assert perms.parse_anon("@none") == frozenset()


def test_credentials_from_arguments_then_bitbakes_variables_then_netrc(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine hq.example login farm password from-netrc\n")
    os.chmod(netrc, 0o600)
    address = "tcp://hq.example:5555"
    env = {}
    assert perms.find_credentials(address, environ=env) == ("farm", "from-netrc")
    assert perms.find_credentials("tcp://other:5555", environ=env) == (None, None)
    assert perms.find_credentials("ipc:///run/hq.ipc", environ=env) == (None, None)
    env = {"BB_HASHSERVE_USERNAME": "builder", "BB_HASHSERVE_PASSWORD": "from-env"}
    assert perms.find_credentials(address, environ=env) == ("builder", "from-env")
    assert perms.find_credentials(address, "me", "arg", environ=env) == ("me", "arg")
    assert perms.find_credentials(address, "me", environ=env) == ("me", "from-env")
    assert perms.find_credentials(address, "farm", environ={}) == ("farm", "from-netrc")
    assert perms.find_credentials(address, "", environ=env) == (None, None)  # explicitly anonymous
    netrc.write_bytes(b"machine hq.example login \xff\xfe password x\n")  # not UTF-8: as none
    assert perms.find_credentials(address, environ={}) == (None, None)
