"""Tests for llmret.data.download and llmret.data.archives against a real HTTP server on 127.0.0.1 (no internet)."""

from __future__ import annotations

import hashlib
import http.server
import logging
import os
import re
import shutil
import stat
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest

import llmret.data.download as dl
from llmret.data.archives import ArchiveError, ArchiveLayoutError, UnsafeArchiveError, safe_extract_zip
from llmret.data.download import ChecksumError, DownloadError, fetch, md5sum, resolve_source

SCIFACT_ZIP = Path("/work/shared/data/beir/scifact.zip")
SCIFACT_MD5 = "4214dfead1313c962c943f4a7e18d2bc"
PAYLOAD = bytes(range(256)) * 400  # 100 KiB
PAYLOAD_MD5 = hashlib.md5(PAYLOAD).hexdigest()


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


Route = Callable[[http.server.BaseHTTPRequestHandler], None]


# ---------------------------------------------------------------------- server


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the tmp folder; paths registered in server.routes misbehave on purpose."""

    def do_GET(self) -> None:
        srv = self.server
        with srv.lock:
            srv.hits[self.path] += 1
            n = srv.hits[self.path]
        route = srv.routes.get(self.path)
        if route is None:
            super().do_GET()
        else:
            route(self, n)

    def log_message(self, *args: object) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # broken pipes from clients we abort on purpose


@pytest.fixture
def server(tmp_path: Path) -> Iterator[SimpleNamespace]:
    root = tmp_path / "served"
    root.mkdir()
    httpd = _Server(("127.0.0.1", 0), partial(_Handler, directory=str(root)))
    httpd.hits = Counter()
    httpd.routes = {}
    httpd.lock = threading.Lock()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield SimpleNamespace(
            root=root,
            base=base,
            hits=httpd.hits,
            routes=httpd.routes,
            url=lambda p: base + p,
        )
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture
def out(tmp_path: Path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


def _send(
    handler: http.server.BaseHTTPRequestHandler,
    code: int,
    body: bytes,
    length: int | None = None,
) -> None:
    handler.send_response(code)
    handler.send_header("Content-Type", "application/octet-stream")
    handler.send_header("Content-Length", str(len(body) if length is None else length))
    handler.end_headers()
    handler.wfile.write(body)
    handler.wfile.flush()
    handler.close_connection = True


def _truncating(handler: http.server.BaseHTTPRequestHandler, n: int) -> None:
    _send(handler, 200, PAYLOAD[: len(PAYLOAD) // 2], length=len(PAYLOAD))


def _fail_first(k: int, code: int = 503) -> Route:
    def route(handler: http.server.BaseHTTPRequestHandler, n: int) -> None:
        if n <= k:
            handler.send_error(code)
        else:
            _send(handler, 200, PAYLOAD)

    return route


# -------------------------------------------------------------- resolve_source

URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/scifact.zip"


@pytest.mark.parametrize(
    ("mirror", "expected"),
    [
        (None, URL),
        ("", URL),
        ("/data/mirror", "/data/mirror/beir/scifact.zip"),
        ("/data/mirror/", "/data/mirror/beir/scifact.zip"),
        ("rel/mirror", "rel/mirror/beir/scifact.zip"),
        ("file:///data/mirror", "file:///data/mirror/beir/scifact.zip"),
        ("file:///data/mirror/", "file:///data/mirror/beir/scifact.zip"),
        ("http://127.0.0.1:8000/x", "http://127.0.0.1:8000/x/beir/scifact.zip"),
        ("http://127.0.0.1:8000/x/", "http://127.0.0.1:8000/x/beir/scifact.zip"),
        ("https://mirror.example.org", "https://mirror.example.org/beir/scifact.zip"),
    ],
)
def test_resolve_source(mirror: str | None, expected: str) -> None:
    assert resolve_source(URL, mirror, "beir/scifact.zip") == expected


def test_resolve_source_leading_slash_in_mirror_path_and_bad_scheme() -> None:
    assert resolve_source(URL, "http://h/x/", "/beir/a.zip") == "http://h/x/beir/a.zip"
    assert resolve_source(URL, "/m", "/beir/a.zip") == "/m/beir/a.zip"
    with pytest.raises(ValueError, match="ftp"):
        resolve_source(URL, "ftp://h/x", "beir/a.zip")


# ------------------------------------------------------------------ md5 / http


def test_md5sum(tmp_path: Path) -> None:
    p = tmp_path / "f.bin"
    p.write_bytes(PAYLOAD)
    assert md5sum(p) == PAYLOAD_MD5
    assert md5sum(p, chunk_size=7) == PAYLOAD_MD5


def test_fetch_http_md5_ok(server: SimpleNamespace, out: Path) -> None:
    (server.root / "a.bin").write_bytes(PAYLOAD)
    dest = out / "sub" / "a.bin"  # parent is created
    got = fetch(server.url("/a.bin"), str(dest), PAYLOAD_MD5.upper(), backoff=0.01)
    assert got == dest and isinstance(got, Path)
    assert dest.read_bytes() == PAYLOAD
    assert os.listdir(dest.parent) == ["a.bin"]
    # default permissions (not mkstemp's private 0600)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o666 & ~_umask()


def test_fetch_http_md5_mismatch_leaves_nothing(server: SimpleNamespace, out: Path) -> None:
    (server.root / "a.bin").write_bytes(PAYLOAD)
    dest = out / "a.bin"
    wrong = "0" * 32
    with pytest.raises(ChecksumError) as ei:
        fetch(server.url("/a.bin"), dest, wrong, retries=3, backoff=0.01)
    msg = str(ei.value)
    assert wrong in msg and PAYLOAD_MD5 in msg and server.url("/a.bin") in msg
    assert isinstance(ei.value, DownloadError)
    assert not dest.exists()
    assert os.listdir(out) == []
    assert server.hits["/a.bin"] == 1  # a checksum mismatch is final


def test_fetch_md5_mismatch_keeps_existing_dest(server: SimpleNamespace, out: Path) -> None:
    (server.root / "a.bin").write_bytes(PAYLOAD)
    dest = out / "a.bin"
    dest.write_bytes(b"old")
    with pytest.raises(ChecksumError):
        fetch(server.url("/a.bin"), dest, "f" * 32, progress=False)
    assert dest.read_bytes() == b"old"
    assert os.listdir(out) == ["a.bin"]


def test_fetch_accepts_md5_list(server: SimpleNamespace, out: Path) -> None:
    (server.root / "a.bin").write_bytes(PAYLOAD)
    dest = fetch(server.url("/a.bin"), out / "a.bin", ["1" * 32, PAYLOAD_MD5], progress=False)
    assert dest.read_bytes() == PAYLOAD
    with pytest.raises(ChecksumError, match=f"{'1' * 32} or {'2' * 32}"):
        fetch(server.url("/a.bin"), out / "b.bin", ("1" * 32, "2" * 32), progress=False)
    assert sorted(os.listdir(out)) == ["a.bin"]


def test_fetch_without_md5_warns(server: SimpleNamespace, out: Path, caplog: pytest.LogCaptureFixture) -> None:
    (server.root / "a.bin").write_bytes(PAYLOAD)
    with caplog.at_level(logging.INFO, logger="llmret.data.download"):
        fetch(server.url("/a.bin"), out / "a.bin", None, progress=False)
    assert (out / "a.bin").read_bytes() == PAYLOAD
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("no md5" in r.getMessage() for r in warnings)
    assert any(PAYLOAD_MD5 in r.getMessage() for r in caplog.records)


def test_fetch_rejects_malformed_md5(out: Path) -> None:
    with pytest.raises(ValueError):
        fetch("/nonexistent", out / "x", "abc")
    with pytest.raises(ValueError):
        fetch("/nonexistent", out / "x", [])


def test_fetch_truncated_is_retried_then_fails(server: SimpleNamespace, out: Path) -> None:
    server.routes["/t.bin"] = _truncating
    dest = out / "t.bin"
    with pytest.raises(DownloadError) as ei:
        fetch(
            server.url("/t.bin"),
            dest,
            PAYLOAD_MD5,
            retries=2,
            backoff=0.01,
            progress=False,
        )
    msg = str(ei.value)
    assert f"truncated: got {len(PAYLOAD) // 2} of {len(PAYLOAD)} bytes" in msg
    assert server.url("/t.bin") in msg and str(dest) in msg
    assert not isinstance(ei.value, ChecksumError)
    assert server.hits["/t.bin"] == 3  # first attempt + retries=2
    assert not dest.exists()
    assert os.listdir(out) == []


def test_fetch_transient_503_then_ok(server: SimpleNamespace, out: Path) -> None:
    server.routes["/f.bin"] = _fail_first(2, 503)
    dest = fetch(server.url("/f.bin"), out / "f.bin", PAYLOAD_MD5, retries=3, backoff=0.01)
    assert dest.read_bytes() == PAYLOAD
    assert server.hits["/f.bin"] == 3
    assert os.listdir(out) == ["f.bin"]


def test_fetch_429_retried_and_backoff_is_exponential(
    server: SimpleNamespace, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(dl, "time", SimpleNamespace(sleep=sleeps.append, monotonic=time.monotonic))
    server.routes["/r.bin"] = _fail_first(10, 429)
    with pytest.raises(DownloadError, match="429") as ei:
        fetch(server.url("/r.bin"), out / "r.bin", PAYLOAD_MD5, retries=3, backoff=0.5)
    assert "after 4 attempt" in str(ei.value)
    assert server.hits["/r.bin"] == 4
    assert sleeps == [0.5, 1.0, 2.0]
    assert os.listdir(out) == []


def test_fetch_404_fails_at_once(server: SimpleNamespace, out: Path) -> None:
    url = server.url("/missing.zip")
    dest = out / "missing.zip"
    with pytest.raises(DownloadError) as ei:
        fetch(url, dest, PAYLOAD_MD5, retries=3, backoff=0.01)
    msg = str(ei.value)
    assert url in msg and "404" in msg and str(dest) in msg
    assert server.hits["/missing.zip"] == 1
    assert os.listdir(out) == []


def test_fetch_timeout_is_retried(server: SimpleNamespace, out: Path) -> None:
    def slow(handler: http.server.BaseHTTPRequestHandler, n: int) -> None:
        if n == 1:
            time.sleep(0.6)
        _send(handler, 200, PAYLOAD)

    server.routes["/slow.bin"] = slow
    dest = fetch(
        server.url("/slow.bin"),
        out / "s.bin",
        PAYLOAD_MD5,
        retries=1,
        timeout=0.2,
        backoff=0.01,
        progress=False,
    )
    assert dest.read_bytes() == PAYLOAD
    assert server.hits["/slow.bin"] == 2


def test_fetch_connection_refused_names_url(out: Path) -> None:
    import socket

    with socket.socket() as s:  # grab a free port, then close it so nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x.zip"
    with pytest.raises(DownloadError, match="after 2 attempt") as ei:
        fetch(url, out / "x.zip", None, retries=1, backoff=0.01, progress=False)
    assert url in str(ei.value)
    assert os.listdir(out) == []


# ----------------------------------------------------------------------- local


def test_fetch_local_path_and_file_url(tmp_path: Path, out: Path) -> None:
    src = tmp_path / "src dir" / "a.bin"
    src.parent.mkdir()
    src.write_bytes(PAYLOAD)
    d1 = fetch(str(src), out / "a1.bin", PAYLOAD_MD5, progress=False)
    d2 = fetch(src.as_uri(), out / "a2.bin", PAYLOAD_MD5, progress=False)  # file:// with %20
    assert d1.read_bytes() == PAYLOAD and d2.read_bytes() == PAYLOAD
    assert sorted(os.listdir(out)) == ["a1.bin", "a2.bin"]
    with pytest.raises(ChecksumError):
        fetch(str(src), out / "a3.bin", "e" * 32, progress=False)
    assert sorted(os.listdir(out)) == ["a1.bin", "a2.bin"]


def test_fetch_missing_local_path(tmp_path: Path, out: Path) -> None:
    src = tmp_path / "nope.zip"
    dest = out / "nope.zip"
    with pytest.raises(DownloadError, match="not found") as ei:
        fetch(str(src), dest, None, progress=False)
    assert str(src) in str(ei.value) and str(dest) in str(ei.value)
    assert os.listdir(out) == []
    with pytest.raises(DownloadError, match="not found"):
        fetch(src.as_uri(), dest, None, progress=False)


def test_fetch_via_resolved_mirror(tmp_path: Path, out: Path, server: SimpleNamespace) -> None:
    (server.root / "beir").mkdir()
    (server.root / "beir" / "a.bin").write_bytes(PAYLOAD)
    for mirror in (str(server.root), server.root.as_uri(), server.base + "/"):
        src = resolve_source("http://unreachable.invalid/a.bin", mirror, "beir/a.bin")
        dest = fetch(src, out / "a.bin", PAYLOAD_MD5, progress=False)
        assert dest.read_bytes() == PAYLOAD
        dest.unlink()


# ---------------------------------------------------------------- interruption


class _ExplodingMd5:
    """Stands in for hashlib.md5(); raises on the 2nd update, i.e. mid-stream."""

    def __init__(self, exc: BaseException) -> None:
        self.exc, self.calls = exc, 0

    def update(self, data: bytes) -> None:
        self.calls += 1
        if self.calls >= 2:
            raise self.exc

    def hexdigest(self) -> str:
        return "0" * 32


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), RuntimeError("boom")])
@pytest.mark.parametrize("pre_existing", [False, True])
def test_interrupt_mid_stream_leaves_nothing(
    server: SimpleNamespace,
    out: Path,
    monkeypatch: pytest.MonkeyPatch,
    exc: BaseException,
    pre_existing: bool,
) -> None:
    big = os.urandom(3 * (1 << 20) + 5)  # > 2 read chunks
    (server.root / "big.bin").write_bytes(big)
    dest = out / "big.bin"
    if pre_existing:
        dest.write_bytes(b"previous")
    fake = SimpleNamespace(md5=lambda **kw: _ExplodingMd5(exc))
    monkeypatch.setattr(dl, "hashlib", fake)
    with pytest.raises(type(exc)):
        fetch(server.url("/big.bin"), dest, None, retries=3, backoff=0.01, progress=False)
    assert server.hits["/big.bin"] == 1  # neither is retried
    if pre_existing:
        assert dest.read_bytes() == b"previous"
        assert os.listdir(out) == ["big.bin"]
    else:
        assert os.listdir(out) == []


def test_write_error_mid_stream_is_final_and_clean(tmp_path: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(2 * (1 << 20) + 1))
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dl.os, "fsync", failing_fsync)
    with pytest.raises(DownloadError, match="No space left") as ei:
        fetch(str(src), out / "big.bin", None, progress=False)
    monkeypatch.setattr(dl.os, "fsync", real_fsync)  # before listdir etc.
    assert str(out / "big.bin") in str(ei.value)
    assert os.listdir(out) == []


# ------------------------------------------------------------------ zip safety


def _make_zip(path: Path, members: list[tuple[str | zipfile.ZipInfo, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members:
            zf.writestr(name, data)
    return path


def _symlink_info(name: str) -> zipfile.ZipInfo:
    zi = zipfile.ZipInfo(name)
    zi.create_system = 3
    zi.external_attr = (stat.S_IFLNK | 0o777) << 16
    return zi


def _raw_name(name: str) -> zipfile.ZipInfo:
    zi = zipfile.ZipInfo("placeholder")
    zi.filename = name  # bypass any normalisation the constructor may do
    return zi


@pytest.mark.parametrize(
    ("member", "why"),
    [
        ("../evil.txt", "escapes"),
        ("ok/../../evil.txt", "escapes"),
        ("..\\evil.txt", "escapes"),
        (_raw_name("/etc/evil.txt"), "absolute"),
        (_raw_name("C:/evil.txt"), "absolute"),
        (_symlink_info("ok/link"), "symlink"),
    ],
    ids=["dotdot", "nested-dotdot", "backslash-dotdot", "absolute", "drive", "symlink"],
)
def test_unsafe_members_rejected_nothing_written(tmp_path: Path, member: str | zipfile.ZipInfo, why: str) -> None:
    arc = _make_zip(tmp_path / "bad.zip", [("ok/a.txt", b"fine"), (member, b"/etc/passwd")])
    work = tmp_path / "work"
    work.mkdir()
    target = work / "target"
    with pytest.raises(UnsafeArchiveError, match=why) as ei:
        safe_extract_zip(arc, target)
    name = member.filename if isinstance(member, zipfile.ZipInfo) else member
    assert str(arc) in str(ei.value) and repr(name) in str(ei.value)
    assert os.listdir(work) == []
    assert not (tmp_path / "evil.txt").exists()


def test_harmless_dotdot_inside_archive_is_allowed(tmp_path: Path) -> None:
    arc = _make_zip(tmp_path / "a.zip", [("d/x/../a.txt", b"A")])
    target = safe_extract_zip(arc, tmp_path / "t")
    assert (target / "d" / "a.txt").read_bytes() == b"A"


def _beir_like_zip(path: Path, extra: list[tuple[str, bytes]] = ()) -> Path:
    return _make_zip(
        path,
        [
            ("scifact/", b""),
            ("scifact/corpus.jsonl", b'{"_id": "1"}\n'),
            ("scifact/qrels/test.tsv", b"q\td\t1\n"),
            ("__MACOSX/scifact/._corpus.jsonl", b"junk"),
            ("scifact/.DS_Store", b"junk"),
            *extra,
        ],
    )


def test_strip_top_level_and_junk_skipped(tmp_path: Path) -> None:
    arc = _beir_like_zip(tmp_path / "s.zip")
    target = safe_extract_zip(arc, tmp_path / "data" / "scifact", strip_top_level="scifact")
    assert target == tmp_path / "data" / "scifact"
    files = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    assert files == ["corpus.jsonl", "qrels/test.tsv"]
    assert os.listdir(target.parent) == ["scifact"]
    # default permissions (not mkdtemp's private 0700), so other users can read the data
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~_umask()


def test_strip_top_level_rejects_member_outside(tmp_path: Path) -> None:
    arc = _beir_like_zip(tmp_path / "s.zip", extra=[("other/evil.txt", b"x")])
    work = tmp_path / "work"
    with pytest.raises(UnsafeArchiveError, match=re.escape("other/evil.txt")) as ei:
        safe_extract_zip(arc, work / "scifact", strip_top_level="scifact")
    assert "scifact" in str(ei.value) and str(arc) in str(ei.value)
    assert not work.exists() or os.listdir(work) == []


def test_strip_top_level_rejects_wrong_name(tmp_path: Path) -> None:
    """Another layout, not an attack: the error says which top folder the zip has."""
    arc = _beir_like_zip(tmp_path / "s.zip")
    with pytest.raises(ArchiveLayoutError, match=r"'nfcorpus/'; its top level holds \['scifact'\]") as ei:
        safe_extract_zip(arc, tmp_path / "t", strip_top_level="nfcorpus")
    assert not isinstance(ei.value, UnsafeArchiveError)


def test_non_regular_members_are_refused(tmp_path: Path) -> None:
    arc = tmp_path / "fifo.zip"
    with zipfile.ZipFile(arc, "w") as zf:
        zf.writestr("scifact/corpus.jsonl", "{}")
        fifo = zipfile.ZipInfo("scifact/pipe")
        fifo.external_attr = (stat.S_IFIFO | 0o644) << 16
        zf.writestr(fifo, "")
    with pytest.raises(UnsafeArchiveError, match=r"'scifact/pipe' is not a regular file or folder"):
        safe_extract_zip(arc, tmp_path / "t", strip_top_level="scifact")
    assert not (tmp_path / "t").exists()
    assert not (tmp_path / "t").exists()


def test_extract_replaces_existing_target(tmp_path: Path) -> None:
    arc = _beir_like_zip(tmp_path / "s.zip")
    target = tmp_path / "t"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    safe_extract_zip(arc, target, strip_top_level="scifact")
    assert not (target / "stale.txt").exists()
    assert (target / "corpus.jsonl").exists()
    assert sorted(os.listdir(tmp_path)) == ["s.zip", "t"]


def test_corrupt_zip_truncated_names_file(tmp_path: Path) -> None:
    bad = tmp_path / "scifact.zip"
    data = SCIFACT_ZIP.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(ArchiveError) as ei:
        safe_extract_zip(bad, work / "scifact", strip_top_level="scifact")
    assert str(bad) in str(ei.value)
    assert os.listdir(work) == []


@pytest.mark.parametrize("pre_existing", [False, True])
def test_crc_error_mid_extraction_cleans_up(tmp_path: Path, pre_existing: bool) -> None:
    arc = tmp_path / "c.zip"
    payload = b"A" * 5000
    with zipfile.ZipFile(arc, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("d/first.txt", b"first")
        zf.writestr("d/second.txt", payload)
    raw = bytearray(arc.read_bytes())
    i = raw.index(payload)
    raw[i + 100] ^= 0xFF  # flip a stored byte: CRC no longer matches
    arc.write_bytes(bytes(raw))
    work = tmp_path / "work"
    work.mkdir()
    target = work / "t"
    if pre_existing:
        target.mkdir()
        (target / "keep.txt").write_text("old")
    with pytest.raises(ArchiveError, match=re.escape("second.txt")) as ei:
        safe_extract_zip(arc, target)
    assert not isinstance(ei.value, UnsafeArchiveError)
    assert str(arc) in str(ei.value)
    if pre_existing:
        assert os.listdir(work) == ["t"]
        assert os.listdir(target) == ["keep.txt"]
    else:
        assert os.listdir(work) == []


def test_not_a_zip(tmp_path: Path) -> None:
    p = tmp_path / "x.zip"
    p.write_text("<html>404</html>")
    with pytest.raises(ArchiveError, match=re.escape("x.zip")):
        safe_extract_zip(p, tmp_path / "t")
    assert not (tmp_path / "t").exists()


# ------------------------------------------------------------------ end to end


@pytest.mark.skipif(not SCIFACT_ZIP.exists(), reason="shared scifact.zip not available")
def test_scifact_end_to_end_over_http(server: SimpleNamespace, tmp_path: Path) -> None:
    shutil.copy(SCIFACT_ZIP, server.root / "scifact.zip")
    src = resolve_source("https://unreachable.invalid/scifact.zip", server.base, "scifact.zip")
    zip_path = fetch(src, tmp_path / "resources" / "beir" / "scifact.zip", SCIFACT_MD5, backoff=0.01)
    assert md5sum(zip_path) == SCIFACT_MD5
    target = safe_extract_zip(zip_path, tmp_path / "resources" / "beir" / "scifact", strip_top_level="scifact")
    for rel in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
        assert (target / rel).is_file(), rel
    with open(target / "corpus.jsonl", "rb") as f:
        assert sum(1 for _ in f) == 5183
    assert sorted(os.listdir(target.parent)) == ["scifact", "scifact.zip"]


def test_archive_with_only_junk_is_an_error(tmp_path: Path) -> None:
    arc = _make_zip(tmp_path / "j.zip", [("__MACOSX/._x", b"j"), ("scifact/", b"")])
    with pytest.raises(ArchiveError, match="no files"):
        safe_extract_zip(arc, tmp_path / "t", strip_top_level="scifact")
    assert sorted(os.listdir(tmp_path)) == ["j.zip"]
