"""`dicomnode bench receive` runs against DCMTK in the same run and prints the ratio.

No timing is asserted: only that both receivers got every instance and a ratio came out.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from tests.conftest import dcmtk, run_cli


def test_bench_receive_prints_rates_and_speed_against_storescp_for_each_standard_scenario():
    done = run_cli("bench", "receive", "--count", "4", "--rounds", "1")

    assert done.returncode == 0, done.stderr
    assert "receive small: 4 instances of CT_small.dcm" in done.stdout
    assert "receive large: 4 instances of RG1_UNCR.dcm" in done.stdout
    assert "receive concurrent: 4 instances of CT_small.dcm, 0.2 MB, 4 association(s)" in done.stdout
    assert "receive per-instance: 4 instances of CT_small.dcm, 0.2 MB, one association each" in done.stdout
    for receiver in ("storescp", "dicomnode"):
        rate = rf"{receiver}\s+[\d.]+ s\s+[\d.]+ MB/s\s+[\d.]+ instances/s  \(range [\d.]+-[\d.]+ s\)"
        assert len(re.findall(rate, done.stdout)) == 4
    assert len(re.findall(r"speed dicomnode/storescp: \d+\.\d\dx", done.stdout)) == 4


def test_bench_receive_runs_the_standard_scenarios_with_a_slice_and_radiograph_of_ones_own(tmp_path):
    own_slice, own_radiograph = tmp_path / "slice.dcm", tmp_path / "radiograph.dcm"
    shutil.copy(get_testdata_file("CT_small.dcm", download=False), own_slice)
    shutil.copy(get_testdata_file("RG1_UNCR.dcm", download=False), own_radiograph)

    done = run_cli(
        "bench",
        "receive",
        "--slice",
        str(own_slice),
        "--radiograph",
        str(own_radiograph),
        "--count",
        "4",
        "--rounds",
        "1",
    )

    assert done.returncode == 0, done.stderr
    for name, file in (
        ("small", "slice"),
        ("large", "radiograph"),
        ("concurrent", "slice"),
        ("per-instance", "slice"),
    ):
        assert f"receive {name}: 4 instances of {file}.dcm" in done.stdout
    assert len(re.findall(r"speed dicomnode/storescp: \d+\.\d\dx", done.stdout)) == 4


def test_bench_receive_without_pydicom_data_asks_for_files_of_ones_own(monkeypatch):
    """A node installed without the test extras has no pydicom-data."""
    import pydicom.data

    from dicomnode.bench import BenchError
    from dicomnode.bench.receive import standard_scenarios

    monkeypatch.setattr(pydicom.data, "get_testdata_file", lambda name, download=True: None)
    with pytest.raises(
        BenchError, match=r"^CT_small\.dcm and RG1_UNCR\.dcm not found .*--slice, --radiograph\)$"
    ):
        standard_scenarios()
    own = Path(get_testdata_file("CT_small.dcm", download=False))
    with pytest.raises(BenchError, match=r"^RG1_UNCR\.dcm not found"):
        standard_scenarios(slice_file=own)
    assert {s.source for s in standard_scenarios(slice_file=own, radiograph=own)} == {own}


def test_bench_receive_refuses_fewer_instances_than_associations_before_sending():
    done = run_cli("bench", "receive", "--count", "3", "--rounds", "1")

    assert done.returncode == 1
    assert "concurrent: 3 instances cannot go over 4 associations; --count at least 4" in done.stderr
    assert "receive small" not in done.stdout  # nothing was run


def test_bench_receive_refuses_a_file_with_the_standard_runs_files(tmp_path):
    done = run_cli(
        "bench",
        "receive",
        "--file",
        get_testdata_file("CT_small.dcm", download=False),
        "--slice",
        get_testdata_file("CT_small.dcm", download=False),
    )

    assert done.returncode == 1
    assert "--file runs a scenario of its own; --slice and --radiograph are the standard runs'" in done.stderr


def test_the_node_in_the_bench_receive_logs_as_serve_logs_and_leaves_the_logging_as_it_was(tmp_path):
    """What serve writes per association and instance costs the receiving thread; the bench's node
    must pay it too, at serve's default level, with its receivers' records coming to the same
    files, and leave this process's handlers as they were."""
    from dicomnode.bench.receive import _dicomnode_scp, make_instances

    (tmp_path / "in").mkdir()
    slices = make_instances(Path(get_testdata_file("CT_small.dcm")), 2, tmp_path / "in")
    handlers = [list(logging.getLogger(name).handlers) for name in ("", "dicomnode.audit")]
    state = tmp_path / "node"
    for receivers in (1, 2):
        with _dicomnode_scp(state / str(receivers), receivers) as port:
            for path in slices:  # an association each, taken by whichever process the kernel picks
                sent = dcmtk("storescu", "-aec", "DICOMNODE", "127.0.0.1", str(port), str(path))
                assert sent.returncode == 0, sent.stderr
        audit = (state / str(receivers) / "logs" / "audit.log").read_text()
        assert audit.count("stored=1 refused=0") == 2, audit
        assert "association released" in (state / str(receivers) / "stderr.log").read_text()
    assert [list(logging.getLogger(name).handlers) for name in ("", "dicomnode.audit")] == handlers


