//! End-to-end, randomized, and checked against the conflict rule: both
//! sides hammer the same 100 customers at once (updates, upserts of some
//! columns, deletes; every written value unique), and afterwards each
//! record must hold the values the rule says should have won, not merely
//! the same values on both sides.
//!
//! The rule, per record, with M the conflict master (dataverse) and N the
//! other side (fno): m and n are each side's last write of the record.
//! Without writes the record keeps its initial values; with one side's
//! writes only, that side's last write wins. With both, n wins iff N "saw"
//! m: some write of N that began after m committed found exactly m's
//! result (presence and every both-way field, in mapped terms); otherwise
//! m wins. A write whose prior state could not be read exactly (an upsert
//! or update that met a row the applier created between the test's
//! `SELECT … FOR UPDATE` and the statement) is ambiguous: a decision
//! resting on it accepts either candidate.
//!
//! Afterwards the test waits (up to 120 s) until both sides are equal, stay
//! so for 2 s and nothing is in flight, then checks every record. A service
//! that exits on its own is restarted, as the platform would, and named in
//! the summary; the `kill -9` variant kills and restarts services mid-storm.
//! Each seed prints one `storm-result` line (counted by the soak script).
//!
//! `DUALWRITE_TEST_SEED` replays one seed; otherwise each test runs a few
//! fresh seeds in turn. `DUALWRITE_STORM_STATEMENTS` (3000 per side) and
//! `DUALWRITE_STORM_SECS` (30) set the two-sided storms' size and length.
//! `scripts/soak.sh storm SECONDS` repeats them.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use support::{
    connect, group_lag, TestEnv, APPLY_DV, APPLY_FNO, CAPTURE_DV, CAPTURE_FNO, PAUSE_BUFFER, ROUTER,
};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Row, Statement};

/// The records under storm: `C0001` to `C0100`, on both sides from the demo data.
const KEYS: usize = 100;
/// At most this many keys may have an ambiguous expected outcome (beyond
/// that the run checks too little and fails).
const MAX_AMBIGUOUS_KEYS: usize = KEYS * 5 / 100;
/// How long the sides get to agree after the storm.
const CONVERGE_DEADLINE: Duration = Duration::from_secs(120);
/// How long they must then stay equal.
const STABLE_FOR: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------- sides

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Who {
    Fno,
    Dv,
}

