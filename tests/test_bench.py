"""`dicomnode bench receive` runs against DCMTK in the same run and prints the ratio.

No timing is asserted: only that both receivers got every instance and a ratio came out.
"""

from __future__ import annotations

import re

from tests.conftest import run_cli


def test_bench_receive_prints_dicomnode_and_storescp_rates_and_their_ratio():
    done = run_cli("bench", "receive", "--count", "3", "--rounds", "1")

    assert done.returncode == 0, done.stderr
    assert "receive: 3 instances of RG1_UNCR.dcm" in done.stdout
    for receiver in ("storescp", "dicomnode"):
        assert re.search(rf"{receiver}\s+[\d.]+ s\s+[\d.]+ MB/s\s+[\d.]+ instances/s", done.stdout)
    assert re.search(r"ratio dicomnode/storescp \(time\): \d+\.\d\d", done.stdout)


def test_bench_receive_of_a_file_that_is_not_dicom_fails_naming_it(tmp_path):
    not_dicom = tmp_path / "notes.txt"
    not_dicom.write_text("not an image")

    done = run_cli("bench", "receive", "--file", str(not_dicom), "--count", "1", "--rounds", "1")

    assert done.returncode != 0
    assert "notes.txt" in done.stderr
