// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! RAM from the caller: memfd blocks shared with a second mapping or the fd itself (what a
//! vhost-user backend does), the caller's file at an offset, clear errors for bad files, and
//! hugetlb memory (skipped loudly where the host has no huge pages).

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use clearlog_memory::{DirtyClient, Error, MemorySystem, RamBacking, PAGE_SIZE};
use vm_memory::{FileOffset, MmapRegion, VolatileMemory};

fn tempfile(len: u64) -> File {
    common::unlinked_tempfile("backing", len)
}

#[test]
fn memfd_block_is_shared_with_a_second_mapping_and_the_fd() {
    let mem = MemorySystem::with_ram_capacity(1 << 24);
    mem.add_ram_backed("ram", 0, 1 << 20, RamBacking::Memfd { hugetlb: false })
        .unwrap();
    let block = mem.ram_blocks()[0].clone();
    let fo = block
        .file_offset()
        .expect("a memfd block has a file")
        .clone();
    assert_eq!(fo.start(), 0);
    assert!(!block.is_hugetlbfs());

    // Another mapping of the same memfd (what a vhost-user backend makes from the fd it is sent).
    let other =
        MmapRegion::<()>::from_file(FileOffset::from_arc(fo.arc().clone(), 0), 1 << 20).unwrap();
    other.get_slice(0x3000, 5).unwrap().copy_from(b"vhost");
    let mut buf = [0u8; 5];
    block.read(0x3000, &mut buf).unwrap();
    assert_eq!(&buf, b"vhost");

    // pwrite to the fd.
    fo.file().write_all_at(b"pwrite", 0x8_0000).unwrap();
    let mut buf = [0u8; 6];
    block.read(0x8_0000, &mut buf).unwrap();
    assert_eq!(&buf, b"pwrite");

    // And the other way: RamBlock::write is seen through the fd, and tracked.
    mem.log_global_start().unwrap();
    block.write(0x5000, b"ours").unwrap();
    let mut buf = [0u8; 4];
    fo.file().read_exact_at(&mut buf, 0x5000).unwrap();
    assert_eq!(&buf, b"ours");
    assert!(mem.dirty().client(DirtyClient::Migration).test(5));
}

#[test]
fn callers_file_at_an_offset() {
    let file = Arc::new(tempfile(4 << 20));
    file.write_all_at(b"before", (1 << 20) + 0x2000).unwrap();
    let mem = MemorySystem::with_ram_capacity(1 << 24);
    let ram = mem
        .create_ram_backed(
            "ram",
            2 << 20,
            RamBacking::File {
                file: file.clone(),
                offset: 1 << 20,
            },
        )
        .unwrap();
    mem.map_region(ram, 0x1_0000_0000, 0).unwrap();
    let block = mem.ram_blocks()[0].clone();
    assert_eq!(block.file_offset().unwrap().start(), 1 << 20);
    let mut buf = [0u8; 6];
    block.read(0x2000, &mut buf).unwrap();
    assert_eq!(&buf, b"before");
    block.write_untracked(0x4000, b"after").unwrap();
    let mut buf = [0u8; 5];
    file.read_exact_at(&mut buf, (1 << 20) + 0x4000).unwrap();
    assert_eq!(&buf, b"after");
    // Exactly to the end of the file is fine.
    mem.add_ram_backed(
        "tail",
        0,
        1 << 20,
        RamBacking::File {
            file,
            offset: 3 << 20,
        },
    )
    .unwrap();
}