/// One side's table; `fields` are the both-way fields, in the same (mapped)
/// order on both sides: name, phone, email, customer group, currency, on hold.
struct Side {
    who: Who,
    tag: &'static str,
    table: &'static str,
    key: &'static str,
    fields: [&'static str; 6],
}

const FNO: Side = Side {
    who: Who::Fno,
    tag: "L",
    table: "customers_v3",
    key: "customeraccount",
    fields: [
        "organizationname",
        "primaryphone",
        "primaryemail",
        "customergroupid",
        "salescurrencycode",
        "onhold",
    ],
};

const DV: Side = Side {
    who: Who::Dv,
    tag: "R",
    table: "accounts",
    key: "accountnumber",
    fields: [
        "name",
        "telephone1",
        "emailaddress1",
        "msdyn_customergroupid",
        "transactioncurrencycode",
        "creditonhold",
    ],
};

/// The fields' names in reports.
const SHORT: [&str; 6] = ["n", "p", "e", "g", "c", "h"];

impl Side {
    /// The both-way fields as text, for SELECT and RETURNING lists.
    fn columns(&self) -> String {
        let f = &self.fields;
        format!(
            "{}, {}, {}, {}, {}, {}::text",
            f[0], f[1], f[2], f[3], f[4], f[5]
        )
    }
}

fn key_name(i: usize) -> String {
    format!("C{:04}", i + 1)
}

/// A record's both-way values (mapped order), as text.
type Values = Vec<Option<String>>;
/// A record's state: `None` when absent.
type State = Option<Values>;

fn values(row: &Row) -> Values {
    (0..6).map(|i| row.get::<_, Option<String>>(i)).collect()
}

fn show(s: &State) -> String {
    match s {
        None => "absent".into(),
        Some(v) => {
            let parts: Vec<String> = v
                .iter()
                .zip(SHORT)
                .map(|(x, l)| format!("{l}={}", x.as_deref().unwrap_or("∅")))
                .collect();
            format!("[{}]", parts.join(" "))
        }
    }
}

// ---------------------------------------------------------------- plan

#[derive(Clone, Copy, Debug)]
enum Kind {
    /// UPDATE of the name and/or the phone.
    Update {
        name: bool,
        phone: bool,
    },
    /// INSERT … ON CONFLICT (key) DO UPDATE SET some of the inserted columns.
    Upsert {
        phone: bool,
        set_name: bool,
        set_phone: bool,
    },
    Delete,
}

#[derive(Clone, Copy, Debug)]
struct Stmt {
    key: usize,
    kind: Kind,
}

/// `n` statements: exactly 45% updates, 30% upserts, 25% deletes, shuffled,
/// each on a random key.
fn plan(rng: &mut StdRng, n: usize) -> Vec<Stmt> {
    let mut kinds: Vec<u8> = (0..n)
        .map(|i| match i % 20 {
            0..=8 => 0,
            9..=14 => 1,
            _ => 2,
        })
        .collect();
    kinds.shuffle(rng);
    kinds
        .into_iter()
        .map(|k| Stmt {
            key: rng.random_range(0..KEYS),
            kind: random_kind(rng, k),
        })
        .collect()
}

fn random_kind(rng: &mut StdRng, k: u8) -> Kind {
    let two = |rng: &mut StdRng| match rng.random_range(0..3) {
        0 => (true, false),
        1 => (false, true),
        _ => (true, true),
    };
    match k {
        0 => {
            let (name, phone) = two(rng);
            Kind::Update { name, phone }
        }
        1 if rng.random_bool(0.5) => {
            let (set_name, set_phone) = two(rng);
            Kind::Upsert {
                phone: true,
                set_name,
                set_phone,
            }
        }
        1 => Kind::Upsert {
            phone: false,
            set_name: true,
            set_phone: false,
        },
        _ => Kind::Delete,
    }
}

/// The statement's SQL. Parameters (all text): $1 key, $2 name, $3 phone,
/// $4 customer group, $5 currency. Returns the both-way fields and whether
/// an existing row was changed (for upserts: updated rather than inserted).
fn statement_sql(side: &Side, kind: Kind) -> String {
    let (t, k, f, cols) = (side.table, side.key, &side.fields, side.columns());
    let returning = format!("RETURNING {cols}, (xmax <> 0) AS updated");
    match kind {
        Kind::Update { name, phone } => {
            let mut set = Vec::new();
            if name {
                set.push(format!("{} = $2", f[0]));
            }
            if phone {
                set.push(format!("{} = $3", f[1]));
            }
            format!(
                "UPDATE {t} SET {} WHERE {k} = $1 {returning}",
                set.join(", ")
            )
        }
        Kind::Upsert {
            phone,
            set_name,
            set_phone,
        } => {
            let (pc, pv) = if phone {
                (format!(", {}", f[1]), ", $3")
            } else {
                (String::new(), "")
            };
            let mut set = Vec::new();
            if set_name {
                set.push(format!("{0} = EXCLUDED.{0}", f[0]));
            }
            if set_phone {
                set.push(format!("{0} = EXCLUDED.{0}", f[1]));
            }
            format!(
                "INSERT INTO {t} ({k}, {}, {}, {}{pc}) VALUES ($1, $2, $4, $5{pv}) \
                 ON CONFLICT ({k}) DO UPDATE SET {} {returning}",
                f[0],
                f[3],
                f[4],
                set.join(", ")
            )
        }
        Kind::Delete => format!("DELETE FROM {t} WHERE {k} = $1 {returning}"),
    }
}

// ---------------------------------------------------------------- writing

/// One committed statement that changed a row.
#[derive(Clone, Debug)]
struct Write {
    who: Who,
    /// Position in the side's commit order (its statement number).
    seq: usize,
    kind: Kind,
    /// Taken before BEGIN.
    begin: Instant,
    /// Taken after COMMIT returned.
    committed: Instant,
    /// The row before, read under lock; `None` when it could not be known
    /// (an ambiguous write).
    before: Option<State>,
    after: State,
}

impl Write {
    /// `fno#12`: the side and the statement number.
    fn label(&self) -> String {
        let side = if self.who == Who::Fno { "fno" } else { "dv" };
        format!("{side}#{}", self.seq)
    }
}

/// What a writer did.
#[derive(Default)]
struct SideLog {
    /// Per key, the side's writes in commit order.
    writes: BTreeMap<usize, Vec<Write>>,
    statements: usize,
    deletes: usize,
    /// Statements that changed nothing (update or delete of an absent row).
    noops: usize,
    retries: usize,
}

impl SideLog {
    /// The key's writes, in commit order.
    fn of(&self, key: usize) -> &[Write] {
        self.writes.get(&key).map_or(&[], Vec::as_slice)
    }

    fn write_count(&self) -> usize {
        self.writes.values().map(Vec::len).sum()
    }

    fn ambiguous_count(&self) -> usize {
        self.writes
            .values()
            .flatten()
            .filter(|w| w.before.is_none())
            .count()
    }
}

/// Prepared statements of one writer's connection, by SQL.
struct Prepared {
    select: Statement,
    by_sql: HashMap<String, Statement>,
}

impl Prepared {
    async fn new(client: &Client, side: &Side) -> Prepared {
        let sql = format!(
            "SELECT {} FROM {} WHERE {} = $1 FOR UPDATE",
            side.columns(),
            side.table,
            side.key
        );
        Prepared {
            select: client.prepare_typed(&sql, &[Type::TEXT]).await.unwrap(),
            by_sql: HashMap::new(),
        }
    }

