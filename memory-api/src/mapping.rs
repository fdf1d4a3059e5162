// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! What the kernel says a host mapping is: shared or private, file or anonymous, one VMA or
//! several, registered with userfaultfd or not (`/proc/self/smaps`).
//!
//! A RAM block's populated-pages answer depends on it (see [`crate::RamBlock::populated_pages`]),
//! and vm-memory's metadata cannot be trusted for it: `MmapRegionBuilder::with_raw_mmap_pointer`
//! keeps its default flags (`MAP_PRIVATE | MAP_ANONYMOUS`) whatever the VMM really mapped, and a
//! mapping can be registered with userfaultfd after it was made. So the kernel is asked.

use std::io;
use std::ops::Range;

/// One VMA of this process, as `/proc/self/smaps` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Vma {
    /// Host addresses.
    pub(crate) range: Range<u64>,
    /// `MAP_SHARED` (`s` in the permissions) rather than private.
    pub(crate) shared: bool,
    /// Offset into the file of `range.start` (0 for anonymous memory).
    pub(crate) offset: u64,
    /// Device (major, minor) and inode of the backing file; inode 0: anonymous.
    pub(crate) dev: (u32, u32),
    pub(crate) inode: u64,
    /// Registered with userfaultfd in missing or minor mode (`um` / `ui` in `VmFlags`): a page
    /// that is not in the page tables gets its content from the handler, not zero.
    pub(crate) uffd: bool,
}

/// What a whole host range is, from its VMAs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum MappingKind {
    /// Private anonymous memory in every VMA: an empty page-table entry reads as zero.
    PrivateAnonymous,
    /// One file mapped shared, contiguously: `(dev, inode)` and the file offset of the range's
    /// first byte.
    SharedFile {
        dev: (u32, u32),
        inode: u64,
        offset: u64,
    },
    /// One file mapped private, contiguously (pages copied on write are anonymous, the others
    /// read through to the file).
    PrivateFile {
        dev: (u32, u32),
        inode: u64,
        offset: u64,
    },
    /// Registered with userfaultfd (missing or minor mode) somewhere in the range.
    Userfaultfd,
    /// Anything else: not all mapped, VMAs of different kinds, a file mapped non-contiguously.
    Other,
}

/// Parse `/proc/self/smaps` (or text in its format) into VMAs, in address order.
pub(crate) fn parse_smaps(text: &str) -> Vec<Vma> {
    let mut vmas: Vec<Vma> = Vec::new();
    for line in text.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if let Some(last) = vmas.last_mut() {
                last.uffd = flags.split_whitespace().any(|f| f == "um" || f == "ui");
            }
            continue;
        }
        if let Some(vma) = parse_header(line) {
            vmas.push(vma);
        }
    }
    vmas
}

/// A VMA header line: `start-end perms offset maj:min inode [path]`. Other smaps lines
/// (`Size:   4 kB`...) do not parse as one.
fn parse_header(line: &str) -> Option<Vma> {
    let mut fields = line.split_whitespace();
    let (start, end) = fields.next()?.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    let perms = fields.next()?;
    if perms.len() != 4 {
        return None;
    }
    let offset = u64::from_str_radix(fields.next()?, 16).ok()?;
    let (major, minor) = fields.next()?.split_once(':')?;
    let dev = (
        u32::from_str_radix(major, 16).ok()?,
        u32::from_str_radix(minor, 16).ok()?,
    );
    let inode = fields.next()?.parse().ok()?;
    Some(Vma {
        range: start..end,
        shared: perms.as_bytes()[3] == b's',
        offset,
        dev,
        inode,
        uffd: false,
    })
}

/// This process's VMAs now.
pub(crate) fn read_vmas() -> io::Result<Vec<Vma>> {
    Ok(parse_smaps(&std::fs::read_to_string("/proc/self/smaps")?))
}

/// What the host range `[start, start + len)` is, given `vmas` (sorted, as from
/// [`read_vmas`]).
pub(crate) fn classify(vmas: &[Vma], start: u64, len: u64) -> MappingKind {
    let Some(end) = start.checked_add(len) else {
        return MappingKind::Other;
    };
    let covering: Vec<&Vma> = vmas
        .iter()
        .filter(|v| v.range.start < end && v.range.end > start)
        .collect();
    // Every byte must be mapped: VMAs contiguous from `start` to `end`.
    let mut at = start;
    for v in &covering {
        if v.range.start > at {
            return MappingKind::Other;
        }
        at = at.max(v.range.end);
    }
    if covering.is_empty() || at < end {
        return MappingKind::Other;
    }
    if covering.iter().any(|v| v.uffd) {
        return MappingKind::Userfaultfd;
    }
    let first = covering[0];
    if covering.iter().all(|v| !v.shared && v.inode == 0) {
        return MappingKind::PrivateAnonymous;
    }
    if first.inode == 0 {
        return MappingKind::Other;
    }
    // One file, the same way, its offsets following the addresses.
    let same_file = covering.iter().all(|v| {
        v.shared == first.shared
            && v.inode == first.inode
            && v.dev == first.dev
            && v.offset.wrapping_sub(first.offset) == v.range.start.wrapping_sub(first.range.start)
    });
    if !same_file {
        return MappingKind::Other;
    }
    let offset = first.offset + (start - first.range.start);
    if first.shared {
        MappingKind::SharedFile {
            dev: first.dev,
            inode: first.inode,
            offset,
        }
    } else {
        MappingKind::PrivateFile {
            dev: first.dev,
            inode: first.inode,
            offset,
        }
    }
}

