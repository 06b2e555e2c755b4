"""An Alertmanager webhook receiver that prints one JSON line per alert it is sent (standard library only).

The compose stack runs it as the `webhook` service in place of real notification endpoints:
    python webhook_receiver.py --port 5001 [--host 0.0.0.0]
Each line: {"receiver": <URL path>, "status", "labels", "annotations", "group_key"}.
"""
import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


_print_lock = threading.Lock()  # requests are served on threads: one whole line at a time


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's naming)
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        except ValueError:
            self.send_response(400)
            self.end_headers()
            return
        lines = "".join(json.dumps({"receiver": self.path.strip("/"), "status": alert.get("status"),
                                    "labels": alert.get("labels", {}), "annotations": alert.get("annotations", {}),
                                    "group_key": body.get("groupKey")}) + "\n"
                        for alert in body.get("alerts", []))
        with _print_lock:
            sys.stdout.write(lines)
            sys.stdout.flush()
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=5001, help="port to listen on (default 5001)")
    args = parser.parse_args(argv)
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print(f"listening on {args.host}:{server.server_port}", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
