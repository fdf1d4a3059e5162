// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! [`RamBacking`]: where a RAM block's host memory comes from.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, MmapRegion};

use crate::{DirtyBitmap, Error, Result, PAGE_SIZE};

/// `statfs.f_type` of a hugetlbfs file system (the kernel's `HUGETLBFS_MAGIC`).
const HUGETLBFS_MAGIC: u64 = 0x9584_58f6;

/// Host memory for a RAM block.
///
/// - [`Anonymous`](Self::Anonymous): private anonymous `MAP_NORESERVE` memory with transparent
///   huge page advice (what [`crate::MemorySystem::add_ram`] uses).
/// - [`Memfd`](Self::Memfd): a memfd this crate creates and maps `MAP_SHARED`, optionally
///   `MFD_HUGETLB` (the block's size must then be a multiple of the host's default huge page
///   size). [`crate::RamBlock::file_offset`] hands out the fd, e.g. for a vhost-user backend.
/// - [`File`](Self::File): the caller's file (a memfd, a hugetlbfs or tmpfs file; any fd can be
///   turned into a [`File`] with `File::from(OwnedFd)`) mapped `MAP_SHARED` from `offset`. It must
///   be a regular file opened read-write holding `offset + size` bytes; hugetlbfs is detected with
///   `fstatfs`, and then `offset` and the size must be huge-page multiples.
///
/// hugetlb memory is mapped without `MAP_NORESERVE`, so a host without enough free huge pages
/// fails at creation with [`Error::HugePagesUnavailable`] rather than with a `SIGBUS` at the first
/// guest access.
///
/// # Examples
///
/// ```
/// use clearlog_memory::{MemorySystem, RamBacking};
///
/// let mem = MemorySystem::with_ram_capacity(1 << 24);
/// mem.add_ram_backed("ram", 0, 1 << 20, RamBacking::Memfd { hugetlb: false }).unwrap();
/// let block = mem.ram_blocks()[0].clone();
/// let fd = block.file_offset().unwrap(); // share it with a vhost-user backend
/// assert_eq!(fd.start(), 0);
/// assert_eq!(fd.file().metadata().unwrap().len(), 1 << 20);
/// ```
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub enum RamBacking {
    /// Private anonymous memory.
    #[default]
    Anonymous,
    /// A new memfd, mapped shared.
    Memfd {
        /// Create it with `MFD_HUGETLB` (the host's default huge page size).
        hugetlb: bool,
    },
    /// The caller's file, mapped shared from `offset`.
    File {
        /// The file (kept open as long as the block exists).
        file: Arc<File>,
        /// Offset of the block's first byte in the file (a page multiple).
        offset: u64,
    },
}

/// A new mapping and what the block needs to know about it.
pub(crate) struct NewMapping {
    pub(crate) mmap: MmapRegion<DirtyBitmap>,
    /// Anonymous memory gets the THP advice.
    pub(crate) anonymous: bool,
}

