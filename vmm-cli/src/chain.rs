// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Printing an error with its causes. The libraries keep each message short and hand the cause on
//! as [`Error::source`] (as vm-memory and cloud-hypervisor do), so the CLI prints the whole chain:
//! `outer: cause: root cause`. A cause whose text the message already holds is not printed again
//! (errors that still quote their source in their message print it once).

use std::error::Error;
use std::fmt;

/// An error shown with its chain of sources (see [`ErrorChain::chain`]).
pub(crate) struct Chain<'a>(&'a (dyn Error + 'a));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = self.0.to_string();
        let mut source = self.0.source();
        while let Some(cause) = source {
            let cause_text = cause.to_string();
            if !text.contains(&cause_text) {
                text.push_str(": ");
                text.push_str(&cause_text);
            }
            source = cause.source();
        }
        f.write_str(&text)
    }
}

/// `e.chain()`: any error, displayed with its sources.
pub(crate) trait ErrorChain {
    /// The error and its sources, `outer: cause: root cause`.
    fn chain(&self) -> Chain<'_>;
}

impl<E: Error> ErrorChain for E {
    fn chain(&self) -> Chain<'_> {
        Chain(self)
    }
}

/// The boxed errors of the engine's traits (`clearlog_migration::BoxError`).
impl ErrorChain for dyn Error + Send + Sync + '_ {
    fn chain(&self) -> Chain<'_> {
        Chain(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("opening the guest")]
    struct Outer(#[source] Middle);

    #[derive(Debug, thiserror::Error)]
    #[error("creating a vCPU")]
    struct Middle(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("reading a record: {0}")]
    struct Quoting(#[source] std::io::Error);

    #[test]
    fn prints_every_cause_once() {
        let e = Outer(Middle(std::io::Error::other("no memory")));
        assert_eq!(
            e.chain().to_string(),
            "opening the guest: creating a vCPU: no memory"
        );
        let q = Quoting(std::io::Error::other("connection reset"));
        assert_eq!(q.chain().to_string(), "reading a record: connection reset");
    }
}
