#!/usr/bin/env python3
"""Writes the committed seed corpora (fuzz/corpus/<target>/): a few valid and a few broken
inputs per target, small enough to replay in the normal test suite. Run from anywhere:
`python3 fuzz/scripts/seeds.py`. Crash reproducers are added beside them by hand."""

import base64
import hashlib
import hmac
import json
import math
import os
import random
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "corpus")


def msgpack(value):
    """Enough of MessagePack for seeds: maps, arrays, str, bin, ints, bools, None, floats."""
    if value is None:
        return b"\xc0"
    if value is True:
        return b"\xc3"
    if value is False:
        return b"\xc2"
    if isinstance(value, int):
        if 0 <= value < 128:
            return bytes([value])
        if 0 <= value < 2**32:
            return b"\xce" + struct.pack(">I", value)
        return b"\xd3" + struct.pack(">q", value)
    if isinstance(value, float):
        return b"\xcb" + struct.pack(">d", value)
    if isinstance(value, str):
        data = value.encode()
        if len(data) < 32:
            return bytes([0xA0 | len(data)]) + data
        return b"\xd9" + bytes([len(data)]) + data if len(data) < 256 else b"\xda" + struct.pack(">H", len(data)) + data
    if isinstance(value, (bytes, bytearray)):
        return (b"\xc4" + bytes([len(value)]) if len(value) < 256 else b"\xc5" + struct.pack(">H", len(value))) + bytes(value)
    if isinstance(value, list):
        return bytes([0x90 | len(value)]) + b"".join(msgpack(v) for v in value)
    if isinstance(value, dict):
        return bytes([0x80 | len(value)]) + b"".join(msgpack(k) + msgpack(v) for k, v in value.items())
    raise TypeError(value)