    async fn get(&mut self, client: &Client, sql: String) -> Statement {
        if let Some(s) = self.by_sql.get(&sql) {
            return s.clone();
        }
        let s = client
            .prepare_typed(&sql, &[Type::TEXT; 5])
            .await
            .unwrap_or_else(|e| panic!("prepare {sql}: {e}"));
        self.by_sql.insert(sql, s.clone());
        s
    }
}

/// A statement's run: (row before, under lock; row returned; begin; commit).
type Run = (State, Option<Row>, Instant, Instant);

/// `BEGIN; SELECT … FOR UPDATE; <statement> RETURNING …; COMMIT`.
async fn run_once(
    client: &mut Client,
    select: &Statement,
    stmt: &Statement,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Run, tokio_postgres::Error> {
    let begin = Instant::now();
    let tx = client.transaction().await?;
    let pre = tx.query_opt(select, &params[..1]).await?;
    let row = tx.query_opt(stmt, params).await?;
    tx.commit().await?;
    let pre = pre.as_ref().map(values);
    Ok((pre, row, begin, Instant::now()))
}

/// Runs one statement in its own transaction, again after a deadlock or
/// serialization failure; returns the write it made, if it changed a row.
async fn execute(
    client: &mut Client,
    prepared: &mut Prepared,
    side: &Side,
    stmt: Stmt,
    seq: usize,
    group_currency: &(String, String),
    log: &mut SideLog,
) -> Option<Write> {
    let sql = statement_sql(side, stmt.kind);
    let st = prepared.get(client, sql.clone()).await;
    let key = key_name(stmt.key);
    let name = format!("{}-n-{seq}", side.tag);
    let phone = format!("{}-p-{seq}", side.tag);
    let params: [&(dyn ToSql + Sync); 5] =
        [&key, &name, &phone, &group_currency.0, &group_currency.1];
    loop {
        match run_once(client, &prepared.select, &st, &params).await {
            Ok((pre, row, begin, committed)) => {
                let w = Write {
                    who: side.who,
                    seq,
                    kind: stmt.kind,
                    begin,
                    committed,
                    before: None,
                    after: None,
                };
                return classify(w, pre, row.as_ref(), &sql);
            }
            Err(e)
                if e.code() == Some(&SqlState::T_R_DEADLOCK_DETECTED)
                    || e.code() == Some(&SqlState::T_R_SERIALIZATION_FAILURE) =>
            {
                log.retries += 1;
            }
            Err(e) => panic!("{sql} ({key}): {e}"),
        }
    }
}

/// Fills in a write's before and after states from what the transaction
/// saw, checking the bookkeeping's own assumptions on the way.
fn classify(mut w: Write, pre: State, row: Option<&Row>, sql: &str) -> Option<Write> {
    let Some(row) = row else {
        // No row changed: only possible when the SELECT found none (it was locked).
        assert!(pre.is_none(), "{sql}: a locked row vanished");
        return None;
    };
    let updated: bool = row.get(6);
    let returned = Some(values(row));
    w.after = match w.kind {
        Kind::Delete => {
            assert!(
                pre.is_none() || pre == returned,
                "{sql}: deleted another row"
            );
            None
        }
        _ => returned,
    };
    w.before = match (&pre, w.kind) {
        (Some(_), Kind::Upsert { .. }) => {
            assert!(updated, "{sql}: inserted over a locked row");
            Some(pre)
        }
        (Some(_), _) => Some(pre),
        // The SELECT found nothing, the statement met a row created meanwhile.
        (None, Kind::Upsert { .. }) if !updated => Some(None),
        (None, _) => None,
    };
    Some(w)
}

/// A writer's schedule: statement `i` at `start + i * period` (or at once when late).
struct Pace {
    start: tokio::time::Instant,
    period: Duration,
}

/// One side's writer: runs the plan at its pace, one connection, one
/// transaction per statement.
async fn writer(
    mut client: Client,
    side: &'static Side,
    plan: Vec<Stmt>,
    originals: Arc<Vec<(String, String)>>,
    pace: Pace,
) -> SideLog {
    let mut prepared = Prepared::new(&client, side).await;
    let mut log = SideLog::default();
    for (seq, stmt) in plan.into_iter().enumerate() {
        tokio::time::sleep_until(pace.start + pace.period * seq as u32).await;
        let gc = &originals[stmt.key];
        let write = execute(&mut client, &mut prepared, side, stmt, seq, gc, &mut log).await;
        log.statements += 1;
        if matches!(stmt.kind, Kind::Delete) {
            log.deletes += 1;
        }
        match write {
            Some(w) => log.writes.entry(stmt.key).or_default().push(w),
            None => log.noops += 1,
        }
    }
    log
}

// ---------------------------------------------------------------- oracle

#[derive(Clone, Debug, PartialEq)]
enum Expected {
    Exact(State),
    /// The decision rests on an ambiguous write: either candidate is right.
    Either(State, State),
}

impl Expected {
    fn accepts(&self, s: &State) -> bool {
        match self {
            Expected::Exact(e) => e == s,
            Expected::Either(a, b) => a == s || b == s,
        }
    }

    /// Whether the record should exist (`None` when the candidates disagree).
    fn presence(&self) -> Option<bool> {
        match self {
            Expected::Exact(e) => Some(e.is_some()),
            Expected::Either(a, b) => (a.is_some() == b.is_some()).then_some(a.is_some()),
        }
    }

    fn show(&self) -> String {
        match self {
            Expected::Exact(e) => show(e),
            Expected::Either(a, b) => format!("{} or {}", show(a), show(b)),
        }
    }
}

/// Which branch of the rule decided a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Decision {
    Untouched,
    MasterOnly,
    FnoOnly,
    /// Both wrote; fno wrote on top of dataverse's last write: fno's last wins.
    FnoSawMaster,
    /// Both wrote; dataverse wrote on top of fno's last write (no conflict).
    MasterSawFno,
    /// Both wrote, neither on top of the other's last write: a conflict,
    /// the master wins.
    Conflict,
    /// Rests on an ambiguous write: either candidate.
    Unsure,
    /// The master's last write deleted the record and the other side's
    /// last write started from no row: its row may have been gone by its
    /// own delete (then the master's delete was concurrent with it) or by
    /// the master's (then it came after); absence carries no identity, so
    /// either candidate.
    AfterDeletes,
}

/// Whether one of `writes` that began after `since` found exactly `state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Saw {
    Yes,
    No,
    /// None did, but one of them could have (an ambiguous write).
    Unsure,
    /// `state` is "no row", and one of them found no row: maybe this one.
    NoRow,
}

