#!/usr/bin/env python3
"""Summarize a function's CloudEvent reply saved by `just invoke`: status, attributes, audio."""

import base64
import io
import json
import sys
import wave

status_file, headers_file, body_file, wav_out = sys.argv[1:5]
status = open(status_file).read().strip()
headers = {}
for line in open(headers_file, encoding="latin-1"):
    if ":" in line:
        name, value = line.split(":", 1)
        headers[name.strip().lower()] = value.strip()
print(f"HTTP {status}  ce-type={headers.get('ce-type')}  ce-id={headers.get('ce-id')}  "
      f"content-type={headers.get('content-type')}")
body = json.load(open(body_file))
audio = body.pop("audio", None)
print("data:", json.dumps(body))
if audio:
    raw = base64.b64decode(audio)
    with wave.open(io.BytesIO(raw)) as w:
        print(f"audio: valid WAV, {w.getnchannels()} ch, {w.getframerate()} Hz, "
              f"{w.getnframes() / w.getframerate():.2f} s, {len(raw)} bytes -> {wav_out}")
    open(wav_out, "wb").write(raw)
sys.exit(0 if status == "200" else 1)