def wav(samples, rate=16000, channels=1, bits=16, fmt=1, extensible=False):
    if fmt == 3:
        data = b"".join(struct.pack("<f", s) for s in samples)
    elif bits == 8:
        data = bytes((s + 128) & 0xFF for s in samples)
    elif bits == 16:
        data = b"".join(struct.pack("<h", s) for s in samples)
    elif bits == 24:
        data = b"".join(struct.pack("<i", s)[:3] for s in samples)
    else:
        data = b"".join(struct.pack("<i", s) for s in samples)
    block = channels * bits // 8
    if extensible:
        fmt_chunk = struct.pack("<HHIIHHHHI", 0xFFFE, channels, rate, rate * block, block, bits, 22, bits, 0)
        fmt_chunk += struct.pack("<H", fmt) + b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
    else:
        fmt_chunk = struct.pack("<HHIIHH", fmt, channels, rate, rate * block, block, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt_chunk)) + fmt_chunk + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def speechy(n, rate, amplitude=8000, seed=1):
    """Noise bursts between silences: what the VAD calls speech."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        t = i / rate
        loud = (t % 0.6) < 0.35
        out.append(int(rng.uniform(-amplitude, amplitude)) if loud else int(rng.uniform(-30, 30)))
    return out


def write(target, name, data):
    os.makedirs(os.path.join(ROOT, target), exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(ROOT, target, name), "wb") as f:
        f.write(data)


def request(headers, body=b""):
    head = "".join(f"{k}: {v}\n" for k, v in headers)
    return head.encode() + b"\n" + (body.encode() if isinstance(body, str) else body)


def binary(ty, content_type, body, extra=()):
    return request([("ce-specversion", "1.0"), ("ce-id", "seed-1"), ("ce-source", "/seed"), ("ce-type", ty), ("content-type", content_type), *extra], body)


def structured(event, extra=()):
    return request([("content-type", "application/cloudevents+json"), *extra], json.dumps(event))


small_wav = wav(speechy(1000, 8000, seed=3), rate=8000, bits=8)
speech_wav = wav(speechy(16000, 16000, seed=5), rate=16000)

# --- cloudevent
write("cloudevent", "binary-json", binary("ai.fuzz.request", "application/json", '{"request_id": "r-1", "text": "hi", "audio": "AAEC"}'))
write("cloudevent", "binary-msgpack", binary("ai.fuzz.request", "application/msgpack", msgpack({"request_id": "r-2", "audio": b"\x00\x01\x02", "n": [1, -5, 2.5, None, True]}), [("accept", "application/json")]))
write("cloudevent", "structured-json", structured({"specversion": "1.0", "id": "e-3", "source": "/s", "type": "ai.fuzz.request", "subject": "x", "datacontenttype": "application/json", "data": {"text": "hé", "list": [1, 2, {"a": None}]}}, [("accept", "application/msgpack")]))
write("cloudevent", "structured-msgpack-base64", structured({"specversion": "1.0", "id": "e-4", "source": "/s", "type": "ai.fuzz.request", "datacontenttype": "application/msgpack", "data_base64": base64.b64encode(msgpack({"text": "hi", "k": 7})).decode(), "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}))
write("cloudevent", "binary-accept-structured", binary("ai.fuzz.request", "application/vnd.msgpack", msgpack({"a": 1}), [("accept", "application/cloudevents+json"), ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"), ("ce-tenant", "t1")]))
write("cloudevent", "raw-wav", binary("ai.fuzz.request", "audio/wav", b"RIFF\x24\x00\x00\x00WAVE"))
write("cloudevent", "not-an-event", request([("content-type", "application/json")], "{}"))
write("cloudevent", "spec-0.3", binary("ai.fuzz.request", "text/json; charset=utf-8", '"text"', [("ce-specversion", "0.3")]))

# --- audio
write("audio", "pcm16-16k-mono", speech_wav[:3000])
write("audio", "pcm8-8k", small_wav)
write("audio", "pcm24-44k-stereo", wav([s for s in speechy(400, 44100, seed=7) for _ in (0, 1)], rate=44100, channels=2, bits=24))
write("audio", "float32-22k", wav([s / 32768 for s in speechy(500, 22050, seed=9)], rate=22050, bits=32, fmt=3))
write("audio", "pcm32-extensible-3ch", wav(list(range(-300, 300, 2)), rate=48000, channels=3, bits=32, extensible=True))
write("audio", "truncated", speech_wav[:1001])
write("audio", "alaw", wav([0] * 100, rate=8000, bits=8, fmt=6))
write("audio", "rate-1hz", wav([1000, -1000, 500], rate=1))

# --- vad: flags, 5 timing bytes, [state], audio
def vad(flags, timings, audio, state=None):
    out = bytes([flags]) + bytes(timings)
    if state is not None:
        out += struct.pack("<H", len(state)) + state
    return out + audio

records = bytes([0x3F, 10, 0x7F, 200, 0x20, 0, 0xBF, 50, 0x3F, 3, 0xFF, 180, 0x0A, 0, 0x5F, 255, 0x3F, 0])
write("vad", "synth-default", vad(0x02, [20, 30, 20, 190, 7], records))
write("vad", "synth-10ms-mode0", vad(0x00, [0, 0, 0, 0, 1], records * 3))
write("vad", "synth-20ms-mode3-short-cut", vad(0x07, [5, 10, 5, 2, 9], records * 2))
write("vad", "raw-samples", vad(0x2A, [20, 30, 20, 10, 3], b"".join(struct.pack("<h", s) for s in speechy(2000, 16000, seed=11))))
state = msgpack({"processed_ms": 900, "partial": [1, 2, 3], "in_speech": True, "utterance_start_ms": 300, "last_voice_end_ms": 870, "voiced_ms": 510, "silence_ms": 30, "floor_ms": 0, "noise_energy": 100})
write("vad", "stored-state", vad(0x12, [20, 30, 20, 190, 5], records, state))
write("vad", "stored-state-positional", vad(0x12, [20, 30, 20, 190, 5], records, msgpack([60, [], False, 0, 0, 0, 0, 0, 0])))

# --- sse: the LLM backend's answer
chunk = lambda text, finish=None: "data: " + json.dumps({"choices": [{"delta": {"content": text}, "finish_reason": finish}]}) + "\n\n"
usage = "data: " + json.dumps({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}) + "\n\n"
write("sse", "stream-done", request([(":cuts", "7"), ("content-type", "text/event-stream")], ": hello\n\n" + chunk("Hel") + chunk("lo ü") + chunk("", "stop") + usage + "data: [DONE]\n\n"))
write("sse", "crlf-multiline", request([(":cuts", "3")], 'event: x\r\nid: 1\r\ndata: {"choices":\r\ndata: [{"delta":{"content":"a"}}]}\r\n\r\ndata: [DONE]'))
write("sse", "finish-without-done", request([(":cuts", "50")], chunk("x", "length")))
write("sse", "error-event", request([], chunk("a") + 'data: {"error": {"message": "overloaded"}}\n\n'))
write("sse", "cut-short", request([(":cuts", "2")], chunk("a") + 'data: {"choi'))
write("sse", "not-utf8", request([(":cuts", "4")], b"data: \xff\xfe\n\n"))
write("sse", "complete-json", request([("content-type", "application/json")], json.dumps({"choices": [{"message": {"content": "whole"}}], "usage": {"total_tokens": 1}})))
write("sse", "busy-503", request([(":status", "503"), ("retry-after", "3")], "busy"))

# --- answers: Milvus, rerank, embeddings
write("answers", "milvus-v2", request([(":api", "milvus-v2")], json.dumps({"code": 0, "data": [{"id": 1, "distance": 0.9, "text": "a"}, {"id": "b", "distance": 0.1}]})))
write("answers", "milvus-v2-nested", request([(":api", "milvus-v2")], json.dumps({"code": 0, "data": [[{"id": 2, "distance": 1}]]})))
write("answers", "milvus-v1-error", request([(":api", "milvus-v1")], json.dumps({"code": 1100, "message": "collection not found", "error": "x"})))
write("answers", "milvus-retriable", request([(":api", "milvus-v2")], json.dumps({"code": 103, "message": "not loaded"})))
write("answers", "tei", request([(":api", "tei"), (":texts", "3")], json.dumps([{"index": 2, "score": 0.3}, {"index": 0, "score": 0.9}])))
write("answers", "cohere-out-of-range", request([(":api", "cohere"), (":texts", "2")], json.dumps({"results": [{"index": 5, "relevance_score": 1.0}]})))
write("answers", "embed", request([(":api", "embed"), (":texts", "2")], json.dumps({"data": [{"index": 1, "embedding": [0.5]}, {"index": 0, "embedding": [1e-3, -2]}]})))
write("answers", "embed-429", request([(":api", "embed"), (":status", "429"), ("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")], "slow down"))

# --- the functions
write("tts_request", "binary-json", binary("ai.tts.request", "application/json", '{"request_id": "t-1", "text": "Hello there. How are you?", "voice": "v1"}'))
write("tts_request", "msgpack-stream", binary("ai.tts.request", "application/msgpack", msgpack({"text": "One. Two!", "stream": True, "language": "en"})))
write("tts_request", "structured", structured({"specversion": "1.0", "id": "t-3", "source": "/s", "type": "ai.tts.request", "data": {"text": "   "}}))
write("tts_request", "bad-id", binary("ai.tts.request", "application/json", '{"request_id": "a\\nb", "text": "x"}'))

audio_b64 = base64.b64encode(small_wav).decode()
write("stt_request", "recording", binary("ai.stt.request", "application/json", json.dumps({"request_id": "s-1", "audio": audio_b64, "language": "en"})))
write("stt_request", "recording-msgpack", binary("ai.stt.request", "application/msgpack", msgpack({"audio": small_wav[:200]})))
write("stt_request", "chunk", binary("ai.stt.chunk", "application/json", json.dumps({"session_id": "sess-1", "seq": 0, "audio": audio_b64[:400], "final": True})))
write("stt_request", "not-audio", binary("ai.stt.request", "application/json", '{"audio": "bm90IGEgd2F2"}'))

write("chat_request", "rag", binary("ai.chat.request", "application/json", json.dumps({"message": "What is JetStream?", "top_k": 2, "rerank_top_n": 1, "history": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})))
write("chat_request", "no-rag-msgpack", binary("ai.chat.request", "application/msgpack", msgpack({"request_id": "c-2", "message": "Hi", "enable_rag": False, "stream": True, "temperature": 0.5, "max_tokens": 10})))
write("chat_request", "bad-role", binary("ai.chat.request", "application/json", json.dumps({"message": "x", "history": [{"role": "tool", "content": "y"}]})))
write("chat_request", "structured", structured({"specversion": "1.0", "id": "c-4", "source": "/s", "type": "ai.chat.request", "data": {"message": "Tell me", "enable_reranker": False, "system_prompt": "Be brief."}}))

write("voice_request", "speech", binary("ai.voice.request", "application/json", json.dumps({"request_id": "v-1", "audio": base64.b64encode(speech_wav[:4000]).decode(), "enable_rag": False, "voice": "v"})))
write("voice_request", "msgpack", binary("ai.voice.request", "application/msgpack", msgpack({"audio": small_wav[:300], "top_k": 1})))
write("voice_request", "no-audio", binary("ai.voice.request", "application/json", '{"message": "x"}'))

write("pipeline_request", "trigger-argo", binary("ai.pipeline.trigger", "application/json", json.dumps({"request_id": "p-1", "pipeline": "train", "parameters": {"model": "bert", "epochs": 5}})))
write("pipeline_request", "trigger-job", binary("ai.pipeline.trigger", "application/msgpack", msgpack({"pipeline": "deploy", "parameters": {"env": "prod", "revision": "abc123"}})))
write("pipeline_request", "trigger-kfp", binary("ai.pipeline.trigger", "application/json", json.dumps({"pipeline": "kfp-train", "parameters": {"lr": 0.5}})))
write("pipeline_request", "trigger-bad-parameter", binary("ai.pipeline.trigger", "application/json", json.dumps({"pipeline": "deploy", "parameters": {"env": "prod; rm -rf /"}})))
write("pipeline_request", "status", binary("ai.pipeline.status.request", "application/json", json.dumps({"request_id": "p-1", "pipeline": "train"})))
write("pipeline_request", "resource-event", binary("dev.knative.apiserver.resource.update", "application/json", json.dumps({"apiVersion": "argoproj.io/v1alpha1", "kind": "Workflow", "metadata": {"name": "train-1", "namespace": "ml", "labels": {"app.kubernetes.io/managed-by": "pipeline-bridge", "pipeline-bridge/pipeline": "train"}, "annotations": {"pipeline-bridge/request-id": "p-1", "pipeline-bridge/lock": "pipeline-lock-x"}}, "status": {"phase": "Failed", "message": "oom"}}), [("ce-subject", "/apis/argoproj.io/v1alpha1/namespaces/ml/workflows/train-1")]))

push = {"ref": "refs/heads/main", "after": "0123abcd", "repository": {"full_name": "acme/ml"}, "commits": [{"added": ["models/bert/config.json"], "removed": [], "modified": ["deploy/app.yaml"]}]}
write("webhook", "github-push", request([("x-github-event", "push"), ("x-github-delivery", "d-1"), ("content-type", "application/json")], json.dumps(push)))
write("webhook", "gitea-push-head-commit", request([(":provider", "gitea"), ("x-gitea-event", "push"), ("x-gitea-delivery", "d-2")], json.dumps({"ref": "refs/heads/main", "head_commit": {"modified": ["charts/a.yaml"]}})))
write("webhook", "github-ping", request([("x-github-event", "ping"), ("x-github-delivery", "d-3")], "{}"))
write("webhook", "deleted-branch", request([("x-github-event", "push"), ("x-github-delivery", "d-4")], json.dumps({"ref": "refs/heads/old", "deleted": True})))
write("webhook", "tag", request([("x-github-event", "push"), ("x-github-delivery", "d-5")], json.dumps({"ref": "refs/tags/v1"})))
write("webhook", "bad-signature", request([(":signature", "bad"), ("x-github-event", "push"), ("x-github-delivery", "d-6")], json.dumps(push)))
write("webhook", "unsigned", request([(":signature", "none"), ("x-github-event", "push"), ("x-github-delivery", "d-7")], "{}"))

# --- catalog: yaml NUL parameters NUL push NUL request_id
catalog = """pipelines:
  build:
    kind: job
    lock: "build-{{parameters.target}}"
    parameters:
      target: {pattern: "[a-z]+"}
      flag: {default: true}
    job:
      template: {spec: {containers: [{name: c, image: i, args: ["{{parameters.target}}", "{{parameters.flag}}"]}]}}
    git: {paths: ["src/**", "*.md"], repository: Acme/App, parameters: {target: "{{git.branch}}"}}
