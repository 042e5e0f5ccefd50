#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz::stt_request::run(data));
