"""The real server, attacked by raw HTTP on a free loopback port: what a web page, a neighbour or a runaway
request can no longer do (issue #18), and what was already refused and must stay so.

Each test sends a handful of requests to 127.0.0.1 only. The server uses the bundled demo model's name but
no test here loads a model: every refusal comes before one would be.
"""

from __future__ import annotations

import io
import json
import socket
import struct
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from sdlora.access import Credentials, exposure_warning, hash_password
from sdlora.config import MAX_CLASS_IMAGES, MAX_IMAGES
from sdlora.data.uploads import MAX_SHOWN_NAME, MAX_ZIP_ENTRIES
from tests.conftest import draw_blob

pytestmark = [
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]
TIMEOUT = httpx.Timeout(60.0)
ALLOWED_NAME = "sdlora.example"


@dataclass
class Server:
    url: str
    port: int
    outputs: Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    from ui.app import launch

    outputs = tmp_path_factory.mktemp("security-outputs")
    (outputs / "adapters").mkdir()
    (outputs / "adapters" / "kept.safetensors").write_bytes(_tiny_safetensors())
    port = free_port()
    app = launch(port=port, outputs_dir=outputs, block=False, allowed_hosts=[ALLOWED_NAME])
    yield Server(f"http://127.0.0.1:{port}", port, outputs)
    app.close()


@pytest.fixture
def client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
        yield http


def _tiny_safetensors() -> bytes:
    header = json.dumps({"__metadata__": {"note": "<b>bold</b>"}}).encode()
    return struct.pack("<Q", len(header)) + header


def upload(client: httpx.Client, name: str, data: bytes) -> str:
    """Send one file to Gradio's upload route; the server path it hands out."""
    answer = client.post("/gradio_api/upload", files={"files": (name, data)})
    assert answer.status_code == 200, answer.text
    return answer.json()[0]


def call(client: httpx.Client, api_name: str, data: list, session: str | None = None) -> list:
    """Run one event by Gradio's HTTP API and return its outputs (an 'error' event fails the test)."""
    event, result = run_event(client, api_name, data, session)
    assert event == "complete", result
    return result


def run_event(
    client: httpx.Client, api_name: str, data: list, session: str | None = None
) -> tuple[str, object]:
    """('complete', outputs) or ('error', what the server said) for one event run by Gradio's HTTP API."""
    body: dict = {"data": data}
    if session:
        body["session_hash"] = session
    started = client.post(f"/gradio_api/call/{api_name}", json=body)
    assert started.status_code == 200, started.text
    stream = client.get(f"/gradio_api/call/{api_name}/{started.json()['event_id']}").text
    event = data_line = None
    for line in stream.splitlines():
        if line.startswith("event:"):
            event = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            data_line = line.split(":", 1)[1].strip()
    return event or "", json.loads(data_line) if data_line else None


def file_data(path: str) -> dict:
    return {"path": path, "meta": {"_type": "gradio.FileData"}}


def png(tmp_path: Path, name: str = "blob.png", colour=(0, 0, 200)) -> bytes:
    return draw_blob(tmp_path / name, (16, 16), colour).read_bytes()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


# 1. Host and Origin: a DNS-rebinding page or another site's form can't drive the server.


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/"),
        ("GET", "/gradio_api/info"),
        ("GET", "/config"),
        ("GET", "/gradio_api/file=adapters/kept.safetensors"),
        ("POST", "/gradio_api/queue/join"),
        ("POST", "/gradio_api/call/deleted"),
        ("POST", "/gradio_api/upload"),
    ],
)
def test_a_foreign_host_header_is_refused_everywhere(client, method, path):
    answer = client.request(method, path, headers={"Host": "rebound.attacker.example:7860"}, json={})
    assert answer.status_code == 403 and "Host not allowed" in answer.text


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::1]", ALLOWED_NAME])
def test_loopback_names_and_allowed_hosts_are_answered(client, server, host):
    assert client.get("/gradio_api/info", headers={"Host": f"{host}:{server.port}"}).status_code == 200