"""
write("catalog", "default-catalog", b"\0" + json.dumps({"model": "bert", "epochs": 10}).encode() + b"\0main\n\nmodels/x/y\n\0req-1")
write("catalog", "job-catalog", catalog.encode() + b"\0" + json.dumps({"target": "app"}).encode() + b"\0main\nacme/app\nsrc/lib.rs\nREADME.md\n\0" + "Ünïcödé id".encode())
write("catalog", "problems", b"pipelines:\n  Bad_Name: {kind: argo, workflow_template: t}\n  p: {kind: argo, workflow_template: t, parameters: {a: {pattern: '('}}}\n  q: {kind: cron}\n\0{}\0dev\n")
write("catalog", "bad-parameters", b"\0" + json.dumps({"model": ["a"], "gpu": 1}).encode())

# --- nats_event: subject, NATS headers, blank line, payload
write("nats_event", "plain-msgpack", b"ai.tts.request\nNats-Msg-Id: req-7\ntraceparent: 00-ab-cd-01\nTenantid: t1\n\n" + msgpack({"text": "hi"}))
write("nats_event", "plain-json-reply-subject", b'ai.stt.stream.s1\nContent-Type: application/json\nreply-subject: ai.tts.response.r1\n\n{"session_id": "s1", "seq": 0}')
write("nats_event", "binary-cloudevent", b"ai.chat.request\nce-specversion: 1.0\nce-id: e1\nce-type: t\nce-source: /s\ncontent-type: application/json\nce-replysubject: a.b\n\n{}")
write("nats_event", "structured-cloudevent", b'ai.chat.request\n:sequence: 9\n\n{"specversion": "1.0", "id": "e2", "type": "t", "source": "/s", "data": {}}')
write("nats_event", "bad-id", b'ai.x\n\n{"specversion": "1.0", "id": "a\\nb"}')
write("nats_event", "unicode-subject", "ai.tts.requête\nX-Tenant: acme\n\n".encode() + msgpack({}))
