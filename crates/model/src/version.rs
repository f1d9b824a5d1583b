//! Mapping versions: a fingerprint of each map's mapping.
//!
//! The version of a map is the first 12 hex digits of the SHA-256 of a
//! canonical form of its `[[map]]` section (keys sorted, whitespace,
//! comments and key order of the file do not matter), leaving out the
//! settings that do not change how records are mapped (`depends_on`,
//! `initial_sync`, `auto_pause`). Any edit of the entities, keys, fields
//! (and their transforms), filters, companies, `on_filter_exit` or
//! `conflict_master` gives a new version.
//!
//! A run records the version on the map's status; the pause buffer holds a
//! map whose configured version differs from the one it runs (see the
//! README, "Editing a map").

use sha2::{Digest, Sha256};

use crate::config::Config;

/// Settings of a map section that are not part of its mapping.
pub const NOT_MAPPING: &[&str] = &["depends_on", "initial_sync", "auto_pause"];

/// Sets the version of every map of `config`, parsed from `text`.
pub(crate) fn stamp(config: &mut Config, text: &str) {
    let Ok(table) = toml::from_str::<toml::Table>(text) else {
        return;
    };
    let Some(toml::Value::Array(maps)) = table.get("map") else {
        return;
    };
    for (m, section) in config.maps.iter_mut().zip(maps) {
        if let toml::Value::Table(t) = section {
            m.version = of_section(t);
        }
    }
}

/// The version of one `[[map]]` section.
pub fn of_section(section: &toml::Table) -> String {
    let mut t = section.clone();
    for k in NOT_MAPPING {
        t.remove(*k);
    }
    let mut text = String::new();
    canonical(&toml::Value::Table(t), &mut text);
    let digest = Sha256::digest(text.as_bytes());
    digest.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

/// A canonical text form of a TOML value: tables with sorted keys.
fn canonical(v: &toml::Value, out: &mut String) {
    match v {
        toml::Value::Table(t) => {
            let mut keys: Vec<&String> = t.keys().collect();
            keys.sort();
            out.push('{');
            for k in keys {
                out.push_str(&serde_json::to_string(k).unwrap_or_default());
                out.push(':');
                canonical(&t[k], out);
                out.push(',');
            }
            out.push('}');
        }
        toml::Value::Array(a) => {
            out.push('[');
            for x in a {
                canonical(x, out);
                out.push(',');
            }
            out.push(']');
        }
        toml::Value::String(s) => out.push_str(&serde_json::to_string(s).unwrap_or_default()),
        other => {
            out.push_str(&format!("{}:", other.type_str()));
            out.push_str(&other.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, TEST_SIDES};

    const BASE: &str = r#"
[[map]]
name = "groups"
left = { entity = "g", key = ["id"] }
right = { entity = "h", key = ["id"] }
field = [{ left = "id", right = "id" }]
[[map]]
name = "customers"
left = { entity = "customers_v3", key = ["customeraccount"] }
right = { entity = "accounts", key = ["accountnumber"] }
depends_on = ["groups"]
field = [
  { left = "customeraccount", right = "accountnumber" },
  { left = "name", right = "name" },
]
"#;

    fn versions(maps: &str) -> Vec<String> {
        Config::parse(&[TEST_SIDES, maps].concat())
            .unwrap()
            .maps
            .iter()
            .map(|m| m.version.clone())
            .collect()
    }

    #[test]
    fn stable_across_formatting_and_key_order() {
        let v = versions(BASE);
        assert_eq!(v[0].len(), 12);
        assert_ne!(v[0], v[1]);
        assert_eq!(versions(BASE), v);
        // Key order, spacing and comments do not matter.
        let reformatted = BASE
            .replace(
                "left = { entity = \"customers_v3\", key = [\"customeraccount\"] }",
                "# customers\nleft   = { key = [ \"customeraccount\" ], entity = \"customers_v3\" }",
            )
            .replace("depends_on = [\"groups\"]", "");
        assert_eq!(versions(&reformatted), v);
        // The value is fixed: a change of the canonical form or the hash shows here.
        assert_eq!(v[0], "a820a787357b");
    }

    #[test]
    fn mapping_edits_change_the_version_of_that_map_only() {
        let v = versions(BASE);
        for edit in [
            BASE.replace("{ left = \"name\", right = \"name\" }", "{ left = \"name\", right = \"fullname\" }"),
            BASE.replace(
                "{ left = \"name\", right = \"name\" }",
                "{ left = \"name\", right = \"name\", direction = \"left_to_right\" }",
            ),
            BASE.replace(
                "right = { entity = \"accounts\", key = [\"accountnumber\"] }",
                "right = { entity = \"accounts\", key = [\"accountnumber\"], filter = \"name != null\" }",
            ),
            BASE.replace("depends_on = [\"groups\"]", "conflict_master = \"fno\""),
        ] {
            let w = versions(&edit);
            assert_eq!(w[0], v[0], "{edit}");
            assert_ne!(w[1], v[1], "{edit}");
        }
        // Settings that do not change the mapping keep the version.
        let w = versions(&BASE.replace(
            "depends_on = [\"groups\"]",
            "initial_sync = false\nauto_pause = { errors = 5 }",
        ));
        assert_eq!(w, v);
    }
}