def test_bench_receive_compares_counts_of_receiving_processes_against_one_storescp_run():
    from pydicom.data import get_testdata_file

    ct = get_testdata_file("CT_small.dcm")
    done = run_cli(
        "bench", "receive", "--file", ct, "--count", "6", "--associations", "3", "--rounds", "1",
        "--receivers", "1", "--receivers", "2", "--receivers", "2",
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert "3 association(s), 1 rounds each, dicomnode in 1, 2 receiving process(es)" in done.stdout
    for receiver in ("storescp", "dicomnode x1", "dicomnode x2"):
        rate = rf"  {receiver}\s+[\d.]+ s\s+[\d.]+ MB/s\s+[\d.]+ instances/s"
        assert len(re.findall(rate, done.stdout)) == 1, done.stdout
    speeds = re.findall(r"speed dicomnode x(\d)/storescp: \d+\.\d\dx", done.stdout)
    assert speeds == ["1", "2"]


def test_bench_receive_memory_prints_the_peak_while_receiving_each_size():
    done = run_cli("bench", "receive", "--memory", "4", "--memory", "12")

    assert done.returncode == 0, done.stderr
    peaks = re.findall(r"one instance of +([\d.]+) MiB in +[\d.]+ s: peak RSS +[\d.]+ MiB", done.stdout)
    assert [float(size) for size in peaks] == [2.0, 10.0]


def test_bench_receive_of_a_file_that_is_not_dicom_fails_naming_it(tmp_path):
    not_dicom = tmp_path / "notes.txt"
    not_dicom.write_text("not an image")

    done = run_cli("bench", "receive", "--file", str(not_dicom), "--count", "1", "--rounds", "1")

    assert done.returncode != 0
    assert "notes.txt" in done.stderr


def test_bench_receive_that_would_fill_its_file_system_fails_before_sending_naming_the_space(tmp_path):
    """Every round's copies stay until the scenario ends; on a file system too small for them a
    receiver ran out of space mid-run and storescu failed with nothing to say."""
    from dicomnode.bench import BenchError
    from dicomnode.bench.receive import Scenario, _bench_scenario

    ct = Path(get_testdata_file("CT_small.dcm"))
    rounds = int(shutil.disk_usage(tmp_path).free / ct.stat().st_size)  # 2 copies a round: over

    with pytest.raises(BenchError) as raised:
        _bench_scenario(Scenario("small", ct, 1), rounds, tmp_path / "bench", print)

    message = str(raised.value)
    assert "small scenario needs about" in message and "MB free in" in message
    assert "--rounds" in message and "TMPDIR" in message
    assert not (tmp_path / "bench" / "in").exists()  # nothing was written


def test_the_space_a_receive_scenario_needs_counts_every_copy_it_keeps():
    from dicomnode.bench.receive import _SPACE_HEADROOM, Scenario, _space_needed

    ct = Path(get_testdata_file("CT_small.dcm"))
    copies = _space_needed(Scenario("small", ct, 10), 3, 2) - _SPACE_HEADROOM

    assert copies == (1 + 3 * (1 + 2)) * 10 * ct.stat().st_size  # sent, then storescp and 2 nodes a round


def test_bench_infer_times_every_method_against_the_backbone_of_the_same_run(tmp_path, tiny_architecture):
    import json

    from tests.conftest import free_port, write_node_config

    config = write_node_config(tmp_path, tiny_architecture, scp_port=free_port())
    figures = tmp_path / "infer.json"

    done = run_cli(
        "bench", "infer", "--config", str(config), "--batch", "2", "--iterations", "2", "--json", str(figures)
    )

    assert done.returncode == 0, done.stderr
    document = json.loads(figures.read_text())
    assert (document["device"], document["architecture"]) == ("cpu", "tinyclip")
    rows = {row["method"]: row for row in document["results"]}
    assert list(rows) == [
        "backbone",
        "tower",
        "zeroshot",
        "linear-probe",
        "vpt-shallow",
        "vpt-deep",
        "dpt",
        "engine-zeroshot",
    ]
    assert rows["backbone"]["ratio_to_backbone"] == 1.0
    for row in rows.values():
        assert row["batch"] == 2 and row["images_per_s"] > 0 and row["p95_ms"] >= row["p50_ms"] > 0
        assert row["ratio_to_backbone"] == row["images_per_s"] / rows["backbone"]["images_per_s"]
    assert rows["vpt-deep"]["learned_parameters"] > rows["vpt-shallow"]["learned_parameters"] > 0
    # The served tower is open_clip's on the CPU: the same probabilities within float rounding.
    assert 0 <= document["served_tower_max_probability_difference"] < 1e-4


def test_bench_train_compares_each_method_with_full_fine_tuning(tmp_path, tiny_architecture):
    import json

    from tests.conftest import free_port, write_node_config

    config = write_node_config(tmp_path, tiny_architecture, scp_port=free_port())
    figures = tmp_path / "train.json"

    done = run_cli(
        "bench", "train", "--config", str(config), "--batch", "2", "--steps", "1", "--json", str(figures)
    )

    assert done.returncode == 0, done.stderr
    rows = {row["method"]: row for row in json.loads(figures.read_text())["results"]}
    assert list(rows) == ["full-finetune", "linear-probe", "vpt-shallow", "vpt-deep", "dpt"]
    assert rows["full-finetune"]["time_vs_full"] == 1.0
    assert all(
        row["learned_parameters"] < rows["full-finetune"]["learned_parameters"]
        for m, row in rows.items()
        if m != "full-finetune"
    )


def test_bench_study_measures_receipt_to_results_against_the_engine_alone(tmp_path, tiny_architecture):
    import json

    from tests.conftest import REPO, free_port, write_node_config

    config = write_node_config(
        tmp_path, tiny_architecture, scp_port=free_port(), prompts_dir=str(REPO / "prompts")
    )
    figures = tmp_path / "study.json"

    done = run_cli("bench", "study", "--config", str(config), "--count", "2", "--json", str(figures))

    assert done.returncode == 0, done.stderr
    document = json.loads(figures.read_text())
    assert document["studies"] == 2
    assert document["p95_ms"] >= document["p50_ms"] > document["engine_ms"] > 0
    assert re.search(r"receipt to SR: p50\s+[\d.]+ ms\s+p95\s+[\d.]+ ms", done.stdout)


def test_bench_imaging_sets_each_inputs_preparation_rate_beside_the_engine(tmp_path, tiny_architecture):
    import json

    from tests.conftest import free_port, write_node_config

    config = write_node_config(tmp_path, tiny_architecture, scp_port=free_port())
    figures = tmp_path / "imaging.json"

    done = run_cli(
        "bench",
        "imaging",
        "--config",
        str(config),
        "--rounds",
        "1",
        "--batch",
        "2",
        "--slide-side",
        "2048",
        "--json",
        str(figures),
    )

    assert done.returncode == 0, done.stderr
    document = json.loads(figures.read_text())
    rows = {row["input"]: row for row in document["results"]}
    assert list(rows) == ["radiograph", "oct", "wsi"]
    assert rows["oct"]["samples_per_unit"] == 128
    assert rows["radiograph"]["samples_per_unit"] == 1 and "RG1_J2KR.dcm" in rows["radiograph"]["description"]
    assert rows["wsi"]["samples_per_unit"] > 1
    for row in rows.values():
        assert row["engine_images_per_s"] == document["engine_images_per_s"] > 0
        assert row["samples_per_s"] == pytest.approx(row["samples_per_unit"] / (row["unit_ms"] / 1e3))
        assert row["workers_to_feed_engine"] >= 1
    assert re.search(r"wsi\s+\d+ samples/unit .* engine/imaging\s+[\d.]+x", done.stdout)


def test_a_bench_node_whose_scp_cannot_start_stops_what_it_started(tmp_path, monkeypatch):
    """Its other receiving processes' socket and its spool's settler do not outlive the error."""
    from dicomnode.bench import receive as bench_receive
    from dicomnode.net.receivers import Receivers

    made: list[Receivers] = []

    class Recorded(Receivers):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    def cannot_listen(spool, *args, **kwargs):
        made.append(spool)
        raise OSError("port taken")

    monkeypatch.setattr(bench_receive, "Receivers", Recorded)
    monkeypatch.setattr(bench_receive, "start_scp", cannot_listen)
    with pytest.raises(OSError, match="port taken"), bench_receive._dicomnode_listening(tmp_path / "node", 3):
        pytest.fail("listening")

    others, spool = made
    assert others.share.socket.fileno() == -1, "the shared socket is closed"
    assert spool._settler is None, "the settler is stopped"
