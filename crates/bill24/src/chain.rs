//! One line for an error and everything under it: the client's transport errors and the
//! gateway's connection logs are both written with it.

use std::fmt;

/// An error and its sources on one line, `: `-separated ("error writing a body to
/// connection: the peer has taken no data ..."); these never contain request headers or
/// bodies. Formats lazily, for `tracing` fields (`error = %Chain(&e)`).
#[derive(Clone, Copy)]
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

/// [`Chain`] as a `String`.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    Chain(err).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Middle);

    #[derive(Debug, thiserror::Error)]
    #[error("middle")]
    struct Middle(#[source] std::io::Error);

    #[test]
    fn an_error_and_its_sources_on_one_line() {
        let e = Outer(Middle(std::io::Error::other("inner")));
        assert_eq!(error_chain(&e), "outer: middle: inner");
        assert_eq!(Chain(&e).to_string(), "outer: middle: inner");
        assert_eq!(error_chain(&std::io::Error::other("alone")), "alone");
    }
}
