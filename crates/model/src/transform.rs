//! Per-field transforms: what a field mapping does to a value on its way
//! from the source side to the target side.
//!
//! Values travel in PostgreSQL's text form (`None` is SQL NULL) and the
//! target column's input function parses what a transform produces, so a
//! transform works on text: it looks a value up in a table (`value_map`),
//! replaces NULL (`default`), writes a fixed value (`constant`) or converts
//! the text form of one column type into another's (`convert`).
//!
//! For a value going from `source` to `target` (the other side):
//!
//! 1. `constant`: the constant, whatever the source holds (a constant field
//!    names the target column only and flows towards it only).
//! 2. NULL: the `default` for the target side if there is one, else NULL.
//!    Transforms never turn a non-NULL value into NULL.
//! 3. `value_map`: the entry's value (left → right: the table as written;
//!    right → left: the table inverted). A value that has no entry follows
//!    `unmapped`: `"error"` (the default: the change goes to the errors
//!    topic naming map, field and value), `"keep"` (passed on unchanged) or
//!    `{ left = "…", right = "…" }` (this value for that target side).
//! 4. `convert = { left = "<type>", right = "<type>" }`: the text is parsed
//!    as the source column's type and written as the target's (see
//!    [`convert`]); a value that does not convert exactly is an error.
//! 5. Otherwise the value is passed on unchanged.
//!
//! `value_map` and `convert` exclude each other (the map already gives the
//! target's values), and key fields take no transform (a key must
//! translate the same both ways with no table to consult).

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, FixedOffset, NaiveDate, NaiveTime, SecondsFormat, Utc};
use serde::{Deserialize, Deserializer};

use crate::side::{Direction, SideId};

/// The column types a conversion converts between.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ColumnType {
    Text,
    Integer,
    Numeric,
    Boolean,
    Date,
    Timestamptz,
    Uuid,
    Json,
}

impl ColumnType {
    pub const ALL: [ColumnType; 8] = [
        ColumnType::Text,
        ColumnType::Integer,
        ColumnType::Numeric,
        ColumnType::Boolean,
        ColumnType::Date,
        ColumnType::Timestamptz,
        ColumnType::Uuid,
        ColumnType::Json,
    ];

    /// The type a conversion names (`text`, `integer`, `numeric`, `boolean`,
    /// `date`, `timestamptz`, `uuid`, `json`, or a PostgreSQL alias of one:
    /// `bigint`, `decimal`, `bool`, `timestamp with time zone`, `jsonb`…).
    pub fn parse(name: &str) -> Option<ColumnType> {
        Some(match name.trim().to_ascii_lowercase().as_str() {
            "text" | "varchar" | "character varying" | "char" | "character" | "citext" => {
                ColumnType::Text
            }
            "integer" | "int" | "int2" | "int4" | "int8" | "smallint" | "bigint" => {
                ColumnType::Integer
            }
            "numeric" | "decimal" => ColumnType::Numeric,
            "boolean" | "bool" => ColumnType::Boolean,
            "date" => ColumnType::Date,
            "timestamptz" | "timestamp with time zone" => ColumnType::Timestamptz,
            "uuid" => ColumnType::Uuid,
            "json" | "jsonb" => ColumnType::Json,
            _ => return None,
        })
    }

    /// The type of a column as PostgreSQL formats it (`format_type`), if it
    /// is one a conversion handles.
    pub fn of_column(pg_type: &str) -> Option<ColumnType> {
        let base = pg_type.split('(').next().unwrap_or(pg_type).trim();
        Some(match base {
            "text" | "character varying" | "character" | "name" | "citext" => ColumnType::Text,
            "smallint" | "integer" | "bigint" => ColumnType::Integer,
            "numeric" | "real" | "double precision" => ColumnType::Numeric,
            "boolean" => ColumnType::Boolean,
            "date" => ColumnType::Date,
            "timestamp with time zone" => ColumnType::Timestamptz,
            "uuid" => ColumnType::Uuid,
            "json" | "jsonb" => ColumnType::Json,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ColumnType::Text => "text",
            ColumnType::Integer => "integer",
            ColumnType::Numeric => "numeric",
            ColumnType::Boolean => "boolean",
            ColumnType::Date => "date",
            ColumnType::Timestamptz => "timestamptz",
            ColumnType::Uuid => "uuid",
            ColumnType::Json => "json",
        }
    }
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether [`convert`] converts values of `from` into `to`: the same type,
/// text or json and any type, integer / numeric / boolean among
/// themselves, and date ↔ timestamptz.
pub fn conversion_supported(from: ColumnType, to: ColumnType) -> bool {
    use ColumnType::*;
    let numeric = |t| matches!(t, Integer | Numeric | Boolean);
    let time = |t| matches!(t, Date | Timestamptz);
    from == to
        || matches!(from, Text | Json)
        || matches!(to, Text | Json)
        || (numeric(from) && numeric(to))
        || (time(from) && time(to))
}

/// A value written in the configuration: a TOML string, integer, float or
/// boolean, kept as PostgreSQL text (`0`, `true`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextValue(pub String);

impl<'de> Deserialize<'de> for TextValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Scalar {
            S(String),
            I(i64),
            F(f64),
            B(bool),
        }
        Ok(TextValue(match Scalar::deserialize(d)? {
            Scalar::S(s) => s,
            Scalar::I(i) => i.to_string(),
            Scalar::F(f) => f.to_string(),
            Scalar::B(b) => b.to_string(),
        }))
    }
}

/// A value per target side: `"x"` for both, or `{ left = "x", right = "y" }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum PerSide {
    Both(TextValue),
    Sides(SideValues),
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SideValues {
    #[serde(default)]
    pub left: Option<TextValue>,
    #[serde(default)]
    pub right: Option<TextValue>,
}

