//! One module per section: its settings, its run, its result type, its checks and how it is
//! printed, behind [`Section`](crate::harness::section::Section). Sections import the harness,
//! never each other.

pub mod chat;
pub mod functions;
pub mod max_body;
pub mod pipeline;
pub mod source;
pub mod speech;
