"""A stand-in for a vLLM OpenAI server process, for launcher tests: answers GET /health (200) and /v1/models on
--host/--port until killed. `--child-pid-file F` first starts a child process in its process group (as vLLM's
engine core is) and writes its pid to F; `--fail-if-exists F` exits with code 3 before serving when F exists
(a start that fails)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path == "/health":
            body = b""
        elif self.path == "/v1/models":
            body = json.dumps({"data": [{"id": "m", "max_model_len": 512}]}).encode()
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--child-pid-file")
    ap.add_argument("--fail-if-exists")
    args, _ = ap.parse_known_args()
    if args.child_pid_file:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        Path(args.child_pid_file).write_text(str(child.pid))
    if args.fail_if_exists and Path(args.fail_if_exists).exists():
        print("fake instance: refusing to start", flush=True)
        sys.exit(3)
    print(f"fake instance serving on {args.host}:{args.port}", flush=True)
    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
