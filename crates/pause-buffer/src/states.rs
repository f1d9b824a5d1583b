//! Where a map's resolver keeps its records' states: the states in use in
//! memory, at most about [`States::new`]'s `cache` of them, and every
//! state in a spill file on local disk ([`redb`]), so that the memory a
//! pause buffer needs does not grow with the records a map has seen (one
//! state per record changed since the map was run) nor with the records
//! in flight at once (a 1,000,000-row transaction puts a million in
//! flight).
//!
//! The spill file is memory by another name, not a second record of the
//! states: it is created empty at each start in a directory of its own
//! (`pause_buffer.state_dir`, the system's temporary directory by
//! default), filled from the changelog topic, and removed when the
//! resolver is dropped; a process that ends without removing it (`kill
//! -9`) leaves it to the next start, which removes it ([`sweep`]). What
//! survives a restart is the changelog, as before.
//!
//! What keeps it equivalent to keeping every state in memory: a state
//! leaves memory only when it is **clean** (its latest content was written
//! to the spill file), and the resolver writes each changed state there
//! when it saves it ([`States::spill`], with the same bytes it sends to
//! the changelog). So a state not in memory is, whole, in the spill file,
//! and reading it back ([`States::get_mut`]) gives what memory would have
//! held: the spill's bytes are the changelog's Avro record, and
//! `state_of(decode(encode_state(s))) == s` is the changelog's own round trip.
//!
//! A spill file that cannot be read or written (the disk under it full
//! or failing) ends the process with that error: a state could otherwise
//! be lost. Nothing is lost by ending: the states come back from the
//! changelog at the next start, and the events after the last save are
//! read again.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::path::Path;

use dualwrite_model::avro;
use dualwrite_model::record::ResolverState;
use dualwrite_resolve::records::state_of;
use dualwrite_resolve::KeyState;
use redb::backends::FileBackend;
use redb::{
    Database, ReadableDatabase, ReadableTableMetadata, StorageBackend, TableDefinition,
    WriteTransaction,
};
use rustix::io::Errno;
use rustix::process::{test_kill_process, Pid};

/// The spill file's one table: record key → the state's changelog record.
const TABLE: TableDefinition<&str, &[u8]> = TableDefinition::new("states");

/// The spill file's own page cache (redb's default is 1 GiB).
const FILE_CACHE: usize = 16 << 20;

/// The spill file, never synced to disk: nothing in it needs to outlive
/// the process. Its commits are redb's durable ones all the same, because
/// those free the pages a commit replaced: redb keeps a record in memory
/// of each non-durable commit (`Durability::None`) until a durable one,
/// about 40 bytes each, measured growing without bound over 300,000 of
/// them, while a durable commit without the sync costs about as much.
#[derive(Debug)]
struct Unsynced(FileBackend);

impl StorageBackend for Unsynced {
    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.0.read(offset, out)
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }

    fn sync_data(&self) -> std::io::Result<()> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.0.write(offset, data)
    }

    fn close(&self) -> std::io::Result<()> {
        self.0.close()
    }
}

/// A map resolver's states.
pub struct States {
    hot: HashMap<String, KeyState>,
    cache: usize,
    db: Database,
    /// The spill file's directory, removed with it.
    _dir: tempfile::TempDir,
}

/// The start of a spill directory's name; the process id follows.
const PREFIX: &str = "dualwrite-resolver-";

/// Removes the spill directories that processes which ended without
/// removing theirs (`kill -9`, a crash) left in `base`: those named with a
/// process id that is not running, or with `own`, which is this process
/// before it made any (in a container every start has the same id).
/// Those of running pause buffers are left alone.
fn sweep(base: &Path, own: u32) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == own || !running(pid) {
            match std::fs::remove_dir_all(e.path()) {
                Ok(()) => {
                    tracing::info!(dir = %e.path().display(), "removed a spill directory left by an earlier process")
                }
                Err(err) => {
                    tracing::warn!(dir = %e.path().display(), "cannot remove a spill directory left by an earlier process: {err}")
                }
            }
        }
    }
}

/// Whether a process with this id runs (one we may not signal runs too).
fn running(pid: u32) -> bool {
    let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
        return false;
    };
    match test_kill_process(pid) {
        Ok(()) => true,
        Err(e) => e == Errno::PERM,
    }
}

/// Ends the process on a spill file failure (see the module docs).
pub(crate) fn fatal(what: &str, e: impl std::fmt::Display) -> ! {
    tracing::error!(
        "resolver state spill file: cannot {what}: {e}; ending the process (the states are read back from the changelog at the next start)"
    );
    std::process::exit(70)
}

