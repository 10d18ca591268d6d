"""The hive's model catalog: entries on disk, atomic writes, corrupt entries, lookups, delete."""

from __future__ import annotations

import json
import os
import stat
import time
from dataclasses import replace
from pathlib import Path

import pytest

from rbee_mesh.actors.hive.catalog import (
    METADATA_NAME,
    Catalog,
    ModelEntry,
    ModelStatus,
    parse_ref,
)
from rbee_mesh.protocol import ErrorCode, MeshError

SHA = "ab" * 32


def make_entry(catalog: Catalog, ref: str, **changes: object) -> ModelEntry:
    repo, file = parse_ref(ref)
    assert file is not None
    entry = ModelEntry(
        id=ref,
        repo=repo,
        file=file,
        revision="c0ffee" * 6 + "abcd",
        size=1234,
        sha256=SHA,
        status=ModelStatus.AVAILABLE,
        error=None,
        added=1_700_000_000.0,
        last_used=1_700_000_000.0,
        path=catalog.model_path(repo, file),
    )
    return replace(entry, **changes)  # type: ignore[arg-type]


def put(catalog: Catalog, ref: str, **changes: object) -> ModelEntry:
    entry = make_entry(catalog, ref, **changes)
    catalog.put(entry)
    return entry


def never_in_use(model: str) -> bool:
    return False


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    return Catalog(tmp_path / "models")


def test_put_then_entries_round_trips_every_field(catalog: Catalog) -> None:
    entry = put(
        catalog,
        "TheOwner/the-repo:sub/model.Q4_K_M.gguf",
        status=ModelStatus.FAILED,
        error="boom",
        sha256=None,
    )
    entries, problems = Catalog(catalog.root).entries()
    assert problems == []
    assert entries == [entry]
    assert entry.path == catalog.root / "TheOwner--the-repo--sub--model.Q4_K_M.gguf" / (
        "model.Q4_K_M.gguf"
    )
    record = entry.to_record()
    assert record["status"] == "failed" and record["path"] == str(entry.path)
    assert json.loads(json.dumps(record)) == record


def test_put_overwrites_atomically_so_a_crash_before_the_rename_keeps_the_old_entry(
    catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = put(catalog, "o/r:m.gguf")

    def crash(src: object, dst: object) -> None:
        raise OSError("simulated crash between write and rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        catalog.put(replace(old, status=ModelStatus.FAILED, error="x"))
    monkeypatch.undo()
    assert catalog.entries() == ([old], [])
    assert os.listdir(old.path.parent) == [METADATA_NAME]  # the temporary file is gone too


def test_temporary_file_left_by_a_crash_mid_write_is_ignored(catalog: Catalog) -> None:
    old = put(catalog, "o/r:m.gguf")
    (old.path.parent / f".{METADATA_NAME}.x1y2.tmp").write_text('{"schema": 1, "id": "o/r:m.g')
    assert catalog.entries() == ([old], [])


def test_put_fsyncs_the_file_and_then_its_directory(
    catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    put(catalog, "o/r:m.gguf")
    assert synced == ["file", "dir"]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b'{"schema": 1, "id": "o/r:bad.gguf", "re', "not valid JSON"),
        (b"\xff\xfe\x00garbage", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"schema": 99}', "schema 99"),
        (b'{"schema": 1, "id": "o/r:bad.gguf"}', "missing field"),
        (b"{}", "schema None"),
    ],
)
def test_corrupt_model_json_is_reported_and_skipped(
    catalog: Catalog, content: bytes, reason: str
) -> None:
    good = put(catalog, "o/r:good.gguf")
    bad_dir = catalog.entry_dir("o/r", "bad.gguf")
    bad_dir.mkdir()
    (bad_dir / METADATA_NAME).write_bytes(content)
    entries, problems = catalog.entries()
    assert entries == [good]
    assert len(problems) == 1 and problems[0].dir == bad_dir
    assert reason in problems[0].reason


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("size", "12", "wrong type"),
        ("size", True, "wrong type"),
        ("status", "exploded", "unknown status"),
        ("sha256", "not-hex", "out of range"),
        ("id", "../../etc:passwd", "bad id"),
        ("file", "other.gguf", "do not match"),
    ],
)
def test_schema_invalid_entry_is_reported_with_its_reason(
    catalog: Catalog, field: str, value: object, reason: str
) -> None:
    entry = put(catalog, "o/r:m.gguf")
    path = entry.path.parent / METADATA_NAME
    data = json.loads(path.read_text())
    data[field] = value
    path.write_text(json.dumps(data))
    entries, problems = catalog.entries()
    assert entries == []
    assert [p.dir for p in problems] == [entry.path.parent]
    assert reason in problems[0].reason