def test_a_state_changing_request_from_a_foreign_origin_is_refused(client, server):
    own = f"http://127.0.0.1:{server.port}"
    for origin in ("http://attacker.example", "null", f"http://localhost:{server.port + 1}"):
        answer = client.post("/gradio_api/call/deleted", json={"data": ["kept"]}, headers={"Origin": origin})
        assert answer.status_code == 403, origin
    assert (server.outputs / "adapters" / "kept.safetensors").is_file()
    # The page's own origin, and clients that send none (scripts, gradio_client), are served.
    assert (
        client.post("/gradio_api/call/asked", json={"data": [None]}, headers={"Origin": own}).status_code
        == 200
    )
    assert client.post("/gradio_api/call/asked", json={"data": [None]}).status_code == 200


def test_the_page_gives_a_same_site_client_cookie(client):
    cookie = client.get("/").headers["set-cookie"]
    assert "sdlora-client=" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie


# 2. Only uploaded files: a client can name files it uploaded, nothing else on the server.


def refused(client: httpx.Client, api_name: str, data: list) -> bool:
    """Whether naming a file was refused: by Gradio (outside its upload cache) or by sdlora (not this
    client's upload), both before the handler touched the file."""
    event, result = run_event(client, api_name, data)
    if event == "error":
        return True
    return any(isinstance(item, str) and "was not uploaded to this server" in item for item in result)


def test_an_adapter_already_in_outputs_can_not_be_imported_by_path(client, server):
    kept = server.outputs / "adapters" / "kept.safetensors"
    assert refused(client, "imported", [file_data(str(kept))])
    assert sorted(p.name for p in kept.parent.iterdir()) == ["kept.safetensors"]


def test_a_file_in_the_upload_cache_that_another_client_sent_is_refused(client, server):
    other = httpx.Client(base_url=server.url, timeout=TIMEOUT, cookies={"sdlora-client": "someone-else"})
    with other:
        theirs = upload(other, "theirs.safetensors", _tiny_safetensors())
    message = call(client, "imported", [file_data(theirs)])[0]
    assert "was not uploaded to this server" in message


def test_an_uploaded_adapter_is_imported_and_its_cached_copy_removed(client, server):
    path = upload(client, "mine.safetensors", _tiny_safetensors())
    message = call(client, "imported", [file_data(path)])[0]
    assert "Imported `mine.safetensors`" in message
    assert (server.outputs / "adapters" / "mine.safetensors").is_file() and not Path(path).exists()
    # Used once: naming the same cached path again is refused.
    assert refused(client, "imported", [file_data(path)])


@pytest.mark.parametrize("named", ["/etc/passwd", "adapters/kept.safetensors", "../../etc/hostname"])
def test_a_training_folder_from_a_path_never_uploaded_is_refused(client, server, named):
    path = named if named.startswith("/") else str(server.outputs / named)
    assert refused(client, "staged_1", [file_data(path)])
    assert not (server.outputs / "uploads").is_dir() or not any((server.outputs / "uploads").iterdir())


# 3. Logins: hashed passwords in a file, throttled after 5 failures, logged.


@pytest.fixture(scope="module")
def login_server(tmp_path_factory) -> Iterator[str]:
    from ui.app import launch

    port = free_port()
    credentials = Credentials({"ada": hash_password("correct horse", iterations=1000)})
    app = launch(
        port=port, outputs_dir=tmp_path_factory.mktemp("login-outputs"), auth=credentials, block=False
    )
    yield f"http://127.0.0.1:{port}"
    app.close()


def test_wrong_passwords_are_throttled_and_logged(login_server, caplog):
    with httpx.Client(base_url=login_server, timeout=TIMEOUT) as http:
        assert http.get("/gradio_api/info").status_code == 401
        answers = [
            http.post("/login", data={"username": "ada", "password": f"guess {n}"}).status_code
            for n in range(7)
        ]
        assert answers[:6] == [400] * 6 and answers[6] == 429
        throttled = http.post("/login", data={"username": "ada", "password": "correct horse"})
        assert throttled.status_code == 429 and int(throttled.headers["retry-after"]) >= 1
    assert sum("Failed login for user 'ada'" in r.getMessage() for r in caplog.records) == 6


