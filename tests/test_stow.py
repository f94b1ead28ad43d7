"""DICOMweb delivery: STOW-RS to a real Orthanc with its DICOMweb plugin (orthanc-dicomweb).

The same queue, retries and dead letter as C-STORE (tests/test_outbox.py, whose helpers queue
the results here): Orthanc checks basic authentication itself, a bearer token through its Lua
HTTP filter, and serves HTTPS with a certificate of the test's CA.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading

import pydicom
import pytest
import requests

from dicomnode.config import ConfigError, DestinationConfig
from dicomnode.net.stow import StowEndpoint
from dicomnode.outbox import DestinationWorker
from tests.conftest import (
    dcmtk,
    free_port,
    run_cli,
    start_orthanc,
    stop_process,
    wait_for_port,
    wait_until,
    write_node_config,
)
from tests.pki import make_pki
from tests.test_outbox import FAR_FUTURE, _queue, _result, _row, spool  # noqa: F401 - spool is a fixture

PASSWORD = "s3cret-Pa55"
TOKEN = "t0ken-for-the-node"

BEARER_FILTER = f"""
function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)
  return httpHeaders['authorization'] == 'Bearer {TOKEN}'
end
"""


@pytest.fixture(scope="module")
def web_pacs(tmp_path_factory):
    """One Orthanc with DICOMweb and basic authentication for the module."""
    server = start_orthanc(
        tmp_path_factory.mktemp("orthanc-web"),
        dicomweb=True,
        AuthenticationEnabled=True,
        RegisteredUsers={"dicomnode": PASSWORD},
    )
    yield server
    stop_process(server.process)


def _stored(url: str, sop_instance_uid: str, auth=None, verify=True) -> list[str]:
    """Orthanc's ids of the instances with this SOP Instance UID, asked through its REST API."""
    response = requests.post(
        url + "/tools/find",
        json={"Level": "Instance", "Query": {"SOPInstanceUID": sop_instance_uid}},
        auth=auth,
        verify=verify,
        timeout=10,
    )
    response.raise_for_status()
    return response.json()


def _web(url: str, name: str = "web", password: str = PASSWORD, **fields) -> DestinationConfig:
    auth = {"basic": {"username": "dicomnode", "password": {"value": password}}}
    return DestinationConfig(name=name, stow_url=url, auth=auth, timeout_s=10.0, **fields)


def _worker(spool, destination: DestinationConfig, stop: threading.Event | None = None):  # noqa: F811
    return DestinationWorker(spool, destination, calling_ae="DICOMNODE", stop=stop or threading.Event())


def test_a_result_is_stored_by_stow_rs_with_basic_authentication(web_pacs, spool):  # noqa: F811
    path, uid = _result(spool)
    _queue(spool, [("web", path)])

    assert _worker(spool, _web(web_pacs.dicomweb_url)).deliver(spool.next_delivery("web")) is True

    [orthanc_id] = _stored(web_pacs.url, uid, auth=("dicomnode", PASSWORD))
    stored = requests.get(
        f"{web_pacs.url}/instances/{orthanc_id}/file", auth=("dicomnode", PASSWORD), timeout=10
    )
    assert (
        pydicom.dcmread(path).PixelData
        == pydicom.dcmread(pydicom.filebase.DicomBytesIO(stored.content)).PixelData
    )
    assert spool.counts()["outbox"] == {"web:sent": 1}


def test_a_wrong_password_is_retried_and_never_logged(web_pacs, spool, caplog):  # noqa: F811
    path, _ = _result(spool)
    _queue(spool, [("web", path)])
    delivery = spool.next_delivery("web")
    caplog.set_level(logging.DEBUG)

    assert _worker(spool, _web(web_pacs.dicomweb_url, password="wrong-Pa55")).deliver(delivery) is False

    row = _row(spool, delivery)
    assert (row["state"], row["attempts"]) == ("pending", 1), "credentials can be fixed: not a refusal"
    assert row["last_error"] == f"{web_pacs.dicomweb_url}: HTTP 401 Unauthorized"
    assert "wrong-Pa55" not in caplog.text and "Authorization" not in caplog.text


