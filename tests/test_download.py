"""Downloads against a local HTTP server: resume, checksums, safe unpacking, clear errors."""

from __future__ import annotations

import hashlib
import io
import json
import socket
import tarfile
import threading
import urllib.request
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cxrlib.__main__ import main
from cxrlib.data import download as dl
from cxrlib.data.download import (
    ChecksumError,
    DirectSource,
    DownloadError,
    ManualDownloadRequired,
    RemoteFile,
    UnsafeArchiveError,
    download,
    fetch,
    safe_extract,
)

# ------------------------------------------------------------------------------ fixtures


class _Handler(BaseHTTPRequestHandler):
    """Serves ``server.files`` (path -> bytes); Range support and truncation per server."""

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):  # noqa: N802 - http.server's naming
        self.server.requests.append((self.path, self.headers.get("Range")))
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        ranged = self.headers.get("Range")
        if ranged and self.server.support_range:
            start = int(ranged.split("=")[1].split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        cut = self.server.cut_after
        if cut is not None:  # promise everything, send part, hang up
            self.server.cut_after = None
            self.wfile.write(payload[:cut])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(payload)


@pytest.fixture()
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.requests, httpd.support_range, httpd.cut_after = {}, [], True, None
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def tar_bytes(members: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                archive.addfile(member)
            else:
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def source(url: str, filename: str, folder: str = "ds", **kwargs) -> dict[str, DirectSource]:
    archive = kwargs.pop("archive") if "archive" in kwargs else dl.archive_format(filename)
    item = RemoteFile(url=url, filename=filename, unpacks_to=folder, archive=archive, **kwargs)
    return {"test": DirectSource(name="test", title="Test set", files=(item,), homepage="http://example.invalid",
                                 size="tiny", license="none", citation="none")}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


ZIP = zip_bytes({"set-master/a.txt": b"alpha", "set-master/sub/b.bin": bytes(range(256)) * 40})


# ------------------------------------------------------------------------------ good downloads


def test_zip_is_fetched_checked_and_unpacked(server, tmp_path):
    server.files["/set.zip"] = ZIP
    result = download("test", tmp_path, sources=source(f"{server.url}/set.zip", "set.zip", sha256=sha(ZIP)),
                      progress=False)
    folder = tmp_path / "ds"
    assert result.folders == [folder]
    assert (folder / "a.txt").read_bytes() == b"alpha"  # the single wrapper folder is dropped
    assert (folder / "sub" / "b.bin").read_bytes() == bytes(range(256)) * 40
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "test.download.json"]  # archive removed
    record = json.loads((tmp_path / "test.download.json").read_text())
    assert record["files"][0]["sha256"] == sha(ZIP) and record["files"][0]["checksum_checked"] is True

    again = download("test", tmp_path, sources=source(f"{server.url}/set.zip", "set.zip"), progress=False)
    assert again.files == [] and len(server.requests) == 1  # folder exists: nothing fetched


def test_tar_gz_without_published_hash_records_the_computed_one(server, tmp_path):
    data = tar_bytes([("one.txt", b"1"), ("two/three.txt", b"3")])
    server.files["/set.tar.gz"] = data
    messages: list[str] = []
    download("test", tmp_path, sources=source(f"{server.url}/set.tar.gz", "set.tar.gz"),
             progress=False, log=messages.append, keep_archive=True)
    assert files_under(tmp_path / "ds") == {"one.txt", "two", "two/three.txt"}
    assert (tmp_path / "set.tar.gz").read_bytes() == data  # kept on request
    entry = json.loads((tmp_path / "test.download.json").read_text())["files"][0]
    assert entry["sha256"] == sha(data) and entry["checksum_checked"] is False
    assert any(sha(data) in message and "not checked" in message for message in messages)


def test_partial_download_is_resumed_with_range(server, tmp_path):
    server.files["/set.zip"] = ZIP
    (tmp_path / "set.zip.part").write_bytes(ZIP[:1000])
    result = fetch(f"{server.url}/set.zip", tmp_path / "set.zip", sha256=sha(ZIP))
    assert server.requests == [("/set.zip", "bytes=1000-")]
    assert result.resumed and result.verified and result.sha256 == sha(ZIP)
    assert (tmp_path / "set.zip").read_bytes() == ZIP and not (tmp_path / "set.zip.part").exists()


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    server.files["/set.zip"] = ZIP
    server.support_range = False
    (tmp_path / "set.zip.part").write_bytes(b"garbage that is not the start of the file")
    notes: list[str] = []
    result = fetch(f"{server.url}/set.zip", tmp_path / "set.zip", sha256=sha(ZIP), log=notes.append)
    assert server.requests[0][1] is not None  # it asked to resume ...
    assert not result.resumed and (tmp_path / "set.zip").read_bytes() == ZIP  # ... and started over
    assert any("does not support resuming" in note for note in notes)


def test_complete_part_file_answered_416_is_used(server, tmp_path):
    server.files["/set.zip"] = ZIP
    (tmp_path / "set.zip.part").write_bytes(ZIP)
    result = fetch(f"{server.url}/set.zip", tmp_path / "set.zip", sha256=sha(ZIP))
    assert result.resumed and (tmp_path / "set.zip").read_bytes() == ZIP


def test_interrupted_transfer_keeps_the_part_and_the_next_run_finishes(server, tmp_path):
    server.files["/set.zip"] = ZIP
    server.cut_after = 700
    with pytest.raises(DownloadError, match="resume") as caught:
        fetch(f"{server.url}/set.zip", tmp_path / "set.zip", sha256=sha(ZIP))
    assert "set.zip.part" in str(caught.value)
    assert (tmp_path / "set.zip.part").stat().st_size == 700 and not (tmp_path / "set.zip").exists()
    result = fetch(f"{server.url}/set.zip", tmp_path / "set.zip", sha256=sha(ZIP))
    assert server.requests[-1][1] == "bytes=700-" and result.resumed
    assert (tmp_path / "set.zip").read_bytes() == ZIP


def test_archive_already_on_disk_needs_no_network(tmp_path, monkeypatch):
    (tmp_path / "set.zip").write_bytes(ZIP)

    def no_network(*args, **kwargs):
        raise AssertionError("no network access expected")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    download("test", tmp_path, sources=source("http://127.0.0.1:9/set.zip", "set.zip", sha256=sha(ZIP)),
             progress=False)
    assert (tmp_path / "ds" / "a.txt").read_bytes() == b"alpha"


def test_plain_file_is_placed_in_its_folder(server, tmp_path):
    server.files["/labels.csv"] = b"a,b\n1,2\n"
    download("test", tmp_path, sources=source(f"{server.url}/labels.csv", "labels.csv", archive=None),
             progress=False)
    assert (tmp_path / "ds" / "labels.csv").read_bytes() == b"a,b\n1,2\n"


# ------------------------------------------------------------------------------ refusals


def test_wrong_sha256_is_refused_and_nothing_is_left(server, tmp_path):
    server.files["/set.zip"] = ZIP
    with pytest.raises(ChecksumError, match="SHA-256") as caught:
        download("test", tmp_path, sources=source(f"{server.url}/set.zip", "set.zip", sha256="0" * 64),
                 progress=False)
    assert sha(ZIP) in str(caught.value)
    assert list(tmp_path.iterdir()) == []  # no archive, no .part, no folder, no record


def test_wrong_md5_is_refused(server, tmp_path):
    server.files["/set.zip"] = ZIP
    with pytest.raises(ChecksumError, match="MD5"):
        fetch(f"{server.url}/set.zip", tmp_path / "set.zip", md5="0" * 32)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("members", "bad"),
    [
        ({"ok.txt": b"fine", "../evil.txt": b"x"}, "../evil.txt"),
        ({"ok.txt": b"fine", "/abs-evil.txt": b"x"}, "/abs-evil.txt"),
        ({"ok.txt": b"fine", "a/../../evil.txt": b"x"}, "a/../../evil.txt"),
        ({"ok.txt": b"fine", "C:/evil.txt": b"x"}, "C:/evil.txt"),
    ],
)
def test_malicious_zip_is_refused(tmp_path, members, bad):
    archive = tmp_path / "dl" / "evil.zip"
    archive.parent.mkdir()
    archive.write_bytes(zip_bytes(members))
    with pytest.raises(UnsafeArchiveError) as caught:
        safe_extract(archive, tmp_path / "dl" / "out")
    assert caught.value.member == bad and bad in str(caught.value)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["dl", "evil.zip"]  # nothing unpacked anywhere