def test_the_right_hashed_password_logs_in(tmp_path):
    """A fresh server (the throttle above is per client): a hashed password from an auth file works."""
    from ui.__main__ import login_from
    from ui.app import launch

    auth_file = tmp_path / "auth.txt"
    auth_file.write_text(f"# logins\nada:{hash_password('correct horse', iterations=1000)}\n")
    auth_file.chmod(0o600)
    credentials = login_from(_args(auth_file=str(auth_file)))
    port = free_port()
    app = launch(port=port, outputs_dir=tmp_path / "outputs", auth=credentials, block=False)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT) as http:
            assert (
                http.post("/login", data={"username": "ada", "password": "correct horse"}).status_code == 200
            )
            assert http.get("/gradio_api/info").status_code == 200
    finally:
        app.close()


def _args(**values):
    import argparse

    return argparse.Namespace(**{"auth_file": None, "auth": None, **values})


def test_the_login_can_come_from_the_environment(monkeypatch):
    from ui.__main__ import login_from

    monkeypatch.setenv("SDLORA_AUTH", "ada:pass:with:colons")
    credentials = login_from(_args())
    assert credentials is not None and credentials.verify("ada", "pass:with:colons")


# 4. Every address beyond this machine warns without a login.


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "[fd00::5]", "myhost.lan"])
def test_every_non_loopback_bind_warns_without_a_login(host):
    assert "without a login" in exposure_warning(host, has_auth=False)
    assert exposure_warning(host, has_auth=True) is None


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_a_loopback_bind_does_not_warn(host):
    assert exposure_warning(host, has_auth=False) is None


def test_launch_prints_the_warning_for_a_host_option(monkeypatch, capsys, tmp_path):
    import gradio as gr

    from ui.app import launch

    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: None)  # nothing is bound
    launch(host="::", outputs_dir=tmp_path, block=False)
    assert "serving on all interfaces without a login" in capsys.readouterr().err


# 5. Bounds: the API can't ask for what the form would refuse.


def test_a_sweep_of_thousands_of_weights_is_refused_before_any_model_loads(client):
    weights = ", ".join(str(n / 1000) for n in range(2000))
    rows = [None, False, 1.0] * 4  # four adapter rows: name, on, weight
    form = ["demo", "a star", "", 0, 20, 7.0, "native", "dpm++", *rows, weights]
    result = call(client, "sweep", [*form, "Adapter 1 weight", "", "none", ""])  # then the X/Y axes
    assert f"at most {MAX_IMAGES} images" in result[2]


def test_one_hundred_thousand_class_images_are_refused(client, tmp_path):
    session = "bounds-session"
    path = upload(client, "star_01.png", png(tmp_path))
    assert "1 image(s) ready" in call(client, "staged", [[file_data(path)]], session)[1]
    from sdlora.forms import MAIN_OPTIONS, OPTION_FIELDS
    from ui.options import option_value

    # The page's option controls: the main ones first, then every other in the config's order.
    order = [*MAIN_OPTIONS, *(o.name for o in OPTION_FIELDS if o.name not in MAIN_OPTIONS)]
    fields = {o.name: o for o in OPTION_FIELDS}
    options = [
        100_000 if name == "num_class_images" else option_value(fields[name], fields[name].default)
        for name in order
    ]
    form = ["star", "a sks star", "a star", True, *options]  # the folder is the session's State
    message = call(
        client, "started", ["demo", {"headers": ["image", "caption"], "data": []}, 1, *form], session
    )[0]
    assert f"between 1 and {MAX_CLASS_IMAGES:,}" in message


# 6. Uploads that can't exhaust memory or files; already-true refusals kept true.


