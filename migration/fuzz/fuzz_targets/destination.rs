// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Arbitrary bytes as an incoming migration stream, received by a `Destination` holding the guest the
//! seed corpus was made for (one 1 MiB block `ram`).
//!
//! Checks, on every input:
//! - no panic, no hang, no allocation over the documented bound (`BoundedAlloc`, `stream_bound`);
//! - the guest is resumed iff `receive` returned `Ok` (or, for a live stream valid up to the source's
//!   confirmation, before its verification failed), `restore_state` ran exactly once before that;
//! - `receive` accepts exactly the streams the independent reference validator (`reference`) accepts,
//!   and then the destination RAM and state equal the reference's: `resume` panics for any stream the
//!   reference rejects.
//!
//! With `CLEARLOG_FUZZ_DEBUG` set, each input's `receive` result is printed (to check a corpus by hand:
//! `CLEARLOG_FUZZ_DEBUG=1 cargo +nightly fuzz run destination corpus/destination -- -runs=0`).
#![no_main]

use std::cell::{Cell, RefCell};
use std::io::Cursor;

use clearlog_memory::MemorySystem;
use clearlog_migration::{BoxError, Destination, StateBlob, Transport, VmRestore};
use clearlog_migration_fuzz::{reference, with_limit, BoundedAlloc, Valid, RAM_NAME, RAM_SIZE};
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: BoundedAlloc = BoundedAlloc;

struct Vm<'a> {
    valid: &'a Option<Valid>,
    mem: &'a MemorySystem,
    restores: Cell<u32>,
    resumes: Cell<u32>,
    blobs: RefCell<Vec<StateBlob>>,
}

impl VmRestore for Vm<'_> {
    fn restore_state(&self, blobs: &[StateBlob]) -> Result<(), BoxError> {
        assert_eq!(self.restores.get(), 0, "restore_state called twice");
        assert_eq!(self.resumes.get(), 0, "restore_state after resume");
        self.restores.set(1);
        *self.blobs.borrow_mut() = blobs.to_vec();
        Ok(())
    }

    fn resume(&self) -> Result<(), BoxError> {
        // A guest must never be resumed from a bad stream.
        let Some(valid) = self.valid else {
            panic!("resume called for a stream the reference validator rejects");
        };
        assert_eq!(self.restores.get(), 1, "resume without restore_state");
        assert_eq!(self.resumes.get(), 0, "resumed twice");
        self.resumes.set(1);
        let mut ram = vec![0u8; RAM_SIZE as usize];
        self.mem.ram_blocks()[0].read(0, &mut ram).unwrap();
        assert!(
            ram == valid.ram,
            "resumed with RAM that differs from the stream's"
        );
        let blobs = self.blobs.borrow();
        assert_eq!(blobs.len(), valid.blobs.len());
        for (b, (name, data)) in blobs.iter().zip(&valid.blobs) {
            assert!(&b.name == name && &b.data == data, "state blob differs");
        }
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let valid = reference(data);
    let mem = MemorySystem::with_ram_capacity(RAM_SIZE);
    mem.add_ram(RAM_NAME, 0, RAM_SIZE).unwrap();
    let vm = Vm {
        valid: &valid,
        mem: &mem,
        restores: Cell::new(0),
        resumes: Cell::new(0),
        blobs: RefCell::new(Vec::new()),
    };
    // A write half that accepts the acknowledgement, so acknowledged streams can succeed too.
    let transport = Transport::new(
        Some(Box::new(Cursor::new(data.to_vec()))),
        Some(Box::new(std::io::sink())),
    );
    let (result, _largest) = with_limit(data.len(), || {
        Destination::new(&mem).receive(transport, &vm)
    });
    if std::env::var_os("CLEARLOG_FUZZ_DEBUG").is_some() {
        eprintln!(
            "receive: {result:?}; reference accepts: {}",
            valid.is_some()
        );
    }
    match (&result, &valid) {
        (Ok(stats), Some(v)) => {
            assert!(stats.resumed && vm.resumes.get() == 1, "Ok without resume");
            assert!(v.verified, "Ok for a stream whose verification fails");
            assert!(stats.verified);
            assert_eq!(stats.acked, v.ack);
            assert!(stats.bytes_received <= data.len() as u64);
        }
        (Ok(_), None) => panic!("Ok for a stream the reference rejects"),
        // A live stream valid up to the source's confirmation resumes, then its verification
        // fails: that is the design (the guest runs at once, the mismatch is reported).
        (Err(e), Some(v)) if v.ack && !v.verified => {
            assert_eq!(vm.resumes.get(), 1, "not resumed before the verification: {e}");
            assert!(
                matches!(
                    e,
                    clearlog_migration::Error::VerificationFailed { .. }
                        | clearlog_migration::Error::VerificationIncomplete(_)
                ),
                "failed after resuming, but not in the verification: {e}"
            );
        }
        (Err(e), Some(_)) => panic!("the reference accepts a stream the destination rejects: {e}"),
        (Err(e), None) => {
            assert_eq!(vm.resumes.get(), 0, "resumed, then failed: {e}");
            // A snapshot that fails its verification is refused before its state is restored;
            // a live one may fail after restore_state (waiting for the confirmation).
            let _ = vm.restores.get();
        }
    }
});