impl States {
    /// An empty set of states, spilling into a new file under `dir` (the
    /// system's temporary directory when `None`), keeping about `cache`
    /// states in memory.
    pub fn new(dir: Option<&Path>, cache: usize) -> std::io::Result<States> {
        let base = dir.map_or_else(std::env::temp_dir, Path::to_path_buf);
        std::fs::create_dir_all(&base)?;
        static SWEPT: std::sync::Once = std::sync::Once::new();
        SWEPT.call_once(|| sweep(&base, std::process::id()));
        let dir = tempfile::Builder::new()
            .prefix(&format!("{PREFIX}{}-", std::process::id()))
            .tempdir_in(&base)?;
        let file = std::fs::File::create_new(dir.path().join("states.redb"))?;
        let db = FileBackend::new(file)
            .and_then(|f| {
                Database::builder()
                    .set_cache_size(FILE_CACHE)
                    .create_with_backend(Unsynced(f))
            })
            .map_err(std::io::Error::other)?;
        let states = States {
            hot: HashMap::new(),
            cache: cache.max(1),
            db,
            _dir: dir,
        };
        states.write(|t| {
            t.open_table(TABLE)?;
            Ok(())
        });
        Ok(states)
    }

    /// The record's state, read back from the spill file if it is not in
    /// memory (a record never seen: the empty state).
    pub fn get_mut(&mut self, key: &str) -> &mut KeyState {
        if !self.hot.contains_key(key) {
            let s = self.read(key).unwrap_or_default();
            self.hot.insert(key.to_owned(), s);
        }
        self.hot.get_mut(key).expect("inserted above")
    }

