"""tune/storage.py: --storage as a folder or a URI, files through the storage's own filesystem."""
from __future__ import annotations

import pytest

from dsdm.errors import DsdmError
from tune.storage import Storage

URI = "s3://bucket/runs/?endpoint_override=127.0.0.1:9000&scheme=http"


def test_a_folder_storage_is_its_own_local_folder_and_writes_files_whole(tmp_path):
    store = Storage.open(tmp_path / "runs", local_dir=tmp_path / "elsewhere")
    assert store.local == tmp_path / "runs" and not store.remote and not (tmp_path / "elsewhere").exists()
    assert store.uri("exp", "trials.md") == str(tmp_path / "runs" / "exp" / "trials.md")
    store.write_text("hello", "exp", "trials.md")
    assert store.exists("exp", "trials.md") and store.read_text("exp", "trials.md") == "hello"
    assert not list((tmp_path / "runs" / "exp").glob("*.tmp"))
    store.write_text("a", "exp", "run_a_1_x", "error.txt")
    store.write_text("b", "exp", "run_a_1_x", "deeper", "error.txt")
    assert store.find("error.txt", "exp") == ["run_a_1_x/error.txt"] and store.find("error.txt", "none") == []


def test_a_uri_keeps_its_query_at_the_end_and_its_local_folder_apart(tmp_path):
    store = Storage(URI.replace("runs/?", "runs?"), tmp_path)
    assert store.remote and store.local_only() == Storage(str(tmp_path), tmp_path)
    assert store.uri("exp") == "s3://bucket/runs/exp?endpoint_override=127.0.0.1:9000&scheme=http"


def test_an_unreachable_uri_is_one_line_and_leaves_nothing(tmp_path):
    with pytest.raises(DsdmError, match=r"^storage 's3://nobucket/x\?endpoint_override=127.0.0.1:9&scheme=http' is "
                                        r"not reachable or not writable \(.*\); check the URI"):
        Storage.open("s3://nobucket/x?endpoint_override=127.0.0.1:9&scheme=http", local_dir=tmp_path / "local")
    assert not (tmp_path / "local").exists()


def test_an_unwritable_folder_is_one_line(tmp_path):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(DsdmError, match="is not writable .*; pass --storage DIR you can write"):
        Storage.open(tmp_path / "a-file" / "runs")


def test_an_unreachable_endpoint_is_reported_in_seconds(tmp_path):
    """The probe tries a dead S3 endpoint 3 times (~2 s), not pyarrow's from_uri default (~12 s here)."""
    import time

    start = time.monotonic()
    with pytest.raises(DsdmError, match="is not reachable"):
        Storage.open("s3://nobucket/x?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1", tmp_path / "l")
    assert time.monotonic() - start < 8
