//! What gets measured: the floor and every function.
//!
//! Adding a function is one more entry in [`functions`]: its binary name, its environment (see
//! [`super::function`] for the placeholders), a sample CloudEvent it answers with 200, and
//! whether events/s is measured.

use std::path::Path;
use std::time::Duration;

use super::fixtures;
use super::function::{
    BACKEND, Function, HOLD_MS, INSTANT, InFlightProbe, KUBE, MILVUS, STREAMING, SampleEvent,
};

/// The floor: `echo-floor` from this crate.
pub fn floor(bin_dir: &Path) -> Function {
    Function {
        name: "echo-floor",
        binary: bin_dir.join("echo-floor"),
        env: vec![],
        hold_env: vec![("ECHO_DELAY_MS", HOLD_MS)],
        backend_work: "none",
        event: SampleEvent::json("echo.request", r#"{"text":"Hi."}"#),
        events_per_sec: true,
        in_flight: InFlightProbe::Settle(Duration::from_secs(1)),
        floor: true,
    }
}

/// tts-module's name in [`functions`].
pub const TTS_MODULE: &str = "tts-module";

/// chat-handler's name in [`functions`]; the chat section measures it further.
pub const CHAT_HANDLER: &str = "chat-handler";

/// chat-handler's sample message; [`EVENT_ID`] makes every copy a different question, as
/// identical concurrent requests would share one pipeline run (one LLM stream for all).
pub const CHAT_SAMPLE: &str = r#"{"message":"What is NATS? ({id})"}"#;

/// stt-module's name in [`functions`]; the speech section measures it further.
pub const STT_MODULE: &str = "stt-module";
/// voice-assistant's name in [`functions`]; the speech section measures it further.
pub const VOICE_ASSISTANT: &str = "voice-assistant";

/// A JSON body `{"audio": <base64 of the fixture>, ...extra}`, made once per run (the
/// sample events are `'static`; the bench is a short-lived process).
fn audio_body(fixture: &str, extra: &str) -> &'static str {
    use base64::Engine as _;
    let bytes = std::fs::read(fixtures::speech_dir().join(fixture)).unwrap_or_default();
    let audio = base64::engine::general_purpose::STANDARD.encode(bytes);
    // Leaked on purpose: one small string per run.
    Box::leak(format!(r#"{{"audio":"{audio}"{extra}}}"#).into_boxed_str())
}

/// pipeline-bridge's name in [`functions`]; its section measures it further.
pub const PIPELINE_BRIDGE: &str = "pipeline-bridge";

/// Every function, in report order.
pub fn functions(bin_dir: &Path) -> Vec<Function> {
    vec![
        Function {
            name: TTS_MODULE,
            binary: bin_dir.join(TTS_MODULE),
            env: vec![("TTS_URL", BACKEND)],
            // The default TTS_CONCURRENCY (8) would queue 92 of the 100 held events and time them
            // out after TTS_QUEUE_TIMEOUT_MS (5 s); 100 lets every one of them reach the backend.
            hold_env: vec![("TTS_CONCURRENCY", "100")],
            backend_work: "one round trip to inference-sim",
            event: SampleEvent::json("ai.tts.request", r#"{"text":"Hi."}"#),
            events_per_sec: true,
            in_flight: InFlightProbe::Metrics,
            floor: false,
        },
        Function {
            name: CHAT_HANDLER,
            binary: bin_dir.join(CHAT_HANDLER),
            // RAG on (the request's default): embed, search, rerank, then the LLM (streamed from
            // the backend even when the request does not stream). No NATS_URL: nothing is
            // published, the answer is the HTTP reply.
            env: vec![
                ("LLM_URL", INSTANT),
                ("EMBED_URL", INSTANT),
                ("RERANK_URL", INSTANT),
                ("MILVUS_URL", MILVUS),
                ("MILVUS_API", "v2"),
            ],
            // 100 LLM streams open at once, tokens trickling in (about HOLD per answer), while
            // embeddings, search and rerank stay instant. The default LLM_CONCURRENCY (32)
            // would queue 68 of them.
            hold_env: vec![("LLM_URL", STREAMING), ("LLM_CONCURRENCY", "100")],
            backend_work: "four round trips: embeddings and rerank on inference-sim, search on \
                           the Milvus mock, then a completion streamed from inference-sim",
            event: SampleEvent::json("ai.chat.request", CHAT_SAMPLE),
            events_per_sec: false,
            in_flight: InFlightProbe::Metrics,
            floor: false,
        },
        Function {
            name: STT_MODULE,
            binary: bin_dir.join(STT_MODULE),
            // No NATS_URL: no session chunks, the transcript is the HTTP reply.
            env: vec![("STT_URL", BACKEND)],
            // The default STT_CONCURRENCY (8) would queue most of the 200 transcription calls
            // of 100 held recordings (2 utterances each).
            hold_env: vec![("STT_CONCURRENCY", "200")],
            backend_work: "decoding and VAD of a 7.5 s recording, then two transcription \
                           round trips to inference-sim",
            event: SampleEvent::json("ai.stt.request", audio_body(fixtures::SPEECH[0], "")),
            events_per_sec: false,
            in_flight: InFlightProbe::Metrics,
            floor: false,
        },
        Function {
            name: VOICE_ASSISTANT,
            binary: bin_dir.join(VOICE_ASSISTANT),
            // RAG off (its effect is in the chat section); no NATS_URL: the answer's audio is
            // the HTTP reply.
            env: vec![
                ("STT_URL", INSTANT),
                ("LLM_URL", INSTANT),
                ("TTS_URL", INSTANT),
                ("EMBED_URL", INSTANT),
                ("RERANK_URL", INSTANT),
                ("MILVUS_URL", MILVUS),
                ("MILVUS_API", "v2"),
            ],
            // 100 LLM streams open at once, as for chat-handler.
            hold_env: vec![("LLM_URL", STREAMING), ("LLM_CONCURRENCY", "100")],
            backend_work: "decoding and VAD of a 7.5 s recording, two transcription round \
                           trips, a completion streamed from inference-sim, and one TTS round trip",
            event: SampleEvent::json(
                "ai.voice.request",
                audio_body(fixtures::SPEECH[0], r#","enable_rag":false"#),
            ),
            events_per_sec: false,
            in_flight: InFlightProbe::Metrics,
            floor: false,
        },
        Function {
            name: PIPELINE_BRIDGE,
            binary: bin_dir.join(PIPELINE_BRIDGE),
            // No NATS_URL: nothing is published, the status is the HTTP reply.
            env: vec![
                ("KUBECONFIG", KUBE),
                (
                    "PIPELINE_CATALOG",
                    Box::leak(
                        fixtures::catalog_path(bin_dir)
                            .display()
                            .to_string()
                            .into_boxed_str(),
                    ),
                ),
            ],
            hold_env: vec![],
            backend_work: "one Job created on fake-kube",
            event: SampleEvent::json("ai.pipeline.trigger", fixtures::TRIGGER_SAMPLE),
            events_per_sec: true,
            in_flight: InFlightProbe::Metrics,
            floor: false,
        },
    ]
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::harness::function::Endpoints;

    fn endpoints() -> Endpoints {
        Endpoints {
            backend: Some("http://127.0.0.1:5".into()),
            instant: Some("http://127.0.0.1:6".into()),
            streaming: Some("http://127.0.0.1:7".into()),
            milvus: Some("http://127.0.0.1:8".into()),
            kube: Some("/k".into()),
        }
    }

    fn var<'a>(env: &'a [(String, String)], name: &str) -> Option<&'a str> {
        env.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    #[test]
    fn placeholders_are_filled() {
        let f = functions(Path::new("/x")).remove(0);
        assert!(f.needs_backend());
        let env = f.environment(1234, &endpoints(), Some(Duration::from_secs(2)));
        assert!(env.contains(&("TTS_URL".into(), "http://127.0.0.1:5".into())));
        assert!(env.contains(&("TTS_CONCURRENCY".into(), "100".into())));
        assert!(env.contains(&("PORT".into(), "1234".into())));
        let floor = floor(Path::new("/x"));
        assert!(!floor.needs_backend());
        let none = Endpoints::default();
        let env = floor.environment(1, &none, Some(Duration::from_millis(2000)));
        assert!(env.contains(&("ECHO_DELAY_MS".into(), "2000".into())));
        assert_eq!(floor.environment(1, &none, None).len(), 1);
    }

    #[test]
    fn chat_handler_holds_on_the_streaming_simulator() {
        let f = functions(Path::new("/x"))
            .into_iter()
            .find(|f| f.name == CHAT_HANDLER)
            .unwrap();
        assert!(f.needs_backend() && f.uses(MILVUS) && !f.uses(BACKEND));
        let normal = f.environment(1, &endpoints(), None);
        assert_eq!(var(&normal, "LLM_URL"), Some("http://127.0.0.1:6"));
        assert_eq!(var(&normal, "MILVUS_URL"), Some("http://127.0.0.1:8"));
        assert_eq!(var(&normal, "LLM_CONCURRENCY"), None);
        let held = f.environment(1, &endpoints(), Some(Duration::from_secs(2)));
        assert_eq!(var(&held, "LLM_URL"), Some("http://127.0.0.1:7"));
        assert_eq!(var(&held, "EMBED_URL"), Some("http://127.0.0.1:6"));
        assert_eq!(var(&held, "LLM_CONCURRENCY"), Some("100"));
        assert_eq!(held.iter().filter(|(k, _)| k == "LLM_URL").count(), 1);
        let addr = SocketAddr::from(([127, 0, 0, 1], 1));
        let body = f.event.request(addr, "e-1", false);
        let text = String::from_utf8_lossy(body.as_bytes()).into_owned();
        assert!(
            text.ends_with(r#"{"message":"What is NATS? (e-1)"}"#),
            "{text}"
        );
    }
}
