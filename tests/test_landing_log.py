"""The landing log's segments (branch landing-log; not wired into the store yet): what is read
back is exactly what was written whole, in sequence, and nothing of a torn or reused tail."""

from __future__ import annotations

import os
import stat

from dicomnode.spool.landing import SEGMENT_BYTES, Landing, LandingLog, encode, read_segment


def _landing(seq: int, size: int = 1000) -> Landing:
    return Landing(
        seq=seq,
        sop_instance_uid=f"1.2.3.{seq}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.4",
        path=f"/var/lib/dicomnode/spool/1.2.3/1.2.3.{seq}.dcm",
        calling_ae="PACS",
        received_at=1764200000.25 + seq,
        content=bytes((seq + i) % 256 for i in range(size)),
    )


def test_records_appended_are_read_back_in_order_whole(tmp_path):
    log = LandingLog(tmp_path / "landing", "0")
    log.append([_landing(1), _landing(2, 40_000)])
    log.append([_landing(3, 0)])

    assert log.records() == [_landing(1), _landing(2, 40_000), _landing(3, 0)]


def test_a_torn_last_record_is_not_read(tmp_path):
    log = LandingLog(tmp_path / "landing", "0")
    log.append([_landing(1), _landing(2)])
    segment = log.paths[0]
    end = len(encode(_landing(1))) + len(encode(_landing(2)))
    with segment.open("r+b") as handle:  # the power went before the second record's last bytes
        handle.seek(end - 10)
        handle.write(bytes(10))

    assert [r.seq for r in read_segment(segment)] == [1]


def test_a_record_cut_short_by_the_end_of_the_segment_is_not_read(tmp_path):
    log = LandingLog(tmp_path / "landing", "0")
    log.append([_landing(1), _landing(2)])
    segment = log.paths[0]
    os.truncate(segment, len(encode(_landing(1))) + len(encode(_landing(2))) - 1)

    assert [r.seq for r in read_segment(segment)] == [1]


def test_segments_are_created_with_room_so_that_appending_overwrites(tmp_path):
    log = LandingLog(tmp_path / "landing", "0")

    assert [path.stat().st_size for path in log.paths] == [SEGMENT_BYTES, SEGMENT_BYTES]
    log.append([_landing(1)])
    assert log.paths[0].stat().st_size == SEGMENT_BYTES


def test_reading_stops_at_a_corrupt_record(tmp_path):
    log = LandingLog(tmp_path / "landing", "0")
    log.append([_landing(1), _landing(2), _landing(3)])
    segment = log.paths[0]
    data = bytearray(segment.read_bytes())
    data[len(encode(_landing(1))) + 200] ^= 0xFF  # a byte of the second record's payload
    segment.write_bytes(bytes(data))

    assert [r.seq for r in read_segment(segment)] == [1]


def test_a_reused_segment_yields_its_new_records_and_none_of_what_it_held_before(tmp_path):
    log = LandingLog(tmp_path / "landing", "0")
    log.append([_landing(1), _landing(2), _landing(3)])
    first = log.switch()
    log.append([_landing(4)])
    log.switch()
    log.append([_landing(5)])  # same length as record 1: the old records 2 and 3 follow it

    assert [r.seq for r in read_segment(first)] == [5]
    assert [r.seq for r in log.records()] == [4, 5]


def test_a_reused_segment_whose_new_record_is_longer_stops_inside_the_old_ones(tmp_path):
    log = LandingLog(tmp_path / "landing", "0")
    log.append([_landing(1), _landing(2), _landing(3)])
    log.switch()
    log.switch()
    log.append([_landing(6, 1500)])

    assert [r.seq for r in read_segment(log.paths[0])] == [6]


def test_segments_are_private_to_the_service_user(tmp_path):
    log = LandingLog(tmp_path / "landing", "1")
    log.append([_landing(1)])

    assert stat.S_IMODE((tmp_path / "landing").stat().st_mode) == 0o700
    assert all(stat.S_IMODE(path.stat().st_mode) == 0o600 for path in log.paths)