def test_an_object_the_endpoint_refuses_is_a_dead_letter_at_once(web_pacs, spool):  # noqa: F811
    path, uid = _result(spool)
    broken = pydicom.dcmread(path)
    del broken.SeriesInstanceUID  # Orthanc: "Missing a mandatory tag", HTTP 400
    broken.save_as(path)
    _queue(spool, [("web", path)])
    delivery = spool.next_delivery("web")

    assert _worker(spool, _web(web_pacs.dicomweb_url)).deliver(delivery) is False

    row = _row(spool, delivery)
    assert (row["state"], row["attempts"]) == ("dead", 1)
    assert row["last_error"].startswith(f"refused by web: {web_pacs.dicomweb_url}: HTTP 400 Bad Request")
    assert _stored(web_pacs.url, uid, auth=("dicomnode", PASSWORD)) == []


def test_an_unreachable_endpoint_gets_the_result_when_it_is_back(spool, tmp_path):  # noqa: F811
    path, uid = _result(spool)
    _queue(spool, [("late", path)])
    port = free_port()
    url = f"http://127.0.0.1:{port}/dicom-web"
    destination = DestinationConfig(
        name="late", stow_url=url, backoff_s=0.2, max_backoff_s=0.5, timeout_s=5.0
    )
    stop = threading.Event()
    worker = _worker(spool, destination, stop)
    worker.start()
    server = None
    try:
        wait_until(
            lambda: spool.next_delivery("late", now=FAR_FUTURE).attempts >= 3, timeout=30, what="retries"
        )
        assert "Connection refused" in _row(spool, spool.next_delivery("late", now=FAR_FUTURE))["last_error"]
        server = start_orthanc(tmp_path / "orthanc", http_port=port, dicomweb=True)
        wait_until(lambda: spool.counts()["outbox"].get("late:sent"), timeout=60, what="delivery")
        assert len(_stored(server.url, uid)) == 1
    finally:
        stop.set()
        worker.join(timeout=30)
        if server is not None:
            stop_process(server.process)


def test_a_bearer_token_from_the_environment_is_sent(spool, tmp_path, monkeypatch):  # noqa: F811
    script = tmp_path / "bearer.lua"
    script.write_text(BEARER_FILTER)
    server = start_orthanc(tmp_path / "orthanc", dicomweb=True, LuaScripts=[str(script)])
    try:
        monkeypatch.setenv("PACS_TOKEN", TOKEN)
        good = DestinationConfig(
            name="web", stow_url=server.dicomweb_url, auth={"bearer": {"env": "PACS_TOKEN"}}
        )
        bad = DestinationConfig.model_validate(good.model_dump() | {"auth": {"bearer": {"value": "another"}}})
        first, uid = _result(spool, "first.dcm")
        _queue(spool, [("web", first)])

        assert _worker(spool, bad).deliver(spool.next_delivery("web")) is False, "Orthanc's filter: 403"
        assert _worker(spool, good).deliver(spool.next_delivery("web", now=FAR_FUTURE)) is True
        authorised = {"Authorization": f"Bearer {TOKEN}"}
        found = requests.post(
            server.url + "/tools/find",
            json={"Level": "Instance", "Query": {"SOPInstanceUID": uid}},
            headers=authorised,
            timeout=10,
        )
        assert found.json() and len(found.json()) == 1
    finally:
        stop_process(server.process)


