"""devtools/ohif_server.py without a browser: our config in place of OHIF's, static files and the
single-page app's routes, nothing outside dist, and Orthanc's DICOMweb behind /dicom-web (real Orthanc)."""

from __future__ import annotations

import httpx
import pytest

from devtools.ohif_server import APP_CONFIG, OhifServer
from devtools.ports import free_port
from tests.helpers.ophthalmic_dicom import Patient, make_cfp, write
from tests.helpers.orthanc import Orthanc


@pytest.fixture
def dist(tmp_path):
    folder = tmp_path / "dist"
    folder.mkdir()
    (folder / "index.html").write_text("<html>OHIF</html>")
    (folder / "app-config.js").write_text("window.config = {remote: 'demo server'};")
    (folder / "codec.wasm").write_bytes(b"\0asm\1\0\0\0")
    (tmp_path / "secret.txt").write_text("outside dist")
    return folder


def test_serves_our_config_the_app_and_nothing_outside_dist(dist):
    server = OhifServer("http://127.0.0.1:9", free_port(), dist=dist).start()
    try:
        with httpx.Client(base_url=server.url) as http:
            config = http.get("/app-config.js")
            assert config.text == APP_CONFIG.read_text()  # ours, not the packaged one
            assert config.headers["content-type"] == "application/javascript"
            # A wasm codec served as anything else fails to compile in the browser.
            assert http.get("/codec.wasm").headers["content-type"] == "application/wasm"
            assert http.get("/viewer?StudyInstanceUIDs=1.2.3").text == "<html>OHIF</html>"  # the app's route
            escape = http.get("/%2E%2E/secret.txt")
            assert "outside dist" not in escape.text
            # No PACS behind it: a clear 502 naming Orthanc, not a dropped connection.
            down = http.get("/dicom-web/studies")
            assert down.status_code == 502 and "Orthanc at 127.0.0.1:9" in down.text
    finally:
        server.stop()


def test_missing_build_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="fetch-ohif.sh"):
        OhifServer("http://127.0.0.1:9", free_port(), dist=tmp_path / "nothing")


def test_proxies_dicomweb_with_the_includefield_commas_orthanc_needs(dist, tmp_path):
    orthanc = Orthanc(tmp_path / "orthanc", {}, dicomweb=True).start()
    server = OhifServer(orthanc.url, free_port(), dist=dist).start()
    try:
        patient = Patient()
        cfp = make_cfp(patient, "R")
        cfp.StudyDescription = "Retina screening"
        orthanc.upload(write(cfp, tmp_path / "cfp.dcm"))
        with httpx.Client(base_url=server.url, timeout=60) as http:
            # As OHIF's study list asks: the comma percent-encoded.
            studies = http.get("/dicom-web/studies?includefield=00081030%2C00080060").json()
        (study,) = studies
        assert study["0020000D"]["Value"] == [patient.study_uid]
        assert study["00081030"]["Value"] == ["Retina screening"]  # the list's description column
    finally:
        server.stop()
        orthanc.stop()