impl SideValues {
    /// The value for `side`, if one is set.
    pub fn get(&self, side: SideId) -> Option<&str> {
        match side {
            SideId::Left => self.left.as_ref(),
            SideId::Right => self.right.as_ref(),
        }
        .map(|v| v.0.as_str())
    }
}

impl PerSide {
    /// The value for `side`, if one is set.
    pub fn get(&self, side: SideId) -> Option<&str> {
        match self {
            PerSide::Both(v) => Some(&v.0),
            PerSide::Sides(s) => match side {
                SideId::Left => s.left.as_ref(),
                SideId::Right => s.right.as_ref(),
            }
            .map(|v| v.0.as_str()),
        }
    }
}

/// What happens to a value a `value_map` has no entry for.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Unmapped {
    /// `"error"` or `"keep"`.
    Mode(UnmappedMode),
    /// `{ left = "…", right = "…" }`: the value written on that target side.
    Default(SideValues),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnmappedMode {
    Error,
    Keep,
}

/// `convert = { left = "<type>", right = "<type>" }`: the types of the two
/// columns, as written (checked by [`Transform::problems`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Convert {
    pub left: String,
    pub right: String,
}

impl Convert {
    pub fn get(&self, side: SideId) -> Option<ColumnType> {
        ColumnType::parse(match side {
            SideId::Left => &self.left,
            SideId::Right => &self.right,
        })
    }
}

/// The transforms of one field mapping (all optional; none: values pass unchanged).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Transform {
    /// Left value → right value.
    pub value_map: Option<BTreeMap<String, String>>,
    pub unmapped: Option<Unmapped>,
    /// Written on the target when the source value is NULL.
    pub default: Option<PerSide>,
    /// Written on the target whatever the source holds.
    pub constant: Option<String>,
    pub convert: Option<Convert>,
}

/// Why a value could not be transformed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransformFailure {
    /// The value, shortened to 100 characters.
    pub value: String,
    pub reason: String,
}

impl fmt::Display for TransformFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "value `{}` {}", self.value, self.reason)
    }
}