def test_entry_describing_another_model_than_its_directory_is_reported(catalog: Catalog) -> None:
    entry = put(catalog, "o/r:m.gguf")
    moved = catalog.root / "o--r--elsewhere.gguf"
    entry.path.parent.rename(moved)
    entries, problems = catalog.entries()
    assert entries == [] and "belongs elsewhere" in problems[0].reason


def test_directory_without_model_json_is_reported(catalog: Catalog) -> None:
    (catalog.root / "o--r--m.gguf").mkdir()
    entries, problems = catalog.entries()
    assert entries == [] and "no model.json" in problems[0].reason


def test_get_resolves_exact_id_then_unique_file_then_unique_repo(catalog: Catalog) -> None:
    a = put(catalog, "o/r:sub/a.Q4_K_M.gguf")
    b = put(catalog, "o/other:b.gguf")
    assert catalog.get("o/r:sub/a.Q4_K_M.gguf") == a
    assert catalog.get("sub/a.Q4_K_M.gguf") == a
    assert catalog.get("a.Q4_K_M.gguf") == a
    assert catalog.get("o/other") == b


def test_get_ambiguous_ref_is_invalid_request_listing_the_candidates(catalog: Catalog) -> None:
    put(catalog, "o/r:a.Q4_K_M.gguf")
    put(catalog, "o/r:a.Q8_0.gguf")
    with pytest.raises(MeshError) as caught:
        catalog.get("o/r")
    assert caught.value.code is ErrorCode.INVALID_REQUEST
    assert "o/r:a.Q4_K_M.gguf" in caught.value.message
    assert "o/r:a.Q8_0.gguf" in caught.value.message


def test_get_unknown_ref_is_not_found_naming_what_the_catalog_holds(catalog: Catalog) -> None:
    put(catalog, "o/r:a.gguf")
    with pytest.raises(MeshError) as caught:
        catalog.get("x/y:z.gguf")
    assert caught.value.code is ErrorCode.NOT_FOUND
    assert "o/r:a.gguf" in caught.value.message and "download" in caught.value.message


def test_delete_is_refused_while_a_worker_uses_the_model(catalog: Catalog) -> None:
    entry = put(catalog, "o/r:a.gguf")
    entry.path.write_bytes(b"weights")
    with pytest.raises(MeshError) as caught:
        catalog.delete("a.gguf", in_use=lambda model: model == entry.id)
    assert caught.value.code is ErrorCode.CONFLICT
    assert "in use by worker(s)" in caught.value.message and "delete them first" in (
        caught.value.message
    )
    assert catalog.entries() == ([entry], []) and entry.path.read_bytes() == b"weights"


def test_delete_removes_the_entry_directory_completely(catalog: Catalog) -> None:
    entry = put(catalog, "o/r:a.gguf")
    entry.path.write_bytes(b"weights")
    (entry.path.parent / "a.gguf.partial").write_bytes(b"wei")
    assert catalog.delete("o/r:a.gguf", in_use=never_in_use) == entry
    assert list(catalog.root.iterdir()) == []


