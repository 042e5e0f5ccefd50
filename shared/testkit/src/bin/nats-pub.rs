//! `nats-pub`: publish one JSON payload as MessagePack to a JetStream subject and print the
//! reply that comes back on another subject. A dev tool for `just publish`, so the whole
//! NATS -> nats-source -> function -> NATS path can be tried without a NATS CLI.
//!
//! Usage: `nats-pub [--url URL] [--wait SUBJECT] [--timeout-ms N] SUBJECT JSON`

use std::time::Duration;

use anyhow::{Context as _, bail};
use futures::StreamExt as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut url = "nats://127.0.0.1:4222".to_string();
    let (mut wait, mut timeout_ms, mut positional) = (None, 10_000u64, Vec::new());
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--url" => url = args.next().context("--url needs a value")?,
            "--wait" => wait = Some(args.next().context("--wait needs a subject")?),
            "--timeout-ms" => {
                timeout_ms = args.next().context("--timeout-ms needs a value")?.parse()?
            }
            _ => positional.push(arg),
        }
    }
    let [subject, json] = positional.as_slice() else {
        bail!("usage: nats-pub [--url URL] [--wait SUBJECT] [--timeout-ms N] SUBJECT JSON");
    };
    let value: serde_json::Value = serde_json::from_str(json).context("payload is not JSON")?;
    let client = async_nats::connect(&url)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let mut replies = match &wait {
        Some(s) => Some(client.subscribe(s.clone()).await?),
        None => None,
    };
    client.flush().await?;
    let js = async_nats::jetstream::new(client.clone());
    let ack = js
        .publish(subject.clone(), rmp_serde::to_vec_named(&value)?.into())
        .await?
        .await
        .with_context(|| format!("no stream stored {subject}"))?;
    println!(
        "published to {subject}: stream {} seq {}",
        ack.stream, ack.sequence
    );
    if let (Some(replies), Some(wait)) = (replies.as_mut(), &wait) {
        let msg = tokio::time::timeout(Duration::from_millis(timeout_ms), replies.next())
            .await
            .with_context(|| format!("no reply on {wait} within {timeout_ms} ms"))?
            .context("subscription closed")?;
        let reply =
            rmpv::decode::read_value(&mut &msg.payload[..]).context("reply is not msgpack")?;
        println!("reply on {}: {}", msg.subject, summarize(&reply));
    }
    Ok(())
}

/// JSON-ish text of a msgpack value, with binary fields (audio) shown by size.
fn summarize(value: &rmpv::Value) -> String {
    match value {
        rmpv::Value::Binary(b) => format!("\"<{} bytes>\"", b.len()),
        rmpv::Value::Map(entries) => {
            let inner: Vec<String> = entries
                .iter()
                .map(|(k, v)| format!("{}: {}", summarize(k), summarize(v)))
                .collect();
            format!("{{{}}}", inner.join(", "))
        }
        rmpv::Value::Array(items) => {
            let inner: Vec<String> = items.iter().map(summarize).collect();
            format!("[{}]", inner.join(", "))
        }
        rmpv::Value::String(s) => format!("{:?}", s.as_str().unwrap_or_default()),
        other => other.to_string(),
    }
}
