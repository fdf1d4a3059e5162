// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Saved vCPU state and its versioned byte format.
//!
//! Layout of [`VcpuState::to_bytes`] (all integers little-endian):
//!
//! ```text
//! magic    8 bytes  "CLKVCPU\0"
//! version  u32      1
//! count    u32      number of sections
//! count x section:
//!   tag    u32      1 regs, 2 sregs, 3 fpu, 4 xsave, 5 xcrs, 6 msrs
//!   len    u32      byte length of data
//!   data   len bytes
//! ```
//!
//! Sections 1, 2, 3 and 5 hold the raw bytes of `kvm_regs`, `kvm_sregs`, `kvm_fpu` and
//! `kvm_xcrs` (x86-64 layout, as in `<linux/kvm.h>`); section 4 the 4096-byte legacy
//! `kvm_xsave` region; section 6 `n` entries of `u32 index, u32 0, u64 value`. Sections
//! 1-3 are mandatory, each tag appears at most once, unknown tags are an error.
//! The format is for migrating between processes on the same host type, not a stable
//! archive format.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs, kvm_xcrs};

use crate::error::{Error, Result};

/// Magic bytes at the start of a serialized state.
pub const STATE_MAGIC: [u8; 8] = *b"CLKVCPU\0";
/// Current format version.
pub const STATE_VERSION: u32 = 1;

const TAG_REGS: u32 = 1;
const TAG_SREGS: u32 = 2;
const TAG_FPU: u32 = 3;
const TAG_XSAVE: u32 = 4;
const TAG_XCRS: u32 = 5;
const TAG_MSRS: u32 = 6;

/// Marker for the kernel ABI structs serialized as raw bytes.
///
/// # Safety
///
/// Implementors are `repr(C)` plain-old-data made only of integers and arrays of integers,
/// with no implicit padding (bindgen spells every padding field out), so every byte is
/// initialized and every bit pattern is valid.
unsafe trait Pod: Copy + Default {}
// SAFETY: kvm_regs is 18 u64 fields.
unsafe impl Pod for kvm_regs {}
// SAFETY: kvm_sregs is kvm_segment/kvm_dtable (explicit padding fields) and u64 fields.
unsafe impl Pod for kvm_sregs {}
// SAFETY: kvm_fpu has explicit pad1/pad2 fields; all members are integers or arrays.
unsafe impl Pod for kvm_fpu {}
// SAFETY: kvm_xcrs is u32/u64 fields, kvm_xcr arrays (explicit reserved) and padding arrays.
unsafe impl Pod for kvm_xcrs {}

fn pod_bytes<T: Pod>(v: &T) -> &[u8] {
    // SAFETY: `T: Pod` has no uninitialized bytes; the slice covers exactly `*v` and
    // borrows it.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

fn pod_from<T: Pod>(b: &[u8], what: &str) -> Result<T> {
    if b.len() != std::mem::size_of::<T>() {
        return Err(Error::InvalidState(format!(
            "{what}: {} bytes, expected {}",
            b.len(),
            std::mem::size_of::<T>()
        )));
    }
    let mut v = T::default();
    // SAFETY: lengths are equal, the regions are distinct, and any bit pattern is a valid
    // `T: Pod`.
    unsafe {
        std::ptr::copy_nonoverlapping(b.as_ptr(), (&raw mut v).cast::<u8>(), b.len());
    }
    Ok(v)
}

/// Architectural state of one vCPU, enough to resume a ring-3 workload in another VM.
///
/// # Example
///
/// ```
/// use clearlog_test_guest::vcpu::VcpuState;
///
/// let mut s = VcpuState::default();
/// s.regs.rip = 0x8000;
/// s.msrs.push((0x10, 12345));
/// let bytes = s.to_bytes();
/// let back = VcpuState::from_bytes(&bytes).unwrap();
/// assert_eq!(back.regs.rip, 0x8000);
/// assert_eq!(back.msrs, vec![(0x10, 12345)]);
/// assert!(VcpuState::from_bytes(&bytes[..bytes.len() - 1]).is_err());
/// ```
#[derive(Clone, Default)]
pub struct VcpuState {
    /// General-purpose registers, RIP, RFLAGS.
    pub regs: kvm_regs,
    /// Segments, control registers, EFER, descriptor tables.
    pub sregs: kvm_sregs,
    /// x87/SSE state.
    pub fpu: kvm_fpu,
    /// The legacy 4 KiB XSAVE area, when the kernel supports it.
    pub xsave: Option<Box<[u32; 1024]>>,
    /// Extended control registers (XCR0), when supported.
    pub xcrs: Option<kvm_xcrs>,
    /// MSRs as `(index, value)`.
    pub msrs: Vec<(u32, u64)>,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("rsp", &format_args!("{:#x}", self.regs.rsp))
            .field("cr3", &format_args!("{:#x}", self.sregs.cr3))
            .field("xsave", &self.xsave.is_some())
            .field("xcrs", &self.xcrs.is_some())
            .field("msrs", &self.msrs)
            .finish_non_exhaustive()
    }
}

