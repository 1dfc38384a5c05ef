"""A stand-in for vLLM's API server process, for tests of how servers are started, placed and
stopped (not of vLLM itself): `python fake_vllm.py ... --host H --port P ...` answers every GET
with what the process sees -- its port, CUDA_VISIBLE_DEVICES and pid -- so a test can check the
devices and ports each managed server was given. Like vLLM, with VLLM_API_KEY in its environment
it refuses /v1/... requests (401) that do not send `Authorization: Bearer <that key>`."""

import http.server
import json
import os
import sys

args = sys.argv[1:]
host, port = args[args.index("--host") + 1], int(args[args.index("--port") + 1])


KEY = os.environ.get("VLLM_API_KEY")


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        if KEY and self.path.startswith("/v1") and self.headers.get("Authorization") != f"Bearer {KEY}":
            self.send_response(401)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        body = json.dumps({"object": "list", "data": [], "port": port,  # "data": /v1/models, empty
                           "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getpid(),
                           "lora_updating": os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING"),
                           "api_key_required": bool(KEY)})
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *a):
        pass


print(f"fake vLLM listening on {host}:{port}", flush=True)
http.server.HTTPServer((host, port), Handler).serve_forever()
