// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The small identities every module names: [`RamBlockId`], [`RegionId`], [`DirtyClient`] and
//! [`DirtyClients`]. They depend on nothing of the crate, so the error type and the modules that
//! use them import one way.

/// Identifies a RAM block inside one [`crate::MemorySystem`].
///
/// # Examples
///
/// ```
/// use clearlog_memory::MemorySystem;
///
/// let mem = MemorySystem::with_ram_capacity(1 << 24);
/// mem.add_ram("ram", 0, 0x10000).unwrap();
/// let id = mem.ram_blocks()[0].id();
/// assert_eq!(mem.ram_block(id).unwrap().name(), "ram");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RamBlockId(u32);

impl RamBlockId {
    pub(crate) const fn new(id: u32) -> Self {
        RamBlockId(id)
    }

    /// The id as a number (for logs and tools; ids are not reused within a memory system).
    ///
    /// # Examples
    ///
    /// ```
    /// let mem = clearlog_memory::MemorySystem::with_ram_capacity(1 << 24);
    /// mem.add_ram("ram", 0, 0x10000).unwrap();
    /// assert_eq!(mem.ram_blocks()[0].id().get(), 0);
    /// ```
    pub const fn get(self) -> u32 {
        self.0
    }
}

/// Identifies a region inside one [`crate::MemorySystem`].
///
/// # Examples
///
/// ```
/// use clearlog_memory::MemorySystem;
///
/// let mem = MemorySystem::with_ram_capacity(1 << 24);
/// let a = mem.add_ram("a", 0, 0x1000).unwrap();
/// let b = mem.add_ram("b", 0x1000, 0x1000).unwrap();
/// assert_ne!(a, b);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegionId(u32);

impl RegionId {
    pub(crate) const fn new(id: u32) -> Self {
        RegionId(id)
    }

    /// The id as a number (for logs and tools).
    ///
    /// # Examples
    ///
    /// ```
    /// let mem = clearlog_memory::MemorySystem::with_ram_capacity(1 << 24);
    /// assert_eq!(mem.add_ram("ram", 0, 0x10000).unwrap().get(), 0);
    /// ```
    pub const fn get(self) -> u32 {
        self.0
    }
}

/// A consumer of dirty bits. Each has one atomic bitmap over the whole RAM address space.
///
/// # Examples
///
/// ```
/// use clearlog_memory::DirtyClient;
///
/// assert_eq!(DirtyClient::ALL.len(), 4);
/// assert_eq!(DirtyClient::Vga.index(), 1);
/// assert_eq!(DirtyClient::Snapshot.index(), 3);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DirtyClient {
    /// Live migration (on while global logging is on).
    Migration = 0,
    /// A display-like client that redraws what changed.
    Vga = 1,
    /// Code-cache invalidation (modelled for completeness).
    Code = 2,
    /// Dirty epochs for snapshots: on while a [`crate::DirtyEpochs`] tracker is open, over all
    /// RAM (like Migration, never per region).
    Snapshot = 3,
}

impl DirtyClient {
    /// Every client, in index order.
    pub const ALL: [DirtyClient; 4] = [
        DirtyClient::Migration,
        DirtyClient::Vga,
        DirtyClient::Code,
        DirtyClient::Snapshot,
    ];

    /// The client's index (its bit number in [`DirtyClients`]).
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(clearlog_memory::DirtyClient::Code.index(), 2);
    /// ```
    pub const fn index(self) -> usize {
        self as usize
    }
}

/// A set of [`DirtyClient`]s as a bit mask (bit = client as u8).
///
/// # Examples
///
/// ```
/// use clearlog_memory::{DirtyClient, DirtyClients};
///
/// let set = DirtyClients::NONE.with(DirtyClient::Vga).with(DirtyClient::Migration);
/// assert!(set.contains(DirtyClient::Vga));
/// assert!(!set.contains(DirtyClient::Code));
/// assert_eq!(set.iter().collect::<Vec<_>>(), [DirtyClient::Migration, DirtyClient::Vga]);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct DirtyClients(u8);

impl DirtyClients {
    /// No client.
    pub const NONE: DirtyClients = DirtyClients(0);
    /// Every client.
    pub const ALL: DirtyClients = DirtyClients(0b1111);

    /// Does the set contain `client`?
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_memory::{DirtyClient, DirtyClients};
    /// assert!(DirtyClients::ALL.contains(DirtyClient::Code));
    /// ```
    pub const fn contains(self, client: DirtyClient) -> bool {
        self.0 & (1 << client as u8) != 0
    }

    /// The set plus `client`.
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_memory::{DirtyClient, DirtyClients};
    /// assert_eq!(DirtyClients::NONE.with(DirtyClient::Vga).bits(), 0b10);
    /// ```
    pub const fn with(self, client: DirtyClient) -> DirtyClients {
        DirtyClients(self.0 | (1 << client as u8))
    }

    /// The set minus `client`.
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_memory::{DirtyClient, DirtyClients};
    /// assert_eq!(DirtyClients::ALL.without(DirtyClient::Migration).bits(), 0b1110);
    /// ```
    pub const fn without(self, client: DirtyClient) -> DirtyClients {
        DirtyClients(self.0 & !(1 << client as u8))
    }

    /// The union of two sets.
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_memory::{DirtyClient, DirtyClients};
    /// let set = DirtyClients::from(DirtyClient::Migration).union(DirtyClient::Code.into());
    /// assert_eq!(set.bits(), 0b101);
    /// ```
    pub const fn union(self, other: DirtyClients) -> DirtyClients {
        DirtyClients(self.0 | other.0)
    }

    /// The clients of `self` that are not in `other`.
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_memory::{DirtyClient, DirtyClients};
    /// let gone = DirtyClients::ALL.minus(DirtyClient::Vga.into());
    /// assert!(!gone.contains(DirtyClient::Vga) && gone.contains(DirtyClient::Code));
    /// ```
    pub const fn minus(self, other: DirtyClients) -> DirtyClients {
        DirtyClients(self.0 & !other.0)
    }

    /// The set as a bit mask: bit [`DirtyClient::index`] for each client.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(clearlog_memory::DirtyClients::ALL.bits(), 0b1111);
    /// ```
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// The set of the bit mask `bits` (bits of no client are dropped).
    pub(crate) const fn from_bits(bits: u8) -> DirtyClients {
        DirtyClients(bits & Self::ALL.0)
    }

    /// Is the set empty (no logging)?
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(clearlog_memory::DirtyClients::NONE.is_empty());
    /// ```
    pub const fn is_empty(self) -> bool {
        self.0 & Self::ALL.0 == 0
    }

    /// The clients of the set, in index order.
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_memory::{DirtyClient, DirtyClients};
    /// assert_eq!(DirtyClients::from(DirtyClient::Code).iter().collect::<Vec<_>>(), [DirtyClient::Code]);
    /// ```
    pub fn iter(self) -> impl Iterator<Item = DirtyClient> {
        DirtyClient::ALL
            .into_iter()
            .filter(move |c| self.contains(*c))
    }
}

impl From<DirtyClient> for DirtyClients {
    fn from(client: DirtyClient) -> Self {
        DirtyClients::NONE.with(client)
    }
}
