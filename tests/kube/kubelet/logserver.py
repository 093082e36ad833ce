"""The kubelet API's ``/containerLogs/{namespace}/{pod}/{container}`` over HTTPS, so ``GET .../pods/{pod}/log``
(``kubectl logs``, ``read_namespaced_pod_log``) works through the API server.

It listens on a free port of 127.0.0.1 with a self-signed certificate made with ``openssl`` (the Node's
``InternalIP`` and ``daemonEndpoints.kubeletEndpoint.Port`` point there; the API server does not verify it).
``follow`` streams new bytes until the container has ended or the client disconnects; ``tailLines`` and
``limitBytes`` are honoured; ``sinceSeconds`` is approximated by the log file's mtime (all or nothing of what is
already written); ``timestamps`` and ``previous`` are ignored. Clients are not authenticated."""

from __future__ import annotations

import logging
import os
import re
import select
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger(__name__)

FOLLOW_POLL_SECONDS = 0.2
OBJECT_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")  # namespaces, pods and containers: no "..", no "/"


class LogServer:
    """``log_file(namespace, pod, container)`` locates a log; ``is_running(namespace, pod)`` says whether its
    container may still write to it."""

    def __init__(
        self,
        pki_folder: Path,
        *,
        common_name: str,
        log_file: Callable[[str, str, str], Path],
        is_running: Callable[[str, str], bool],
    ) -> None:
        self.pki_folder = pki_folder
        self.common_name = common_name
        self.log_file = log_file
        self.is_running = is_running
        self._server: ThreadingHTTPServer | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "the log server is not started"
        return self._server.server_address[1]

    def start(self) -> None:
        self.pki_folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", "kubelet.key", "-out", "kubelet.crt", "-days", "3650", "-subj", f"/CN={self.common_name}",
             "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
            cwd=self.pki_folder, check=True, capture_output=True,
        )  # fmt: skip
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.pki_folder / "kubelet.crt", self.pki_folder / "kubelet.key")
        server = ThreadingHTTPServer(("127.0.0.1", 0), _ContainerLogsHandler)
        server.daemon_threads = True
        server.socket = context.wrap_socket(server.socket, server_side=True)
        server.logs = self  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, name=f"kubelet-api-{self.common_name}", daemon=True).start()
        self._server = server

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _ContainerLogsHandler(BaseHTTPRequestHandler):
    """``GET /containerLogs/{namespace}/{pod}/{container}?follow=&tailLines=&limitBytes=&sinceSeconds=``."""

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        logs: LogServer = self.server.logs  # type: ignore[attr-defined]
        url = urlsplit(self.path)
        parts = url.path.strip("/").split("/")
        if len(parts) != 4 or parts[0] != "containerLogs" or not all(map(OBJECT_NAME.fullmatch, parts[1:])):
            self.send_error(404, "no such container log")
            return
        _, namespace, pod, container = parts
        path = logs.log_file(namespace, pod, container)
        if not path.is_file():
            self.send_error(404, "no such container log")
            return
        query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        follow = query.get("follow") in ("true", "1")
        limit = int(query["limitBytes"]) if "limitBytes" in query else None
        with open(path, "rb") as f:
            data = f.read()
            since = query.get("sinceSeconds")
            if since and os.path.getmtime(path) < time.time() - float(since):
                data = b""
            if "tailLines" in query:
                n = int(query["tailLines"])
                data = b"".join(data.splitlines(keepends=True)[-n:]) if n > 0 else b""
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Connection", "close")
            self.end_headers()
            try:
                while True:
                    if limit is not None:
                        data, limit = data[:limit], limit - len(data[:limit])
                    self.wfile.write(data)
                    self.wfile.flush()
                    if not follow or limit == 0:
                        return
                    running = logs.is_running(namespace, pod)  # read what is there after it ended too
                    data = f.read()
                    if not data and (not running or self._client_gone(FOLLOW_POLL_SECONDS)):
                        return
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                return

    def _client_gone(self, wait: float) -> bool:
        """Waits up to ``wait`` seconds for the client to close the connection (it sends nothing after its
        request, so anything readable means it is gone)."""
        if not select.select([self.connection], [], [], wait)[0]:
            return False
        try:
            return not self.connection.recv(1)
        except (OSError, ssl.SSLError):
            return True

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - quiet: tests read the pods' logs instead
        log.debug("kubelet harness api: " + format, *args)
