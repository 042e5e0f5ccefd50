//! The app under test and helpers.

use axum::Router;

pub use testkit::cloudevent::{assert_error, event, send};

pub async fn app(stt_url: &str, extra: &[(&str, &str)]) -> Router {
    let mut env: Vec<(&str, &str)> = extra.to_vec();
    env.push(("STT_URL", stt_url));
    let config = handler_kit::config::load(&env, stt_module::Config::read).expect("valid config");
    stt_module::app(stt_module::State::new(config).await.expect("state"))
}

pub async fn simulator() -> String {
    let (addr, _task) = testkit::sim::spawn(testkit::sim::SimConfig::default())
        .await
        .expect("sim");
    format!("http://{addr}")
}
