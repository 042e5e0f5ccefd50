#!/usr/bin/env python3
"""Writes knative/observability/dashboard.json, the Grafana dashboard for the AI handler
functions and their sources. The JSON is generated so that each panel is one line here and the
file stays reviewable; edit this script, run it, commit both.

    python3 scripts/make-dashboard.py

The expressions use the recording rules of knative/observability/prometheusrule.yaml where one
exists; nats-source's observability test asks a real Prometheus for every one of them.
"""
import json
import pathlib

SEL_FN = 'namespace=~"$namespace", function=~"$function"'
SEL_SRC = 'namespace=~"$namespace", source=~"$source"'
SEL_NS = 'namespace=~"$namespace"'

# (row title, [(panel title, unit, [(expr, legend)])])
ROWS = [
    ("Functions", [
        ("Events/s by status", "reqps", [
            (f"sum by (function, status) (function:handler_events:rate5m{{{SEL_FN}}})", "{{function}} {{status}}"),
        ]),
        ("Event latency", "s", [
            (f"function:handler_event_duration_seconds:p50{{{SEL_FN}}}", "{{function}} p50"),
            (f"function:handler_event_duration_seconds:p90{{{SEL_FN}}}", "{{function}} p90"),
            (f"function:handler_event_duration_seconds:p99{{{SEL_FN}}}", "{{function}} p99"),
        ]),
        ("Events in flight", "short", [
            (f"sum by (function) (handler_events_in_flight{{{SEL_FN}}})", "{{function}}"),
        ]),
        ("Failures that spend retries (5xx but 503)", "percentunit", [
            (f"function:handler_failures:ratio5m{{{SEL_FN}}}", "{{function}}"),
        ]),
        ("Backend calls/s by outcome", "reqps", [
            (f"sum by (function, backend, outcome) (function:handler_backend_calls:rate5m{{{SEL_FN}}})", "{{function}} {{backend}} {{outcome}}"),
        ]),
        ("Backend latency p90", "s", [
            (f"histogram_quantile(0.9, sum by (function, backend, le) (rate(handler_backend_duration_seconds_bucket{{{SEL_FN}}}[5m])))", "{{function}} {{backend}}"),
        ]),
        ("Breakers open", "short", [
            (f"max by (function, backend) (handler_breaker_open{{{SEL_FN}}})", "{{function}} {{backend}}"),
        ]),
        ("NATS connected", "short", [
            (f"min by (function) (handler_nats_connected{{{SEL_FN}}})", "{{function}}"),
        ]),
    ]),
    ("Chat", [
        ("Time to first token", "s", [
            (f"histogram_quantile(0.5, sum by (le) (rate(chat_time_to_first_token_seconds_bucket{{{SEL_NS}}}[5m])))", "p50"),
            (f"max(chat:time_to_first_token_seconds:p90{{{SEL_NS}}})", "p90 (10 min)"),
        ]),
        ("Stage latency p90", "s", [
            (f"histogram_quantile(0.9, sum by (stage, le) (rate(chat_stage_duration_seconds_bucket{{{SEL_NS}}}[5m])))", "{{stage}}"),
        ]),
        ("Answers/s by path", "reqps", [
            (f"sum by (path, degraded) (rate(chat_answers_total{{{SEL_NS}}}[5m]))", "{{path}} degraded={{degraded}}"),
        ]),
    ]),
    ("Sources", [
        ("Messages/s by outcome (delivered, retried, held_off, dead_lettered, ...)", "reqps", [
            (f"sum by (source, outcome) (source:messages:rate5m{{{SEL_SRC}}})", "{{source}} {{outcome}}"),
        ]),
        ("Lag: waiting + unacknowledged", "short", [
            (f"source:lag{{{SEL_SRC}}}", "{{source}}"),
        ]),
        ("Oldest unacknowledged message", "s", [
            (f"max by (source) (source_oldest_unacked_age_seconds{{{SEL_SRC}}})", "{{source}}"),
        ]),
        ("End-to-end latency p90 (stored to acked)", "s", [
            (f"source:end_to_end_seconds:p90{{{SEL_SRC}}}", "{{source}}"),
        ]),
        ("In flight and ready", "short", [
            (f"sum by (source) (source_in_flight{{{SEL_SRC}}})", "{{source}} in flight"),
            (f"min by (source) (source_ready{{{SEL_SRC}}})", "{{source}} ready"),
        ]),
    ]),
]


def variable(name, query):
    return {
        "name": name,
        "type": "query",
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "query": {"query": query, "refId": name},
        "definition": query,
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"text": "All", "value": "$__all"},
    }


def dashboard():
    panels = []
    y = 0
    pid = 1
    for title, row in ROWS:
        panels.append({"id": pid, "type": "row", "title": title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        pid += 1
        y += 1
        for i, (ptitle, unit, targets) in enumerate(row):
            panels.append({
                "id": pid,
                "type": "timeseries",
                "title": ptitle,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": y + 8 * (i // 2)},
                "targets": [
                    {"refId": chr(ord("A") + n), "expr": expr, "legendFormat": legend}
                    for n, (expr, legend) in enumerate(targets)
                ],
            })
            pid += 1
        y += 8 * ((len(row) + 1) // 2)
    return {
        "uid": "ai-handlers",
        "title": "AI handler functions",
        "description": "Functions, chat and NATS sources; generated by scripts/make-dashboard.py",
        "tags": ["ai-handlers", "knative", "nats"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus",
             "current": {"text": "default", "value": "default"}},
            variable("namespace", "label_values(handler_events_total, namespace)"),
            variable("function", 'label_values(handler_events_total{namespace=~"$namespace"}, function)'),
            variable("source", 'label_values(source_messages_total{namespace=~"$namespace"}, source)'),
        ]},
        "panels": panels,
    }


if __name__ == "__main__":
    out = pathlib.Path(__file__).resolve().parent.parent / "knative/observability/dashboard.json"
    out.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {out}")
