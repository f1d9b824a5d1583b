//! A PostgreSQL side: everything dualwrite says to a PostgreSQL database.
//!
//! - [`pg`]: connections (TLS as libpq's `sslmode`), the classification of
//!   PostgreSQL's errors into the services' [`Class`]es, replication
//!   origins, table descriptions for the schema check;
//! - [`source`]: the change source, a wal2json logical replication slot
//!   streamed through [`replication`] ([`wal2json`] decodes it, [`position`]
//!   keeps what the slot may be moved to);
//! - [`target`]: the applier's compare-and-set writes, bookkeeping and
//!   reports ([`target_sql`] holds the statements);
//! - [`copy`]: the initial write's snapshot reads and guarded writes
//!   ([`copy_sql`]), the wait for the slot to pass a snapshot, and the
//!   table descriptions of the schema check;
//! - [`inspect`]: the comparisons' key-ordered passes, row reads and
//!   hashes (drift check, `ctl verify`, `ctl repair`) and the touch of a
//!   row (`ctl retry-errors`).
//!
//! [`Class`]: dualwrite_runtime::side::Class

pub mod copy;
pub mod copy_sql;
pub mod inspect;
pub mod pg;
pub mod position;
pub mod replication;
pub mod source;
pub mod target;
pub mod target_sql;
pub mod wal2json;

pub use copy::{PgCopy, PgCopyWriter};
pub use inspect::PgInspect;
pub use source::PgSource;
pub use target::PgTarget;
