"""The request parser and reply builders of node/protocol.py, as plain calls.

Grouped by section of reference/ensync-wire-protocol.md. Nothing here opens a
socket or an event loop: frames go in as strings, and a Request, a reply string
or a ProtocolError comes out.
"""

from __future__ import annotations

import json

import pytest

from node.errors import BrokerError, ProtocolError, RequestRejected
from node.session import _metadata
from node.protocol import (
    FRAME_BYTES_MAX,
    conn_passed,
    parse_request,
    passed,
    record_frame,
)

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # hypothesis is a test extra; without it one test skips
    given = None

PUB_HEAD = (
    "PUB;CLIENT_ID=:c-1;EVENT_NAME=:order/created;PAYLOAD=:eyJ4IjoxfQ=="
    ";DELIVERY_TO=:QUJD"
)


def rejected(frame: str) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_request(frame)
    return info.value


def sdk_strip(frame: str) -> str:
    """What ensync-sdk-ws 0.4.3 feeds to json.loads: the frame with both
    prefixes removed wherever they occur (spec 4.1)."""
    return frame.replace("+RECORD:", "").replace("+REPLAY:", "")


def sdk_conn_fields(reply: str) -> dict[str, str]:
    """How the SDK reads a CONN reply (spec 3.1): drop +PASS:, drop the braces,
    split pairs on commas and each pair at its first '='."""
    body = reply.removeprefix("+PASS:").strip().strip("{}")
    pairs = (item.split("=", 1) for item in body.split(","))
    return {k.strip(): v.strip() for k, v in pairs}


# -- 2.1 Request grammar: both parameter forms ---------------------------------


def test_sdk_form_drops_the_colon_after_the_equals_sign():
    req = parse_request("SUB;CLIENT_ID=:c-1;EVENT_NAME=:order/created")

    assert req.verb == "SUB"
    assert req.params == {"CLIENT_ID": "c-1", "EVENT_NAME": "order/created"}


def test_docs_form_takes_the_value_as_written():
    req = parse_request("SUB;CLIENT_ID=c-1;EVENT_NAME=order/created")

    assert req.params == {"CLIENT_ID": "c-1", "EVENT_NAME": "order/created"}


def test_both_forms_mix_in_one_frame():
    req = parse_request("ACK;CLIENT_ID=c-1;EVENT_IDEM=:evt-0001-000000000002")

    assert req.get("CLIENT_ID") == "c-1"
    assert req.get("EVENT_IDEM") == "evt-0001-000000000002"


def test_only_one_leading_colon_is_dropped():
    req = parse_request("SUB;CLIENT_ID=::c-1;EVENT_NAME=:a")

    assert req.get("CLIENT_ID") == ":c-1"


def test_values_keep_base64_padding_and_inner_equals_signs():
    req = parse_request(
        "PUB;CLIENT_ID=:c;EVENT_NAME=:a/b;PAYLOAD=:YQ==;DELIVERY_TO=:x=y=="
    )

    assert req.get("PAYLOAD") == "YQ=="
    assert req.get("DELIVERY_TO") == "x=y=="


def test_parameter_order_is_not_significant():
    req = parse_request("SUB;EVENT_NAME=:a/b;CLIENT_ID=:c-1")

    assert req.params == {"CLIENT_ID": "c-1", "EVENT_NAME": "a/b"}


def test_unknown_keys_are_ignored():
    req = parse_request(
        "ACK;CLIENT_ID=:c;EVENT_IDEM=:e;BLOCK=:17;EVENT_NAME=:a;NOT_A_KEY=:zz"
    )

    assert req.verb == "ACK"
    assert req.get("CLIENT_ID") == "c"
    assert req.get("EVENT_IDEM") == "e"


def test_a_duplicate_key_keeps_the_first_value():
    req = parse_request("SUB;CLIENT_ID=:first;EVENT_NAME=:a;CLIENT_ID=:second")

    assert req.get("CLIENT_ID") == "first"


def test_conn_needs_no_parameters_at_parse_time():
    # Whether ACCESS_KEY or CLIENT_ID is present is the session's decision.
    assert parse_request("CONN") == parse_request("CONN;")
    assert parse_request("CONN").params == {}


# -- 2.1 Request grammar: METADATA is user JSON --------------------------------

TRICKY_METADATA = {
    "source": "test;x",
    "trap": ";EVENT_NAME=:evil;DELIVERY_TO=other",
    "nested": {"a": {"b": [1, {"c": "};{"}, "}}"]}},
    "quote": 'say "hi";PAYLOAD=x',
}


