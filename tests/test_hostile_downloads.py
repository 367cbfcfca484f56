"""Hostile or changed download sources (issue 30, items 7 and 10): a server that trickles
bytes is stopped by a deadline on the whole request, and a second accepted md5 reruns
nothing that already has a file with an accepted md5."""

from __future__ import annotations

import hashlib
import http.server
import os
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from llmret import schema
from llmret.data import download, sources
from llmret.data.download import DownloadError, fetch

BODY = b"x" * 40  # one byte every 0.2 s: 8 s in all
BODY_MD5 = hashlib.md5(BODY).hexdigest()


class _Trickle(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        try:
            for i in range(len(BODY)):
                self.wfile.write(BODY[i : i + 1])
                self.wfile.flush()
                if self.server.stop.wait(0.2):
                    return
        except OSError:
            pass  # the client gave up, as it should

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def trickle() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    httpd.daemon_threads = True
    httpd.stop = threading.Event()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/slow.zip"
    finally:
        httpd.stop.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def test_a_trickling_server_meets_the_deadline_of_the_whole_request(trickle, tmp_path):
    """Each byte comes well within any read timeout; the request as a whole takes 8 s."""
    out = tmp_path / "out"
    start = time.monotonic()
    with pytest.raises(DownloadError) as ei:
        fetch(trickle, out / "slow.zip", BODY_MD5, retries=0, timeout=1, progress=False)
    took = time.monotonic() - start
    assert took < 4, f"the deadline did not stop the download ({took:.1f} s)"
    msg = str(ei.value)
    assert trickle in msg and "download.timeout" in msg and "1 s" in msg
    assert os.listdir(out) == []  # no partial file


def test_the_timeouts_come_from_the_schema():
    assert schema.default("download", "timeout") >= 3600  # a whole multi-GB download fits
    assert schema.default("download", "read_timeout") == 60
    defaults = fetch.__kwdefaults__
    assert defaults["timeout"] == schema.default("download", "timeout")
    assert defaults["read_timeout"] == schema.default("download", "read_timeout")


# --------------------------------------------------------------------------- md5 rerun key

A, B, C = "a" * 32, "b" * 32, "c" * 32


def _published(tmp_path: Path, md5: str, key) -> Path:
    path = tmp_path / "toy.zip"
    path.write_bytes(b"zip bytes")
    sources.write_record(path, md5, key)
    return path


def test_a_second_accepted_md5_keeps_the_key_the_file_was_verified_with(tmp_path):
    path = _published(tmp_path, A, A)
    assert sources.md5_key(A, path) == A
    assert sources.md5_key([A, B], path) == A  # a mirror's copy accepted too: no rerun
    assert sources.md5_key([B.upper(), A.upper()], path) == A
    assert sources.md5_key([B, C], path) == [B, C]  # the file is no longer accepted: rerun


def test_without_a_current_record_the_key_is_the_accepted_list(tmp_path):
    assert sources.md5_key([A, B], tmp_path / "absent.zip") == [A, B]
    path = _published(tmp_path, A, [A, B])
    assert sources.md5_key([A], path) == [A, B]
    path.write_bytes(b"other bytes, same file name")  # replaced behind its record (another size)
    assert sources.md5_key([A], path) == [A]
    sources.record_path(path).write_text("{not json")
    assert sources.md5_key([A], path) == [A]


def test_the_download_rules_pass_the_key_not_the_list():
    text = (Path(__file__).resolve().parents[1] / "workflow" / "rules" / "data.smk").read_text()
    assert 'lookup(dpath="datasets/{dataset}/md5"' not in text
    assert text.count("md5=download_md5(") == 2


def _toy_zip(path: Path) -> str:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("toy/corpus.jsonl", '{"_id": "d1", "text": "cats"}\n')
        zf.writestr("toy/queries.jsonl", '{"_id": "q1", "text": "cat"}\n')
        zf.writestr("toy/qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    return download.md5sum(path)


@pytest.mark.integration
def test_adding_an_accepted_md5_reruns_nothing_downstream(tmp_path):
    """Download and unpack for real, then plan again: a second md5 plans nothing, an md5 the
    file does not have plans the download and what follows it."""
    from conftest import snakemake

    md5 = _toy_zip(tmp_path / "toy.zip")
    work = tmp_path / "w"

    def config(md5s) -> str:
        conf = tmp_path / "c.yaml"
        ds = {"url": str(tmp_path / "toy.zip"), "md5": md5s, "corpus_size": 1}
        conf.write_text(yaml.safe_dump({"datasets": {"toy": ds}, "systems": {"bm25": {"type": "bm25"}}}))
        return str(conf)

    target = "resources/datasets/toy"
    snakemake(work, target, "--configfile", config([md5]), "--replace-workflow-config", timeout=300)
    assert (work / target / "corpus.jsonl").is_file()
    plans = {}
    for name, md5s in {"added": [md5, C], "reordered": [C, md5], "replaced": [C]}.items():
        out = snakemake(work, "-n", target, "--configfile", config(md5s), "--replace-workflow-config", timeout=300)
        plans[name] = sorted(set(_planned(out.stdout)))
    assert plans == {"added": [], "reordered": [], "replaced": ["download_dataset", "unpack_dataset"]}


def _planned(stdout: str) -> list[str]:
    import re

    return re.findall(r"^(?:local)?rule (\w+):", stdout, flags=re.M)
