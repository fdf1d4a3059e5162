//! TODO: clearlog-kvm (filled in by a later issue).
#![deny(missing_docs)]