def _stage_zip(
    client: httpx.Client, server: Server, data: bytes, name: str = "set.zip"
) -> tuple[str | None, str]:
    """The training folder made from an uploaded zip (None if refused) and the page's message (which
    names no server path: the folder is the one that appeared under outputs/uploads)."""
    uploads = server.outputs / "uploads"
    before = set(uploads.iterdir()) if uploads.is_dir() else set()
    message = call(client, "staged_1", [file_data(upload(client, name, data))])[1]  # [0]: the State
    assert str(server.outputs) not in message, message
    made = sorted(set(uploads.iterdir()) - before) if uploads.is_dir() else []
    if "image(s) ready" not in message:
        assert not made, made
        return None, message
    assert len(made) == 1, made
    return str(made[0]), message


def test_a_zip_with_a_huge_caption_leaves_it_out_without_reading_it(client, tmp_path, server):
    folder, message = _stage_zip(
        client, server, zip_bytes({"a.png": png(tmp_path), "a.txt": b"tag, " * 2_000_000})
    )
    assert folder and "a.txt: 9.5 MiB is too large for a caption" in message, message
    assert len(message) < 2_000


def test_a_zip_that_claims_gigabytes_is_refused_from_its_directory(client, tmp_path, server):
    data = bytearray(zip_bytes({"a.png": png(tmp_path)}))
    entry = data.rfind(b"PK\x01\x02")
    data[entry + 24 : entry + 28] = struct.pack("<I", 0xFFFFFFF0)  # uncompressed size: ~4 GiB
    folder, message = _stage_zip(client, server, bytes(data))
    assert folder is None and "too large to unpack" in message


def test_a_zip_listing_too_many_entries_is_refused_before_its_directory_is_read(client, tmp_path, server):
    data = bytearray(zip_bytes({"a.png": png(tmp_path)}))
    end = data.rfind(b"PK\x05\x06")
    data[end + 8 : end + 12] = struct.pack("<HH", 65_000, 65_000)
    folder, message = _stage_zip(client, server, bytes(data))
    assert folder is None and f"at most {MAX_ZIP_ENTRIES:,}" in message


def test_zip_traversal_is_refused(client, tmp_path, server):
    folder, message = _stage_zip(client, server, zip_bytes({"../../evil.png": png(tmp_path)}))
    assert folder is None and "unsafe path" in message
    assert not list(server.outputs.rglob("evil.png"))


def test_long_names_duplicates_and_zero_repeat_folders(client, tmp_path, server):
    long_name = "星" * 120 + ".png"
    members = {
        f"set/{long_name}": png(tmp_path),
        "set/copy.png": png(tmp_path),
        "set/other.png": png(tmp_path, "other.png", (200, 0, 0)),
        "set/0_reg/r.png": png(tmp_path, "r.png", (0, 200, 0)),
    }
    folder, message = _stage_zip(client, server, zip_bytes(members))
    assert folder is not None and "2 image(s) ready" in message
    assert "the same picture as" in message and "0_reg/: a kohya folder with 0 repeats" in message
    assert all(len(p.name.encode()) <= 120 for p in Path(folder).iterdir())
    assert max(len(part) for part in message.split()) <= MAX_SHOWN_NAME + 40


def test_an_image_too_long_and_thin_is_refused_before_decoding(client, tmp_path, server):
    from PIL import Image

    strip = io.BytesIO()
    Image.new("L", (1, 200_000), 255).save(strip, format="PNG")
    folder, message = _stage_zip(
        client, server, zip_bytes({"a.png": png(tmp_path), "strip.png": strip.getvalue()})
    )
    assert folder is not None and "strip.png: 1x200000 is too long and thin to train on" in message