@pytest.mark.parametrize("colon", [":", ""], ids=["sdk-form", "docs-form"])
def test_metadata_with_semicolons_survives_as_the_last_key(colon):
    text = json.dumps(TRICKY_METADATA)

    req = parse_request(f"{PUB_HEAD};METADATA={colon}{text}")

    assert req.get("METADATA") == text
    assert req.get("EVENT_NAME") == "order/created"
    assert req.get("DELIVERY_TO") == "QUJD"


@pytest.mark.parametrize("colon", [":", ""], ids=["sdk-form", "docs-form"])
def test_metadata_with_semicolons_survives_when_another_key_follows(colon):
    text = json.dumps(TRICKY_METADATA)
    shape = json.dumps({"byte_size": 7, "skeleton": {"x": "int;"}})

    req = parse_request(
        f"{PUB_HEAD};METADATA={colon}{text};PAYLOAD_METADATA={colon}{shape}"
        ";REASON=:after"
    )

    assert req.get("METADATA") == text
    assert req.get("PAYLOAD_METADATA") == shape
    assert req.get("REASON") == "after"


def test_metadata_json_ends_where_its_exponent_numbers_end():
    text = '{"big":1e300,"small":-2.5E-7,"n":[1E+2]}'

    req = parse_request(f"{PUB_HEAD};METADATA=:{text};REASON=:r")

    assert req.get("METADATA") == text
    assert json.loads(req.get("METADATA"))["small"] == -2.5e-7


def test_metadata_that_is_not_json_ends_at_the_next_key():
    req = parse_request(f"{PUB_HEAD};METADATA=:{{broken;REASON=:r")

    assert req.get("METADATA") == "{broken"
    assert req.get("REASON") == "r"


def test_metadata_with_text_after_its_json_keeps_that_text():
    # The JSON ends at '}' but no ';KEY=' follows, so the value runs on; the
    # session rejects it as bad JSON later instead of losing bytes here.
    req = parse_request(f'{PUB_HEAD};METADATA=:{{"a":1}}tail;REASON=:r')

    assert req.get("METADATA") == '{"a":1}tail'


def test_deeply_nested_metadata_parses_and_is_then_rejected_as_bad_json():
    frame = f'{PUB_HEAD};METADATA=:{{"a":' + "[" * 100_000

    assert len(frame) <= FRAME_BYTES_MAX
    req = parse_request(frame)  # no RecursionError escapes the parser
    assert req.get("METADATA").startswith('{"a":[[[')
    with pytest.raises(ProtocolError) as failure:
        _metadata(req.get("METADATA"))
    assert failure.value.code == "INVALID_PARAMETER"


# -- 2.1 / 3.13 Request grammar: what is rejected, and with which code ---------


def test_an_unknown_command_is_rejected():
    err = rejected("FETCH;CLIENT_ID=:c")

    assert err.code == "UNKNOWN_COMMAND"
    assert err.wire() == "-FAIL:UNKNOWN_COMMAND;MESSAGE=unknown command FETCH"


def test_a_lowercase_verb_is_an_unknown_command():
    err = rejected("sub;CLIENT_ID=:c;EVENT_NAME=:a")

    assert err.code == "UNKNOWN_COMMAND"
    assert "sub" in err.message


@pytest.mark.parametrize("frame", ["", ";CLIENT_ID=:c", "P", "PÜB;X=1", " SUB"])
def test_a_frame_without_a_verb_is_an_unknown_command(frame):
    err = rejected(frame)

    assert err.code == "UNKNOWN_COMMAND"
    assert err.wire().isascii()


def test_missing_parameters_are_all_named_in_order():
    err = rejected("PUB;CLIENT_ID=:c-1")

    assert err.code == "MISSING_PARAMETERS"
    assert err.message == "missing EVENT_NAME, PAYLOAD, DELIVERY_TO"


def test_a_verb_alone_is_missing_every_required_parameter():
    err = rejected("ACK")

    assert err.code == "MISSING_PARAMETERS"
    assert err.message == "missing CLIENT_ID, EVENT_IDEM"


@pytest.mark.parametrize("empty", ["CLIENT_ID=:", "CLIENT_ID="])
def test_an_empty_value_counts_as_missing(empty):
    err = rejected(f"SUB;{empty};EVENT_NAME=:a")

    assert err.code == "MISSING_PARAMETERS"
    assert err.message == "missing CLIENT_ID"