def test_a_token_file_rotated_on_disk_is_read_again_without_a_restart(spool, tmp_path, caplog):  # noqa: F811
    # Orthanc takes only the new token: the node must send what the file holds now.
    script = tmp_path / "bearer.lua"
    script.write_text(BEARER_FILTER)
    server = start_orthanc(tmp_path / "orthanc", dicomweb=True, LuaScripts=[str(script)])
    try:
        token = tmp_path / "pacs.token"
        token.write_text("the-expired-token\n")
        token.chmod(0o600)
        destination = DestinationConfig(
            name="web", stow_url=server.dicomweb_url, auth={"bearer": {"file": token}}, timeout_s=10.0
        )
        worker = _worker(spool, destination)  # reads the file now, as the node at start-up
        first, uid = _result(spool, "first.dcm")
        _queue(spool, [("web", first)])
        caplog.set_level(logging.DEBUG)

        assert worker.deliver(spool.next_delivery("web")) is False, "Orthanc's filter: 403"

        # Rotated as a secrets agent does it: a new file renamed over the old one.
        rotated = tmp_path / "pacs.token.new"
        rotated.write_text(f"{TOKEN}\n")
        rotated.chmod(0o600)
        rotated.rename(token)
        assert worker.deliver(spool.next_delivery("web", now=FAR_FUTURE)) is True
        assert "destinations[web].auth.bearer.file changed: the secret is read again" in caplog.text

        # A rotation that leaves no usable file: the next attempt waits, naming the key.
        token.write_text("")
        second, _ = _result(spool, "second.dcm")
        _queue(spool, [("web", second)])
        delivery = spool.next_delivery("web")
        assert worker.deliver(delivery) is False
        row = _row(spool, delivery)
        assert row["state"] == "pending"
        assert row["last_error"] == "destinations[web].auth.bearer: the secret is empty"
        assert TOKEN not in caplog.text and "the-expired-token" not in caplog.text
    finally:
        stop_process(server.process)


def _https_in_front_of(port: int, pki_server, folder) -> tuple[subprocess.Popen, int]:
    """socat terminating TLS with the server certificate and forwarding to Orthanc's HTTP port,
    as nginx or a load balancer fronts a hospital's DICOMweb service."""
    binary = shutil.which("socat")
    if binary is None:
        pytest.fail("socat is not installed (Debian package socat); .ci/run installs it")
    tls_port = free_port()
    listen = (
        f"OPENSSL-LISTEN:{tls_port},bind=127.0.0.1,reuseaddr,fork,verify=0,"
        f"cert={pki_server.certificate},key={pki_server.private_key}"
    )
    log = open(folder / "socat.log", "wb")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(
        [binary, listen, f"TCP:127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT
    )
    wait_for_port(tls_port, process=process)
    return process, tls_port


def test_https_is_verified_against_the_configured_ca(spool, tmp_path):  # noqa: F811
    pki = make_pki(tmp_path / "pki")
    server = start_orthanc(tmp_path / "orthanc", dicomweb=True)
    proxy, tls_port = _https_in_front_of(server.http_port, pki.server, tmp_path)
    url = f"https://127.0.0.1:{tls_port}/dicom-web"
    try:
        first, uid = _result(spool, "first.dcm")
        _queue(spool, [("trusted", first), ("untrusted", first)])
        trusted = DestinationConfig(name="trusted", stow_url=url, tls={"ca_certificates": pki.ca.certificate})
        untrusted = DestinationConfig(
            name="untrusted", stow_url=url, tls={"ca_certificates": pki.other_ca.certificate}
        )

        assert _worker(spool, trusted).deliver(spool.next_delivery("trusted")) is True
        delivery = spool.next_delivery("untrusted")
        assert _worker(spool, untrusted).deliver(delivery) is False

        row = _row(spool, delivery)
        assert row["state"] == "pending" and "CERTIFICATE_VERIFY_FAILED" in row["last_error"]
        assert len(_stored(server.url, uid)) == 1
    finally:
        stop_process(proxy)
        stop_process(server.process)


def test_a_secret_that_cannot_be_read_names_its_key_not_its_value(tmp_path, monkeypatch):
    monkeypatch.delenv("ABSENT_TOKEN", raising=False)
    absent = DestinationConfig(
        name="web", stow_url="https://pacs.example.org/dicom-web", auth={"bearer": {"env": "ABSENT_TOKEN"}}
    )
    with pytest.raises(
        ConfigError, match=r"destinations\[web\]\.auth\.bearer\.env: environment variable ABSENT_TOKEN"
    ):
        StowEndpoint.of(absent)

    missing = absent.model_copy(update={"auth": None})
    missing = DestinationConfig.model_validate(
        missing.model_dump()
        | {"auth": {"basic": {"username": "node", "password": {"file": tmp_path / "nope"}}}}
    )
    with pytest.raises(ConfigError, match=r"auth\.basic\.password\.file: cannot read"):
        StowEndpoint.of(missing)

    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o644)
    readable = DestinationConfig.model_validate(absent.model_dump() | {"auth": {"bearer": {"file": token}}})
    with pytest.raises(
        ConfigError, match=r"auth\.bearer\.file: others may access .* a file holding a secret must"
    ):
        StowEndpoint.of(readable)
    token.chmod(0o600)
    endpoint = StowEndpoint.of(
        DestinationConfig.model_validate(absent.model_dump() | {"auth": {"bearer": {"file": token}}})
    )
    assert TOKEN not in repr(endpoint) and TOKEN not in str(endpoint)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"stow_url": "https://node:pw@pacs/dicom-web"}, "credentials in the URL would be logged"),
        ({"stow_url": "ftp://pacs/dicom-web"}, "give the DICOMweb base URL"),
        ({"stow_url": "https://pacs/dicom-web", "host": "pacs"}, "remove host"),
        ({"stow_url": "http://pacs/dicom-web", "tls": {}}, "stow_url is not https"),
        ({"host": "pacs", "port": 104}, "missing: ae_title"),
        (
            {"host": "pacs", "port": 104, "ae_title": "PACS", "auth": {"bearer": {"value": "x"}}},
            "auth is for stow_url",
        ),
        (
            {"stow_url": "https://pacs/dicom-web", "auth": {"bearer": {"value": "x", "env": "Y"}}},
            "exactly one of",
        ),
    ],
)
def test_a_destination_is_either_dicom_or_dicomweb_and_says_what_is_wrong(fields, message):
    with pytest.raises(ValueError, match=message):
        DestinationConfig(name="d", **fields)


