#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz::voice_request::run(data));
