//! voice-assistant end to end: real speech in, the simulator as STT, LLM and TTS, audio out in
//! order on a real nats-server.

mod hostile_data;
mod request_values;
mod voice;
