"""No patient data in any text the node writes, where the code once leaked it.

The leaks issue 16 found by reading the code, each provoked over the network against a running
node: an OS error that names the results folder (the Study Instance UID) kept in the journal
and shown by `dicomnode status` and `--json`; a chained OS error naming the spool path,
printed by `log.exception`; routing reasons quoting PatientSex and PatientWeight (CS and DS,
codes and numbers, yet about the patient). The node's output, log and audit files, status and
journal are then scanned for every name, ID and UID sent.
"""

from __future__ import annotations

import sqlite3

import pydicom

from dicomnode.net.scu import Peer, store
from dicomnode.privacy import describe_error, where_raised
from dicomnode.spool import SpoolError
from tests.conftest import wait_until
from tests.reliability.conftest import assert_no_leak, node_texts, write_study

#: Rules that look at the patient's sex and weight, before the repository's chest rule.
ROUTING = """
rules:
  - {name: heavy, match: {PatientWeight: ['120']}, prompt_set: cxr}
  - {name: male, match: {PatientSex: [M]}, prompt_set: cxr}
  - {name: chest, match: {Modality: [CR, DX], BodyPartExamined: [CHEST]}, prompt_set: cxr}
"""
WEIGHT = "83.25"
#: Not an enumerated value of PatientSex, but what some modalities send: a value to look for.
SEX = "FEMALE"


def test_provoked_failures_leave_no_name_id_uid_sex_or_weight_in_any_text(tmp_path, node_factory, tally):
    routing = tmp_path / "routing.yaml"
    routing.write_text(ROUTING)
    node = node_factory(routing=str(routing), studies={"retry_backoff_s": 0.5, "max_attempts": 2})
    state = node.config.parent / "var"
    peer = Peer("127.0.0.1", node.port, "DICOMNODE")
    blocked_results, blocked_spool, ignored = (
        write_study(tmp_path / "sent", n, instances=1) for n in (1, 2, 3)
    )
    # A file where the study's results folder goes, and one where its spool folder goes.
    (state / "outbox").mkdir(parents=True, exist_ok=True)
    (state / "outbox" / blocked_results.study_instance_uid).write_text("not a folder")
    (state / "spool" / blocked_spool.study_instance_uid).write_text("not a folder")
    # The ignored study: no rule matches, and the reasons name the sex and weight rules.
    ds = pydicom.dcmread(ignored.paths[0])
    ds.PatientSex, ds.PatientWeight, ds.BodyPartExamined = SEX, WEIGHT, "HAND"
    ds.save_as(ignored.paths[0])

    outcomes = store(peer, [*blocked_results.paths, *blocked_spool.paths, *ignored.paths])
    assert [o.ok for o in outcomes] == [True, False, True]
    assert outcomes[1].status == 0xA700 and "node cannot store" in outcomes[1].comment

    journal = state / "journal.sqlite"

    def outcome(study) -> str | None:
        with sqlite3.connect(journal, timeout=30) as db:
            row = db.execute(
                "SELECT state || ': ' || coalesce(reason, '') FROM studies WHERE study_instance_uid=?",
                (study.study_instance_uid,),
            ).fetchone()
        return row and row[0]

    with tally.case("failed results folder: the OS error without its path"):
        reason = wait_until(lambda: (r := outcome(blocked_results)) and r.startswith("failed") and r, 60)
        assert "FileExistsError: [Errno 17] File exists" in reason
        assert blocked_results.study_instance_uid not in reason
    with tally.case("ignored study: the sex and weight rules explained without the values"):
        reason = wait_until(lambda: (r := outcome(ignored)) and r.startswith("ignored") and r, 60)
        assert "PatientSex is a value that does not match" in reason
        assert "PatientWeight is a value that does not match" in reason
    with tally.case("every text the node wrote is free of the names, IDs, UIDs, sex and weight sent"):
        texts = node_texts(node)
        assert "spool failed for instance" in texts["logs/dicomnode.log"]
        identifiers = blocked_results.identifiers | blocked_spool.identifiers | ignored.identifiers
        # The values sent, whatever words a reason would put around them.
        assert_no_leak(texts, identifiers | {WEIGHT, SEX})


def test_error_descriptions_keep_the_kind_and_meaning_never_a_path_or_a_library_text():
    path = "/var/lib/dicomnode/spool/1.2.826.0.1.3680043.8.498.12345/1.2.3.dcm"
    try:
        try:
            open(path)  # noqa: SIM115 - the error is the point
        except OSError as missing:
            raise SpoolError("cannot write instance file: No such file or directory") from missing
    except SpoolError as exc:
        described, trail = describe_error(exc), where_raised(exc)
    assert described == "SpoolError: cannot write instance file: No such file or directory"
    assert "FileNotFoundError: [Errno 2] No such file or directory at test_privacy.py:" in trail
    assert "12345" not in trail and "spool/" not in trail
    assert describe_error(ValueError("Doe^Jane is not valid for VR DA")) == "ValueError"
