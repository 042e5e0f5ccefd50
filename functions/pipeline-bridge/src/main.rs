//! pipeline-bridge's entry point: [`handler_kit::serve::run`] does configuration, telemetry, bind and
//! serve for every function; the logic is in `lib.rs`.
//!
//! mimalloc is the allocator: a trigger is a burst of small allocations (two HTTP exchanges,
//! JSON both ways), and with the C library's malloc they took a fifth of its CPU; with
//! mimalloc a trigger costs ~0.055 ms instead of ~0.08 at 100 in flight, for ~0.8 MiB more
//! idle RSS (README "Benchmarks").

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    handler_kit::serve::run::<pipeline_bridge::State>().await
}