@pytest.mark.parametrize(
    "rest",
    [
        "garbage",
        "CLIENT_ID",
        "client_id=:c",
        "=:c",
        "CLIENT ID=:c",
        "garbage;CLIENT_ID=:c",
    ],
)
def test_garbage_after_the_verb_is_an_invalid_parameter(rest):
    err = rejected(f"SUB;{rest}")

    assert err.code == "INVALID_PARAMETER"


def test_a_frame_of_exactly_one_mebibyte_is_accepted():
    head = "SUB;CLIENT_ID=:c;EVENT_NAME=:"
    frame = head + "x" * (FRAME_BYTES_MAX - len(head))

    assert len(frame) == FRAME_BYTES_MAX == 1 << 20
    assert parse_request(frame).verb == "SUB"


def test_a_frame_over_one_mebibyte_is_payload_too_large():
    head = "SUB;CLIENT_ID=:c;EVENT_NAME=:"
    frame = head + "x" * (FRAME_BYTES_MAX + 1 - len(head))

    err = rejected(frame)

    assert err.code == "PAYLOAD_TOO_LARGE"


def test_the_size_check_comes_before_any_parsing():
    err = rejected("not even a verb " * (FRAME_BYTES_MAX // 16 + 1))

    assert err.code == "PAYLOAD_TOO_LARGE"


def test_the_frame_limit_counts_utf8_bytes_not_characters():
    head = "SUB;CLIENT_ID=:c;EVENT_NAME=:"
    frame = head + "é" * (FRAME_BYTES_MAX // 2)

    assert len(frame.encode()) > FRAME_BYTES_MAX >= len(frame)
    assert rejected(frame).code == "PAYLOAD_TOO_LARGE"


# -- 2.2 Reply grammar ---------------------------------------------------------


def test_a_fail_frame_puts_the_code_first():
    err = ProtocolError("missing EVENT_NAME", "MISSING_PARAMETERS")

    assert err.wire() == "-FAIL:MISSING_PARAMETERS;MESSAGE=missing EVENT_NAME"


def test_each_error_class_has_its_default_code():
    assert ProtocolError("x").wire() == "-FAIL:INVALID_PARAMETER;MESSAGE=x"
    assert RequestRejected("x").wire() == "-FAIL:NOT_FOUND;MESSAGE=x"
    assert BrokerError("x").wire() == "-FAIL:INTERNAL_ERROR;MESSAGE=x"


def test_a_semicolon_in_a_message_never_leaks_into_the_frame():
    err = RequestRejected("no;such;MESSAGE=thing", "NOT_FOUND")

    wire = err.wire()

    assert wire == "-FAIL:NOT_FOUND;MESSAGE=no,such,MESSAGE=thing"
    assert wire.count(";") == 1
    assert err.message == "no;such;MESSAGE=thing"


def test_a_pass_reply_uses_the_docs_form():
    reply = passed("PUBLISHED", IDEM="evt-0001-000000000001", TIMESTAMP=1700)

    assert reply == "+PASS:PUBLISHED;IDEM=evt-0001-000000000001;TIMESTAMP=1700"
    assert passed("SUBSCRIBED") == "+PASS:SUBSCRIBED"


# -- 3.1 CONN reply ------------------------------------------------------------


def test_conn_reply_has_the_shape_the_sdk_parses():
    reply = conn_passed("n1.0a1b.7", "QUJD+/8=")

    assert reply == "+PASS:{clientId=n1.0a1b.7, clientHash=QUJD+/8=}"
    assert sdk_conn_fields(reply) == {"clientId": "n1.0a1b.7", "clientHash": "QUJD+/8="}


# -- 4.1 Pushed record frames --------------------------------------------------

RECORD = {
    "idem": "evt-0001-000000000002",
    "id": "evt-0001-000000000002",
    "name": "order/created",
    "block": 2,
    "loggedAt": 1_759_800_000_000,
    "payload": "eyJ4IjoxfQ==",
    "metadata": {"note": "plain"},
    "sender": "QUJD",
}


def test_a_record_frame_is_the_prefix_and_the_record_as_json():
    frame = record_frame(RECORD)

    assert frame.startswith("+RECORD:{")
    assert json.loads(frame.removeprefix("+RECORD:")) == RECORD


def test_a_replay_frame_uses_its_own_prefix():
    frame = record_frame(RECORD, prefix="+REPLAY:")

    assert frame.startswith("+REPLAY:{")
    assert json.loads(frame.removeprefix("+REPLAY:")) == RECORD


@pytest.mark.parametrize("prefix", ["+RECORD:", "+REPLAY:"])
def test_prefixes_inside_strings_are_escaped_so_the_sdk_strip_keeps_json(prefix):
    metadata = {
        "note": "a +RECORD: b +REPLAY: c",
        "+RECORD:key": ["+REPLAY:", "\\+RECORD:", "+RE+RECORD:CORD:"],
    }
    record = {**RECORD, "metadata": metadata}

    frame = record_frame(record, prefix)
    body = frame.removeprefix(prefix)

    assert "+RECORD:" not in body and "+REPLAY:" not in body
    assert json.loads(body) == record
    assert json.loads(sdk_strip(frame)) == record


def test_exponent_floats_survive_a_record():
    metadata = {"big": 1e300, "small": 1.5e-7, "neg": -2.5e20, "tiny": 5e-324}
    record = {**RECORD, "metadata": metadata}

    decoded = json.loads(sdk_strip(record_frame(record)))

    assert decoded["metadata"] == metadata


def test_non_ascii_text_survives_a_record():
    record = {**RECORD, "metadata": {"city": "Zürich ✓ 東京"}}

    assert json.loads(sdk_strip(record_frame(record))) == record


# -- Properties (hypothesis) ---------------------------------------------------

if given is None:

    def test_properties_need_hypothesis():
        pytest.skip("hypothesis is not installed")

else:
    KEYS = [
        "CLIENT_ID",
        "EVENT_NAME",
        "PAYLOAD",
        "DELIVERY_TO",
        "METADATA",
        "EVENT_IDEM",
        "PAYLOAD_METADATA",
        "ACCESS_KEY",
        "X",
        "_",
    ]
    VERBS = ["CONN", "PUB", "SUB", "UNSUB", "ACK", "DEFER", "NOPE", "pub", ""]
    NASTY = st.text(alphabet=st.sampled_from(list(';=:{}[]"\\ ,aZ0_+é')), max_size=12)
    VALUES = st.one_of(NASTY, st.text(max_size=12))
    PARAMS = st.lists(
        st.tuples(st.sampled_from(KEYS), st.sampled_from(["=", "=:", ""]), VALUES),
        max_size=8,
    )
    SAFE_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
    JSON_VALUES = st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**63 - 1)
        | st.floats(allow_nan=False, allow_infinity=False)
        | SAFE_TEXT
        | st.sampled_from(["+RECORD:", "+REPLAY:", ";METADATA=:{", "}", "\\"]),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(SAFE_TEXT, inner, max_size=4)
        ),
        max_leaves=20,
    )
    JSON_OBJECTS = st.dictionaries(SAFE_TEXT, JSON_VALUES, max_size=5)

    def parse_or_protocol_error(frame: str) -> None:
        try:
            req = parse_request(frame)
        except ProtocolError as exc:
            assert exc.wire().startswith(f"-FAIL:{exc.code};MESSAGE=")
            assert exc.wire().count(";") == 1
            return
        assert req.verb.isupper()
        assert all(isinstance(v, str) for v in req.params.values())

    @settings(max_examples=500, deadline=None)
    @given(st.text())
    def test_arbitrary_text_raises_nothing_but_protocol_error(frame):
        parse_or_protocol_error(frame)

    @settings(max_examples=500, deadline=None)
    @given(st.sampled_from(VERBS), PARAMS)
    def test_frames_built_from_real_keys_raise_nothing_but_protocol_error(verb, params):
        frame = verb + "".join(f";{k}{sep}{v}" for k, sep, v in params)

        parse_or_protocol_error(frame)

    @settings(max_examples=300, deadline=None)
    @given(JSON_OBJECTS, st.booleans(), st.sampled_from([":", ""]))
    def test_any_json_object_survives_as_metadata(metadata, followed, colon):
        text = json.dumps(metadata)
        tail = ";REASON=:r" if followed else ""

        req = parse_request(f"{PUB_HEAD};METADATA={colon}{text}{tail}")

        assert req.get("METADATA") == text
        assert req.get("REASON") == ("r" if followed else None)

    @settings(max_examples=300, deadline=None)
    @given(JSON_OBJECTS)
    def test_any_record_survives_the_sdk_strip(metadata):
        record = {**RECORD, "metadata": metadata}

        assert json.loads(sdk_strip(record_frame(record))) == record