#[test]
fn bad_files_are_clear_errors() {
    let mem = MemorySystem::with_ram_capacity(1 << 24);
    let file = Arc::new(tempfile(1 << 20));
    let backed = |size: u64, offset: u64, file: &Arc<File>| {
        mem.add_ram_backed(
            "ram",
            0,
            size,
            RamBacking::File {
                file: file.clone(),
                offset,
            },
        )
    };

    let e = backed(2 << 20, 0, &file).unwrap_err();
    assert!(
        matches!(
            e,
            Error::BackingPastEof {
                offset: 0,
                size: 0x20_0000,
                file_size: 0x10_0000
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("past the end"), "{e}");
    assert!(matches!(
        backed(PAGE_SIZE, 1 << 20, &file),
        Err(Error::BackingPastEof { .. })
    ));
    assert!(matches!(
        backed(PAGE_SIZE, u64::MAX - 0xfff, &file),
        Err(Error::BackingPastEof { .. })
    ));
    assert!(matches!(
        backed(PAGE_SIZE, 0x800, &file),
        Err(Error::NotPageAligned { .. })
    ));

    // Not a regular file: a directory.
    let dir = Arc::new(File::open(std::env::temp_dir()).unwrap());
    let e = backed(PAGE_SIZE, 0, &dir).unwrap_err();
    assert!(matches!(e, Error::BackingNotRegularFile), "{e}");
    assert!(e.to_string().contains("not a regular file"), "{e}");

    // Opened read-only: mmap(PROT_WRITE, MAP_SHARED) is refused.
    let path = std::env::temp_dir().join(format!("clearlog-ro-{}", std::process::id()));
    std::fs::write(&path, vec![0u8; 0x10000]).unwrap();
    let ro = Arc::new(File::open(&path).unwrap());
    std::fs::remove_file(&path).unwrap();
    let e = backed(0x10000, 0, &ro).unwrap_err();
    assert!(matches!(e, Error::Mmap { .. }), "{e}");

    // Nothing was added by the failures.
    assert!(mem.ram_blocks().is_empty());
    assert!(mem.sections().is_empty());
}

#[test]
fn hugetlb_memfd_or_a_clear_error() {
    let mem = MemorySystem::with_ram_capacity(1 << 26);
    // Not a huge page multiple: refused before asking the kernel for anything.
    match mem.add_ram_backed("small", 0, 1 << 20, RamBacking::Memfd { hugetlb: true }) {
        Err(Error::NotHugePageAligned { .. } | Error::HugePagesUnavailable { .. }) => {}
        other => panic!("1 MiB of hugetlb memory: {other:?}"),
    }
    match mem.add_ram_backed("huge", 0, 4 << 20, RamBacking::Memfd { hugetlb: true }) {
        Ok(_) => {
            let block = mem.ram_blocks()[0].clone();
            assert!(block.is_hugetlbfs());
            block.write(0x20_0000, b"huge").unwrap();
            let mut buf = [0u8; 4];
            block.read(0x20_0000, &mut buf).unwrap();
            assert_eq!(&buf, b"huge");
            // The same hugetlbfs file as the caller's file: detected with fstatfs.
            let file = block.file_offset().unwrap().arc().clone();
            let other = MemorySystem::with_ram_capacity(1 << 26);
            let e = other
                .add_ram_backed(
                    "misaligned",
                    0,
                    2 << 20,
                    RamBacking::File {
                        file: file.clone(),
                        offset: 0x1000,
                    },
                )
                .unwrap_err();
            assert!(matches!(e, Error::NotHugePageAligned { .. }), "{e}");
            other
                .add_ram_backed(
                    "view",
                    0,
                    2 << 20,
                    RamBacking::File {
                        file,
                        offset: 2 << 20,
                    },
                )
                .unwrap();
            let view = other.ram_blocks()[0].clone();
            assert!(view.is_hugetlbfs());
            let mut buf = [0u8; 4];
            view.read(0, &mut buf).unwrap();
            assert_eq!(&buf, b"huge");
        }
        Err(e @ Error::HugePagesUnavailable { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("nr_hugepages"), "{msg}");
            eprintln!(
                "SKIPPED hugetlb_memfd_or_a_clear_error: this host has no free huge pages \
                 (/proc/sys/vm/nr_hugepages); the error was: {msg}"
            );
            assert!(mem.ram_blocks().is_empty());
        }
        Err(e) => panic!("hugetlb memfd: unexpected error {e}"),
    }
}