def test_file_routes_outside_outputs_are_refused(client):
    for path in ["/etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "../../../../etc/passwd"]:
        answer = client.get(f"/gradio_api/file={path}")
        assert answer.status_code in (403, 404) and "root:" not in answer.text, path


def test_html_in_file_names_is_stored_and_echoed_as_plain_text(client, tmp_path, server):
    name = '<img src=x onerror="alert(1)">.png'
    folder, message = _stage_zip(
        client, server, zip_bytes({name: png(tmp_path), "page.html": b"<script>1</script>"})
    )
    assert folder is not None and all("<" not in p.name for p in Path(folder).iterdir())
    assert "page.html: not an image" in message and not list(Path(folder).glob("*.html"))


def test_html_in_adapter_metadata_is_not_served_as_a_page(client, server):
    answer = client.get("/gradio_api/file=" + str(server.outputs / "adapters" / "kept.safetensors"))
    assert answer.status_code == 200 and "text/html" not in answer.headers.get("content-type", "")


if sys.platform != "linux":  # pragma: no cover - the throttle and mounts are only exercised on Linux CI
    pytestmark.append(pytest.mark.skip("Linux only"))


# 5b. Cleaning: what no run uses goes, at start-up and after each run; runs and adapters stay.


def _outputs_with_leftovers(root: Path) -> tuple[Path, Path, Path, Path]:
    """An old upload no run used, an old one a run used, that run's folder and an adapter."""
    import os
    import time

    from sdlora.data.uploads import UNUSED_UPLOAD_AGE_S
    from sdlora.outputs import Outputs

    outputs = Outputs(root)
    unused, used = outputs.new_upload_dir("unused"), outputs.new_upload_dir("used")
    draw_blob(used / "a.png", (32, 32), (200, 0, 200))
    run = outputs.new_run_dir("earlier")
    (run / "config.json").write_text(json.dumps({"data_dir": str(used)}))
    adapter = outputs.adapter_file("earlier")
    adapter.parent.mkdir(parents=True, exist_ok=True)
    adapter.write_bytes(_tiny_safetensors())
    old = time.time() - UNUSED_UPLOAD_AGE_S - 60
    for folder in (unused, used):
        os.utime(folder, (old, old))
    return unused, used, run, adapter


def test_start_up_removes_uploads_no_run_used_and_keeps_runs_and_adapters(monkeypatch, tmp_path):
    import os
    import time

    import gradio as gr

    from sdlora.outputs import Outputs
    from ui.app import CACHE_CLEANING, launch

    unused, used, run, adapter = _outputs_with_leftovers(tmp_path)
    # What a killed server left in its upload cache (a day old), and what a live one holds now.
    cache = Outputs(tmp_path).upload_cache
    left, current = cache / ("a" * 64), cache / ("b" * 64)
    for folder in (left, current):
        folder.mkdir(parents=True)
        (folder / "photo.png").write_bytes(b"png")
    old = time.time() - CACHE_CLEANING[1] - 60
    for path in (left, left / "photo.png"):
        os.utime(path, (old, old))

    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: None)  # nothing is bound
    launch(outputs_dir=tmp_path, block=False)
    assert not unused.exists() and used.is_dir() and run.is_dir() and adapter.is_file()
    assert not left.exists() and (current / "photo.png").is_file()


def test_the_app_keeps_its_upload_cache_in_its_outputs_folder(monkeypatch, tmp_path):
    """So start-up can clean what a killed server left without touching other apps' files in /tmp/gradio."""
    import os

    import ui.__main__ as entry

    monkeypatch.setenv("GRADIO_TEMP_DIR", "")  # restored afterwards
    monkeypatch.delenv("GRADIO_TEMP_DIR")
    monkeypatch.setattr(entry, "launch", lambda *args, **kwargs: None)
    entry.main(["--outputs", str(tmp_path)])
    assert os.environ["GRADIO_TEMP_DIR"] == str((tmp_path / ".upload-cache").resolve())


def test_a_finished_run_removes_uploads_no_run_used(tiny_base, tmp_path):
    from sdlora.jobs import JobQueue, JobStatus
    from tests.conftest import train_config

    unused, used, run, adapter = _outputs_with_leftovers(tmp_path)
    queue = JobQueue()
    job = queue.submit(train_config(used, tiny_base, tmp_path, steps=1, name="next"))
    queue.wait(job.id, timeout=300)
    assert job.status is JobStatus.DONE and job.result.adapter.is_file()
    assert not unused.exists() and used.is_dir() and run.is_dir() and adapter.is_file()
