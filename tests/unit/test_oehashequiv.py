"""OEHASHEQUIV framing (hq.oehashequiv): the reference's handshake, lines and chunking."""

import json

import pytest

from hq import oehashequiv as f


def test_a_short_message_is_one_line_as_json_dumps_writes_it():
    assert f.encode({"alive": True}) == b'{"alive": true}\n'
    assert f.encode(None) == b"null\n"
    assert f.encode({"t": "\u00e9"}) == b'{"t": "\\u00e9"}\n'  # ASCII, as BitBake's defaults


def test_a_long_message_is_chunked_exactly_as_bitbake_does():
    value = {"outhash_siginfo": "x" * 131000}
    text = json.dumps(value)
    lines = f.encode(value).split(b"\n")
    assert lines[0] == b'{"chunk-stream": null}'
    assert all(len(line) == f.MAX_CHUNK - 1 for line in lines[1:-3])
    assert lines[-2:] == [b"", b""]  # the empty terminator line, then the end of the data
    assert b"".join(lines[1:-2]).decode() == text
    # the boundary: 32766 characters is one line, 32767 is a chunk stream
    assert f.encode("a" * (f.MAX_CHUNK - 4)).count(b"\n") == 1
    assert f.encode("a" * (f.MAX_CHUNK - 3)).startswith(b'{"chunk-stream": null}\n')


def test_lines_come_out_whole_however_the_bytes_arrive():
    buf = f.LineBuffer()
    assert buf.feed(b"OEHASHEQ") == []
    assert buf.feed(b"UIV 1.1\nneeds-headers: false\n\n{") == ["OEHASHEQUIV 1.1", "needs-headers: false", ""]
    assert buf.pending()
    assert buf.feed(b'"ping": {}}  \n') == ['{"ping": {}}  ']  # trailing space kept: the caller strips


def test_a_line_over_the_limit_or_not_utf8_is_dropped():
    buf = f.LineBuffer(max_line=100)
    with pytest.raises(f.Drop):
        buf.feed(b"x" * 101)
    with pytest.raises(f.Drop):
        f.LineBuffer().feed(b"\xff\xfe\n")


@pytest.mark.parametrize("line", ["OEHASHEQUIV 1.1", "OEHASHEQUIV   1.1  "])
def test_the_protocol_line_accepted(line):
    f.check_protocol_line(line)


@pytest.mark.parametrize(
    "line", ["OEHASHEQUIV 1.0", "OEHASHEQUIV 1.2", "OEHASHEQUIV", "HTTP/1.1 200", "OEHASHEQUIV x.y"]
)
def test_the_protocol_lines_refused(line):
    with pytest.raises(f.Drop):
        f.check_protocol_line(line)


def test_headers_and_json():
    assert f.header("Needs-Headers:  true ") == ("needs-headers", "true")
    with pytest.raises(f.Drop):
        f.header("no colon")
    with pytest.raises(f.Drop):
        f.decode("{not json")
    assert f.is_chunk_start({"chunk-stream": None}) and not f.is_chunk_start({"get": {}})