def test_zip_symlink_is_refused(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        info = zipfile.ZipInfo("link")
        info.external_attr = 0o120777 << 16
        archive.writestr(info, "../../etc/passwd")
    path = tmp_path / "link.zip"
    path.write_bytes(buffer.getvalue())
    with pytest.raises(UnsafeArchiveError, match="symbolic link"):
        safe_extract(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (("/abs-evil.txt", b"x"), "absolute path"),
        (("../evil.txt", b"x"), "'..'"),
        (link("escape", "../../outside"), "outside"),
        (link("etc", "/etc"), "absolute path"),
        (link("hard", "../evil.txt", tarfile.LNKTYPE), "hard link"),
        (link("nested/up", "../../evil"), "outside"),
    ],
)
def test_malicious_tar_is_refused(tmp_path, bad, reason):
    data = tar_bytes([("ok.txt", b"fine"), bad])
    archive = tmp_path / "dl" / "evil.tar.gz"
    archive.parent.mkdir()
    archive.write_bytes(data)
    name = bad.name if isinstance(bad, tarfile.TarInfo) else bad[0]
    with pytest.raises(UnsafeArchiveError, match=reason) as caught:
        safe_extract(archive, tmp_path / "dl" / "out")
    assert caught.value.member == name
    # checked before unpacking: not even ok.txt was written, and no staging folder remains
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["dl", "evil.tar.gz"]


