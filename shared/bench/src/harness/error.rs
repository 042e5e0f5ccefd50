//! The crate's one error type. A failed measurement records its error, causes included
//! (`{:#}`: `what was being done: why`), in its section's result; `main` prints the rest.

use std::error::Error as StdError;
use std::fmt;

/// A result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a measurement (or the run) failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// What a measurement found wrong: a status, a count, a missed deadline.
    Failed(String),
    /// Sockets, files and child processes.
    Io(#[from] std::io::Error),
    /// JSON in answers, files and results.
    Json(#[from] serde_json::Error),
    /// Decoding a MessagePack reply.
    MsgPackDecode(#[from] rmp_serde::decode::Error),
    /// Encoding a MessagePack request.
    MsgPackEncode(#[from] rmp_serde::encode::Error),
    /// A number in a variable, a file or an answer.
    Int(#[from] std::num::ParseIntError),
    /// A decimal number in a file.
    Float(#[from] std::num::ParseFloatError),
    /// A NATS client call, a timer or a task of the async clients.
    Client(#[source] Box<dyn StdError + Send + Sync>),
    /// `source`, with what was being done when it happened.
    Context {
        /// What was being done.
        context: String,
        /// What went wrong.
        #[source]
        source: Box<Error>,
    },
}

impl Error {
    /// An error that is just `message`.
    pub fn msg(message: impl fmt::Display) -> Self {
        Self::Failed(message.to_string())
    }

    /// This error, with what was being done when it happened.
    pub fn context(self, context: impl fmt::Display) -> Self {
        Self::Context {
            context: context.to_string(),
            source: Box::new(self),
        }
    }

    /// The error this one wraps, past our own layers.
    fn cause(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            Self::Failed(_) | Self::Context { .. } => None,
            Self::Io(e) => e.source(),
            Self::Json(e) => e.source(),
            Self::MsgPackDecode(e) => e.source(),
            Self::MsgPackEncode(e) => e.source(),
            Self::Int(e) => e.source(),
            Self::Float(e) => e.source(),
            Self::Client(e) => e.source(),
        }
    }
}

/// `{}` is the outermost message; `{:#}` the whole chain joined with `: `.
impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Failed(m) => f.write_str(m)?,
            Self::Io(e) => write!(f, "{e}")?,
            Self::Json(e) => write!(f, "{e}")?,
            Self::MsgPackDecode(e) => write!(f, "{e}")?,
            Self::MsgPackEncode(e) => write!(f, "{e}")?,
            Self::Int(e) => write!(f, "{e}")?,
            Self::Float(e) => write!(f, "{e}")?,
            Self::Client(e) => write!(f, "{e}")?,
            Self::Context { context, source } => {
                f.write_str(context)?;
                if f.alternate() {
                    write!(f, ": {source:#}")?;
                }
                return Ok(());
            }
        }
        if f.alternate() {
            let mut next = self.cause();
            while let Some(e) = next {
                write!(f, ": {e}")?;
                next = e.source();
            }
        }
        Ok(())
    }
}

impl<K> From<async_nats::error::Error<K>> for Error
where
    K: Clone + fmt::Debug + fmt::Display + PartialEq + Send + Sync + 'static,
{
    fn from(e: async_nats::error::Error<K>) -> Self {
        Self::Client(Box::new(e))
    }
}

macro_rules! client_errors {
    ($($ty:ty),* $(,)?) => {
        $(impl From<$ty> for Error {
            fn from(e: $ty) -> Self {
                Self::Client(Box::new(e))
            }
        })*
    };
}

client_errors!(
    tokio::time::error::Elapsed,
    tokio::task::JoinError,
    std::str::Utf8Error,
);

/// Adds what was being done to the error of a `Result`, or makes one of a `None`.
pub trait Context<T> {
    /// The error, with `context`.
    fn context(self, context: impl fmt::Display) -> Result<T>;
    /// The error, with the context `f` makes (only when there is an error).
    fn with_context<C: fmt::Display>(self, f: impl FnOnce() -> C) -> Result<T>;
}

impl<T, E: Into<Error>> Context<T> for std::result::Result<T, E> {
    fn context(self, context: impl fmt::Display) -> Result<T> {
        self.map_err(|e| e.into().context(context))
    }

    fn with_context<C: fmt::Display>(self, f: impl FnOnce() -> C) -> Result<T> {
        self.map_err(|e| e.into().context(f()))
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, context: impl fmt::Display) -> Result<T> {
        self.ok_or_else(|| Error::msg(context))
    }

    fn with_context<C: fmt::Display>(self, f: impl FnOnce() -> C) -> Result<T> {
        self.ok_or_else(|| Error::msg(f()))
    }
}

/// An [`Error`] from a format string.
macro_rules! err {
    ($($arg:tt)*) => {
        $crate::harness::error::Error::msg(format!($($arg)*))
    };
}

/// Returns an [`Error`] from a format string.
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::harness::error::err!($($arg)*))
    };
}

/// Returns an [`Error`] unless `cond` holds: the format string's, or the condition's text.
macro_rules! ensure {
    ($cond:expr $(,)?) => {
        if !$cond {
            $crate::harness::error::bail!(concat!("condition failed: `", stringify!($cond), "`"));
        }
    };
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            $crate::harness::error::bail!($($arg)+);
        }
    };
}

pub(crate) use {bail, ensure, err};

#[cfg(test)]
mod tests {
    use super::*;

    fn io() -> Result<()> {
        Err(std::io::Error::other("refused"))?
    }

    #[test]
    fn alternate_display_is_the_chain() {
        let e = io()
            .context("connecting")
            .unwrap_err()
            .context("starting x");
        assert_eq!(e.to_string(), "starting x");
        assert_eq!(format!("{e:#}"), "starting x: connecting: refused");
        let none: Option<u8> = None;
        assert_eq!(
            format!("{:#}", none.context("no value").unwrap_err()),
            "no value"
        );
    }

    #[test]
    fn ensure_and_bail_make_messages() {
        fn check(n: usize) -> Result<usize> {
            ensure!(n > 1, "{n} is too small");
            if n > 9 {
                bail!("{n} is too big");
            }
            Ok(n)
        }
        assert_eq!(check(1).unwrap_err().to_string(), "1 is too small");
        assert_eq!(check(10).unwrap_err().to_string(), "10 is too big");
        assert_eq!(check(5).unwrap(), 5);
    }
}
