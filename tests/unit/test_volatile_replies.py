"""Volatile reply parts (smrd.framing.volatile and its use by the gateway's CallBook).

An HTTP server's `Date` differs between replicas a second apart: the gateway must not count that
as a divergence, must still count a different body or status, and the digest it sends to a
minority must be what that replica computes from its own reply."""
import itertools

import pytest

from smrd.config.settings import ConfigError, load_config
from smrd.framing.volatile import comparable_reply, header_names, same_reply
from smrd.gateway.calls import CallBook, Notice
from smrd.protocol.messages import reply_digest


def http(date=b"Tue, 08 Dec 2026 01:00:00 GMT", body=b"hello", status=b"200 OK", extra=b""):
    return (b"HTTP/1.1 " + status + b"\r\nServer: x\r\nDate: " + date + b"\r\n" + extra
            + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


DATE = comparable_reply("http", header_names("Date"))


def test_header_names_are_case_insensitive_and_blanks_ignored():
    assert header_names(" Date, last-modified ,,ETAG ") == ("date", "etag", "last-modified")
    assert header_names("") == ()


def test_only_http_with_names_has_volatile_parts():
    assert comparable_reply("line", ("date",)) is None
    assert comparable_reply("http", ()) is None
    assert DATE is not None


def test_a_date_header_is_ignored_in_any_case_and_nothing_else_is():
    a, b = http(), http(date=b"Tue, 08 Dec 2026 01:00:01 GMT")
    assert a != b and same_reply(a, b, DATE)
    assert same_reply(a, http(date=b"x").replace(b"Date:", b"dAtE:"), DATE)
    assert not same_reply(a, http(body=b"HELLO"), DATE), "a body that differs is a divergence"
    assert not same_reply(a, http(status=b"500 Internal Server Error"), DATE)
    assert not same_reply(a, http(extra=b"ETag: 1\r\n"), DATE)
    assert not same_reply(a, b, None), "without the setting every byte counts"


def test_a_header_named_like_the_body_text_is_not_touched():
    # Only the head is parsed: "Date: ..." inside the body is the body's.
    a = http(body=b"Date: 1\r\n")
    b = http(body=b"Date: 2\r\n")
    assert not same_reply(a, b, DATE)


def test_a_reply_without_a_whole_head_compares_every_byte():
    assert DATE(b"HTTP/1.1 200 OK\r\nDate: 1") == b"HTTP/1.1 200 OK\r\nDate: 1"


def test_comparable_part_drops_only_the_named_lines():
    assert DATE(http()) == b"HTTP/1.1 200 OK\r\nServer: x\r\nContent-Length: 5\r\n\r\nhello"


def book(comparable):
    ids = itertools.count(100)
    b = CallBook((0, 1, 2), k=8, max_inflight=8, reply_quorum=3, retransmit_s=0.5, deadline_s=10.0,
                 check_every=0, new_client_id=lambda: next(ids), comparable=comparable)
    for r in range(3):
        b.heard(r, 0.0)
        b.on_status(r, dict(view=0, leader=0, status="normal",
                            membership={"index": 0, "voters": [0, 1, 2], "learners": []}), 0.0)
    return b


def test_the_gateway_ignores_dates_and_the_client_gets_one_replicas_reply_unchanged():
    b = book(DATE)
    call = b.submit(b"GET / HTTP/1.1\r\n\r\n", 0.0)
    b.flush()
    b.take()
    replies = [http(date=b"Tue, 08 Dec 2026 01:00:0%d GMT" % r) for r in range(3)]
    for r, reply in enumerate(replies):
        b.on_reply(r, call.key, reply, 0.0)
    assert call.result() in replies
    assert b.stats["divergences"] == 0
    assert not [out for out in b.take() if type(out) is Notice]


def test_a_different_body_is_still_reported_and_the_digest_is_of_the_comparable_part():
    b = book(DATE)
    call = b.submit(b"GET / HTTP/1.1\r\n\r\n", 0.0)
    b.flush()
    b.take()
    b.on_reply(0, call.key, http(date=b"a"), 0.0)
    b.on_reply(1, call.key, http(date=b"b", body=b"WRONG"), 0.0)
    b.on_reply(2, call.key, http(date=b"c"), 0.0)
    assert b.stats["divergences"] >= 1
    told = [out for out in b.take() if type(out) is Notice]
    assert [n.to for n in told] == [1]
    (_, _, data), = told[0].entries
    # What replica 1's executor compares (smrd.replica.executor.diverged): the digest of the
    # majority's comparable reply, whatever Date that replica's own copy carried.
    assert data[:16] == reply_digest(DATE(http(date=b"zzz")))
    assert data[:16] != reply_digest(DATE(http(date=b"b", body=b"WRONG")))


def test_the_setting_is_checked_and_warns_outside_http(tmp_path):
    hosts = tmp_path / "hosts.conf"
    hosts.write_text("".join(f"replica {i} 127.0.0.1 {11000 + 10 * i} {11001 + 10 * i}\n"
                             for i in range(3)) + "gateway 0 127.0.0.1 11900\n")
    with pytest.raises(ConfigError, match="not an HTTP header name"):
        load_config(flags={"hosts": str(hosts), "role": "server", "id": 0,
                    "volatile_reply_headers": "Date, bad header"}, env={})
    config = load_config(flags={"hosts": str(hosts), "role": "server", "id": 0,
                         "volatile_reply_headers": "Date"}, env={})
    assert any("applies to framing=http only" in w for w in config.warnings)
    config = load_config(flags={"hosts": str(hosts), "role": "server", "id": 0, "framing": "http"}, env={})
    assert config.settings.volatile_reply_headers == "Date" and not any(
        "volatile" in w for w in config.warnings)
