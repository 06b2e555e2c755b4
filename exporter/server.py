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
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

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
        self.retired = False  # a newer exporter took the port over: drop once its final state was scraped
        # The run's end counts as scraped only by a scrape that began after close(): one in flight at that moment
        # may carry the state from before, and must neither end the wait at exit nor drop a retired source.
        self.closed_ticket: Optional[int] = None
        self.final_scraped = False


class _Served(NamedTuple):
    """What one scrape served: its ticket (scrapes begun before it, plus one) and the sources it carried."""

    ticket: int
    sources: List[_Source]


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
        self._tickets = 0  # scrapes begun
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

    def exposition(self, accept: Optional[str]) -> Tuple[bytes, str, _Served]:
        """The body of one scrape, its content type, and what it served (for ``scraped``)."""
        with self._lock:
            self._tickets += 1
            served = _Served(self._tickets, list(self._sources))
        encoder, content_type = choose_encoder(accept or "")
        sources = served.sources
        registry = sources[0].registry if len(sources) == 1 else _Merged(sources)
        return encoder(registry), content_type, served

    def close_source(self, source: _Source) -> None:
        """``source``'s run ended: only scrapes that begin from now on carry its final state."""
        with self._lock:
            source.closed = True
            source.closed_ticket = self._tickets

    def scraped(self, served: _Served) -> None:
        """A response went out whole: the closed sources it began after have had their final scrape, and the
        retired ones among them are dropped."""
        with self._lock:
            for source in served.sources:
                if source.closed_ticket is not None and served.ticket > source.closed_ticket:
                    source.final_scraped = True
                    if source.retired and source in self._sources:
                        self._sources.remove(source)
            self._lock.notify_all()

    def wait_final_scrape(self, source: _Source, deadline: float) -> bool:
        """Wait until ``source``'s final state has been scraped, or the ``time.monotonic()`` deadline passes."""
        with self._lock:
            while not source.final_scraped and source in self._sources:
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
_LOCK = threading.RLock()  # reentrant: a SIGTERM handler closing an exporter may interrupt its holder


class Endpoint:
    """An exporter's place on a server: its port, the end of its run, and the final scrape."""

    def __init__(self, server: MetricsServer, source: _Source) -> None:
        self.server = server
        self._source = source
        self.port = server.port
        self.scheme = server.scheme
        self._closed = False

    def close(self, timeout: float) -> None:
        """The run ended: keep serving, and at exit wait up to ``timeout`` s for one scrape of the final state."""
        self.server.close_source(self._source)
        self._closed = True
        if timeout > 0:
            with _LOCK:
                _FINAL[self] = timeout

    def wait_final_scrape(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for a scrape after ``close()``; returns at once if one already happened."""
        if not self._closed or os.getpid() != self.server.pid:
            return False
        return self.server.wait_final_scrape(self._source, time.monotonic() + timeout)

    def stop(self) -> None:
        """Stop serving this exporter's registry; the server stops with its last registry."""
        server = self.server
        with _LOCK:
            _FINAL.pop(self, None)
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


_FINAL: Dict[Endpoint, float] = {}  # closed endpoints of this process and how long each waits for its final scrape


@atexit.register
def wait_final_scrapes() -> bool:
    """Wait for the final scrape of every closed exporter of this process, all at once: each at most its own
    ``close_timeout`` from now, so several exporters cost the longest of their timeouts, not the sum.
    True when every one was scraped."""
    start = time.monotonic()
    with _LOCK:
        waiting = list(_FINAL.items())
    done = True
    for endpoint, timeout in waiting:
        if endpoint._closed and os.getpid() == endpoint.server.pid:
            done = endpoint.server.wait_final_scrape(endpoint._source, start + timeout) and done
    return done


def serve(registry: CollectorRegistry, port: int, addr: str, web_config: Optional[str] = None) -> Endpoint:
    """Serve ``registry`` on ``addr:port`` (port 0 picks a free one), taking over the port from exporters of this
    process that were closed: their final series stay until a scrape that began after their close() carried
    them."""
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
