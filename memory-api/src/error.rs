// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The crate's error type.

use clearlog_bitmap::format_size;

use crate::ids::{DirtyClient, RamBlockId, RegionId};

/// Error a [`crate::MemoryListener`] hook returns; boxed so accelerators keep their own error types.
///
/// # Examples
///
/// ```
/// use clearlog_memory::ListenerError;
///
/// let e: ListenerError = "slot table full".into();
/// assert_eq!(e.to_string(), "slot table full");
/// ```
pub type ListenerError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors of the memory API.
///
/// Every caller mistake (bad alignment, overlap, out-of-range access, clearing a region that does not
/// log) is reported as one of these values: the API never panics or silently does nothing on them.
///
/// # Examples
///
/// ```
/// use clearlog_memory::{Error, MemorySystem};
///
/// let mem = MemorySystem::with_ram_capacity(1 << 24);
/// let err = mem.add_ram("ram", 0x1000, 0x1800).unwrap_err();
/// assert!(matches!(err, Error::NotPageAligned { .. }));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A listener hook failed.
    #[error("memory listener `{listener}` failed in {hook}")]
    Listener {
        /// Listener name.
        listener: String,
        /// Hook name.
        hook: &'static str,
        /// The listener's error.
        #[source]
        source: ListenerError,
    },
    /// An address or size that must be a multiple of the page size is not.
    #[error("{what} {value:#x} is not a multiple of the page size")]
    NotPageAligned {
        /// Which argument.
        what: &'static str,
        /// Its value.
        value: u64,
    },
    /// A region or block of size zero was requested.
    #[error("{what} has size zero")]
    ZeroSize {
        /// What was empty.
        what: &'static str,
    },
    /// A guest-physical range would wrap around the end of the address space.
    #[error("range {start:#x}+{len:#x} overflows the 64-bit address space")]
    AddressOverflow {
        /// Start of the range.
        start: u64,
        /// Length of the range.
        len: u64,
    },
    /// A region would overlap another mapped region of the same priority.
    #[error("region `{name}` at {guest_addr:#x}+{size:#x} overlaps region {existing:?} of the same priority")]
    Overlap {
        /// Name of the region being mapped.
        name: String,
        /// Its guest-physical address.
        guest_addr: u64,
        /// Its size.
        size: u64,
        /// The region already mapped there.
        existing: RegionId,
    },
    /// A byte range is not inside the region or block it addresses.
    #[error("range {offset:#x}+{len:#x} is past the end of a {size:#x}-byte {what}")]
    OutOfRange {
        /// What was addressed (`"region"`, `"block"`, `"alias target"`).
        what: &'static str,
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// Size of the thing addressed.
        size: u64,
    },
    /// A clear or snapshot was requested for a region none of whose sections logs.
    #[error("region {region:?} has no section with dirty logging on{}", client.map(|c| format!(" for {c:?}")).unwrap_or_default())]
    LoggingOff {
        /// The region.
        region: RegionId,
        /// The client the caller asked about, if any.
        client: Option<DirtyClient>,
    },
    /// The region is not (or no longer) in this memory system.
    #[error("unknown region {0:?}")]
    UnknownRegion(RegionId),
    /// The RAM block is not (or no longer) in this memory system.
    #[error("unknown RAM block {0:?}")]
    UnknownBlock(RamBlockId),
    /// The region exists but is not mapped in the guest-physical address space.
    #[error("region {0:?} is not mapped")]
    NotMapped(RegionId),
    /// The region is already mapped.
    #[error("region {0:?} is already mapped")]
    AlreadyMapped(RegionId),
    /// The region cannot be removed: aliases still point into it.
    #[error("region {region:?} is still the target of alias {alias:?}")]
    RegionInUse {
        /// The region to remove.
        region: RegionId,
        /// An alias that targets it.
        alias: RegionId,
    },
    /// An alias must point at a RAM region.
    #[error("alias target {0:?} is not a RAM region")]
    NotRam(RegionId),
    /// Two RAM blocks would have the same name (names identify blocks in a migration stream).
    #[error("a RAM block named `{0}` already exists")]
    DuplicateName(String),
    /// The RAM address space (and its dirty bitmaps) is full.
    #[error(
        "RAM address space full: {requested_pages} more pages do not fit in {capacity_pages} pages"
    )]
    RamSpaceExhausted {
        /// Pages requested.
        requested_pages: u64,
        /// Capacity of the RAM address space in pages.
        capacity_pages: u64,
    },
    /// Allocating host memory for a RAM block failed.
    #[error("cannot map {} of host memory", format_size(*size))]
    Mmap {
        /// Size requested.
        size: u64,
        /// vm-memory's error.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// A volatile access to guest memory failed.
    #[error("guest memory access failed")]
    Volatile(#[from] vm_memory::VolatileMemoryError),
    /// Migration and Snapshot logging are global: use `log_global_start`/`log_global_stop`, or
    /// open a [`crate::DirtyEpochs`].
    #[error("{0:?} logging cannot be set per region")]
    NotPerRegionClient(DirtyClient),
    /// The listener is not registered.
    #[error("listener is not registered")]
    UnknownListener,
    /// A bitmap of `clearlog-bitmap` refused the call (a [`crate::ClearBitmap`] with a shift
    /// outside its range, a page past its block).
    #[error("dirty bitmap")]
    Bitmap(#[from] clearlog_bitmap::Error),
    /// A memfd for RAM could not be created or sized.
    #[error("cannot create or size a memfd for guest RAM")]
    Memfd(#[source] std::io::Error),
    /// hugetlb memory could not be had: the host has no (or not enough) free huge pages.
    #[error(
        "cannot get {} of hugetlb guest RAM{}: the host has no free huge pages for it \
         (reserve some with /proc/sys/vm/nr_hugepages; see HugePages_Free in /proc/meminfo)",
        format_size(*size),
        if *huge_page_size != 0 { format!(" in {} pages", format_size(*huge_page_size)) } else { String::new() }
    )]
    HugePagesUnavailable {
        /// Bytes requested.
        size: u64,
        /// The huge page size (0 if unknown: the memfd could not even be created).
        huge_page_size: u64,
        /// The system call's error (`ENOMEM` from `mmap` when no huge pages are free).
        #[source]
        source: std::io::Error,
    },
    /// A hugetlb size or offset is not a multiple of the huge page size.
    #[error(
        "{what} {} is not a multiple of the huge page size {}",
        format_size(*value), format_size(*huge_page_size)
    )]
    NotHugePageAligned {
        /// Which value.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The huge page size.
        huge_page_size: u64,
    },
    /// The caller's backing file could not be inspected (`fstat`/`fstatfs` failed: a bad fd?).
    #[error("cannot inspect the RAM backing file")]
    BackingFile {
        /// The system call's error.
        #[source]
        source: std::io::Error,
    },
    /// The caller's backing fd is not a regular file (memfd, hugetlbfs or tmpfs file expected).
    #[error(
        "the RAM backing fd is not a regular file (a memfd, hugetlbfs or tmpfs file is expected)"
    )]
    BackingNotRegularFile,
    /// The block would extend past the end of the caller's backing file.
    #[error(
        "RAM of {} at file offset {offset:#x} is past the end of the backing file of {} (ftruncate it first)",
        format_size(*size), format_size(*file_size)
    )]
    BackingPastEof {
        /// Offset of the block in the file.
        offset: u64,
        /// Size of the block.
        size: u64,
        /// Size of the file.
        file_size: u64,
    },
    /// A vm-memory region's bitmap is already attached to a memory system (possibly this one).
    #[error("the vm-memory region{} is already attached to a memory system", guest_addr.map(|a| format!(" at {a:#x}")).unwrap_or_default())]
    AlreadyAttached {
        /// Guest address of the region, when known.
        guest_addr: Option<u64>,
    },
    /// The mapped RAM regions cannot be shown as one vm-memory `GuestMemoryMmap` (they overlap).
    #[error("the mapped RAM regions do not form a vm-memory GuestMemoryMmap")]
    GuestMemoryView(#[source] vm_memory::GuestRegionCollectionError),
    /// The RAM layout cannot change while a migration runs (global dirty logging is on): the
    /// migration stream's header fixed the list of RAM blocks (names and sizes) when it started.
    /// Remapping existing RAM (`map_region`, `unmap_region`) and adding or removing aliases are
    /// allowed.
    #[error(
        "cannot {what} while a migration runs: the RAM layout is fixed by the migration stream's \
         header until the migration ends; stop or finish the migration first"
    )]
    MigrationInProgress {
        /// What was refused (`"add a RAM block"`, `"remove a RAM region"`).
        what: &'static str,
    },
    /// A [`crate::DirtyEpochs`] tracker is open: the RAM layout is fixed (every epoch's delta
    /// names the same RAM blocks), and one tracker at a time owns the Snapshot client.
    #[error(
        "cannot {what} while a dirty-epoch tracker is open: the RAM layout is fixed and the \
         Snapshot client has one owner until the tracker is closed; close it first"
    )]
    DirtyEpochsOpen {
        /// What was refused (`"add a RAM block"`, `"open a second dirty-epoch tracker"`).
        what: &'static str,
    },
    /// Two [`crate::EpochDelta`]s cannot be merged: the later one must come from the same tracker
    /// and start where the earlier one ends.
    #[error("cannot merge dirty epochs {theirs:?} into {ours:?}: {why}")]
    EpochMerge {
        /// The epochs of the delta merged into.
        ours: std::ops::Range<u64>,
        /// The epochs of the delta given.
        theirs: std::ops::Range<u64>,
        /// Why not.
        why: &'static str,
    },
    /// Asking the kernel which pages of a RAM block are populated failed unexpectedly
    /// ([`crate::RamBlock::populated_pages`]): `PAGEMAP_SCAN` or `lseek(SEEK_DATA/SEEK_HOLE)`
    /// returned an error other than "not supported" (which is not an error: the range then counts
    /// as populated). A caller can treat the range as fully populated and read it.
    #[error("cannot tell which guest pages are populated ({what})")]
    PopulatedScan {
        /// What failed.
        what: &'static str,
        /// The system call's error.
        #[source]
        source: std::io::Error,
    },
    /// A caller-owned bitmap is too small for the RAM block it is used with.
    #[error("{what} holds {have} bits, the block needs {need}")]
    BitmapTooSmall {
        /// Which bitmap.
        what: &'static str,
        /// Bits needed.
        need: u64,
        /// Bits it holds.
        have: u64,
    },
}

/// Result alias of this crate.
///
/// # Examples
///
/// ```
/// fn size_of_first_block(mem: &clearlog_memory::MemorySystem) -> clearlog_memory::Result<u64> {
///     Ok(mem.ram_blocks().first().map_or(0, |b| b.size()))
/// }
/// assert_eq!(size_of_first_block(&clearlog_memory::MemorySystem::new()).unwrap(), 0);
/// ```
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_sizes_are_printed_in_units() {
        let e = Error::NotHugePageAligned {
            what: "size",
            value: 3 << 20,
            huge_page_size: 2 << 20,
        };
        assert_eq!(
            e.to_string(),
            "size 3M is not a multiple of the huge page size 2M"
        );
        let e = Error::BackingPastEof {
            offset: 0x20_0000,
            size: 1 << 30,
            file_size: 512 << 20,
        };
        assert_eq!(
            e.to_string(),
            "RAM of 1G at file offset 0x200000 is past the end of the backing file of 512M (ftruncate it first)"
        );
    }
}
