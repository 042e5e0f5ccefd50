#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz::nats_event::run(data));
