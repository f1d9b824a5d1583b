//! `ctl retry-errors` for changes the capturer could not publish because
//! their record was larger than `kafka.max_record_bytes`
//! (`record_too_large`, service `capture`): no record was produced, so
//! there is nothing to send again, but the error names the side, the
//! entity and the alternate key.
//!
//! The row is brought back by **touching** it on its side: a no-op
//! `UPDATE` of its key columns (`SET k = k`), in a session with no
//! replication origin, so the capturer captures it as a write of the side
//! like any other, with the row's current values, at a real position in
//! the side's WAL and in commit order with the side's other writes. The
//! resolver then decides it by its usual rule (last write, or the
//! conflict master's values if the other side changed the record
//! meanwhile). A record made up from a read of the row instead would need
//! a source position: the lost change's would be older than the values
//! read, and any other would not be in the WAL, so the resolver could not
//! place it among the side's writes. If the row is still too large, the
//! touch is recorded again as `record_too_large`; if it was deleted
//! since, its delete was captured and there is nothing to bring back.
//!
//! A touch fires the table's `UPDATE` triggers (e.g. one stamping a
//! modification time). The values of columns an update leaves unchanged
//! and stored out of line (TOASTed) come from the old row, which needs
//! `REPLICA IDENTITY FULL`, as for any update.

use std::collections::BTreeSet;
use std::io::Write;

use dualwrite_model::config::{Config, SideId};
use dualwrite_model::record::{ErrorRecord, Field};
use dualwrite_runtime::side::Inspect;

/// A row to touch.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Touch {
    pub side: SideId,
    /// `schema.table`.
    pub entity: String,
    /// The alternate key values, in the entity's key order.
    pub key: Vec<String>,
}

/// The row behind a capture error too large to publish: `None` for any
/// other error, an error when the record does not name a captured row.
pub fn touch_of(config: &Config, e: &ErrorRecord) -> Option<Result<Touch, String>> {
    if e.service != "capture" || e.error_class != "record_too_large" {
        return None;
    }
    Some(parse(config, e))
}

fn parse(config: &Config, e: &ErrorRecord) -> Result<Touch, String> {
    let side = e
        .source_side
        .as_deref()
        .and_then(|s| config.side_id(s))
        .ok_or_else(|| {
            format!(
                "side `{}` is not configured",
                e.source_side.as_deref().unwrap_or("")
            )
        })?;
    let key: Vec<Option<String>> = serde_json::from_str(e.key.as_deref().unwrap_or(""))
        .map_err(|_| "the record carries no key".to_owned())?;
    let (entity, values) = key.split_first().ok_or("the record carries no key")?;
    let entity = entity.clone().unwrap_or_default();
    let names = config
        .captured_entities(side)
        .remove(&entity)
        .ok_or_else(|| {
            format!(
                "{entity} is not captured on side {}",
                config.side(side).name
            )
        })?;
    let key: Vec<String> = values
        .iter()
        .cloned()
        .collect::<Option<_>>()
        .ok_or("a key value is NULL")?;
    if key.len() != names.len() {
        return Err(format!(
            "{} key values for {entity}, whose key has {}",
            key.len(),
            names.len()
        ));
    }
    Ok(Touch { side, entity, key })
}

/// What the touches did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Touched {
    pub touched: usize,
    /// Rows no longer on their side (their delete was captured).
    pub gone: Vec<String>,
}

/// Touches each row once, on its side.
pub async fn touch_rows<I: Inspect>(
    config: &Config,
    rows: &BTreeSet<Touch>,
) -> Result<Touched, String> {
    let mut done = Touched::default();
    for side in [SideId::Left, SideId::Right] {
        let mine: Vec<&Touch> = rows.iter().filter(|t| t.side == side).collect();
        if mine.is_empty() {
            continue;
        }
        let name = &config.side(side).name;
        let mut inspect = I::connect(config, side, "dualwrite-ctl")
            .await
            .map_err(|e| e.message)?;
        for t in mine {
            let names = config
                .captured_entities(side)
                .remove(&t.entity)
                .unwrap_or_default();
            let key: Vec<Field> = names
                .iter()
                .zip(&t.key)
                .map(|(n, v)| Field::new(n, Some(v)))
                .collect();
            let there = inspect
                .touch(&t.entity, &key)
                .await
                .map_err(|e| format!("side {name}: {:?}: {}", t.key, e.message))?;
            if there {
                done.touched += 1;
            } else {
                done.gone.push(format!("{name}: {} {:?}", t.entity, t.key));
            }
        }
    }
    Ok(done)
}

/// Touches the rows (`ctl retry-errors`) and says what it did; returns
/// how many were touched.
pub async fn retry<I: Inspect>(
    config: &Config,
    rows: &BTreeSet<Touch>,
    out: &mut impl Write,
) -> Result<usize, crate::CtlError> {
    if rows.is_empty() {
        return Ok(0);
    }
    let done = touch_rows::<I>(config, rows)
        .await
        .map_err(crate::CtlError::Usage)?;
    writeln!(
        out,
        "touched {} row(s) whose change was too large to capture: captured again with their current values \
         (a row still too large is recorded again); {} no longer there",
        done.touched,
        done.gone.len()
    )?;
    for g in &done.gone {
        writeln!(out, "  gone (its delete was captured): {g}")?;
    }
    Ok(done.touched)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dualwrite_model::config::DEMO_CONFIG;

    fn error(service: &str, class: &str, side: &str, key: &str) -> ErrorRecord {
        let mut e = ErrorRecord::new(service, class, "m", 0);
        e.source_side = Some(side.to_owned());
        e.key = Some(key.to_owned());
        e
    }

    #[test]
    fn a_too_large_capture_record_names_its_row() {
        let c = Config::parse(DEMO_CONFIG).unwrap();
        let e = error(
            "capture",
            "record_too_large",
            "fno",
            r#"["public.customers_v3","C1"]"#,
        );
        assert_eq!(
            touch_of(&c, &e),
            Some(Ok(Touch {
                side: SideId::Left,
                entity: "public.customers_v3".into(),
                key: vec!["C1".into()],
            }))
        );
        for (service, class) in [("router", "record_too_large"), ("capture", "encode")] {
            assert_eq!(touch_of(&c, &error(service, class, "fno", "[]")), None);
        }
        for (side, key, why) in [
            ("nope", r#"["public.customers_v3","C1"]"#, "not configured"),
            ("fno", r#"["public.accounts","C1"]"#, "not captured"),
            ("fno", r#"["public.customers_v3",null]"#, "NULL"),
            (
                "fno",
                r#"["public.customers_v3","C1","x"]"#,
                "whose key has 1",
            ),
            ("fno", "C1", "no key"),
        ] {
            let got = touch_of(&c, &error("capture", "record_too_large", side, key));
            assert!(
                matches!(&got, Some(Err(m)) if m.contains(why)),
                "{key}: {got:?}"
            );
        }
    }
}
