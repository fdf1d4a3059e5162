//! TODO: clearlog-memory (filled in by a later issue).
#![deny(missing_docs)]
