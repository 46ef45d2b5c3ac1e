"""The HTTP client the commands share: node URLs, ``https://`` with ``--cacert``, and what
``meshllm status`` and ``meshllm prompt`` do against a node that speaks TLS (a stand-in server
here, with a certificate made for 127.0.0.1 by the openssl command)."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from meshllm.cli import main
from meshllm.client import metric_values, node_url, ssl_context
from meshllm.errors import UserError

VIEW = {"node": {"name": "n0", "id": "abcdef0123"}, "members": [], "ready": True, "epoch": 1, "term": 1}


def test_node_urls() -> None:
    assert node_url("127.0.0.1:7070") == "http://127.0.0.1:7070"
    assert node_url(" https://h:1/ ") == "https://h:1"
    assert node_url("http://h:1") == "http://h:1"
    for bad in ("", "  ", "ftp://h:1"):
        with pytest.raises(UserError):
            node_url(bad)


def test_a_missing_or_bad_ca_file_is_a_clear_error(tmp_path: Path) -> None:
    assert ssl_context(None) is None
    with pytest.raises(UserError, match="no such file"):
        ssl_context(tmp_path / "nope.pem")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(UserError, match="not a CA certificate"):
        ssl_context(junk)


def test_metric_values_reads_the_exposition() -> None:
    text = ('# TYPE meshllm_kv_bytes_in_use gauge\nmeshllm_kv_bytes_in_use 4096.0\n'
            '# TYPE meshllm_requests counter\nmeshllm_requests_total{outcome="ok"} 3.0\n')
    got = metric_values(text)
    assert got["meshllm_kv_bytes_in_use"] == 4096.0
    assert got['meshllm_requests_total{outcome="ok"}'] == 3.0


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def _send(self, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._send(json.dumps(VIEW).encode())

    def do_POST(self) -> None:
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if req.get("stream"):
            ev = {"choices": [{"text": "hi", "index": 0}], "meshllm": {"token_ids": [7]}}
            self._send(f"data: {json.dumps(ev)}\n\ndata: [DONE]\n\n".encode(), "text/event-stream")
        else:
            self._send(json.dumps({"choices": [{"text": "hi", "finish_reason": "length"}],
                                   "meshllm": {"prompt_token_ids": [1], "token_ids": [7]}}).encode())


@pytest.fixture()
def tls_node(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An HTTPS server on 127.0.0.1 with a self-signed certificate; (its URL, the CA file)."""
    openssl = shutil.which("openssl")
    assert openssl, "the openssl command makes this test's certificate"
    cert, key = tmp_path / "ca.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", cert
    finally:
        server.shutdown()
        server.server_close()


def test_status_and_prompt_speak_https_with_a_ca_file(tls_node: tuple[str, Path],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    url, ca = tls_node
    assert main(["status", "--node", url, "--cacert", str(ca), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["node"]["name"] == "n0"
    assert main(["prompt", "--node", url, "--cacert", str(ca), "--json", "x"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == [7]
    assert main(["prompt", "--node", url, "--cacert", str(ca), "x"]) == 0
    assert capsys.readouterr().out == "hi\n"


def test_an_unverified_certificate_is_refused_with_a_hint(tls_node: tuple[str, Path],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    url, _ = tls_node
    # without --cacert the system's CAs are used, and they do not know this certificate
    assert main(["status", "--node", url]) != 0
    err = capsys.readouterr().err
    assert "certificate" in err and "--cacert" in err
    assert main(["prompt", "--node", url, "x"]) != 0
    err = capsys.readouterr().err
    assert "certificate" in err and "--cacert" in err
