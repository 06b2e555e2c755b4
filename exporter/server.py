"""The HTTP(S) server that serves ``/metrics`` from background threads of the training process.

Written for processes that run for weeks beside a training loop:

- a fixed pool of worker threads and per-connection timeouts: a scrape storm or a client that stalls mid-request
  costs a bounded number of threads, never the training thread (excess connections are closed at once);
- TLS, client-certificate verification and HTTP basic auth (bcrypt) from a ``web-config.yml`` in the format of
  Prometheus's own exporters (exporter-toolkit), so operators reuse the files they have;
- a child forked from the training process (a DataLoader worker) closes its copy of the listening socket, so a
  scrape never reaches a process that does not serve;
- one server per port in a process: an exporter created after another one on the same port was closed takes the
  port over and keeps serving the closed run's final series until they have been scraped once.
"""
from __future__ import annotations

import atexit
import errno
import gzip
import hashlib
import os
import queue
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from . import runtime
from .exposition import choose_encoder

WORKERS = 4  # threads that answer scrapes; Prometheus servers scrape a target one request at a time each
QUEUED = 16  # accepted connections waiting for a worker; more are closed at once
TIMEOUT = 10.0  # seconds a connection may stall (TLS handshake, request, response) before it is dropped

_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_OPTIONAL,
    "RequireAnyClientCert": ssl.CERT_REQUIRED,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_TLS_VERSIONS = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1, "TLS12": ssl.TLSVersion.TLSv1_2,
                 "TLS13": ssl.TLSVersion.TLSv1_3}
_KNOWN = {
    "tls_server_config": {"cert_file", "key_file", "cert", "key", "client_auth_type", "client_ca_file",
                          "min_version", "max_version"},
    "http_server_config": {"http2", "headers"},
    "basic_auth_users": None,
}


class WebConfig:
    """A ``web-config.yml`` (exporter-toolkit's format): TLS, client certificates, basic auth, extra headers.

    Keys this server cannot honour (cipher suites, curve preferences, rate limits) are refused rather than ignored.
    """

    def __init__(self, path: Path) -> None:
        import yaml

        self.path = Path(path)
        where = str(self.path)
        try:
            data = yaml.safe_load(self.path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{where}: not valid YAML: {' '.join(str(exc).split())}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a mapping at the top level")
        for key, value in data.items():
            if key not in _KNOWN:
                raise ValueError(f"{where}: {key} is not supported by this exporter (supported: {', '.join(_KNOWN)})")
            if not isinstance(value, dict):
                raise ValueError(f"{where}: {key} must be a mapping")
            unknown = set(value) - _KNOWN[key] if _KNOWN[key] is not None else set()
            if unknown:
                raise ValueError(f"{where}: {key}.{sorted(unknown)[0]} is not supported by this exporter")
        self.users: Dict[str, bytes] = {}
        for user, hashed in (data.get("basic_auth_users") or {}).items():
            if not isinstance(hashed, str) or not hashed.startswith("$2"):
                raise ValueError(f"{where}: basic_auth_users.{user} must be a bcrypt hash ($2y$...)")
            self.users[str(user)] = hashed.encode()
        if self.users:
            try:
                import bcrypt  # noqa: F401  (checked here so a missing package fails at start, not at a scrape)
            except ModuleNotFoundError:
                raise ModuleNotFoundError("basic_auth_users needs the bcrypt package: "
                                          "pip install 'training-exporter[security]'") from None
        http = data.get("http_server_config") or {}
        self.headers: Dict[str, str] = {str(k): str(v) for k, v in (http.get("headers") or {}).items()}
        self.context = self._tls(data.get("tls_server_config"), where) if "tls_server_config" in data else None
        self._checked: Dict[bytes, bool] = {}

    def _tls(self, tls: Dict[str, Any], where: str) -> ssl.SSLContext:
        def path(name: str) -> str:
            return str(self.path.parent / tls[name])

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = _TLS_VERSIONS.get(tls.get("min_version", "TLS12"))
        if context.minimum_version is None:
            raise ValueError(f"{where}: tls_server_config.min_version must be one of {', '.join(_TLS_VERSIONS)}")
        if "max_version" in tls:
            if tls["max_version"] not in _TLS_VERSIONS:
                raise ValueError(f"{where}: tls_server_config.max_version must be one of {', '.join(_TLS_VERSIONS)}")
            context.maximum_version = _TLS_VERSIONS[tls["max_version"]]
        try:
            if "cert" in tls or "key" in tls:
                # Inline PEM: the ssl module loads only files, so write them where only this user can read.
                import tempfile

                with tempfile.TemporaryDirectory() as tmp:
                    cert, key = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
                    cert.write_text(tls.get("cert", ""))
                    key.touch(0o600)
                    key.write_text(tls.get("key", ""))
                    context.load_cert_chain(str(cert), str(key))
            elif "cert_file" in tls and "key_file" in tls:
                context.load_cert_chain(path("cert_file"), path("key_file"))
            else:
                raise ValueError(f"{where}: tls_server_config needs cert_file and key_file (or cert and key)")
            auth = tls.get("client_auth_type", "NoClientCert")
            if auth not in _CLIENT_AUTH:
                raise ValueError(f"{where}: tls_server_config.client_auth_type must be one of "
                                 f"{', '.join(_CLIENT_AUTH)}, got {auth!r}")
            context.verify_mode = _CLIENT_AUTH[auth]
            if "Verify" in auth or "client_ca_file" in tls:
                if "client_ca_file" not in tls:
                    raise ValueError(f"{where}: tls_server_config.client_auth_type {auth} needs client_ca_file")
                context.load_verify_locations(path("client_ca_file"))
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"{where}: tls_server_config: {exc}") from None
        return context

    def authorized(self, header: Optional[str]) -> bool:
        """Whether an ``Authorization`` header carries one of the users and its password (always, without users)."""
        if not self.users:
            return True
        import base64

        import bcrypt

        if not header or not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        hashed = self.users.get(user)
        if hashed is None:
            return False
        # bcrypt costs tens of milliseconds by design: remember the verdict for this exact user and password.
        key = hashlib.sha256(hashed + b"\0" + password.encode()).digest()
        verdict = self._checked.get(key)
        if verdict is None:
            verdict = bcrypt.checkpw(password.encode(), hashed)
            if len(self._checked) < 64:
                self._checked[key] = verdict
        return verdict


