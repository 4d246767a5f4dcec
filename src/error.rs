//! Typed errors: what kind of failure a [`candle::Error`] of this crate is, so
//! that a training loop can act on it (retry from a checkpoint after a
//! timeout, stop on ranks that disagree, skip a bad file) without matching
//! message text.
//!
//! The crate's functions return [`candle::Result`]. Where the kind of a
//! failure is known, the `candle::Error` carries an [`Error`] inside, with
//! the message it always had ([`Error::message`]; the `candle::Error`'s text
//! is unchanged). candle 0.11's `candle::Error::Wrapped` holds a
//! `dyn Display`, which cannot be downcast, so the [`Error`] travels as the
//! payload of a [`std::io::Error`] in `candle::Error::Io`, whose text is the
//! payload's: `io_error.get_ref()` and `downcast_ref::<Error>()` find it, and
//! [`error_kind`] and [`Error::find`] do that through any
//! `candle::Error::Context`, `WithBacktrace` and `WithPath` layers around it.

use std::fmt;
use std::io;

/// What kind of failure an [`Error`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Another rank did not answer within the group's timeout (it is stalled,
    /// stuck before this collective, or slower than the timeout allows), or
    /// the rendezvous did not complete in time.
    Timeout,
    /// Rank `rank` failed: its process died, its thread ended, it closed its
    /// connection, or it reported a failure of its own.
    PeerFailed {
        /// The rank that failed.
        rank: usize,
    },
    /// The ranks did not make the same collective call (a different layer,
    /// shape, dtype or order of calls): their numbers would have been mixed.
    RanksDisagree,
    /// The ranks could not meet: a wrong job token, a refused or
    /// unauthenticated peer, a listener that is not rank 0 of this job.
    Rendezvous,
    /// A checkpoint file is malformed, truncated, or not what it claims to be.
    BadCheckpoint,
    /// An argument or input tensor the operation cannot take (rank, channel
    /// count, dtype, device, configuration).
    BadInput,
}

impl ErrorKind {
    /// The [`io::ErrorKind`] of the `std::io::Error` that carries an error of
    /// this kind inside a `candle::Error`.
    fn io_kind(self) -> io::ErrorKind {
        match self {
            ErrorKind::Timeout => io::ErrorKind::TimedOut,
            ErrorKind::PeerFailed { .. } => io::ErrorKind::ConnectionAborted,
            ErrorKind::RanksDisagree | ErrorKind::Rendezvous => io::ErrorKind::Other,
            ErrorKind::BadCheckpoint => io::ErrorKind::InvalidData,
            ErrorKind::BadInput => io::ErrorKind::InvalidInput,
        }
    }
}

/// A failure of a known [`ErrorKind`], with its message.
///
/// Converts into a [`candle::Error`] (see the module docs) whose text is the
/// message. Find it in a `candle::Error` with [`Error::find`] or
/// [`error_kind`]:
///
/// ```
/// use candle_syncbn::{error_kind, ErrorKind};
///
/// let e: candle::Error = candle_syncbn::Error::new(ErrorKind::Timeout, "rank 1 did not answer").into();
/// let e = e.context("step 7");
/// assert_eq!(error_kind(&e), Some(ErrorKind::Timeout));
/// assert!(e.to_string().contains("rank 1 did not answer"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

