"""Ingest reads from any fsspec URI: here a real HTTP server on localhost."""

import functools
import http.server
import threading

import pytest

from components.ingest import read_table
from driftloop.core.errors import DataSourceError


@pytest.fixture()
def http_dir(tmp_path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_read_parquet_and_csv_over_http(http_dir):
    from driftloop.app.scenario import generate

    folder, base = http_dir
    df = generate(rows=500, drift_at=None)
    df.to_parquet(folder / "d.parquet", index=False)
    df.to_csv(folder / "d.csv", index=False)
    got = read_table(f"{base}/d.parquet")
    assert len(got) == 500 and list(got.columns) == list(df.columns)
    assert len(read_table(f"{base}/d.csv")) == 500


def test_missing_remote_file_is_a_clear_error(http_dir):
    _, base = http_dir
    with pytest.raises(DataSourceError, match="d-missing.parquet"):
        read_table(f"{base}/d-missing.parquet")


def test_unknown_scheme_driver_missing():
    with pytest.raises(DataSourceError, match="cannot read|driver"):
        read_table("nosuchfs://bucket/key.parquet")