    /// The record's state, if it has one.
    pub fn get(&self, key: &str) -> Option<Cow<'_, KeyState>> {
        match self.hot.get(key) {
            Some(s) => Some(Cow::Borrowed(s)),
            None => self.read(key).map(Cow::Owned),
        }
    }

    /// Writes states to the spill file as their changelog records (key,
    /// encoded [`ResolverState`]). Then, if `all` (the caller spilled every
    /// state it changed since its last call: every state in memory is
    /// clean) and memory holds more than the cache, lets go of the states
    /// in memory: all of them, or, when the ones just written fit in half
    /// the cache, all but those (the next events of a record, such as the
    /// reports of the writes it sent, tend to come soon after).
    pub fn spill<'a>(&mut self, records: impl Iterator<Item = (&'a str, &'a [u8])>, all: bool) {
        let evict = all && self.hot.len() > self.cache;
        let mut written = HashSet::new();
        self.write(|t| {
            let mut table = t.open_table(TABLE)?;
            for (key, bytes) in records {
                table.insert(key, bytes)?;
                if evict {
                    written.insert(key);
                }
            }
            Ok(())
        });
        if !evict {
            return;
        }
        if written.len() <= self.cache / 2 {
            self.hot.retain(|k, _| written.contains(k.as_str()));
            self.hot.shrink_to_fit();
        } else {
            self.hot = HashMap::new();
        }
    }

    /// Loads the states of a changelog: `Some` bytes is a record's state,
    /// `None` forgets it (a later record of a key wins). The memory is left
    /// empty.
    pub fn load<'a>(&mut self, records: impl Iterator<Item = (&'a str, Option<&'a [u8]>)>) {
        self.hot.clear();
        self.write(|t| {
            let mut table = t.open_table(TABLE)?;
            for (key, bytes) in records {
                match bytes {
                    Some(b) => table.insert(key, b).map(|_| ())?,
                    None => table.remove(key).map(|_| ())?,
                }
            }
            Ok(())
        });
    }

    /// Forgets every state.
    pub fn clear(&mut self) {
        self.hot = HashMap::new();
        self.write(|t| {
            t.delete_table(TABLE)?;
            t.open_table(TABLE)?;
            Ok(())
        });
    }

    /// How many records have a state in the spill file (every record's,
    /// right after a [`States::spill`]).
    pub fn spilled(&self) -> u64 {
        let read =
            || -> Result<u64, redb::Error> { Ok(self.db.begin_read()?.open_table(TABLE)?.len()?) };
        read().unwrap_or_else(|e| fatal("count the states", e))
    }

    /// How many states are in memory.
    pub fn in_memory(&self) -> usize {
        self.hot.len()
    }

    fn read(&self, key: &str) -> Option<KeyState> {
        let read = || -> Result<Option<Vec<u8>>, redb::Error> {
            let t = self.db.begin_read()?.open_table(TABLE)?;
            Ok(t.get(key)?.map(|v| v.value().to_vec()))
        };
        let bytes = read().unwrap_or_else(|e| fatal("read a state", e))?;
        match avro::decode::<ResolverState>(&bytes) {
            Ok(r) => Some(state_of(r)),
            Err(e) => fatal(&format!("decode the state of `{key}`"), e),
        }
    }

    /// Runs `f` in a write transaction and commits it (not synced to disk:
    /// see [`Unsynced`]).
    fn write(&self, f: impl FnOnce(&WriteTransaction) -> Result<(), redb::Error>) {
        let run = || -> Result<(), redb::Error> {
            let t = self.db.begin_write()?;
            f(&t)?;
            t.commit()?;
            Ok(())
        };
        run().unwrap_or_else(|e| fatal("write states", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dualwrite_model::config::SideId;
    use dualwrite_model::record::Field;
    use dualwrite_resolve::changelog::encode_state;
    use dualwrite_resolve::{apply, Event, Pos, Shape};

    /// A state with a write on its way (values in the agreed content, in
    /// what the left side holds and in the right side's pending write).
    fn state(n: i64) -> KeyState {
        let mut s = KeyState::default();
        let shape = Shape {
            one_way_into: [vec![], vec![]],
            master: SideId::Right,
        };
        let e = Event::Local {
            side: SideId::Left,
            pos: Pos { lsn: n, seq: 0 },
            present: true,
            own: vec![Field::new("k", Some(n.to_string()))],
            values: vec![Field::new("K", Some(n.to_string()))],
        };
        assert_eq!(apply(&mut s, &shape, n as u64, &e).len(), 1);
        s
    }

    fn encoded(key: &str, s: &KeyState) -> (String, Vec<u8>) {
        let bytes = encode_state("m", 1, 0, s).unwrap();
        (key.to_owned(), bytes)
    }

    #[test]
    fn states_leave_memory_once_spilled_and_come_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut states = States::new(Some(dir.path()), 2).unwrap();
        let keys: Vec<String> = (1..=5).map(|n| format!("k{n}")).collect();
        for (n, k) in keys.iter().enumerate() {
            *states.get_mut(k) = state(n as i64 + 1);
        }
        assert_eq!(states.in_memory(), 5);
        let records: Vec<_> = keys
            .iter()
            .map(|k| encoded(k, &states.get(k).unwrap()))
            .collect();
        states.spill(
            records.iter().map(|(k, b)| (k.as_str(), b.as_slice())),
            false,
        );
        assert_eq!(states.in_memory(), 5, "not all spilled: memory kept");
        states.spill(
            records.iter().map(|(k, b)| (k.as_str(), b.as_slice())),
            true,
        );
        assert_eq!(states.in_memory(), 0, "more than the cache: memory let go");
        assert_eq!(states.spilled(), 5);
        for (n, k) in keys.iter().enumerate() {
            assert_eq!(*states.get(k).unwrap(), state(n as i64 + 1));
            assert_eq!(*states.get_mut(k), state(n as i64 + 1));
        }
        assert_eq!(states.in_memory(), 5);
        assert!(states.get("never").is_none());
        assert_eq!(*states.get_mut("never"), KeyState::default());
    }

    #[test]
    fn an_eviction_keeps_the_states_just_written_when_they_fit() {
        let mut states = States::new(None, 4).unwrap();
        for n in 1..=5 {
            *states.get_mut(&format!("k{n}")) = state(n);
        }
        let records = [encoded("k4", &state(4)), encoded("k5", &state(5))];
        states.spill(
            records.iter().map(|(k, b)| (k.as_str(), b.as_slice())),
            true,
        );
        assert_eq!(states.in_memory(), 2);
        assert!(states.hot.contains_key("k4") && states.hot.contains_key("k5"));
        assert!(
            states.get("k1").is_none(),
            "never spilled, so gone: the caller must spill all"
        );
    }

    #[test]
    fn spill_directories_of_ended_processes_are_swept() {
        let base = tempfile::tempdir().unwrap();
        let own = std::process::id();
        let dead = i32::MAX as u32;
        let dirs = [
            format!("{PREFIX}{own}-a"),
            format!("{PREFIX}{dead}-b"),
            format!("{PREFIX}1-c"),
            "something-else".to_owned(),
        ];
        for d in &dirs {
            std::fs::create_dir(base.path().join(d)).unwrap();
        }
        sweep(base.path(), own);
        let left: Vec<bool> = dirs.iter().map(|d| base.path().join(d).exists()).collect();
        assert_eq!(
            left,
            [false, false, true, true],
            "own and ended swept; running and others kept"
        );
    }

    #[test]
    fn within_the_cache_states_stay_in_memory() {
        let mut states = States::new(None, 10).unwrap();
        *states.get_mut("a") = state(1);
        let (k, b) = encoded("a", &state(1));
        states.spill(std::iter::once((k.as_str(), b.as_slice())), true);
        assert_eq!(states.in_memory(), 1);
        assert_eq!(states.spilled(), 1);
    }

    #[test]
    fn a_load_keeps_each_key_s_last_record_and_clear_forgets_all() {
        let dir = tempfile::tempdir().unwrap();
        let mut states = States::new(Some(dir.path()), 10).unwrap();
        let (a, b) = (encoded("a", &state(1)), encoded("b", &state(2)));
        let records = [
            ("a", Some(a.1.as_slice())),
            ("b", Some(b.1.as_slice())),
            ("a", None),
        ];
        states.load(records.into_iter());
        assert!(states.get("a").is_none());
        assert_eq!(*states.get("b").unwrap(), state(2));
        assert_eq!(states.spilled(), 1);
        states.clear();
        assert!(states.get("b").is_none());
        assert_eq!(states.spilled(), 0);
        let files = std::fs::read_dir(dir.path()).unwrap().count();
        drop(states);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            files - 1,
            "the spill file's directory goes with it"
        );
    }
}