def test_delete_is_refused_while_the_model_downloads(catalog: Catalog) -> None:
    entry = put(catalog, "o/r:a.gguf", status=ModelStatus.DOWNLOADING)
    with catalog.download_lock(entry.id), pytest.raises(MeshError) as caught:
        catalog.delete(entry.id, in_use=never_in_use)
    assert caught.value.code is ErrorCode.CONFLICT and "being downloaded" in caught.value.message
    assert catalog.entries() == ([entry], [])


def test_delete_by_exact_id_removes_a_corrupt_entry(catalog: Catalog) -> None:
    directory = catalog.entry_dir("o/r", "a.gguf")
    directory.mkdir()
    (directory / METADATA_NAME).write_text("{half")
    assert catalog.delete("o/r:a.gguf", in_use=never_in_use) is None
    assert list(catalog.root.iterdir()) == []


@pytest.mark.parametrize(
    "ref",
    [
        "../x:y.gguf",
        "o/..:y.gguf",
        "o/r:../../etc/passwd",
        "o/r:/etc/passwd",
        "o/r:a/../../b.gguf",
        "o/r:a\\b.gguf",
        "o/r:a//b.gguf",
        "o/r:a\x00.gguf",
        "/abs/r:x.gguf",
        "o--x/r:y.gguf",
        "o/r/extra:y.gguf",
        "o/r:" + "x" * 300,
    ],
)
def test_refs_that_could_escape_the_catalog_root_are_refused(catalog: Catalog, ref: str) -> None:
    with pytest.raises(MeshError) as caught:
        parse_ref(ref)
    assert caught.value.code is ErrorCode.INVALID_REQUEST
    with pytest.raises(MeshError):
        catalog.lookup(ref)
    assert list(catalog.root.parent.iterdir()) == [catalog.root]


def test_touch_updates_last_used_and_nothing_else(catalog: Catalog) -> None:
    entry = put(catalog, "o/r:a.gguf")
    before = time.time()
    touched = catalog.touch(entry.id)
    assert touched.last_used >= before
    assert catalog.lookup(entry.id) == touched == replace(entry, last_used=touched.last_used)


def test_touch_of_an_unknown_model_is_not_found(catalog: Catalog) -> None:
    with pytest.raises(MeshError) as caught:
        catalog.touch("o/r:a.gguf")
    assert caught.value.code is ErrorCode.NOT_FOUND


def test_download_lock_is_exclusive_and_leaves_no_lock_file(catalog: Catalog) -> None:
    with catalog.download_lock("o/r:a.gguf"):
        with pytest.raises(MeshError) as caught, Catalog(catalog.root).download_lock("o/r:a.gguf"):
            pass
        assert caught.value.code is ErrorCode.CONFLICT
        with catalog.download_lock("o/r:b.gguf"):
            pass
    with catalog.download_lock("o/r:a.gguf"):
        pass
    assert list(catalog.root.iterdir()) == []


def test_mark_interrupted_fails_downloads_left_by_a_dead_hive_but_not_running_ones(
    catalog: Catalog,
) -> None:
    stale = put(catalog, "o/r:stale.gguf", status=ModelStatus.DOWNLOADING)
    running = put(catalog, "o/r:running.gguf", status=ModelStatus.DOWNLOADING)
    ready = put(catalog, "o/r:ready.gguf")
    with catalog.download_lock(running.id):
        marked = catalog.mark_interrupted()
    assert [m.id for m in marked] == [stale.id]
    stale_now = catalog.lookup(stale.id)
    assert stale_now is not None and stale_now.status is ModelStatus.FAILED
    assert stale_now.error is not None and "resume" in stale_now.error
    assert catalog.lookup(running.id) == running and catalog.lookup(ready.id) == ready


def test_a_delete_interrupted_after_its_rename_is_finished_at_the_next_start(
    catalog: Catalog,
) -> None:
    tombstone = catalog.root / ".deleting-o--r--a.gguf-0011"
    tombstone.mkdir()
    (tombstone / "a.gguf").write_bytes(b"w")
    Catalog(catalog.root)
    assert list(catalog.root.iterdir()) == []