class _Source:
    """One exporter's registry as served by a ``MetricsServer``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.closed = False
        self.retired = False  # a newer exporter took the port over: serve until scraped once more, then drop
        self.scrapes = 0


class _Merged:
    """The sources of one scrape as one registry: a series two sources serve comes from the newest."""

    def __init__(self, sources: List[_Source]) -> None:
        self.sources = sources

    def collect(self):
        families: Dict[str, Metric] = {}
        seen = set()
        for source in reversed(self.sources):
            for family in source.registry.collect():
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(family.name, family.documentation, family.type,
                                                            family.unit)
                for sample in family.samples:
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    if key not in seen:
                        seen.add(key)
                        merged.samples.append(sample)
        return list(families.values())


class _Handler(BaseHTTPRequestHandler):
    server: "_Listener"
    server_version = "training-exporter"
    timeout = TIMEOUT  # a client that stalls mid-request or stops reading the response is dropped

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        owner = self.server.owner
        config = owner.web_config
        if config is not None and not config.authorized(self.headers.get("Authorization")):
            self._reply(401, b"Unauthorized\n", "text/plain", {"WWW-Authenticate": 'Basic realm="metrics"'})
            return
        if self.path.split("?")[0] not in ("/metrics", "/"):
            self._reply(404, b"Not found: the metrics are at /metrics\n", "text/plain")
            return
        body, content_type, served = owner.exposition(self.headers.get("Accept"))
        headers = {}
        if "gzip" in (self.headers.get("Accept-Encoding") or ""):
            # Level 1: the default 9 takes 6 times the CPU (19 ms for 10,000 series) for a body 6% smaller.
            body, headers["Content-Encoding"] = gzip.compress(body, compresslevel=1), "gzip"
        self._reply(200, body, content_type, headers)
        owner.scraped(served)

    def _reply(self, code: int, body: bytes, content_type: str, headers: Optional[Dict[str, str]] = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in {**(self.server.owner.web_config.headers if self.server.owner.web_config else {}),
                            **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class _Listener(HTTPServer):
    """An HTTP server whose connections are answered by ``WORKERS`` threads from a bounded queue."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address: Tuple[str, int], owner: "MetricsServer") -> None:
        self.owner = owner
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._pending: "queue.Queue" = queue.Queue(QUEUED)
        self._connections: set = set()
        self._workers: List[threading.Thread] = []
        super().__init__(address, _Handler)
        self._workers = [threading.Thread(target=self._work, name=f"metrics-worker-{i}", daemon=True)
                         for i in range(WORKERS)]
        for worker in self._workers:
            worker.start()

    def server_bind(self) -> None:
        # HTTPServer's own looks the host name up (reverse DNS), which can take seconds on a cluster node.
        super(HTTPServer, self).server_bind()
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        try:
            self._pending.put_nowait((request, client_address))
        except queue.Full:  # a storm: shed it here rather than grow threads or memory
            self.shutdown_request(request)

    def _work(self) -> None:
        while True:
            item = self._pending.get()
            if item is None:
                return
            request, client_address = item
            self._connections.add(request)
            try:
                request.settimeout(TIMEOUT)
                context = self.owner.web_config.context if self.owner.web_config else None
                if context is not None:
                    request = context.wrap_socket(request, server_side=True)  # the handshake, under the timeout
                    self._connections.add(request)
                self.finish_request(request, client_address)
            except Exception:  # a client that vanished or failed its handshake concerns no one else
                pass
            finally:
                self._connections.discard(item[0])
                self._connections.discard(request)
                self.shutdown_request(request)

    def close_in_child(self) -> None:
        """In a forked child: drop the copies of the listening and connected sockets, serve nothing."""
        for sock in [self.socket, *self._connections]:
            try:
                sock.close()
            except OSError:
                pass

    def server_close(self) -> None:
        super().server_close()
        for _ in self._workers:
            self._pending.put(None)