def test_symlink_inside_the_folder_is_allowed(tmp_path):
    archive = tmp_path / "fine.tar"
    archive.write_bytes(tar_bytes([("data/a.txt", b"a"), link("data/alias.txt", "a.txt"), ("b.txt", b"b")],
                                  mode="w"))
    out = safe_extract(archive, tmp_path / "out")
    assert (out / "data" / "alias.txt").read_bytes() == b"a"


def test_extract_refuses_an_existing_target(tmp_path):
    archive = tmp_path / "set.zip"
    archive.write_bytes(ZIP)
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="out"):
        safe_extract(archive, tmp_path / "out")


def test_http_404_is_a_clear_error(server, tmp_path):
    with pytest.raises(DownloadError, match="404") as caught:
        download("test", tmp_path, sources=source(f"{server.url}/missing.zip", "missing.zip"), progress=False)
    message = str(caught.value)
    assert f"{server.url}/missing.zip" in message and "example.invalid" in message  # URL and home page
    assert not (tmp_path / "missing.zip").exists() and not (tmp_path / "ds").exists()


def test_unreachable_server_says_what_to_do(tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/set.zip"
    with pytest.raises(DownloadError) as caught:
        download("test", tmp_path, sources=source(url, "set.zip"), progress=False, timeout=5)
    message = str(caught.value)
    assert url in message and "offline" in message and str(tmp_path / "set.zip") in message


def test_manual_source_explains_and_never_touches_the_network(tmp_path, monkeypatch, capsys):
    def no_network(*args, **kwargs):
        raise AssertionError("no network access expected")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(ManualDownloadRequired) as caught:
        download("rsna-pneumonia", tmp_path)
    message = str(caught.value)
    assert "kaggle.com" in message and "stage_2_train_images" in message
    assert str(tmp_path / "rsna-pneumonia") in message

    assert main(["data", "download", "chexpert", "--to", str(tmp_path)]) == 3
    err = capsys.readouterr().err
    assert "CheXpert" in err and "train.csv" in err
    assert repr(str(tmp_path / "chexpert" / "CheXpert-v1.0-small")) in err  # the folder the adapter reads
    assert list(tmp_path.iterdir()) == []


def test_cli_downloads_prints_the_hash_and_fails_clearly(server, tmp_path, monkeypatch, capsys):
    server.files["/set.zip"] = ZIP
    monkeypatch.setitem(dl.SOURCES, "test", source(f"{server.url}/set.zip", "set.zip")["test"])
    assert main(["data", "download", "test", "--to", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert sha(ZIP) in out and "no published checksum" in out and str(tmp_path / "ds") in out

    monkeypatch.setitem(dl.SOURCES, "gone", source(f"{server.url}/gone.zip", "gone.zip")["test"])
    assert main(["data", "download", "gone", "--to", str(tmp_path / "other"), "--quiet"]) == 1
    assert "HTTP 404" in capsys.readouterr().err


def test_cli_lists_sources_and_rejects_unknown(capsys):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("ieee8023", "zunair2021", "montgomery", "shenzhen", "rsna-pneumonia", "nih-cxr14"):
        assert name in out
    assert main(["data", "download", "no-such-set", "--to", "unused"]) == 2  # bad input: exit status 2
    assert "unknown source 'no-such-set'" in capsys.readouterr().err


def test_registry_entries_are_well_formed():
    from cxrlib.data.sources import ADAPTERS

    for name, entry in dl.SOURCES.items():
        assert entry.name == name and entry.homepage.startswith("http")
        assert entry.adapter is None or entry.adapter in ADAPTERS, entry.adapter
        if isinstance(entry, DirectSource):
            for item in entry.files:
                assert item.url.startswith("https://") and item.archive in dl.ARCHIVE_FORMATS
    with pytest.raises(ValueError, match="plain relative"):
        RemoteFile(url="https://x", filename="a.zip", unpacks_to="../up")
