"""Through real nginx, with the site config of deploy/nginx.conf (shown in the README)."""
import json
import os
import re
import shutil
import socket
import subprocess
import time

import pytest
import websocket

from conftest import ROOT, SSEStream, free_port, stop_process, wait_until_up

pytestmark = pytest.mark.nginx
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)


def test_the_readme_shows_the_nginx_config_that_is_tested():
    site = (ROOT / "deploy" / "nginx.conf").read_text()
    assert site.strip() in (ROOT / "README.md").read_text()


@pytest.fixture
def nginx(server, tmp_path):
    if NGINX is None:
        if os.environ.get("CI"):
            pytest.fail("nginx is not installed (.ci/run installs it)")
        pytest.skip("nginx is not installed")
    port = free_port()
    site = (ROOT / "deploy" / "nginx.conf").read_text()
    site = site.replace("127.0.0.1:5000", server.url.removeprefix("http://"))
    site = re.sub(r"listen 80;", f"listen 127.0.0.1:{port};", site)
    (tmp_path / "nginx.conf").write_text(f"""
daemon off;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log;
events {{}}
http {{
    access_log off;
    client_body_temp_path {tmp_path}; proxy_temp_path {tmp_path};
    fastcgi_temp_path {tmp_path}; uwsgi_temp_path {tmp_path}; scgi_temp_path {tmp_path};
{site}
}}
""")
    proc = subprocess.Popen([NGINX, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
                            stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    wait_until_up(url + "/api/health", proc)
    yield url
    stop_process(proc)


def test_deltas_arrive_one_by_one_through_nginx(server, nginx):
    sid = server.new_session()
    stream = SSEStream(nginx, "/api/chat/stream", {"session_id": sid, "message": "@@words=6 @@delay=0.4"})
    assert stream.status == 200 and stream.headers["Content-Type"].startswith("text/event-stream")
    events = list(stream.events())
    deltas = [(data["content"], at) for name, data, at in events if name == "delta"]
    assert len(deltas) == 6
    # Each delta was read off the socket on its own, about 0.4 s after the one
    # before: nothing was buffered and released in a lump.
    gaps = [b[1] - a[1] for a, b in zip(deltas, deltas[1:])]
    assert min(gaps) > 0.2, gaps
    assert events[-1][0] == "done" and events[-1][1]["content"] == "".join(d for d, _ in deltas)


def test_a_websocket_turn_through_nginx(server, nginx):
    sid = server.new_session()
    ws = websocket.create_connection(nginx.replace("http", "ws") + "/api/chat/ws", timeout=15)
    try:
        ws.send(json.dumps({"type": "chat", "session_id": sid, "message": "안녕 @@words=3"}))
        frames = []
        while not frames or frames[-1]["type"] not in ("done", "error"):
            frames.append(json.loads(ws.recv()))
    finally:
        ws.close()
    assert [f["type"] for f in frames] == ["start", "delta", "delta", "delta", "done"]
    assert frames[-1]["message"]["content"] == "".join(f["content"] for f in frames if f["type"] == "delta")


def test_a_client_that_sends_its_header_a_byte_at_a_time_is_turned_away(server, nginx):
    """Slowloris: with gunicorn exposed directly each such client holds a
    thread for as long as it likes; nginx holds it instead, and not for long
    (client_header_timeout)."""
    host, port = nginx.removeprefix("http://").split(":")
    request = b"GET /api/slow-header-client HTTP/1.1\r\nHost: chatbot\r\nX-Padding: " + b"a" * 1000
    client = socket.create_connection((host, int(port)), timeout=5)
    started, answer = time.monotonic(), b""
    try:
        for byte in request:
            client.sendall(bytes([byte]))
            time.sleep(0.25)
            if time.monotonic() - started > 40:
                break
    except OSError:   # nginx closed the connection: sending failed
        pass
    try:
        answer = client.recv(65536)
    except OSError:
        pass
    held = time.monotonic() - started
    client.close()
    assert held < 25, f"nginx held the slow client for {held:.0f} s"
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer[:100]
    server.stop()
    assert "slow-header-client" not in server.output()   # it never reached gunicorn
