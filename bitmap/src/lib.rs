//! TODO: clearlog-bitmap (filled in by a later issue).
#![deny(missing_docs)]