fn saw(writes: &[Write], state: &State, since: Instant) -> Saw {
    let mut unsure = false;
    for w in writes.iter().filter(|w| w.begin > since) {
        match &w.before {
            Some(None) if state.is_none() => return Saw::NoRow,
            Some(before) if before == state => return Saw::Yes,
            Some(_) => {}
            None => unsure = true,
        }
    }
    if unsure {
        Saw::Unsure
    } else {
        Saw::No
    }
}

/// The rule (see the top of the file), for one key: `m` are the master's
/// writes (dataverse), `n` the other side's, each in commit order.
fn expected(initial: &State, m: &[Write], n: &[Write]) -> (Expected, Decision) {
    let exact = |s: &State, d| (Expected::Exact(s.clone()), d);
    let (last_m, last_n) = match (m.last(), n.last()) {
        (None, None) => return exact(initial, Decision::Untouched),
        (Some(m), None) => return exact(&m.after, Decision::MasterOnly),
        (None, Some(n)) => return exact(&n.after, Decision::FnoOnly),
        (Some(m), Some(n)) => (m, n),
    };
    let either = |d| {
        let e = Expected::Either(last_m.after.clone(), last_n.after.clone());
        (e, d)
    };
    match saw(n, &last_m.after, last_m.committed) {
        Saw::Yes => exact(&last_n.after, Decision::FnoSawMaster),
        Saw::Unsure => either(Decision::Unsure),
        Saw::NoRow => either(Decision::AfterDeletes),
        // Only to tell conflicts apart in the counts: both cases expect m.
        Saw::No => match saw(m, &last_n.after, last_n.committed) {
            Saw::Yes => exact(&last_m.after, Decision::MasterSawFno),
            _ => exact(&last_m.after, Decision::Conflict),
        },
    }
}

// ---------------------------------------------------------------- reading

/// Every storm key's state on one side.
async fn read_side(client: &Client, side: &Side) -> Vec<State> {
    let keys: Vec<String> = (0..KEYS).map(key_name).collect();
    let sql = format!(
        "SELECT {}, {} FROM {} WHERE {} = ANY($1)",
        side.columns(),
        side.key,
        side.table,
        side.key
    );
    let mut by_key: HashMap<String, Values> = client
        .query(sql.as_str(), &[&keys])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, String>(6), values(r)))
        .collect();
    keys.iter().map(|k| by_key.remove(k)).collect()
}

type Snapshot = (Vec<State>, Vec<State>);

async fn snapshot(fno: &Client, dv: &Client) -> Snapshot {
    (read_side(fno, &FNO).await, read_side(dv, &DV).await)
}

/// Records the customers map's path has not committed yet (router, gate, appliers).
fn in_flight(env: &TestEnv) -> i64 {
    let p = &env.prefix;
    let mut pairs = vec![(
        format!("{p}.pause-buffer.customers"),
        format!("{p}.map.customers"),
    )];
    for side in ["fno", "dataverse"] {
        pairs.push((format!("{p}.router"), format!("{p}.capture.{side}")));
        pairs.push((format!("{p}.apply.{side}"), format!("{p}.apply.{side}")));
    }
    pairs.iter().map(|(g, t)| group_lag(env, g, t)).sum()
}