class MetricsServer:
    """Serves exporters' registries on ``addr:port`` until every one of them stopped.

    Use ``serve()``: it reuses the server of a closed exporter on the same port instead of failing to bind.
    """

    def __init__(self, port: int, addr: str, web_config: Optional[WebConfig]) -> None:
        self.web_config = web_config
        self.addr = addr
        self.pid = os.getpid()
        self._lock = threading.Condition()
        self._sources: List[_Source] = []
        try:
            self._httpd = _Listener((addr, port), self)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise OSError(
                    exc.errno,
                    f"cannot serve metrics on {addr}:{port}: the port is already in use. Choose another with "
                    f"TrainingExporter(port=...) or the environment variable {runtime.ENV_PREFIX}PORT "
                    f"(port=0 picks a free port).",
                ) from None
            raise
        self.port: int = self._httpd.server_port
        self.scheme = "https" if web_config is not None and web_config.context is not None else "http"
        # A short poll interval: stop() (a sweep's next run, a test) returns within it.
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.1,), name="metrics-server",
                                        daemon=True)
        self._thread.start()

    def exposition(self, accept: Optional[str]) -> Tuple[bytes, str, List[_Source]]:
        """The body of one scrape, its content type, and the sources it served."""
        with self._lock:
            sources = list(self._sources)
        encoder, content_type = choose_encoder(accept or "")
        registry = sources[0].registry if len(sources) == 1 else _Merged(sources)
        return encoder(registry), content_type, sources

    def scraped(self, sources: List[_Source]) -> None:
        """A response carrying ``sources`` went out whole: retired sources have been seen, and are dropped."""
        with self._lock:
            for source in sources:
                source.scrapes += 1
                if source.retired and source in self._sources:
                    self._sources.remove(source)
            self._lock.notify_all()

    def wait_scraped(self, source: _Source, after: int, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a scrape of ``source`` beyond its first ``after``."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while source.scrapes <= after and source in self._sources:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
        return True

    def stop(self) -> None:
        if os.getpid() != self.pid:  # a forked child: its copy of the server never ran
            return
        self._httpd.shutdown()
        self._httpd.server_close()


_SERVERS: Dict[Tuple[str, int], MetricsServer] = {}  # every running server by address and port
_LOCK = threading.Lock()


class Endpoint:
    """An exporter's place on a server: its port, the end of its run, and the final scrape."""

    def __init__(self, server: MetricsServer, source: _Source) -> None:
        self.server = server
        self._source = source
        self.port = server.port
        self.scheme = server.scheme
        self._closed_at: Optional[int] = None

    def close(self, timeout: float) -> None:
        """The run ended: keep serving, and at exit wait up to ``timeout`` s for one scrape of the final state."""
        with self.server._lock:
            self._source.closed = True
            self._closed_at = self._source.scrapes
        if timeout > 0:
            atexit.register(self.wait_final_scrape, timeout)

    def wait_final_scrape(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for a scrape after ``close()``; returns at once if one already happened."""
        if self._closed_at is None or os.getpid() != self.server.pid:
            return False
        return self.server.wait_scraped(self._source, self._closed_at, timeout)

    def stop(self) -> None:
        """Stop serving this exporter's registry; the server stops with its last registry."""
        atexit.unregister(self.wait_final_scrape)
        server = self.server
        with server._lock:
            if self._source in server._sources:
                server._sources.remove(self._source)
            last = not server._sources
            server._lock.notify_all()
        if last:
            with _LOCK:
                for key, value in list(_SERVERS.items()):
                    if value is server:
                        del _SERVERS[key]
            server.stop()


def serve(registry: CollectorRegistry, port: int, addr: str, web_config: Optional[str] = None) -> Endpoint:
    """Serve ``registry`` on ``addr:port`` (port 0 picks a free one), taking over the port from exporters of this
    process that were closed: their final series stay until a scrape has carried them once more."""
    config = WebConfig(Path(web_config)) if web_config else None
    source = _Source(registry)
    with _LOCK:
        server = _SERVERS.get((addr, port)) if port else None
        if server is not None:
            with server._lock:
                if all(s.closed for s in server._sources):
                    same = (None if server.web_config is None else server.web_config.path.resolve()) == \
                           (None if config is None else config.path.resolve())
                    if not same:
                        raise ValueError(f"port {port} is still served by a closed exporter with another web_config; "
                                         f"stop it first (close(stop_server=True))")
                    for old in server._sources:
                        old.retired = True
                    server._sources.append(source)
                    return Endpoint(server, source)
        server = MetricsServer(port, addr, config)
        with server._lock:
            server._sources.append(source)
        _SERVERS[(addr, server.port)] = server
    return Endpoint(server, source)


def _close_in_child() -> None:
    for server in set(_SERVERS.values()):
        server._httpd.close_in_child()
    _SERVERS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)
