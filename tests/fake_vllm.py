"""A stand-in for vLLM's API server process, for tests of how servers are started, placed and
stopped (not of vLLM itself): `python fake_vllm.py ... --host H --port P ...` answers every GET
with what the process sees -- its port, CUDA_VISIBLE_DEVICES and pid -- so a test can check the
devices and ports each managed server was given."""

import http.server
import json
import os
import sys

args = sys.argv[1:]
host, port = args[args.index("--host") + 1], int(args[args.index("--port") + 1])


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        body = json.dumps({"port": port, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                           "pid": os.getpid(), "lora_updating": os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING")})
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *a):
        pass


print(f"fake vLLM listening on {host}:{port}", flush=True)
http.server.HTTPServer((host, port), Handler).serve_forever()