fn section(out: &mut Vec<u8>, tag: u32, data: &[u8]) {
    out.extend_from_slice(&tag.to_le_bytes());
    // Sections are at most a few KiB.
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(data);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(Error::InvalidState("truncated".into()));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

impl VcpuState {
    /// Serializes the state (see the [module documentation](self) for the layout).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8192);
        out.extend_from_slice(&STATE_MAGIC);
        out.extend_from_slice(&STATE_VERSION.to_le_bytes());
        let count = 4 + u32::from(self.xsave.is_some()) + u32::from(self.xcrs.is_some());
        out.extend_from_slice(&count.to_le_bytes());
        section(&mut out, TAG_REGS, pod_bytes(&self.regs));
        section(&mut out, TAG_SREGS, pod_bytes(&self.sregs));
        section(&mut out, TAG_FPU, pod_bytes(&self.fpu));
        if let Some(x) = &self.xsave {
            let bytes: Vec<u8> = x.iter().flat_map(|w| w.to_le_bytes()).collect();
            section(&mut out, TAG_XSAVE, &bytes);
        }
        if let Some(x) = &self.xcrs {
            section(&mut out, TAG_XCRS, pod_bytes(x));
        }
        let mut msrs = Vec::with_capacity(self.msrs.len() * 16);
        for (i, v) in &self.msrs {
            msrs.extend_from_slice(&i.to_le_bytes());
            msrs.extend_from_slice(&0u32.to_le_bytes());
            msrs.extend_from_slice(&v.to_le_bytes());
        }
        section(&mut out, TAG_MSRS, &msrs);
        out
    }

    /// Parses bytes produced by [`to_bytes`](Self::to_bytes).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader(bytes);
        if r.take(8)? != STATE_MAGIC {
            return Err(Error::InvalidState("bad magic".into()));
        }
        let version = r.u32()?;
        if version != STATE_VERSION {
            return Err(Error::InvalidState(format!(
                "unsupported version {version}"
            )));
        }
        let count = r.u32()?;
        let mut s = VcpuState::default();
        let mut seen = 0u32;
        for _ in 0..count {
            let tag = r.u32()?;
            let len = r.u32()? as usize;
            let data = r.take(len)?;
            if !(1..=6).contains(&tag) {
                return Err(Error::InvalidState(format!("unknown section {tag}")));
            }
            if seen & (1 << tag) != 0 {
                return Err(Error::InvalidState(format!("duplicate section {tag}")));
            }
            seen |= 1 << tag;
            match tag {
                TAG_REGS => s.regs = pod_from(data, "regs")?,
                TAG_SREGS => s.sregs = pod_from(data, "sregs")?,
                TAG_FPU => s.fpu = pod_from(data, "fpu")?,
                TAG_XCRS => s.xcrs = Some(pod_from(data, "xcrs")?),
                TAG_XSAVE => {
                    if len != 4096 {
                        return Err(Error::InvalidState(format!("xsave: {len} bytes")));
                    }
                    let mut region = Box::new([0u32; 1024]);
                    for (w, c) in region.iter_mut().zip(data.chunks_exact(4)) {
                        *w = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    }
                    s.xsave = Some(region);
                }
                _ => {
                    if len % 16 != 0 {
                        return Err(Error::InvalidState(format!("msrs: {len} bytes")));
                    }
                    s.msrs = data
                        .chunks_exact(16)
                        .map(|c| {
                            let mut i = [0u8; 4];
                            i.copy_from_slice(&c[..4]);
                            let mut v = [0u8; 8];
                            v.copy_from_slice(&c[8..]);
                            (u32::from_le_bytes(i), u64::from_le_bytes(v))
                        })
                        .collect();
                }
            }
        }
        let required = (1 << TAG_REGS) | (1 << TAG_SREGS) | (1 << TAG_FPU);
        if seen & required != required {
            return Err(Error::InvalidState("missing regs, sregs or fpu".into()));
        }
        if !r.0.is_empty() {
            return Err(Error::InvalidState("trailing bytes".into()));
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn struct_sizes() {
        assert_eq!(std::mem::size_of::<kvm_regs>(), 144);
        assert_eq!(std::mem::size_of::<kvm_sregs>(), 312);
        assert_eq!(std::mem::size_of::<kvm_fpu>(), 416);
        assert_eq!(std::mem::size_of::<kvm_xcrs>(), 392);
    }

    fn sample() -> VcpuState {
        let mut s = VcpuState::default();
        s.regs.rip = 0x8042;
        s.regs.r15 = u64::MAX;
        s.sregs.cr3 = 0x2000;
        s.sregs.cs.selector = 0x23;
        s.fpu.mxcsr = 0x1f80;
        let mut x = Box::new([0u32; 1024]);
        x[0] = 0x37f;
        x[1023] = 7;
        s.xsave = Some(x);
        let mut xcrs = kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        };
        xcrs.xcrs[0].value = 3;
        s.xcrs = Some(xcrs);
        s.msrs = vec![(0x10, 99), (0xc000_0100, 0x1234)];
        s
    }

    #[test]
    fn round_trip() {
        let s = sample();
        let b = s.to_bytes();
        let t = VcpuState::from_bytes(&b).unwrap();
        assert_eq!(t.to_bytes(), b);
        assert_eq!(t.regs.rip, 0x8042);
        assert_eq!(t.sregs.cs.selector, 0x23);
        assert_eq!(t.xsave.as_ref().unwrap()[1023], 7);
        assert_eq!(t.xcrs.unwrap().xcrs[0].value, 3);
        assert_eq!(t.msrs, s.msrs);
        let minimal = VcpuState::default();
        let m = VcpuState::from_bytes(&minimal.to_bytes()).unwrap();
        assert!(m.xsave.is_none() && m.xcrs.is_none() && m.msrs.is_empty());
    }

    #[test]
    fn rejects_bad_input() {
        let b = sample().to_bytes();
        let mut bad = b.clone();
        bad[0] ^= 1;
        VcpuState::from_bytes(&bad).unwrap_err();
        let mut bad = b.clone();
        bad[8] = 2; // version
        VcpuState::from_bytes(&bad).unwrap_err();
        let mut bad = b.clone();
        bad.push(0);
        VcpuState::from_bytes(&bad).unwrap_err();
        // Section count 0: regs missing.
        let mut bad = b.clone();
        bad[12..16].copy_from_slice(&0u32.to_le_bytes());
        VcpuState::from_bytes(&bad[..16]).unwrap_err();
        // Wrong regs length.
        let mut bad = b;
        bad[20..24].copy_from_slice(&143u32.to_le_bytes());
        VcpuState::from_bytes(&bad).unwrap_err();
    }

    proptest! {
        #[test]
        fn never_panics_on_garbage(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = VcpuState::from_bytes(&data);
        }

        #[test]
        fn truncation_is_an_error(cut in 0usize..5000) {
            let b = sample().to_bytes();
            let cut = cut % b.len();
            prop_assert!(VcpuState::from_bytes(&b[..cut]).is_err());
        }
    }
}
