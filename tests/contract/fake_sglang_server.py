"""A stand-in for `python -m sglang.launch_server` on CPU, for the launcher's failure paths.

It parses the real flag list (the committed snapshot, original names, like SGLang would) and then, per
FAKE_SGLANG_MODE: `ok` serves /health, `die` crashes at start, `hang` never listens. Like SGLang, it rejects an
unknown flag (argparse error, exit 2) and a --mem-fraction-static outside (0, 1) (ValueError).
"""

import argparse
import http.server
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from streamrl.passthrough import load_specs  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(prog="sglang.launch_server")
    for spec in load_specs("sglang")["args"]:
        kw = {"dest": spec["dest"]}
        if spec["action"] in ("store_true", "store_false"):
            kw["action"] = spec["action"]
        elif spec["nargs"] is not None:
            kw["nargs"] = spec["nargs"]
        p.add_argument(*spec["flags"], **kw)
    a = p.parse_args()
    print(f"fake sglang: model {a.model_path} on {a.host}:{a.port}", flush=True)
    if a.mem_fraction_static is not None and not 0 < float(a.mem_fraction_static) < 1:
        raise ValueError(f"mem_fraction_static={a.mem_fraction_static} must be in (0, 1)")
    mode = os.environ.get("FAKE_SGLANG_MODE", "ok")
    if mode == "die":
        raise RuntimeError("CUDA error: out of memory (fake)")
    if mode == "hang":
        import time

        while True:
            time.sleep(3600)

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    http.server.HTTPServer((a.host, int(a.port)), Health).serve_forever()


if __name__ == "__main__":
    main()