/// Polls until both sides are equal on every key, stay so for
/// [`STABLE_FOR`] and nothing is in flight, or the deadline passes.
/// Returns the last snapshot, whether it converged, and the time waited.
/// Restarts, as the platform would, a service that exits meanwhile.
async fn converge(env: &mut TestEnv, exits: &mut Vec<String>) -> (Snapshot, bool, Duration) {
    let (fno, dv) = (env.fno().await, env.dv().await);
    let start = Instant::now();
    let mut equal_since: Option<(Instant, Snapshot)> = None;
    loop {
        revive(env, &[], exits);
        let snap = snapshot(&fno, &dv).await;
        let equal = snap.0 == snap.1;
        match &equal_since {
            Some((since, prev)) if equal && *prev == snap => {
                if since.elapsed() >= STABLE_FOR && in_flight(env) == 0 {
                    return (snap, true, start.elapsed());
                }
            }
            _ => equal_since = equal.then(|| (Instant::now(), snap.clone())),
        }
        if start.elapsed() > CONVERGE_DEADLINE {
            return (snap, false, start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

// ---------------------------------------------------------------- verdict

/// One key's outcome.
struct KeyCheck {
    key: usize,
    expected: Expected,
    decision: Decision,
    left: State,
    right: State,
}

impl KeyCheck {
    fn ok(&self) -> bool {
        self.left == self.right && self.expected.accepts(&self.left)
    }

    /// What went wrong, in a few words.
    fn problem(&self, o: &Outcome) -> &'static str {
        let last = |log: &SideLog| log.of(self.key).last().map(|w| w.after.clone());
        if self.left != self.right {
            "sides differ"
        } else if self
            .expected
            .presence()
            .is_some_and(|p| p != self.left.is_some())
        {
            "wrong presence"
        } else if [last(&o.fno), last(&o.dv)].contains(&Some(self.left.clone())) {
            "the other side's last write won"
        } else if origin(o, self.key, &self.left).is_some() {
            "an older write won"
        } else {
            "values no single write produced"
        }
    }
}

/// The write whose result `state` is (the latest such), or the initial values.
fn origin(o: &Outcome, key: usize, state: &State) -> Option<String> {
    let mut ws: Vec<&Write> = o.fno.of(key).iter().chain(o.dv.of(key)).collect();
    ws.retain(|w| w.after == *state);
    ws.sort_by_key(|w| w.committed);
    match ws.last() {
        Some(w) => Some(w.label()),
        None => (o.initial[key] == *state).then(|| "the initial values".into()),
    }
}

/// Everything a seed's run produced, for its verdict and report.
struct Outcome {
    seed: u64,
    initial: Vec<State>,
    fno: SideLog,
    dv: SideLog,
    checks: Vec<KeyCheck>,
    converged: bool,
    waited: Duration,
    storm: Duration,
    /// Services that exited on their own (and were restarted), with their last log line.
    exits: Vec<String>,
}

impl Outcome {
    fn wrong(&self) -> Vec<&KeyCheck> {
        self.checks.iter().filter(|c| !c.ok()).collect()
    }

    /// Keys whose outcome rests on an ambiguous write (not on a deleted
    /// record's absence, which is no fault of the test's bookkeeping).
    fn ambiguous_keys(&self) -> usize {
        self.checks
            .iter()
            .filter(|c| c.decision == Decision::Unsure)
            .count()
    }

    /// How many keys each branch of the rule decided.
    fn decisions(&self) -> BTreeMap<Decision, usize> {
        let mut d = BTreeMap::new();
        for c in &self.checks {
            *d.entry(c.decision).or_default() += 1;
        }
        d
    }

    fn passed(&self) -> bool {
        self.converged && self.wrong().is_empty() && self.ambiguous_keys() <= MAX_AMBIGUOUS_KEYS
    }

    fn summary(&self, test: &str) -> String {
        let pct = |l: &SideLog| 100.0 * l.deletes as f64 / l.statements.max(1) as f64;
        let mut problems: BTreeMap<&str, usize> = BTreeMap::new();
        for c in self.wrong() {
            *problems.entry(c.problem(self)).or_default() += 1;
        }
        format!(
            "storm-result test={test} seed={} verdict={} statements fno={} dataverse={} \
             writes fno={} dataverse={} no-ops fno={} dataverse={} deletes% fno={:.1} dataverse={:.1} storm={:.1}s \
             ambiguous keys={} (writes fno={} dataverse={}) retries={} rule {:?} \
             services restarted after exiting on their own={} converged={} wait={:.1}s \
             wrong keys={} {problems:?}",
            self.seed,
            if self.passed() { "ok" } else { "FAIL" },
            self.fno.statements,
            self.dv.statements,
            self.fno.write_count(),
            self.dv.write_count(),
            self.fno.noops,
            self.dv.noops,
            pct(&self.fno),
            pct(&self.dv),
            self.storm.as_secs_f64(),
            self.ambiguous_keys(),
            self.fno.ambiguous_count(),
            self.dv.ambiguous_count(),
            self.fno.retries + self.dv.retries,
            self.decisions(),
            self.exits.len(),
            self.converged,
            self.waited.as_secs_f64(),
            self.wrong().len(),
        )
    }
}

fn show_write(w: &Write, t0: Instant) -> String {
    let ms = |t: Instant| t.saturating_duration_since(t0).as_millis();
    let before = w.before.as_ref().map_or("UNKNOWN".into(), show);
    format!(
        "      {} {:?} {}..{}ms: {before} -> {}",
        w.label(),
        w.kind,
        ms(w.begin),
        ms(w.committed),
        show(&w.after)
    )
}

/// The report of the wrong keys (the first `limit` in detail).
fn report(o: &Outcome, t0: Instant, limit: usize) -> String {
    let mut out = String::new();
    for c in o.wrong().into_iter().take(limit) {
        let from = |s: &State| origin(o, c.key, s).unwrap_or_else(|| "no single write".into());
        out += &format!(
            "  {} ({}, rule: {:?}): initial {}\n    expected {}\n    fno      {} (from {})\n    dv       {} (from {})\n",
            key_name(c.key),
            c.problem(o),
            c.decision,
            show(&o.initial[c.key]),
            c.expected.show(),
            show(&c.left),
            from(&c.left),
            show(&c.right),
            from(&c.right),
        );
        for log in [&o.fno, &o.dv] {
            let ws = log.of(c.key);
            for w in &ws[ws.len().saturating_sub(4)..] {
                out += &show_write(w, t0);
                out.push('\n');
            }
        }
    }
    out
}

/// What the pipeline did with `keys` (wrong ones), for a failure's report:
/// every event of the map topic (in its order) and every write of the
/// apply topics, a line each.
fn history(env: &TestEnv, keys: &[String]) -> String {
    let topics = ["map:customers", "apply:fno", "apply:dataverse"];
    let records: Vec<(&str, Vec<serde_json::Value>)> =
        topics.iter().map(|t| (*t, env.tail(t))).collect();
    let mut out = String::new();
    for key in keys {
        out += &format!("  history of {key}:\n");
        for (topic, rs) in &records {
            for r in rs.iter().filter(|r| names_key(r, key)) {
                out += &format!("    {topic} {}\n", brief(r));
            }
        }
    }
    out
}

/// Whether a map or apply record is about `key`.
fn names_key(r: &serde_json::Value, key: &str) -> bool {
    r["key"]
        .as_array()
        .is_some_and(|k| k.iter().any(|f| f["value"].as_str() == Some(key)))
}

/// The parts of a map or apply record that tell what happened.
fn brief(r: &serde_json::Value) -> String {
    let name = r["values"].as_array().and_then(|vs| {
        vs.iter()
            .find(|f| matches!(f["name"].as_str(), Some("name" | "organizationname")))
            .map(|f| f["value"].to_string())
    });
    let pick = |k: &str| r.get(k).map(|v| format!("{k}={v}")).unwrap_or_default();
    [
        pick("source_side"),
        pick("target_side"),
        pick("op"),
        pick("source_lsn"),
        pick("source_seq"),
        pick("version"),
        r.get("expect")
            .map(|e| format!("expect={e}"))
            .unwrap_or_default(),
        name.map(|n| format!("name={n}")).unwrap_or_default(),
    ]
    .into_iter()
    .filter(|s| !s.is_empty())
    .collect::<Vec<_>>()
    .join(" ")
}

// ---------------------------------------------------------------- a run

/// What a run does.
#[derive(Clone, Copy)]
struct Storm {
    /// Statements per writing side.
    statements: usize,
    /// Wall time the statements are spread over.
    duration: Duration,
    /// Whether dataverse writes too (fno always does).
    both_sides: bool,
    /// Whether services are killed with SIGKILL (and restarted) meanwhile.
    kills: bool,
}

/// What the setup waits for.
#[derive(Debug)]
enum Ready {
    /// Both capturers created their replication slots.
    Slots,
    /// The customers map (and so its dependencies) runs.
    Running,
}

async fn is_ready(env: &TestEnv, admin: &Client, what: &Ready) -> bool {
    match what {
        Ready::Slots => {
            let dbs = [env.fno_db.clone(), env.dv_db.clone()];
            let sql = "SELECT count(*) FROM pg_replication_slots WHERE database = ANY($1)";
            let row = admin.query_one(sql, &[&dbs.as_slice()]).await.unwrap();
            row.get::<_, i64>(0) == 2
        }
        Ready::Running => env.states().get("customers").map(String::as_str) == Some("Running"),
    }
}

/// Polls until `what` holds, reviving services that exit meanwhile;
/// panics after 90 s.
async fn supervised_until(env: &mut TestEnv, admin: &Client, exits: &mut Vec<String>, what: Ready) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !is_ready(env, admin, &what).await {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what:?}\n{}",
            env.logs_tail(30)
        );
        revive(env, &[], exits);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A fresh world with every service running and the customers map (with
/// its dependencies) Running. Services that exit on their own meanwhile
/// are restarted (and recorded in `exits`), as the platform would.
async fn started(name: &str, exits: &mut Vec<String>) -> TestEnv {
    let mut env = TestEnv::new(name).await;
    env.start_all();
    let admin = connect(&format!("{}/postgres", env.stack.pg_url)).await;
    supervised_until(&mut env, &admin, exits, Ready::Slots).await;
    env.ctl(&["run", "customers", "--include-related", "--no-wait"]);
    supervised_until(&mut env, &admin, exits, Ready::Running).await;
    env
}

/// Every service [`TestEnv::start_all`] starts.
const SERVICES: [usize; 6] = [
    CAPTURE_FNO,
    CAPTURE_DV,
    ROUTER,
    PAUSE_BUFFER,
    APPLY_FNO,
    APPLY_DV,
];

/// Restarts, as the platform would, every service that exited on its own
/// (not those in `down`, killed on purpose); records each with its log's
/// last line.
fn revive(env: &mut TestEnv, down: &[usize], exits: &mut Vec<String>) {
    for i in SERVICES.into_iter().filter(|i| !down.contains(i)) {
        let s = env.service(i);
        if !s.is_running() {
            let log = std::fs::read_to_string(&s.log).unwrap_or_default();
            exits.push(format!("{}: {}", s.name, log.lines().last().unwrap_or("")));
            s.restart();
        }
    }
}

/// A moment of the storm when services are killed, and for how long they stay down.
struct Kill {
    at: Duration,
    victims: Vec<usize>,
    down: Duration,
}

/// 3-4 kills at random moments of the storm, each of a random set of services.
fn kill_plan(rng: &mut StdRng, storm: Duration) -> Vec<Kill> {
    let ms = storm.as_millis() as u64;
    let mut plan: Vec<Kill> = (0..rng.random_range(3..=4))
        .map(|_| {
            let at = Duration::from_millis(rng.random_range(ms / 20..ms * 9 / 10));
            let mut victims: Vec<usize> = SERVICES
                .into_iter()
                .filter(|_| rng.random_bool(0.5))
                .collect();
            if victims.is_empty() {
                victims.push(SERVICES[rng.random_range(0..SERVICES.len())]);
            }
            let down = Duration::from_millis(rng.random_range(0..1500));
            Kill { at, victims, down }
        })
        .collect();
    plan.sort_by_key(|k| k.at);
    plan
}

/// The services during the storm: the kills still to come, those down now
/// (until when), and the ones that exited on their own.
struct Supervisor {
    plan: Vec<Kill>,
    down: Option<(tokio::time::Instant, Vec<usize>)>,
    exits: Vec<String>,
}

impl Supervisor {
    /// One step: restarts the killed ones when their time is up, kills the
    /// next ones when their moment came, revives any that exited.
    fn step(&mut self, env: &mut TestEnv, start: tokio::time::Instant) {
        let now = tokio::time::Instant::now();
        match self.down.take() {
            Some((until, victims)) if now >= until => {
                for &v in &victims {
                    env.service(v).restart();
                }
            }
            Some(down) => self.down = Some(down),
            None if self.plan.first().is_some_and(|k| now >= start + k.at) => {
                let k = self.plan.remove(0);
                for &v in &k.victims {
                    env.service(v).kill9();
                }
                let names: Vec<String> = k
                    .victims
                    .iter()
                    .map(|&v| env.service(v).name.clone())
                    .collect();
                println!("  kill -9 at {:?} for {:?}: {names:?}", k.at, k.down);
                self.down = Some((now + k.down, k.victims));
            }
            None => {}
        }
        let down = self.down.as_ref().map(|d| d.1.clone()).unwrap_or_default();
        revive(env, &down, &mut self.exits);
    }
}

/// The customer group and currency each key was created with (inserts reuse them).
fn originals(initial: &[State]) -> Vec<(String, String)> {
    initial
        .iter()
        .map(|s| {
            let v = s.as_ref().expect("every storm key exists at the start");
            (v[3].clone().unwrap(), v[4].clone().unwrap())
        })
        .collect()
}

/// Runs the storm on `env`, supervising the services (and killing them, if
/// asked) meanwhile; returns each side's log.
async fn storm(
    env: &mut TestEnv,
    seed: u64,
    cfg: Storm,
    initial: &[State],
    sup: &mut Supervisor,
) -> (SideLog, SideLog) {
    let originals = Arc::new(originals(initial));
    let start = tokio::time::Instant::now() + Duration::from_millis(200);
    let period = cfg.duration / cfg.statements as u32;
    let spawn = |client, side: &'static Side, salt: u64| {
        let plan = plan(&mut StdRng::seed_from_u64(seed ^ salt), cfg.statements);
        let pace = Pace { start, period };
        tokio::spawn(writer(client, side, plan, originals.clone(), pace))
    };
    let fno = spawn(env.fno().await, &FNO, 0x5bd1_e995);
    let dv = if cfg.both_sides {
        Some(spawn(env.dv().await, &DV, 0x9e37_79b9))
    } else {
        None
    };
    if cfg.kills {
        sup.plan = kill_plan(&mut StdRng::seed_from_u64(seed ^ 0x2545_f491), cfg.duration);
    }
    while !(fno.is_finished() && dv.as_ref().is_none_or(|h| h.is_finished())) || sup.down.is_some()
    {
        sup.step(env, start);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dv = match dv {
        Some(h) => h.await.unwrap(),
        None => SideLog::default(),
    };
    (fno.await.unwrap(), dv)
}

/// Each key's expected outcome beside what both sides hold.
fn check(initial: &[State], last: &Snapshot, fno: &SideLog, dv: &SideLog) -> Vec<KeyCheck> {
    (0..KEYS)
        .map(|k| {
            let (expected, decision) = expected(&initial[k], dv.of(k), fno.of(k));
            KeyCheck {
                key: k,
                expected,
                decision,
                left: last.0[k].clone(),
                right: last.1[k].clone(),
            }
        })
        .collect()
}

/// One seed, start to end, in a fresh world. Prints its summary line (and
/// the report when it failed); returns whether it passed.
async fn run_seed(test: &str, seed: u64, cfg: Storm) -> bool {
    println!("{test}: DUALWRITE_TEST_SEED={seed}");
    let mut sup = Supervisor {
        plan: Vec::new(),
        down: None,
        exits: Vec::new(),
    };
    let mut env = started(test, &mut sup.exits).await;
    let (fno, dv) = (env.fno().await, env.dv().await);
    let initial = snapshot(&fno, &dv).await;
    assert_eq!(initial.0, initial.1, "the sides differ before the storm");
    let t0 = Instant::now();
    let (fno_log, dv_log) = storm(&mut env, seed, cfg, &initial.0, &mut sup).await;
    let storm_time = t0.elapsed();
    let (last, converged, waited) = converge(&mut env, &mut sup.exits).await;
    let o = Outcome {
        seed,
        checks: check(&initial.0, &last, &fno_log, &dv_log),
        initial: initial.0,
        fno: fno_log,
        dv: dv_log,
        converged,
        waited,
        storm: storm_time,
        exits: sup.exits,
    };
    println!("{}", o.summary(test));
    for e in &o.exits {
        println!("  exited on its own (restarted): {e}");
    }
    let passed = o.passed();
    if !passed {
        println!(
            "{test} seed {seed}: {} of {KEYS} keys wrong (first 15 below), {} ambiguous (at most {MAX_AMBIGUOUS_KEYS} allowed), errors topic: {} records, exited on their own: {:#?}\n{}\n{}",
            o.wrong().len(),
            o.ambiguous_keys(),
            env.tail("errors").len(),
            o.exits,
            report(&o, t0, 15),
            env.logs_tail(15)
        );
        let keys: Vec<String> = o.wrong().iter().take(3).map(|c| key_name(c.key)).collect();
        println!("{}", history(&env, &keys));
    }
    env.cleanup().await;
    passed
}

/// The seeds to run: DUALWRITE_TEST_SEED alone, or `n` fresh ones.
fn seeds(n: usize) -> Vec<u64> {
    match std::env::var("DUALWRITE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(seed) => vec![seed],
        None => (0..n).map(|_| rand::random()).collect(),
    }
}

/// Runs every seed in turn (each in a fresh world), then fails naming the failed ones.
async fn run_seeds(test: &str, n: usize, cfg: Storm) {
    let mut failed = Vec::new();
    for seed in seeds(n) {
        let t = Instant::now();
        if !run_seed(test, seed, cfg).await {
            failed.push(seed);
        }
        println!("{test}: seed {seed} took {:.1}s", t.elapsed().as_secs_f64());
    }
    assert!(
        failed.is_empty(),
        "{test}: the records did not end as the conflict rule says for seeds {failed:?} \
         (replay one with DUALWRITE_TEST_SEED=<seed>; the report is above)"
    );
}

/// A number from the environment, or `default`.
fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Both sides write 3000 statements each (`DUALWRITE_STORM_STATEMENTS`),
/// spread over 30 s (`DUALWRITE_STORM_SECS`): 100 a second per side. (At
/// half that rate, the code of commit bf18379 got every record right in 10
/// seeds out of 10; at this rate it got some wrong in 5 out of 5.)
fn both_sides(kills: bool) -> Storm {
    Storm {
        statements: knob("DUALWRITE_STORM_STATEMENTS", 3000) as usize,
        duration: Duration::from_secs(knob("DUALWRITE_STORM_SECS", 30)),
        both_sides: true,
        kills,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_converges_to_the_rule_without_faults() {
    run_seeds("storm", 3, both_sides(false)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_converges_to_the_rule_with_kill_9() {
    run_seeds("stormkill", 2, both_sides(true)).await;
}

/// The test's own bookkeeping, without conflicts: only fno writes, so
/// every record must end with its last write (or its initial values).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_one_side_only_converges_to_the_last_write() {
    run_seeds(
        "stormone",
        1,
        Storm {
            statements: 600,
            duration: Duration::from_secs(12),
            both_sides: false,
            kills: false,
        },
    )
    .await;
}