impl Error {
    /// An error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
        }
    }

    /// Its kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Its message (the text of the `candle::Error` that carries it).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The typed error inside `err`, looking through the
    /// `candle::Error::Context`, `WithBacktrace` and `WithPath` layers around
    /// it; `None` when `err` carries none (an error of candle itself, or one
    /// of this crate whose kind is not one of [`ErrorKind`]'s).
    pub fn find(err: &candle::Error) -> Option<&Error> {
        match err {
            candle::Error::Context { inner, .. }
            | candle::Error::WithBacktrace { inner, .. }
            | candle::Error::WithPath { inner, .. } => Error::find(inner),
            candle::Error::Io(e) => e.get_ref()?.downcast_ref::<Error>(),
            candle::Error::WrappedContext { wrapped, .. } => {
                let wrapped: &(dyn std::error::Error + 'static) = &**wrapped;
                wrapped.downcast_ref::<Error>().or_else(|| {
                    wrapped
                        .downcast_ref::<io::Error>()?
                        .get_ref()?
                        .downcast_ref::<Error>()
                })
            }
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<Error> for candle::Error {
    fn from(e: Error) -> Self {
        candle::Error::Io(io::Error::new(e.kind.io_kind(), e))
    }
}

/// The [`ErrorKind`] of the typed error inside `err` ([`Error::find`]).
///
/// ```no_run
/// # fn step() -> candle::Result<()> { Ok(()) }
/// use candle_syncbn::{error_kind, ErrorKind};
///
/// match step() {
///     Ok(()) => {}
///     Err(e) => match error_kind(&e) {
///         Some(ErrorKind::Timeout | ErrorKind::PeerFailed { .. }) => { /* restart from the last checkpoint */ }
///         Some(ErrorKind::RanksDisagree) => panic!("the ranks run different models: {e}"),
///         _ => return Err(e),
///     },
/// }
/// # Ok::<(), candle::Error>(())
/// ```
pub fn error_kind(err: &candle::Error) -> Option<ErrorKind> {
    Error::find(err).map(Error::kind)
}

/// A `candle::Error` of `kind` with `message` (what the crate's error sites call).
pub(crate) fn error(kind: ErrorKind, message: impl Into<String>) -> candle::Error {
    Error::new(kind, message).into()
}

/// `message` as a `candle::Error` of the same kind as `source` (an error
/// this crate rewords keeps its kind; one of no kind stays untyped).
pub(crate) fn keep_kind(source: &candle::Error, message: String) -> candle::Error {
    match error_kind(source) {
        Some(kind) => error(kind, message),
        None => candle::Error::Msg(message),
    }
}

/// Why an internal step failed: its kind when known, and the message (what
/// the crate's functions that report text pass around before it becomes a
/// `candle::Error`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    pub kind: Option<ErrorKind>,
    pub msg: String,
}

impl Failure {
    /// A failure of `kind`.
    pub fn new(kind: ErrorKind, msg: impl Into<String>) -> Self {
        Failure {
            kind: Some(kind),
            msg: msg.into(),
        }
    }

    /// The same kind with another message.
    pub fn map_msg(self, f: impl FnOnce(String) -> String) -> Self {
        Failure {
            kind: self.kind,
            msg: f(self.msg),
        }
    }

    /// The `candle::Error` (typed when the kind is known, else `Msg`).
    pub fn into_error(self) -> candle::Error {
        match self.kind {
            Some(kind) => error(kind, self.msg),
            None => candle::Error::Msg(self.msg),
        }
    }
}

/// A failure of unknown kind.
impl From<String> for Failure {
    fn from(msg: String) -> Self {
        Failure { kind: None, msg }
    }
}

/// `candle::bail!` with a kind: returns `Err(error(kind, format!(...)))`,
/// with a backtrace when `RUST_BACKTRACE` asks for one (as `bail!`).
macro_rules! bail_kind {
    ($kind:expr, $($arg:tt)*) => {
        return Err($crate::error::error($kind, format!($($arg)*)).bt())
    };
}
pub(crate) use bail_kind;

/// `candle::bail!` of an [`ErrorKind::BadInput`].
macro_rules! bail_input {
    ($($arg:tt)*) => {
        $crate::error::bail_kind!($crate::error::ErrorKind::BadInput, $($arg)*)
    };
}
pub(crate) use bail_input;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn found_through_every_layer_with_the_text_unchanged() {
        let kinds = [
            ErrorKind::Timeout,
            ErrorKind::PeerFailed { rank: 3 },
            ErrorKind::RanksDisagree,
            ErrorKind::Rendezvous,
            ErrorKind::BadCheckpoint,
            ErrorKind::BadInput,
        ];
        for kind in kinds {
            let e = error(kind, "what happened");
            assert_eq!(e.to_string().lines().next(), Some("what happened"));
            assert_eq!(error_kind(&e), Some(kind));
            let bt = candle::Error::WithBacktrace {
                inner: Box::new(error(kind, "deep")),
                backtrace: Box::new(std::backtrace::Backtrace::disabled()),
            };
            let layered = bt.context("layer 'bn1'").with_path("/x").context("step 7");
            assert_eq!(error_kind(&layered), Some(kind));
            assert_eq!(Error::find(&layered).unwrap().message(), "deep");
            let wc = candle::Error::WrappedContext {
                wrapped: Box::new(Error::new(kind, "w")),
                context: String::new(),
            };
            assert_eq!(error_kind(&wc), Some(kind));
        }
        assert_eq!(error_kind(&candle::Error::Msg("plain".into())), None);
        let other_io = candle::Error::Io(io::Error::other("disk full"));
        assert_eq!(error_kind(&other_io), None);
    }

    #[test]
    fn bail_kind_formats() {
        fn f(x: usize) -> candle::Result<()> {
            bail_kind!(ErrorKind::BadInput, "got {x}, expected {}", 2)
        }
        let e = f(1).unwrap_err();
        assert_eq!(error_kind(&e), Some(ErrorKind::BadInput));
        assert_eq!(e.to_string().lines().next(), Some("got 1, expected 2"));
    }
}