def test_dicomnode_config_reports_the_endpoint_and_an_unset_token_with_file_and_key(
    tmp_path, tiny_architecture
):
    web = {
        "name": "web",
        "stow_url": "https://pacs.example.org/dicom-web",
        "auth": {"bearer": {"env": "NO_SUCH_TOKEN_VAR"}},
    }
    config = write_node_config(tmp_path, tiny_architecture, scp_port=free_port(), destinations=[web])

    done = run_cli("config", "--config", str(config))

    assert done.returncode == 2
    assert f"{config}: destinations.0.auth.bearer.env: environment variable NO_SUCH_TOKEN_VAR" in done.stderr

    web["auth"] = {"basic": {"username": "node", "password": {"value": PASSWORD}}}
    config = write_node_config(tmp_path, tiny_architecture, scp_port=free_port(), destinations=[web])
    done = run_cli("config", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert (
        "destination web: STOW-RS to https://pacs.example.org/dicom-web, basic authentication" in done.stdout
    )
    assert PASSWORD not in done.stdout + done.stderr


def test_the_node_sends_its_sr_and_sc_by_stow_rs_and_status_shows_the_queue(web_pacs, node_factory, chest_cr):
    destination = _web(web_pacs.dicomweb_url).model_dump(exclude_none=True, mode="json")
    destination["auth"]["basic"]["password"] = {"value": PASSWORD}  # model_dump masks a SecretStr
    node = node_factory(destinations=[destination | {"backoff_s": 0.5}])

    sent = dcmtk(
        "storescu", "-aec", "DICOMNODE", "-aet", "MODALITY", "127.0.0.1", str(node.port), str(chest_cr)
    )
    assert sent.returncode == 0, sent.stderr

    status = wait_until(lambda: "web:sent=2" in (s := node.cli("status").stdout) and s, 120, what="delivery")
    source = pydicom.dcmread(chest_cr, stop_before_pixels=True)
    found = requests.post(
        web_pacs.url + "/tools/find",
        json={"Level": "Series", "Query": {"StudyInstanceUID": source.StudyInstanceUID}},
        auth=("dicomnode", PASSWORD),
        timeout=10,
    ).json()
    assert len(found) == 2, "a series for the SR and one for the SC"
    assert status.splitlines()[0] == f"node DICOMNODE ({node.config}): health ok", "the live node's /healthz"
    assert [row for row in status.splitlines() if row.strip().startswith("│ web ")]
    assert PASSWORD not in node.log.read_text() + status
