//! Reading a side for the comparisons of its maps (the drift check,
//! `ctl verify`, `ctl repair`) and touching a row (`ctl retry-errors`).
//!
//! What is compared, and how, is decided above the seam (the `drift`
//! crate builds the [`Reading`] from the map and merges the two sides'
//! passes); a side only reads what a [`Reading`] names, in key order.

use std::collections::BTreeMap;
use std::future::Future;

use dualwrite_model::config::{Config, SideId};
use dualwrite_model::record::Field;

use super::SideError;

/// A record's alternate key values, as text.
pub type TextKey = Vec<String>;
/// A row's columns, each as its type's text, the form live sync carries
/// and writes (a timestamp `2026-12-04 10:00:00`, an array `{1,2}`;
/// `None`: NULL), so that a comparison applies the map's transforms and
/// scopes to what live sync does, and a repair writes values the target
/// reads.
pub type TextRow = BTreeMap<String, Option<String>>;

/// What the comparisons read of a map's table on one side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reading {
    /// `schema.table`.
    pub table: String,
    /// The alternate key's columns, in order.
    pub key: Vec<String>,
    /// The columns read (the key's first).
    pub columns: Vec<String>,
    /// When set, a pass reads a hash of these columns' text values (in
    /// this order) instead of the row: two sides hash equal values alike.
    pub hashed: Option<Vec<String>>,
}

/// What a pass read of one row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// The hash of [`Reading::hashed`]'s values.
    Hash(String),
    /// The row's [`Reading::columns`].
    Row(TextRow),
}

/// A side's reader for comparisons, on a connection of its own.
pub trait Inspect: Sized + Send + 'static {
    /// Connects to `side`, named `application` there; values read as text
    /// as the side's own clock zone would not change them (UTC).
    fn connect(
        config: &Config,
        side: SideId,
        application: &str,
    ) -> impl Future<Output = Result<Self, SideError>> + Send;

    /// Opens a read-only consistent snapshot of `reading`'s table, whose
    /// rows [`fetch`](Inspect::fetch) then gives in the byte order of their
    /// key texts (the order of [`TextKey`]'s `Ord`, the same on every side).
    fn open_pass(
        &mut self,
        reading: &Reading,
    ) -> impl Future<Output = Result<(), SideError>> + Send;

    /// The pass's next rows, at most `n`; fewer only at its end.
    fn fetch(
        &mut self,
        n: usize,
    ) -> impl Future<Output = Result<Vec<(TextKey, Payload)>, SideError>> + Send;

    /// Ends the pass (its snapshot).
    fn close_pass(&mut self) -> impl Future<Output = Result<(), SideError>> + Send;

    /// The rows of `keys` as they are now (their [`Reading::columns`]);
    /// keys without a row are left out.
    fn read_rows(
        &mut self,
        reading: &Reading,
        keys: &[TextKey],
    ) -> impl Future<Output = Result<BTreeMap<TextKey, TextRow>, SideError>> + Send;

    /// The side's change stream position now: a write committed after the
    /// call is at a later position.
    fn position(&mut self) -> impl Future<Output = Result<u64, SideError>> + Send;

    /// A no-op update of the row of `entity` (`schema.table`) whose key
    /// is `key` (each value read by its column type), made as a write of
    /// the side itself, so its change source captures it with the row's
    /// current values; `false` when no row has the key.
    fn touch(
        &mut self,
        entity: &str,
        key: &[Field],
    ) -> impl Future<Output = Result<bool, SideError>> + Send;
}
