//! `NATS_URL` as a comma-separated list of servers.

use handler_kit::nats::{Nats, NatsConfig};
use testkit::nats_server::{NatsServer, free_port};

use crate::{config, next_message};

#[tokio::test]
async fn a_list_whose_first_server_is_down_still_connects_and_publishes() {
    let nats = NatsServer::start().await.expect("nats-server");
    let watcher = nats.client().await.expect("client");
    let mut sub = watcher.subscribe("list.check").await.expect("sub");
    watcher.flush().await.expect("flush");

    let closed = format!("nats://127.0.0.1:{}", free_port().expect("port"));
    let url = format!("{closed}, {}", nats.url());
    let publisher = Nats::connect(Some(&config(&url)), "servers-test")
        .await
        .expect("a list is accepted");
    publisher
        .publish("list.check".to_string(), &"hello", Some("m-1"))
        .await
        .expect("published through the server that is up");

    let msg = next_message(&mut sub).await;
    let body: String = rmp_serde::from_slice(&msg.payload).expect("msgpack");
    assert_eq!(body, "hello");
}

#[tokio::test]
async fn a_malformed_server_is_a_clear_error_without_the_password() {
    let url = "nats://127.0.0.1:4222,nats://svc:hunter2@nats:42x2";
    let e = NatsConfig::from_url(url)
        .expect_err("a malformed entry is a configuration error")
        .to_string();
    assert!(e.contains("server 2 of 2"), "{e}");
    assert!(e.contains("invalid port"), "{e}");
    assert!(!e.contains("hunter2") && !e.contains("svc"), "{e}");
}
