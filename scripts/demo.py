#!/usr/bin/env python3
"""Demo: start a supervisor with one CPU worker on the tiny random model, ask it a few questions
about images through the client library, print the answers and the status table, and stop it.

The tiny model has random weights, so its answers are gibberish; the point is the path they take.
"""

import argparse
import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

from qvl.protocol import BadRequest, Client
from qvl.supervisor.cli import format_status


def picture(size: tuple[int, int], color: str) -> bytes:
    image = Image.new("RGB", size, color)
    ImageDraw.Draw(image).ellipse((size[0] // 4, size[1] // 4, size[0] * 3 // 4, size[1] * 3 // 4),
                                  fill="white")
    buf = io.BytesIO()
    image.save(buf, format="JPEG")
    return buf.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=".models/tiny")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="qvl-demo-"))
    endpoint = f"ipc://{run_dir}/frontend"
    log_path = run_dir / "supervisor.log"
    print(f"== starting qvl-supervisor (model {args.model} on {args.device}); log: {log_path}")
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        sup = subprocess.Popen(
            [sys.executable, "-m", "qvl.supervisor.cli", "start", "--model", args.model,
             "--device", args.device, "--frontend", endpoint, "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT)
    try:
        with Client(endpoint, timeout=60) as client:
            client.wait_ready(timeout=120)
            print(f"== worker ready after {time.monotonic() - t0:.1f}s\n")
            red, blue = picture((320, 240), "red"), picture((200, 300), "blue")
            asks = [
                ("one image", [{"role": "user", "content": [
                    {"type": "image", "image": red}, {"type": "text", "text": "What is this?"}]}]),
                ("two images", [{"role": "user", "content": [
                    {"type": "image", "image": red}, {"type": "image", "image": blue},
                    {"type": "text", "text": "What differs between these pictures?"}]}]),
                ("multi-turn", [
                    {"role": "user", "content": [{"type": "image", "image": blue},
                                                 {"type": "text", "text": "Describe the picture."}]},
                    {"role": "assistant", "content": "A white circle on blue."},
                    {"role": "user", "content": "What color is the circle?"}]),
            ]
            for name, messages in asks:
                r = client.generate(messages, max_new_tokens=16)
                print(f"[{name}] {r.text!r}\n    tokens {r.usage['prompt_tokens']}+"
                      f"{r.usage['completion_tokens']}, {r.timings['total_ms']:.0f} ms, "
                      f"worker {r.worker['slot']} gen {r.worker['generation']}")
            try:
                client.ask(b"this is not an image", "What is this?")
            except BadRequest as exc:
                print(f"[bad image] refused as expected: {exc.code}: {exc.message}")
            r = client.ask(red, "And is the service still fine?", max_new_tokens=8)
            print(f"[after the bad image] {r.text!r}\n")
            print(format_status(client.status()))
    finally:
        sup.terminate()
        code = sup.wait(timeout=60)
    print(f"\n== supervisor stopped with exit code {code}")
    print("(answers are gibberish: the demo model has random weights)")
    return code


if __name__ == "__main__":
    sys.exit(main())