/// `message` with every row value shown as ``value `…` `` (the form a
/// [`TransformFailure`] takes) replaced by ``value `…` ``: for logs and
/// records that must not carry row values.
pub fn redact_values(message: &str) -> String {
    const MARK: &str = "value `";
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find(MARK) {
        let after = &rest[at + MARK.len()..];
        // The last candidate end: a value holding a backtick is hidden
        // whole (more is hidden rather than less).
        let Some(end) = after
            .rfind("` ")
            .or_else(|| after.ends_with('`').then(|| after.len() - 1))
        else {
            break;
        };
        out.push_str(&rest[..at + MARK.len()]);
        out.push('…');
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

fn shorten(value: &str) -> String {
    if value.chars().count() <= 100 {
        value.to_owned()
    } else {
        let mut s: String = value.chars().take(100).collect();
        s.push('…');
        s
    }
}

impl Transform {
    /// True when the field passes values unchanged.
    pub fn is_identity(&self) -> bool {
        self == &Transform::default()
    }

    /// The value written to the `target` side for the source value `value`.
    pub fn apply(
        &self,
        target: SideId,
        value: Option<&str>,
    ) -> Result<Option<String>, TransformFailure> {
        if let Some(c) = &self.constant {
            return Ok(Some(c.clone()));
        }
        let Some(v) = value else {
            return Ok(self
                .default
                .as_ref()
                .and_then(|d| d.get(target))
                .map(str::to_owned));
        };
        let fail = |reason: String| TransformFailure {
            value: shorten(v),
            reason,
        };
        let source = target.other();
        if let Some(table) = &self.value_map {
            let found = match source {
                SideId::Left => table.get(v).cloned(),
                SideId::Right => table
                    .iter()
                    .find(|(_, r)| r.as_str() == v)
                    .map(|(l, _)| l.clone()),
            };
            return match (found, &self.unmapped) {
                (Some(t), _) => Ok(Some(t)),
                (None, Some(Unmapped::Mode(UnmappedMode::Keep))) => Ok(Some(v.to_owned())),
                (None, Some(Unmapped::Default(d))) => {
                    match d.get(target) {
                        Some(t) => Ok(Some(t.to_owned())),
                        None => Err(fail(format!(
                            "has no entry in value_map and `unmapped` gives no value for the {target} side"
                        ))),
                    }
                }
                (None, _) => Err(fail(format!(
                    "has no entry in value_map ({source} values: {}); add it, or set `unmapped`",
                    table_values(table, source)
                ))),
            };
        }
        if let Some(c) = &self.convert {
            let (Some(from), Some(to)) = (c.get(source), c.get(target)) else {
                return Err(fail("cannot be converted: unknown column type".to_owned()));
            };
            return convert(v, from, to).map(Some).map_err(fail);
        }
        Ok(Some(v.to_owned()))
    }

    /// Problems with this transform for a field that syncs in `direction`,
    /// as (what, message); `what` is the TOML key at fault.
    pub fn problems(&self, direction: Direction) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if self.constant.is_some()
            && (self.value_map.is_some()
                || self.convert.is_some()
                || self.default.is_some()
                || self.unmapped.is_some())
        {
            out.push((
                "constant",
                "a constant is written whatever the source holds: it takes no value_map, unmapped, default or convert".to_owned(),
            ));
        }
        if self.value_map.is_some() && self.convert.is_some() {
            out.push((
                "convert",
                "value_map already gives the target's values: use value_map or convert, not both"
                    .to_owned(),
            ));
        }
        if self.unmapped.is_some() && self.value_map.is_none() {
            out.push((
                "unmapped",
                "applies to values a value_map has no entry for: add a value_map".to_owned(),
            ));
        }
        if let Some(table) = &self.value_map {
            self.value_map_problems(table, direction, &mut out);
        }
        if let Some(PerSide::Sides(d)) = &self.default {
            if d.left.is_none() && d.right.is_none() {
                out.push((
                    "default",
                    "gives no value: set `left`, `right` or both".to_owned(),
                ));
            }
        }
        if let Some(c) = &self.convert {
            convert_problems(c, direction, &mut out);
        }
        out
    }

    fn value_map_problems(
        &self,
        table: &BTreeMap<String, String>,
        direction: Direction,
        out: &mut Vec<(&'static str, String)>,
    ) {
        if table.is_empty() {
            out.push((
                "value_map",
                "is empty: give at least one `<left value> = \"<right value>\"`".to_owned(),
            ));
        }
        // Right → left looks the table up inverted: each right value once.
        if direction.carries_from(SideId::Right) {
            let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
            for (l, r) in table {
                if let Some(prev) = seen.insert(r, l) {
                    out.push((
                        "value_map",
                        format!(
                            "right value `{r}` is mapped from both `{prev}` and `{l}`: it cannot be mapped back right to left (make the values unique, or sync the field left_to_right)"
                        ),
                    ));
                }
            }
        }
        if let Some(Unmapped::Default(d)) = &self.unmapped {
            for source in sources(direction) {
                let target = source.other();
                if d.get(target).is_none() {
                    out.push((
                        "unmapped",
                        format!("gives no value for the {target} side, which this field writes"),
                    ));
                }
            }
        }
    }
}

/// The sides a field that syncs in `direction` carries values from.
fn sources(direction: Direction) -> impl Iterator<Item = SideId> {
    [SideId::Left, SideId::Right]
        .into_iter()
        .filter(move |s| direction.carries_from(*s))
}

fn convert_problems(c: &Convert, direction: Direction, out: &mut Vec<(&'static str, String)>) {
    let mut ok = true;
    for (side, name) in [(SideId::Left, &c.left), (SideId::Right, &c.right)] {
        if ColumnType::parse(name).is_none() {
            ok = false;
            out.push((
                "convert",
                format!(
                    "{side} type `{name}` is not one of {}",
                    ColumnType::ALL.map(|t| t.as_str()).join(", ")
                ),
            ));
        }
    }
    if !ok {
        return;
    }
    for source in sources(direction) {
        if let (Some(from), Some(to)) = (c.get(source), c.get(source.other())) {
            if !conversion_supported(from, to) {
                out.push((
                    "convert",
                    format!("there is no conversion from {from} to {to}"),
                ));
            }
        }
    }
}

fn table_values(table: &BTreeMap<String, String>, side: SideId) -> String {
    let mut v: Vec<&str> = match side {
        SideId::Left => table.keys().map(String::as_str).collect(),
        SideId::Right => table.values().map(String::as_str).collect(),
    };
    v.truncate(10);
    let mut s = v.join(", ");
    if table.len() > 10 {
        s.push_str(", …");
    }
    s
}

/// A value parsed from the text form of its type.
enum Parsed {
    Text(String),
    Int(i64),
    /// Canonical decimal text, or `NaN`/`Infinity`/`-Infinity`.
    Num(String),
    Bool(bool),
    Date(NaiveDate),
    Ts(DateTime<FixedOffset>),
    Uuid(String),
    Json(serde_json::Value),
}

/// Converts `value`, the text form of a `from` value, into the text form of
/// a `to` value that means the same. Fails (with the reason) when the text
/// is not a `from` value, or when the value has no exact `to` equivalent:
/// nothing is rounded or truncated.
///
/// Canonical forms: integer `-12`; numeric without exponent or superfluous
/// zeros (`1.5`, `-0.25`); boolean `true`/`false` (from `t`, `yes`, `on`, `1`…;
/// as a number `1`/`0`); date `YYYY-MM-DD`; timestamptz RFC 3339 in UTC
/// (`2024-05-01T10:30:00.123456+00:00`, from any offset; a timestamp
/// without one is refused); uuid lowercase with hyphens; json compact with
/// sorted keys; json ↔ text: the text holds the JSON document; a JSON
/// scalar converts to the scalar types (`"2024-05-01"` → date).
pub fn convert(value: &str, from: ColumnType, to: ColumnType) -> Result<String, String> {
    use ColumnType as T;
    if !conversion_supported(from, to) {
        return Err(format!(
            "cannot be converted: there is no conversion from {from} to {to}"
        ));
    }
    let parsed = match from {
        T::Text => Parsed::Text(value.to_owned()),
        T::Integer => Parsed::Int(parse_int(value)?),
        T::Numeric => Parsed::Num(parse_numeric(value)?),
        T::Boolean => Parsed::Bool(parse_bool(value)?),
        T::Date => Parsed::Date(parse_date(value)?),
        T::Timestamptz => Parsed::Ts(parse_timestamptz(value)?),
        T::Uuid => Parsed::Uuid(parse_uuid(value)?),
        T::Json => Parsed::Json(parse_json(value)?),
    };
    render(parsed, to)
}

fn render(p: Parsed, to: ColumnType) -> Result<String, String> {
    use ColumnType as T;
    let no = |what: &str| {
        Err(format!(
            "cannot be converted: {what} has no {to} equivalent"
        ))
    };
    match (to, p) {
        // A JSON string holds the text of a scalar; other JSON scalars
        // convert as their JSON text.
        (T::Json, Parsed::Json(j)) => Ok(j.to_string()),
        (T::Text, Parsed::Json(j)) => Ok(j.to_string()),
        (_, Parsed::Json(serde_json::Value::String(s))) => render(Parsed::Text(s), to),
        (T::Integer | T::Numeric | T::Boolean, Parsed::Json(j @ serde_json::Value::Number(_)))
        | (T::Boolean, Parsed::Json(j @ serde_json::Value::Bool(_))) => {
            render(Parsed::Text(j.to_string()), to)
        }
        (_, Parsed::Json(_)) => no("this JSON value"),

        (T::Text, Parsed::Text(s)) => Ok(s),
        (T::Text, Parsed::Int(i)) => Ok(i.to_string()),
        (T::Text, Parsed::Num(n)) => Ok(n),
        (T::Text, Parsed::Bool(b)) => Ok(b.to_string()),
        (T::Text, Parsed::Date(d)) => Ok(format_date(d)),
        (T::Text, Parsed::Ts(t)) => Ok(format_timestamptz(t)),
        (T::Text, Parsed::Uuid(u)) => Ok(u),

        (T::Integer, Parsed::Text(s)) => parse_int(&s).map(|i| i.to_string()),
        (T::Integer, Parsed::Int(i)) => Ok(i.to_string()),
        (T::Integer, Parsed::Num(n)) => numeric_to_int(&n).map(|i| i.to_string()),
        (T::Integer, Parsed::Bool(b)) => Ok(if b { "1" } else { "0" }.to_owned()),

        (T::Numeric, Parsed::Text(s)) => parse_numeric(&s),
        (T::Numeric, Parsed::Int(i)) => Ok(i.to_string()),
        (T::Numeric, Parsed::Num(n)) => Ok(n),
        (T::Numeric, Parsed::Bool(b)) => Ok(if b { "1" } else { "0" }.to_owned()),

        (T::Boolean, Parsed::Text(s)) => parse_bool(&s).map(|b| b.to_string()),
        (T::Boolean, Parsed::Bool(b)) => Ok(b.to_string()),
        (T::Boolean, Parsed::Int(i)) => int_to_bool(i).map(|b| b.to_string()),
        (T::Boolean, Parsed::Num(n)) => numeric_to_int(&n)
            .and_then(int_to_bool)
            .map(|b| b.to_string()),

        (T::Date, Parsed::Text(s)) => parse_date(&s).map(format_date),
        (T::Date, Parsed::Date(d)) => Ok(format_date(d)),
        (T::Date, Parsed::Ts(t)) => {
            let utc = t.with_timezone(&Utc);
            if utc.time() != NaiveTime::MIN {
                return Err(format!(
                    "cannot be converted to a date: it has a time of day ({} in UTC); only midnight UTC converts exactly",
                    utc.time()
                ));
            }
            Ok(format_date(utc.date_naive()))
        }

        (T::Timestamptz, Parsed::Text(s)) => parse_timestamptz(&s).map(format_timestamptz),
        (T::Timestamptz, Parsed::Ts(t)) => Ok(format_timestamptz(t)),
        (T::Timestamptz, Parsed::Date(d)) => Ok(format_timestamptz(
            d.and_time(NaiveTime::MIN).and_utc().fixed_offset(),
        )),

        (T::Uuid, Parsed::Text(s)) => parse_uuid(&s),
        (T::Uuid, Parsed::Uuid(u)) => Ok(u),

        (T::Json, Parsed::Text(s)) => parse_json(&s).map(|j| j.to_string()),
        (T::Json, Parsed::Int(i)) => Ok(i.to_string()),
        (T::Json, Parsed::Num(n)) => {
            if n.chars()
                .all(|c| c.is_ascii_digit() || c == '.' || c == '-')
            {
                Ok(n)
            } else {
                no(&n)
            }
        }
        (T::Json, Parsed::Bool(b)) => Ok(b.to_string()),
        (T::Json, Parsed::Date(d)) => Ok(serde_json::Value::String(format_date(d)).to_string()),
        (T::Json, Parsed::Ts(t)) => {
            Ok(serde_json::Value::String(format_timestamptz(t)).to_string())
        }
        (T::Json, Parsed::Uuid(u)) => Ok(serde_json::Value::String(u).to_string()),

        _ => Err(format!("cannot be converted to {to}")),
    }
}

fn parse_int(s: &str) -> Result<i64, String> {
    let t = s.trim();
    t.strip_prefix('+')
        .unwrap_or(t)
        .parse::<i64>()
        .map_err(|_| {
            if !t.is_empty() && parse_numeric(t).is_ok() {
                format!(
                    "is not an integer: {}",
                    numeric_to_int(t).err().unwrap_or_default()
                )
            } else {
                "is not an integer".to_owned()
            }
        })
}

fn int_to_bool(i: i64) -> Result<bool, String> {
    match i {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(format!(
            "cannot be converted to a boolean: only 0 and 1 are (got {i})"
        )),
    }
}

/// A canonical numeric's integer value; fails on a fraction or out of i64's range.
fn numeric_to_int(n: &str) -> Result<i64, String> {
    let n = parse_numeric(n)?;
    if n.ends_with("NaN") || n.ends_with("Infinity") {
        return Err(format!(
            "is not a finite number ({n}): it has no integer value"
        ));
    }
    if n.contains('.') {
        return Err(format!(
            "has a fractional part ({n}): it is not rounded to an integer"
        ));
    }
    n.parse::<i64>()
        .map_err(|_| format!("is out of the integer range (64-bit): {n}"))
}

/// Canonical decimal text: no exponent, no leading or trailing zeros, no `+`, no `-0`.
fn parse_numeric(s: &str) -> Result<String, String> {
    let t = s.trim();
    let bad = || "is not a number".to_owned();
    match t.to_ascii_lowercase().as_str() {
        "nan" => return Ok("NaN".to_owned()),
        "infinity" | "+infinity" | "inf" | "+inf" => return Ok("Infinity".to_owned()),
        "-infinity" | "-inf" => return Ok("-Infinity".to_owned()),
        _ => {}
    }
    let (neg, rest) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (mantissa, exp) = match rest.find(['e', 'E']) {
        Some(i) => {
            let e = &rest[i + 1..];
            let e = e.strip_prefix('+').unwrap_or(e);
            let exp: i64 = e.parse().map_err(|_| bad())?;
            if exp.abs() > 1000 {
                return Err("is a number whose exponent is out of range (±1000)".to_owned());
            }
            (&rest[..i], exp)
        }
        None => (rest, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int.is_empty() && frac.is_empty()
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    let digits = format!("{int}{frac}");
    let point = int.len() as i64 + exp;
    let (mut ip, mut fp) = if point <= 0 {
        (
            String::new(),
            format!("{}{digits}", "0".repeat((-point) as usize)),
        )
    } else if point as usize >= digits.len() {
        (
            format!("{digits}{}", "0".repeat(point as usize - digits.len())),
            String::new(),
        )
    } else {
        let (a, b) = digits.split_at(point as usize);
        (a.to_owned(), b.to_owned())
    };
    ip = ip.trim_start_matches('0').to_owned();
    if ip.is_empty() {
        ip.push('0');
    }
    fp = fp.trim_end_matches('0').to_owned();
    let zero = ip == "0" && fp.is_empty();
    let mut out = String::new();
    if neg && !zero {
        out.push('-');
    }
    out.push_str(&ip);
    if !fp.is_empty() {
        out.push('.');
        out.push_str(&fp);
    }
    Ok(out)
}

/// PostgreSQL's boolean input forms.
fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "t" | "true" | "y" | "yes" | "on" | "1" => Ok(true),
        "f" | "false" | "n" | "no" | "off" | "0" => Ok(false),
        _ => Err("is not a boolean (true/false, t/f, yes/no, on/off, 1/0)".to_owned()),
    }
}

fn parse_date(s: &str) -> Result<NaiveDate, String> {
    NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d")
        .map_err(|e| format!("is not a date (YYYY-MM-DD): {e}"))
}

fn format_date(d: NaiveDate) -> String {
    d.format("%Y-%m-%d").to_string()
}

/// RFC 3339, or PostgreSQL's output (`2024-05-01 10:30:00.5+02`, `+05:30`).
fn parse_timestamptz(s: &str) -> Result<DateTime<FixedOffset>, String> {
    let t = s.trim();
    let mut norm = t.to_owned();
    if norm.len() > 10 && norm.as_bytes()[10] == b' ' {
        norm.replace_range(10..11, "T");
    }
    if let Ok(dt) = DateTime::parse_from_rfc3339(&norm) {
        return Ok(dt);
    }
    for fmt in ["%Y-%m-%dT%H:%M:%S%.f%#z", "%Y-%m-%dT%H:%M%#z"] {
        if let Ok(dt) = DateTime::parse_from_str(&norm, fmt) {
            return Ok(dt);
        }
    }
    if chrono::NaiveDateTime::parse_from_str(&norm, "%Y-%m-%dT%H:%M:%S%.f").is_ok() {
        return Err(
            "is a timestamp without a time zone offset: it names no instant (add e.g. +00:00)"
                .to_owned(),
        );
    }
    Err("is not a timestamp with time zone (e.g. 2024-05-01T10:30:00+00:00)".to_owned())
}

fn format_timestamptz(t: DateTime<FixedOffset>) -> String {
    t.with_timezone(&Utc)
        .to_rfc3339_opts(SecondsFormat::AutoSi, false)
}

/// Lowercase hyphenated form; accepts braces, `urn:uuid:`, any hyphens.
fn parse_uuid(s: &str) -> Result<String, String> {
    let t = s.trim();
    let t = t
        .strip_prefix('{')
        .and_then(|x| x.strip_suffix('}'))
        .unwrap_or(t);
    let t = t.strip_prefix("urn:uuid:").unwrap_or(t);
    let hex: String = t.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err("is not a UUID (32 hexadecimal digits)".to_owned());
    }
    let h = hex.to_ascii_lowercase();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

fn parse_json(s: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str(s).map_err(|e| format!("is not JSON: {e}"))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn row_values_are_redacted_from_messages() {
        assert_eq!(
            redact_values(
                "map `p`: field `s` → `t` on public.p: value `Ann` has no entry; set `unmapped`"
            ),
            "map `p`: field `s` → `t` on public.p: value `…` has no entry; set `unmapped`"
        );
        assert_eq!(
            redact_values("value `a` b` is not a boolean"),
            "value `…` is not a boolean"
        );
        assert_eq!(redact_values("ends with value `x`"), "ends with value `…`");
        assert_eq!(redact_values("no values here"), "no values here");
    }
    use ColumnType as T;

    fn ok(v: &str, from: T, to: T) -> String {
        convert(v, from, to).unwrap_or_else(|e| panic!("{v} {from}→{to}: {e}"))
    }
    fn err(v: &str, from: T, to: T) -> String {
        convert(v, from, to).expect_err(&format!("{v} {from}→{to} should fail"))
    }

    pub(crate) fn value_map() -> Transform {
        Transform {
            value_map: Some(
                [("Active", "0"), ("Closed", "1")]
                    .map(|(a, b)| (a.to_owned(), b.to_owned()))
                    .into(),
            ),
            ..Transform::default()
        }
    }

    #[test]
    fn value_map_both_ways_and_unmapped_error() {
        let t = value_map();
        assert_eq!(
            t.apply(SideId::Right, Some("Active")).unwrap().as_deref(),
            Some("0")
        );
        assert_eq!(
            t.apply(SideId::Left, Some("1")).unwrap().as_deref(),
            Some("Closed")
        );
        // NULL stays NULL without a default.
        assert_eq!(t.apply(SideId::Right, None).unwrap(), None);
        let e = t.apply(SideId::Right, Some("Pending")).unwrap_err();
        assert_eq!(e.value, "Pending");
        assert!(e.reason.contains("no entry in value_map"), "{e}");
        assert!(e.reason.contains("Active, Closed"), "{e}");
        let e = t.apply(SideId::Left, Some("7")).unwrap_err();
        assert!(e.reason.contains("right values: 0, 1"), "{e}");
    }

    #[test]
    fn unmapped_keep_and_default() {
        let mut t = value_map();
        t.unmapped = Some(Unmapped::Mode(UnmappedMode::Keep));
        assert_eq!(
            t.apply(SideId::Right, Some("X")).unwrap().as_deref(),
            Some("X")
        );
        t.unmapped = Some(Unmapped::Default(SideValues {
            left: None,
            right: Some(TextValue("9".into())),
        }));
        assert_eq!(
            t.apply(SideId::Right, Some("X")).unwrap().as_deref(),
            Some("9")
        );
        // No value for the left side: an error.
        let e = t.apply(SideId::Left, Some("5")).unwrap_err();
        assert!(e.reason.contains("no value for the left side"), "{e}");
        // And the configuration check says so for a both-way field.
        let p = t.problems(Direction::Both);
        assert!(
            p.iter()
                .any(|(w, m)| *w == "unmapped" && m.contains("left side")),
            "{p:?}"
        );
        assert!(t.problems(Direction::LeftToRight).is_empty());
    }

    #[test]
    fn default_replaces_null_per_side() {
        let t = Transform {
            default: Some(PerSide::Sides(SideValues {
                left: Some(TextValue("none".into())),
                right: None,
            })),
            ..Transform::default()
        };
        assert_eq!(
            t.apply(SideId::Left, None).unwrap().as_deref(),
            Some("none")
        );
        assert_eq!(t.apply(SideId::Right, None).unwrap(), None);
        assert_eq!(
            t.apply(SideId::Left, Some("x")).unwrap().as_deref(),
            Some("x")
        );
        let both = Transform {
            default: Some(PerSide::Both(TextValue("0".into()))),
            ..Transform::default()
        };
        assert_eq!(
            both.apply(SideId::Right, None).unwrap().as_deref(),
            Some("0")
        );
        let empty = Transform {
            default: Some(PerSide::Sides(SideValues {
                left: None,
                right: None,
            })),
            ..Transform::default()
        };
        assert_eq!(empty.problems(Direction::Both)[0].0, "default");
    }

    #[test]
    fn default_after_value_map_and_convert() {
        // NULL takes the default; the default is the target's value as written.
        let mut t = value_map();
        t.default = Some(PerSide::Both(TextValue("1".into())));
        assert_eq!(t.apply(SideId::Right, None).unwrap().as_deref(), Some("1"));
        assert_eq!(
            t.apply(SideId::Right, Some("Active")).unwrap().as_deref(),
            Some("0")
        );
    }

    #[test]
    fn constant_ignores_the_source() {
        let t = Transform {
            constant: Some("fno".into()),
            ..Transform::default()
        };
        assert_eq!(
            t.apply(SideId::Right, None).unwrap().as_deref(),
            Some("fno")
        );
        assert_eq!(
            t.apply(SideId::Right, Some("x")).unwrap().as_deref(),
            Some("fno")
        );
        assert!(t.problems(Direction::LeftToRight).is_empty());
        let mut bad = t.clone();
        bad.default = Some(PerSide::Both(TextValue("y".into())));
        assert_eq!(bad.problems(Direction::LeftToRight)[0].0, "constant");
    }

    #[test]
    fn value_map_must_invert_when_it_goes_right_to_left() {
        let mut t = value_map();
        t.value_map
            .as_mut()
            .unwrap()
            .insert("Open".into(), "0".into());
        let p = t.problems(Direction::Both);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].1
                .contains("right value `0` is mapped from both `Active` and `Open`"),
            "{p:?}"
        );
        assert!(t.problems(Direction::LeftToRight).is_empty());
        assert_eq!(
            t.problems(Direction::RightToLeft).len(),
            1,
            "right to left inverts the table too"
        );
    }

    #[test]
    fn problems_of_combinations_and_types() {
        let mut t = value_map();
        t.convert = Some(Convert {
            left: "text".into(),
            right: "integer".into(),
        });
        assert_eq!(t.problems(Direction::Both)[0].0, "convert");
        let t = Transform {
            convert: Some(Convert {
                left: "int".into(),
                right: "float".into(),
            }),
            ..Transform::default()
        };
        let p = t.problems(Direction::Both);
        assert!(
            p[0].1
                .contains("right type `float` is not one of text, integer"),
            "{p:?}"
        );
        let t = Transform {
            convert: Some(Convert {
                left: "uuid".into(),
                right: "integer".into(),
            }),
            ..Transform::default()
        };
        let p = t.problems(Direction::LeftToRight);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].1.contains("no conversion from uuid to integer"),
            "{p:?}"
        );
        assert_eq!(t.problems(Direction::Both).len(), 2);
        let t = Transform {
            unmapped: Some(Unmapped::Mode(UnmappedMode::Keep)),
            ..Transform::default()
        };
        assert_eq!(t.problems(Direction::Both)[0].0, "unmapped");
        let t = Transform {
            value_map: Some(BTreeMap::new()),
            ..Transform::default()
        };
        assert_eq!(t.problems(Direction::Both)[0].0, "value_map");
    }

    #[test]
    fn conversion_failure_is_named() {
        let t = Transform {
            convert: Some(Convert {
                left: "boolean".into(),
                right: "integer".into(),
            }),
            ..Transform::default()
        };
        assert_eq!(
            t.apply(SideId::Right, Some("t")).unwrap().as_deref(),
            Some("1")
        );
        assert_eq!(
            t.apply(SideId::Left, Some("0")).unwrap().as_deref(),
            Some("false")
        );
        let e = t.apply(SideId::Left, Some("2")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "value `2` cannot be converted to a boolean: only 0 and 1 are (got 2)"
        );
        let long = "x".repeat(300);
        let e = t.apply(SideId::Right, Some(&long)).unwrap_err();
        assert_eq!(e.value.chars().count(), 101);
    }

    #[test]
    fn text_conversions() {
        for ty in ColumnType::ALL {
            assert!(conversion_supported(T::Text, ty) && conversion_supported(ty, T::Text));
        }
        assert_eq!(ok(" 42 ", T::Text, T::Integer), "42");
        assert_eq!(ok("42", T::Integer, T::Text), "42");
        assert_eq!(ok("anything", T::Text, T::Text), "anything");
        assert!(err("4x", T::Text, T::Integer).contains("not an integer"));
    }

    #[test]
    fn integer_conversions() {
        assert_eq!(ok("+7", T::Integer, T::Integer), "7");
        assert_eq!(ok("-7", T::Integer, T::Numeric), "-7");
        assert_eq!(ok("1", T::Integer, T::Boolean), "true");
        assert_eq!(ok("0", T::Integer, T::Boolean), "false");
        assert_eq!(ok("12", T::Integer, T::Json), "12");
        assert_eq!(
            ok("9223372036854775807", T::Integer, T::Integer),
            "9223372036854775807"
        );
        assert!(err("9223372036854775808", T::Integer, T::Numeric).contains("not an integer"));
        assert!(err("1.5", T::Integer, T::Text).contains("fractional"));
        assert!(err("2", T::Integer, T::Boolean).contains("only 0 and 1"));
        assert!(err("", T::Integer, T::Numeric).contains("not an integer"));
    }

    #[test]
    fn numeric_conversions() {
        assert_eq!(ok("10.50", T::Numeric, T::Numeric), "10.5");
        assert_eq!(ok("-0.000", T::Numeric, T::Text), "0");
        assert_eq!(ok("007.250", T::Numeric, T::Text), "7.25");
        assert_eq!(ok("1.5e3", T::Numeric, T::Integer), "1500");
        assert_eq!(ok("25E-3", T::Numeric, T::Numeric), "0.025");
        assert_eq!(ok(".5", T::Numeric, T::Numeric), "0.5");
        assert_eq!(ok("42.000", T::Numeric, T::Integer), "42");
        assert_eq!(ok("1.0", T::Numeric, T::Boolean), "true");
        assert_eq!(ok("-3.25", T::Numeric, T::Json), "-3.25");
        assert_eq!(ok("NaN", T::Numeric, T::Text), "NaN");
        assert!(err("NaN", T::Numeric, T::Json).contains("no json equivalent"));
        assert!(err("NaN", T::Numeric, T::Integer).contains("not a finite number"));
        assert!(err("42.5", T::Numeric, T::Integer).contains("fractional part (42.5)"));
        assert!(err("1e19", T::Numeric, T::Integer).contains("out of the integer range"));
        assert!(err("1e5000", T::Numeric, T::Numeric).contains("exponent"));
        assert!(err("1.2.3", T::Numeric, T::Text).contains("not a number"));
        assert!(err(".", T::Numeric, T::Text).contains("not a number"));
        assert!(err("0.5", T::Numeric, T::Boolean).contains("fractional"));
    }

    #[test]
    fn boolean_conversions() {
        for t in ["t", "TRUE", "yes", "on", "1", " y "] {
            assert_eq!(ok(t, T::Boolean, T::Boolean), "true");
        }
        for f in ["f", "false", "No", "off", "0", "n"] {
            assert_eq!(ok(f, T::Boolean, T::Integer), "0");
        }
        assert_eq!(ok("true", T::Boolean, T::Numeric), "1");
        assert_eq!(ok("f", T::Boolean, T::Json), "false");
        assert_eq!(ok("t", T::Boolean, T::Text), "true");
        assert!(err("maybe", T::Boolean, T::Integer).contains("not a boolean"));
        assert!(err("maybe", T::Text, T::Boolean).contains("not a boolean"));
        assert!(!conversion_supported(T::Boolean, T::Date));
        assert!(err("t", T::Boolean, T::Uuid).contains("no conversion from boolean to uuid"));
    }

    #[test]
    fn date_conversions() {
        assert_eq!(ok("2024-02-29", T::Date, T::Date), "2024-02-29");
        assert_eq!(
            ok("2024-02-29", T::Date, T::Timestamptz),
            "2024-02-29T00:00:00+00:00"
        );
        assert_eq!(ok("2024-02-29", T::Date, T::Json), "\"2024-02-29\"");
        assert_eq!(ok("\"2024-02-29\"", T::Json, T::Date), "2024-02-29");
        assert_eq!(
            ok("2024-03-01 00:00:00+00", T::Timestamptz, T::Date),
            "2024-03-01"
        );
        assert_eq!(
            ok("2024-03-01T02:00:00+02:00", T::Timestamptz, T::Date),
            "2024-03-01"
        );
        assert!(err("2023-02-29", T::Date, T::Text).contains("not a date"));
        assert!(err("01/02/2024", T::Text, T::Date).contains("not a date"));
        assert!(err("2024-03-01 10:00:00+00", T::Timestamptz, T::Date).contains("time of day"));
        assert!(err("2024-03-01", T::Date, T::Integer).contains("no conversion"));
    }

    #[test]
    fn timestamptz_conversions() {
        assert_eq!(
            ok("2024-05-01 10:30:00+02", T::Timestamptz, T::Timestamptz),
            "2024-05-01T08:30:00+00:00"
        );
        assert_eq!(
            ok("2024-05-01 10:30:00.123456+05:30", T::Timestamptz, T::Text),
            "2024-05-01T05:00:00.123456+00:00"
        );
        assert_eq!(
            ok("2024-05-01T10:30:00.5Z", T::Text, T::Timestamptz),
            "2024-05-01T10:30:00.500+00:00"
        );
        assert_eq!(
            ok("2024-05-01T10:30:00-0100", T::Text, T::Timestamptz),
            "2024-05-01T11:30:00+00:00"
        );
        assert_eq!(
            ok("2024-05-01 10:30:00+00", T::Timestamptz, T::Json),
            "\"2024-05-01T10:30:00+00:00\""
        );
        assert!(err("2024-05-01 10:30:00", T::Text, T::Timestamptz)
            .contains("without a time zone offset"));
        assert!(err("yesterday", T::Text, T::Timestamptz).contains("not a timestamp"));
        assert!(err("2024-13-01 10:30:00+00", T::Timestamptz, T::Text).contains("not a timestamp"));
    }

    #[test]
    fn uuid_conversions() {
        let u = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";
        assert_eq!(
            ok("A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11", T::Uuid, T::Uuid),
            u
        );
        assert_eq!(
            ok("{a0eebc999c0b4ef8bb6d6bb9bd380a11}", T::Text, T::Uuid),
            u
        );
        assert_eq!(ok(&format!("urn:uuid:{u}"), T::Text, T::Uuid), u);
        assert_eq!(ok(u, T::Uuid, T::Text), u);
        assert_eq!(ok(u, T::Uuid, T::Json), format!("\"{u}\""));
        assert!(err("a0eebc99-9c0b", T::Text, T::Uuid).contains("not a UUID"));
        assert!(
            err("g0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", T::Uuid, T::Text).contains("not a UUID")
        );
    }

    #[test]
    fn json_conversions() {
        assert_eq!(
            ok("{ \"b\": 1, \"a\": [true, null] }", T::Json, T::Json),
            "{\"a\":[true,null],\"b\":1}"
        );
        assert_eq!(ok("{\"a\":1}", T::Json, T::Text), "{\"a\":1}");
        assert_eq!(ok(" [1, 2] ", T::Text, T::Json), "[1,2]");
        assert_eq!(ok("42", T::Json, T::Integer), "42");
        assert_eq!(ok("\"42\"", T::Json, T::Integer), "42");
        assert_eq!(ok("true", T::Json, T::Boolean), "true");
        assert_eq!(ok("1.50", T::Json, T::Numeric), "1.5");
        assert!(err("{", T::Json, T::Text).contains("not JSON"));
        assert!(err("not json", T::Text, T::Json).contains("not JSON"));
        assert!(err("[1]", T::Json, T::Integer).contains("no integer equivalent"));
        assert!(err("4.5", T::Json, T::Integer).contains("fractional"));
        assert!(err("true", T::Json, T::Date).contains("no date equivalent"));
    }

    #[test]
    fn column_types_from_names_and_columns() {
        assert_eq!(ColumnType::parse("BigInt"), Some(T::Integer));
        assert_eq!(ColumnType::parse("decimal"), Some(T::Numeric));
        assert_eq!(ColumnType::parse("jsonb"), Some(T::Json));
        assert_eq!(ColumnType::parse("float"), None);
        assert_eq!(ColumnType::of_column("numeric(14,2)"), Some(T::Numeric));
        assert_eq!(
            ColumnType::of_column("character varying(20)"),
            Some(T::Text)
        );
        assert_eq!(
            ColumnType::of_column("timestamp with time zone"),
            Some(T::Timestamptz)
        );
        assert_eq!(ColumnType::of_column("timestamp without time zone"), None);
        assert_eq!(ColumnType::of_column("point"), None);
    }

    proptest::proptest! {
        /// Any text through any conversion: a result or a reason, never a
        /// panic; and a result converts back to the same canonical value.
        #[test]
        fn conversions_never_panic_and_round_trip(v in ".{0,40}", a in 0usize..8, b in 0usize..8) {
            let (from, to) = (ColumnType::ALL[a], ColumnType::ALL[b]);
            if let Ok(out) = convert(&v, from, to) {
                if from != T::Text && to != T::Text && from != T::Json && to != T::Json {
                    let back = convert(&out, to, from);
                    proptest::prop_assert!(back.is_ok(), "{v:?} {from}→{to} gave {out:?}, back: {back:?}");
                }
            }
        }

        #[test]
        fn numbers_round_trip(i in proptest::num::i64::ANY) {
            let s = i.to_string();
            proptest::prop_assert_eq!(convert(&s, T::Integer, T::Numeric).unwrap(), s.clone());
            proptest::prop_assert_eq!(convert(&s, T::Numeric, T::Integer).unwrap(), s);
        }
    }
}
