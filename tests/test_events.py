"""Parsing KServe logger CloudEvents: fast path equals the cloudevents SDK; V1/V2 flattening; bad events."""

import pytest

from monitoring.events import (EventError, attributes_from_headers, attributes_via_sdk, parse_batch, parse_binary)
from tests.ce_events import COLUMNS, binary, instance, structured


def test_fast_attribute_parse_equals_cloudevents_from_http():
    for kind, data, kw in [("request", {"instances": [instance(1)]}, {}),
                           ("response", {"predictions": [1]}, {"version": "3", "role": "challenger"})]:
        headers, body = binary("id-1", kind, data, **kw)
        fast = attributes_from_headers(headers)
        assert fast == attributes_via_sdk(headers, body)
        assert fast["id"] == "id-1" and fast["inferenceservicename"] == "churn"
        assert parse_binary(headers, body, received_at=1.0) == parse_binary(headers, body, received_at=1.0,
                                                                                use_sdk=True)


def test_fast_parse_equals_sdk_without_time_header():
    headers, body = binary("id-2", "request", {"instances": [[1.0, "eu"]]})
    del headers["ce-time"]
    assert attributes_from_headers(headers) == attributes_via_sdk(headers, body)


def test_v1_request_dict_rows_and_response_version_from_header():
    rows = [instance(i) for i in range(3)]
    req = parse_binary(*binary("a", "request", {"instances": rows}), reference_columns=COLUMNS)
    assert req.kind == "request" and req.rows == rows and req.n == 3 and req.model_name == "churn"
    resp = parse_binary(*binary("a", "response", {"predictions": [0, 1, 0]}, version="7", role="canary"))
    assert resp.kind == "response" and resp.predictions == [0, 1, 0]
    assert (resp.model_version, resp.role) == ("7", "canary")


def test_model_version_from_response_body():
    resp = parse_binary(*binary("a", "response", {"predictions": [1], "model_version": 4}))
    assert resp.model_version == "4"


def test_v1_list_rows_map_by_reference_order():
    ev = parse_binary(*binary("a", "request", {"instances": [[1.0, "eu"], [2.0, None]]}),
                      reference_columns=["tenure", "region"])
    assert ev.rows == [{"tenure": 1.0, "region": "eu"}, {"tenure": 2.0, "region": None}]


def test_v2_one_tensor_per_column():
    payload = {"inputs": [{"name": "tenure", "shape": [2], "datatype": "FP64", "data": [1.0, 2.0]},
                          {"name": "region", "shape": [2], "datatype": "BYTES", "data": ["eu", "us"]}]}
    ev = parse_binary(*binary("a", "request", payload), reference_columns=["region", "tenure"])
    assert ev.rows == [{"tenure": 1.0, "region": "eu"}, {"tenure": 2.0, "region": "us"}]


def test_v2_single_2d_tensor_unnamed_columns_flat_and_nested():
    for data in ([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]):
        payload = {"inputs": [{"name": "input-0", "shape": [2, 3], "datatype": "FP64", "data": data}]}
        ev = parse_binary(*binary("a", "request", payload), reference_columns=["a", "b", "c"])
        assert ev.rows == [{"a": 1.0, "b": 2.0, "c": 3.0}, {"a": 4.0, "b": 5.0, "c": 6.0}]


def test_v2_response_outputs():
    payload = {"model_name": "churn", "model_version": "2", "id": "a",
               "outputs": [{"name": "output-0", "shape": [3], "datatype": "INT64", "data": [1, 0, 1]}]}
    ev = parse_binary(*binary("a", "response", payload))
    assert ev.predictions == [1, 0, 1] and ev.model_version == "2"


@pytest.mark.parametrize("header", ["ce-id", "ce-type", "ce-source", "ce-specversion", "ce-inferenceservicename"])
def test_missing_header_is_400_naming_it(header):
    headers, body = binary("a", "request", {"instances": [instance(0)]})
    del headers[header]
    with pytest.raises(EventError) as err:
        parse_binary(headers, body)
    assert err.value.status == 400 and header in err.value.message


def test_bad_events():
    headers, _ = binary("a", "request", {"instances": [instance(0)]})
    with pytest.raises(EventError) as err:
        parse_binary(headers, b"{not json")
    assert err.value.status == 400 and "not JSON" in err.value.message and err.value.reason == "bad_json"

    with pytest.raises(EventError) as err:
        parse_binary(*binary("a", "request", {"instances": [instance(0)]}, model="other"), model_names={"churn"})
    assert err.value.status == 404 and "'other'" in err.value.message

    row = instance(0)
    del row["plan"]
    row["colour"] = "red"
    with pytest.raises(EventError) as err:
        parse_binary(*binary("a", "request", {"instances": [row]}), reference_columns=COLUMNS)
    assert err.value.status == 422 and "['plan']" in err.value.message and "['colour']" in err.value.message

    with pytest.raises(EventError) as err:
        parse_binary(*binary("a", "request", {"instances": [[1.0]]}), reference_columns=COLUMNS)
    assert err.value.status == 422 and "unnamed" in err.value.message

    headers, body = binary("a", "request", {"instances": [instance(0)]})
    headers["ce-type"] = "com.example.other"
    with pytest.raises(EventError) as err:
        parse_binary(headers, body)
    assert err.value.status == 400 and "com.example.other" in err.value.message

    with pytest.raises(EventError) as err:
        parse_binary(*binary("a", "request", {"rows": []}))
    assert err.value.status == 422 and "instances" in err.value.message


def test_structured_batch_parses_and_is_all_or_nothing():
    import orjson

    items = [structured(f"b{i}", "request", {"instances": [instance(i)]}) for i in range(3)]
    items.append(structured("b0", "response", {"predictions": [1]}, version="2"))
    events = parse_batch(orjson.dumps(items), reference_columns=COLUMNS)
    assert [e.kind for e in events] == ["request"] * 3 + ["response"]
    assert events[0].rows == [instance(0)] and events[3].model_version == "2"
    # same attributes as binary mode
    assert events[1].attributes["id"] == "b1" and events[1].source == "http://localhost:9081/"
    assert events[1].attributes["namespace"] == "default"

    items[1] = {k: v for k, v in items[1].items() if k != "id"}
    with pytest.raises(EventError) as err:
        parse_batch(orjson.dumps(items))
    assert err.value.status == 400 and "#1" in err.value.message and "attribute 'id'" in err.value.message


def test_raw_asgi_header_parse_equals_cloudevents_from_http():
    from monitoring.events import attributes_from_raw_headers, parse_binary_attributes

    headers, body = binary("id-3", "response", {"predictions": [0]}, version="2", role="champion")
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()] + [(b"host", b"x")]
    attrs, ctype = attributes_from_raw_headers(raw)
    assert attrs == attributes_via_sdk(headers, body) and ctype == "application/json"
    assert parse_binary_attributes(attrs, ctype, body, received_at=2.0) == parse_binary(headers, body, received_at=2.0,
                                                                                        use_sdk=True)


def test_instances_with_different_columns_are_refused():
    rows = [instance(0), {**instance(1), "extra": 1}]
    with pytest.raises(EventError) as err:
        parse_binary(*binary("a", "request", {"instances": rows}))
    assert err.value.status == 422 and "same columns" in err.value.message
    with pytest.raises(EventError) as err:
        parse_binary(*binary("a", "request", {"instances": [instance(0), [1.0]]}))
    assert err.value.status == 422
