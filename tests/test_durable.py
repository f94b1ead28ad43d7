"""Durable writes: every new folder is synced to its parent, so a power loss cannot drop it.

fsync itself cannot be observed without pulling the power, so these tests record which
folders the code syncs, on a real file system.
"""

from __future__ import annotations

import os
import stat

import dicomnode.durable as durable
from dicomnode.durable import make_folder_durably, write_durably
from tests.conftest import umask


def _record_folder_syncs(monkeypatch) -> list:
    synced = []
    real = durable.fsync_dir
    monkeypatch.setattr(durable, "fsync_dir", lambda path: (synced.append(path), real(path)))
    return synced


def test_each_folder_created_is_synced_to_its_parent_and_private(tmp_path, monkeypatch):
    synced = _record_folder_syncs(monkeypatch)

    with umask(0o000):  # private by the code's own mode, whatever the umask
        make_folder_durably(tmp_path / "outbox" / "1.2.3" / "v1")

    assert synced == [tmp_path, tmp_path / "outbox", tmp_path / "outbox" / "1.2.3"]
    assert stat.S_IMODE((tmp_path / "outbox" / "1.2.3").stat().st_mode) == 0o700


def test_an_existing_folder_costs_no_sync(tmp_path, monkeypatch):
    synced = _record_folder_syncs(monkeypatch)

    make_folder_durably(tmp_path)

    assert synced == []


def test_a_file_written_into_a_new_folder_syncs_the_folder_and_its_parent(tmp_path, monkeypatch):
    synced = _record_folder_syncs(monkeypatch)

    write_durably(tmp_path / "study" / "sr.dcm", lambda handle: handle.write(b"report"))

    assert synced == [tmp_path, tmp_path / "study"]
    assert (tmp_path / "study" / "sr.dcm").read_bytes() == b"report"


def test_a_file_written_unsynced_replaces_the_old_by_a_rename_and_syncs_nothing(tmp_path, monkeypatch):
    synced = _record_folder_syncs(monkeypatch)
    monkeypatch.setattr(durable.os, "fsync", lambda fd: synced.append(fd))
    (tmp_path / "sr.dcm").write_bytes(b"old")
    before = (tmp_path / "sr.dcm").stat().st_ino

    durable.write_unsynced(tmp_path / "sr.dcm", b"new")

    assert synced == []
    assert (tmp_path / "sr.dcm").read_bytes() == b"new"
    assert (tmp_path / "sr.dcm").stat().st_ino != before, "a new file took the name: never torn"
    assert [p.name for p in tmp_path.iterdir()] == ["sr.dcm"]


def test_the_file_system_sync_runs_on_an_open_folder_and_says_why_it_cannot(tmp_path):
    folder = durable.open_folder(tmp_path)
    try:
        durable.sync_file_system(folder)
    finally:
        os.close(folder)

    try:
        durable.sync_file_system(folder)  # closed now
    except OSError as exc:
        assert exc.strerror == "Bad file descriptor"
    else:
        raise AssertionError("a sync that fails must raise")