/// `(major, minor)` of a `stat`'s `st_dev`, as `/proc/self/maps` prints it.
pub(crate) fn dev_of(meta: &std::fs::Metadata) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let dev = meta.dev();
    (libc::major(dev), libc::minor(dev))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
7f0000000000-7f0000200000 rw-p 00000000 00:00 0 
Size:               2048 kB
VmFlags: rd wr mr mw me ac sd 
7f0000200000-7f0000400000 rw-p 00000000 00:00 0                          [anon:guest]
Size:               2048 kB
VmFlags: rd wr mr mw me ac sd hg 
7f0000400000-7f0000600000 rw-s 00000000 00:01 4242                       /memfd:ram (deleted)
VmFlags: rd wr sh mr mw me ms sd 
7f0000600000-7f0000800000 rw-s 00200000 00:01 4242                       /memfd:ram (deleted)
VmFlags: rd wr sh mr mw me ms sd 
7f0000800000-7f0000a00000 rw-s 00000000 00:01 4243                       /memfd:other (deleted)
VmFlags: rd wr sh mr mw me ms sd 
7f0000a00000-7f0000c00000 rw-p 00000000 00:00 0 
VmFlags: rd wr mr mw me ac sd um 
7f0000e00000-7f0001000000 rw-p 00001000 fd:01 77                         /var/lib/file with spaces
VmFlags: rd wr mr mw me ac sd 
";

    const MB2: u64 = 0x20_0000;
    const BASE: u64 = 0x7f00_0000_0000;

    #[test]
    fn smaps_headers_and_flags_parse() {
        let v = parse_smaps(SMAPS);
        assert_eq!(v.len(), 7);
        assert_eq!(v[0].range, BASE..BASE + MB2);
        assert!(!v[0].shared && v[0].inode == 0 && !v[0].uffd);
        assert!(v[2].shared);
        assert_eq!((v[2].dev, v[2].inode), ((0, 1), 4242));
        assert_eq!(v[3].offset, 0x20_0000);
        assert!(v[5].uffd, "`um` marks userfaultfd missing mode");
        assert_eq!((v[6].dev, v[6].inode, v[6].offset), ((0xfd, 1), 77, 0x1000));
    }

    #[test]
    fn ranges_are_classified_from_every_vma_they_touch() {
        let v = parse_smaps(SMAPS);
        use MappingKind::*;
        // Two private anonymous VMAs (one named) are one anonymous range.
        assert_eq!(classify(&v, BASE, 2 * MB2), PrivateAnonymous);
        // One memfd in two VMAs with following offsets; a sub-range keeps its offset.
        let memfd = SharedFile {
            dev: (0, 1),
            inode: 4242,
            offset: 0x1000,
        };
        assert_eq!(
            classify(&v, BASE + 2 * MB2 + 0x1000, 2 * MB2 - 0x1000),
            memfd
        );
        // Anonymous and shared together, or two files: nothing known.
        assert_eq!(classify(&v, BASE + MB2, 2 * MB2), Other);
        assert_eq!(classify(&v, BASE + 3 * MB2, 2 * MB2), Other);
        // userfaultfd anywhere wins.
        assert_eq!(classify(&v, BASE + 5 * MB2, MB2), Userfaultfd);
        // A hole (0x7f0000c00000..0x7f0000e00000 is not mapped).
        assert_eq!(classify(&v, BASE + 5 * MB2, 3 * MB2), Other);
        assert_eq!(classify(&v, BASE + 6 * MB2, MB2), Other);
        assert_eq!(
            classify(&v, BASE + 7 * MB2, MB2),
            PrivateFile {
                dev: (0xfd, 1),
                inode: 77,
                offset: 0x1000
            }
        );
        assert_eq!(classify(&v, u64::MAX - 5, 10), Other);
        assert_eq!(classify(&v, 0, 4096), Other);
    }

    #[test]
    #[cfg_attr(miri, ignore = "reads /proc")]
    fn this_process_has_its_own_anonymous_mapping() {
        let len = 4 << 20;
        // SAFETY: a new private anonymous mapping chosen by the kernel; unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let kind = classify(&read_vmas().unwrap(), p as u64, len as u64);
        // SAFETY: the mapping made above, not used after this.
        unsafe { libc::munmap(p, len) };
        assert_eq!(kind, MappingKind::PrivateAnonymous);
    }
}