fn fstatfs(file: &File) -> io::Result<libc::statfs> {
    // SAFETY: an all-zero `statfs` is a valid value of the plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is open (borrowed from `file`) and `st` is a valid, writable `statfs`.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &raw mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

/// Huge page size if the file lives on hugetlbfs.
fn hugetlbfs_page_size(file: &File) -> io::Result<Option<u64>> {
    let st = fstatfs(file)?;
    // `f_type`'s integer type differs between targets; the magic fits in 32 bits.
    #[allow(clippy::unnecessary_cast)]
    let magic = st.f_type as u64 & 0xffff_ffff;
    Ok((magic == HUGETLBFS_MAGIC).then_some(st.f_bsize as u64))
}

fn check_huge_aligned(what: &'static str, value: u64, huge_page_size: u64) -> Result<()> {
    if huge_page_size == 0 || value % huge_page_size != 0 {
        return Err(Error::NotHugePageAligned {
            what,
            value,
            huge_page_size,
        });
    }
    Ok(())
}

fn create_memfd(name: &str, hugetlb: bool, size: u64) -> Result<File> {
    let name = CString::new(format!("clearlog:{name}").replace('\0', "_"))
        .unwrap_or_else(|_| c"clearlog-ram".to_owned());
    let mut flags = libc::MFD_CLOEXEC;
    if hugetlb {
        flags |= libc::MFD_HUGETLB;
    }
    // SAFETY: `name` is a NUL-terminated string that outlives the call; no memory is handed over.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        let source = io::Error::last_os_error();
        return Err(if hugetlb {
            Error::HugePagesUnavailable {
                size,
                huge_page_size: 0,
                source,
            }
        } else {
            Error::Memfd(source)
        });
    }
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn map_shared(
    file: Arc<File>,
    offset: u64,
    size: u64,
    huge_page_size: Option<u64>,
) -> Result<MmapRegion<DirtyBitmap>> {
    let len = usize::try_from(size).map_err(|_| Error::AddressOverflow {
        start: 0,
        len: size,
    })?;
    // hugetlb: no MAP_NORESERVE, so missing huge pages fail here, not at the first guest access.
    let flags = if huge_page_size.is_some() {
        libc::MAP_SHARED
    } else {
        libc::MAP_SHARED | libc::MAP_NORESERVE
    };
    MmapRegionBuilder::new_with_bitmap(len, DirtyBitmap::new())
        .with_file_offset(FileOffset::from_arc(file, offset))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(flags)
        .with_hugetlbfs(huge_page_size.is_some())
        .build()
        .map_err(|source| match (huge_page_size, source) {
            (Some(huge_page_size), vm_memory::mmap::MmapRegionError::Mmap(source))
                if source.raw_os_error() == Some(libc::ENOMEM) =>
            {
                Error::HugePagesUnavailable {
                    size,
                    huge_page_size,
                    source,
                }
            }
            (_, source) => Error::Mmap { size, source },
        })
}

impl RamBacking {
    /// Make the host memory of a `size`-byte block (`size` a non-zero page multiple).
    pub(crate) fn map(&self, name: &str, size: u64) -> Result<NewMapping> {
        match self {
            RamBacking::Anonymous => {
                let mmap = usize::try_from(size)
                    .map_err(|_| Error::AddressOverflow {
                        start: 0,
                        len: size,
                    })
                    .and_then(|len| {
                        MmapRegion::<DirtyBitmap>::new(len)
                            .map_err(|source| Error::Mmap { size, source })
                    })?;
                Ok(NewMapping {
                    mmap,
                    anonymous: true,
                })
            }
            RamBacking::Memfd { hugetlb } => {
                let file = create_memfd(name, *hugetlb, size)?;
                let huge = if *hugetlb {
                    let hps = hugetlbfs_page_size(&file)
                        .map_err(|source| Error::BackingFile { source })?
                        .unwrap_or(2 << 20);
                    check_huge_aligned("hugetlb RAM size", size, hps)?;
                    Some(hps)
                } else {
                    None
                };
                file.set_len(size).map_err(|source| match huge {
                    Some(huge_page_size) => Error::HugePagesUnavailable {
                        size,
                        huge_page_size,
                        source,
                    },
                    None => Error::Memfd(source),
                })?;
                let mmap = map_shared(Arc::new(file), 0, size, huge)?;
                Ok(NewMapping {
                    mmap,
                    anonymous: false,
                })
            }
            RamBacking::File { file, offset } => {
                let meta = file
                    .metadata()
                    .map_err(|source| Error::BackingFile { source })?;
                if !meta.file_type().is_file() {
                    return Err(Error::BackingNotRegularFile);
                }
                if offset % PAGE_SIZE != 0 {
                    return Err(Error::NotPageAligned {
                        what: "backing file offset",
                        value: *offset,
                    });
                }
                match offset.checked_add(size) {
                    Some(end) if end <= meta.len() => {}
                    _ => {
                        return Err(Error::BackingPastEof {
                            offset: *offset,
                            size,
                            file_size: meta.len(),
                        })
                    }
                }
                let huge =
                    hugetlbfs_page_size(file).map_err(|source| Error::BackingFile { source })?;
                if let Some(hps) = huge {
                    check_huge_aligned("hugetlbfs file offset", *offset, hps)?;
                    check_huge_aligned("hugetlbfs RAM size", size, hps)?;
                }
                let mmap = map_shared(file.clone(), *offset, size, huge)?;
                Ok(NewMapping {
                    mmap,
                    anonymous: false,
                })
            }
        }
    }
}
