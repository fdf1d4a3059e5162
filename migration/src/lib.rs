//! TODO: clearlog-migration (filled in by a later issue).
#![deny(missing_docs)]
