use super::*;
use std::collections::BTreeSet;

const GOOD: &str = r#"
[kafka]
bootstrap_servers = "127.0.0.1:9092"

[sides.left]
name = "fno"
kind = "postgres"
connection = { host = "127.0.0.1", dbname = "fno", user = "postgres" }

[sides.right]
name = "dataverse"
kind = "postgres"
connection = { host = "127.0.0.1", dbname = "dv", user = "postgres" }

[[map]]
name = "customer_groups"
left = { entity = "customer_groups", key = ["customergroupid"] }
right = { entity = "msdyn_customergroups", key = ["msdyn_groupid"] }
field = [
  { left = "customergroupid", right = "msdyn_groupid" },
  { left = "description", right = "msdyn_description", direction = "left_to_right" },
]

[[map]]
name = "customers"
left = { entity = "public.customers_v3", key = ["customeraccount"] }
right = { entity = "accounts", key = ["accountnumber"] }
depends_on = ["customer_groups"]
conflict_master = "fno"
field = [
  { left = "customeraccount", right = "accountnumber" },
  { left = "name", right = "name" },
]
"#;

fn problems(text: &str) -> Vec<Problem> {
    Config::parse(text).unwrap().validate().unwrap_err()
}

#[test]
fn security_settings_are_checked() {
    let text = GOOD
        .replace(
            "dbname = \"fno\", user = \"postgres\" }",
            "dbname = \"fno\", user = \"postgres\", sslmode = \"verify-full\" }",
        )
        .replace(
            "dbname = \"dv\", user = \"postgres\" }",
            "dbname = \"dv\", user = \"postgres\", sslmode = \"require\", sslrootcert = \"/ca.pem\", sslcert = \"/c.pem\" }",
        )
        .replace("entity = \"accounts\"", "entity = \"dualwrite.record_versions\"")
        + "[control]\nsigning_keys = [{ env = \"A\" }, { env = \"B\" }, { file = \"/c\" }]\n";
    let found: Vec<String> = problems(&text)
        .iter()
        .map(|p| format!("{}: {}", p.location, p.message))
        .collect();
    let has = |s: &str| found.iter().any(|f| f.contains(s));
    assert!(
        has("sides.left.connection.sslrootcert: sslmode `verify-full` needs the CA certificates"),
        "{found:#?}"
    );
    assert!(
        has("sides.right.connection.sslrootcert: is used only by sslmode verify-ca or verify-full"),
        "{found:#?}"
    );
    assert!(
        has("sides.right.connection.sslcert: sslcert and sslkey go together"),
        "{found:#?}"
    );
    assert!(
        has("right.entity: `dualwrite.record_versions` is in the `dualwrite` schema"),
        "{found:#?}"
    );
    assert!(has("control.signing_keys: at most two keys"), "{found:#?}");
    assert_eq!(found.len(), 5, "{found:#?}");
    let e = problems(&GOOD.replace(
        "user = \"postgres\" }",
        "user = \"postgres\", sslmode = \"verify\" }",
    ));
    assert!(
        e[0].message
            .contains("not one of disable, prefer, require, verify-ca, verify-full"),
        "{e:?}"
    );
    // Keys are read when used, and must be long enough.
    let c = Config::parse(
        &(GOOD.to_owned() + "[control]\nsigning_keys = [{ env = \"DW_TEST_UNSET_KEY\" }]\n"),
    )
    .unwrap();
    c.validate().unwrap();
    assert!(c
        .control
        .keys()
        .unwrap_err()
        .contains("`DW_TEST_UNSET_KEY` is not set"));
    assert!(c.errors.include_payload && !c.errors.log_values);
    // ctl reads only the first key; a short key is refused.
    let dir = std::env::temp_dir().join(format!("dw-key-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (good, short) = (dir.join("good"), dir.join("short"));
    std::fs::write(&good, "k".repeat(64) + "\n").unwrap();
    std::fs::write(&short, "short").unwrap();
    let with =
        |keys: &str| Config::parse(&format!("{GOOD}[control]\nsigning_keys = [{keys}]\n")).unwrap();
    let c = with(&format!(
        "{{ file = \"{}\" }}, {{ env = \"DW_TEST_UNSET_KEY\" }}",
        good.display()
    ));
    assert_eq!(
        c.control.signing_key().unwrap().unwrap().expose(),
        "k".repeat(64)
    );
    assert!(c.control.keys().is_err());
    let c = with(&format!("{{ file = \"{}\" }}", short.display()));
    assert!(c
        .control
        .signing_key()
        .unwrap_err()
        .contains("at least 32 bytes"));
    assert!(with("").control.signing_key().unwrap().is_none());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn good_config_validates() {
    let c = Config::parse(GOOD).unwrap();
    c.validate().unwrap();
    assert_eq!(c.maps.len(), 2);
    assert_eq!(c.kafka.topic_prefix, "dualwrite");
    assert_eq!(c.conflict_master(&c.maps[0]), SideId::Right);
    assert_eq!(c.conflict_master(&c.maps[1]), SideId::Left);
    assert_eq!(
        c.captured_entities(SideId::Left).keys().collect::<Vec<_>>(),
        ["public.customer_groups", "public.customers_v3"]
    );
    assert_eq!(c.slot_name(SideId::Left), "dualwrite_dualwrite_fno");
}

#[test]
fn read_columns_are_keys_scope_and_mapped_fields_of_every_map() {
    let c = Config::parse(&format!(
        r#"{TEST_SIDES}
[[map]]
name = "a"
companies = ["dat"]
left = {{ entity = "custtable", key = ["accountnum"], company_field = "dataareaid", filter = "blocked == 'f'" }}
right = {{ entity = "accounts", key = ["accountnumber"], company_field = "company" }}
field = [
  {{ left = "accountnum", right = "accountnumber" }},
  {{ left = "name", right = "name", direction = "right_to_left" }},
  {{ right = "source", constant = "fno" }},
]
[[map]]
name = "b"
left = {{ entity = "custtable", key = ["accountnum"] }}
right = {{ entity = "others", key = ["code"] }}
field = [{{ left = "accountnum", right = "code" }}, {{ left = "phone", right = "tel" }}]
"#
    ))
    .unwrap();
    let left = crate::columns::read_columns(&c, SideId::Left);
    let t = &left["public.custtable"];
    let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(t.identity, set(&["accountnum", "blocked", "dataareaid"]));
    assert_eq!(
        t.all,
        set(&["accountnum", "blocked", "dataareaid", "name", "phone"])
    );
    let right = crate::columns::read_columns(&c, SideId::Right);
    assert_eq!(
        right["public.accounts"].all,
        set(&["accountnumber", "company", "name", "source"])
    );
    assert_eq!(right["public.others"].all, set(&["code", "tel"]));
}

#[test]
fn unmapped_key_names_map_and_field() {
    let text = GOOD.replace(
        "{ left = \"customeraccount\", right = \"accountnumber\" },",
        "",
    );
    let p = problems(&text);
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].location, "map \"customers\": left.key");
    assert!(p[0].message.contains("customeraccount"), "{}", p[0].message);
}

#[test]
fn an_entity_linked_by_two_keys_is_rejected() {
    let text = format!(
        "{GOOD}\n[[map]]\nname = \"groups_by_name\"\nleft = {{ entity = \"customer_groups\", key = [\"description\"] }}\nright = {{ entity = \"other_groups\", key = [\"name\"] }}\nfield = [ {{ left = \"description\", right = \"name\" }} ]\n"
    );
    let p = problems(&text);
    let p: Vec<&Problem> = p
        .iter()
        .filter(|p| p.location.ends_with(".left.key"))
        .collect();
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].location, "map groups_by_name.left.key");
    assert!(
        p[0].message.contains("in map customer_groups"),
        "{}",
        p[0].message
    );
}

#[test]
fn one_way_key_is_rejected() {
    let text = GOOD.replace(
        "{ left = \"customergroupid\", right = \"msdyn_groupid\" }",
        "{ left = \"customergroupid\", right = \"msdyn_groupid\", direction = \"right_to_left\" }",
    );
    let p = problems(&text);
    assert_eq!(p[0].location, "map \"customer_groups\": field[0].direction");
}

#[test]
fn unknown_dependency_and_master_are_named() {
    let text = GOOD
        .replace(
            "depends_on = [\"customer_groups\"]",
            "depends_on = [\"currencies\"]",
        )
        .replace("conflict_master = \"fno\"", "conflict_master = \"crm\"");
    let p = problems(&text);
    let locations: Vec<_> = p.iter().map(|p| p.location.as_str()).collect();
    assert!(
        locations.contains(&"map \"customers\": depends_on"),
        "{p:?}"
    );
    assert!(
        locations.contains(&"map \"customers\": conflict_master"),
        "{p:?}"
    );
}

#[test]
fn dependency_cycle_is_rejected() {
    let text = GOOD.replace(
        "name = \"customer_groups\"",
        "name = \"customer_groups\"\ndepends_on = [\"customers\"]",
    );
    let p = problems(&text);
    assert!(p.iter().any(|p| p.message.contains("cycle")), "{p:?}");
}

#[test]
fn unknown_field_is_a_parse_error_with_position() {
    let text = GOOD.replace(
        "name = \"fno\"\nkind",
        "name = \"fno\"\ncolour = \"red\"\nkind",
    );
    let err = Config::parse(&text).unwrap_err();
    assert!(err.contains("unknown field `colour`"), "{err}");
    assert!(err.contains("line"), "{err}");
}

#[test]
fn literal_secret_property_is_rejected() {
    let text = GOOD.replace(
        "bootstrap_servers = \"127.0.0.1:9092\"",
        "bootstrap_servers = \"127.0.0.1:9092\"\nproperties = { \"sasl.password\" = \"hunter2\" }",
    );
    let p = problems(&text);
    assert_eq!(p[0].location, "kafka.properties.\"sasl.password\"");
}

#[test]
fn secrets_come_from_env_and_never_show_in_debug() {
    std::env::set_var("DUALWRITE_TEST_SECRET_A", "hunter2");
    let text = GOOD.replace(
        "connection = { host = \"127.0.0.1\", dbname = \"fno\", user = \"postgres\" }",
        "connection = { host = \"127.0.0.1\", dbname = \"fno\", user = \"postgres\", password = { env = \"DUALWRITE_TEST_SECRET_A\" } }",
    );
    let c = Config::parse(&text).unwrap();
    let pw = c.sides.left.connection.password.as_ref().unwrap();
    assert_eq!(pw.expose(), "hunter2");
    assert!(!format!("{c:?}").contains("hunter2"));
    let missing = text.replace("DUALWRITE_TEST_SECRET_A", "DUALWRITE_TEST_SECRET_UNSET");
    let err = Config::parse(&missing).unwrap_err();
    assert!(err.contains("DUALWRITE_TEST_SECRET_UNSET"), "{err}");
}

#[test]
fn env_overrides_apply() {
    let mut c = Config::parse(GOOD).unwrap();
    c.apply_env_overrides(|k| match k {
        "DUALWRITE_BOOTSTRAP_SERVERS" => Some("kafka:9093".into()),
        "DUALWRITE_TOPIC_PREFIX" => Some("t1".into()),
        _ => None,
    });
    assert_eq!(c.kafka.bootstrap_servers, "kafka:9093");
    assert_eq!(c.kafka.topic_prefix, "t1");
}

proptest::proptest! {
    /// Any text, and any single-line corruption of a good file, gives a
    /// result or an error, never a panic.
    #[test]
    fn arbitrary_config_text_never_panics(text in ".{0,400}", line in 0usize..40, junk in ".{0,40}") {
        if let Ok(c) = Config::parse(&text) {
            let _ = c.validate();
        }
        let mut lines: Vec<&str> = GOOD.lines().collect();
        let at = line % lines.len();
        lines[at] = &junk;
        if let Ok(c) = Config::parse(&lines.join("\n")) {
            let _ = c.validate();
        }
    }
}

#[test]
fn kafka_properties_from_the_environment() {
    let mut c = Config::parse(GOOD).unwrap();
    c.apply_kafka_env([
        (
            "DUALWRITE_KAFKA_SECURITY_PROTOCOL".to_owned(),
            "sasl_ssl".to_owned(),
        ),
        (
            "DUALWRITE_KAFKA_SASL_MECHANISMS".to_owned(),
            "SCRAM-SHA-512".to_owned(),
        ),
        (
            "DUALWRITE_KAFKA_SASL_PASSWORD".to_owned(),
            "hunter2".to_owned(),
        ),
        ("OTHER".to_owned(), "x".to_owned()),
    ]);
    assert_eq!(c.kafka.properties["security.protocol"], "sasl_ssl");
    assert_eq!(c.kafka.properties["sasl.mechanisms"], "SCRAM-SHA-512");
    assert_eq!(
        c.kafka.secret_properties["sasl.password"].expose(),
        "hunter2"
    );
    assert!(!format!("{c:?}").contains("hunter2"));
    c.validate().unwrap();
}

#[test]
fn load_error_names_the_file() {
    let dir = std::env::temp_dir().join(format!("dw-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    std::fs::write(
        &path,
        GOOD.replace("conflict_master = \"fno\"", "conflict_master = \"x\""),
    )
    .unwrap();
    let err = Config::load(&path).unwrap_err().to_string();
    assert!(err.contains("bad.toml"), "{err}");
    assert!(err.contains("map \"customers\": conflict_master"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

mod transform_config_tests {
    use crate::config::*;

    fn problems_of(fields: &str) -> Vec<Problem> {
        let text = format!(
            r#"{TEST_SIDES}[[map]]
name = "customers"
left = {{ entity = "customers_v3", key = ["account"] }}
right = {{ entity = "accounts", key = ["number"] }}
field = [
  {{ left = "account", right = "number" }},
  {fields}
]
"#
        );
        match Config::parse(&text).unwrap().validate() {
            Ok(()) => Vec::new(),
            Err(p) => p,
        }
    }

    fn one(fields: &str) -> Problem {
        let p = problems_of(fields);
        assert_eq!(p.len(), 1, "{p:?}");
        p.into_iter().next().unwrap()
    }

    #[test]
    fn transforms_parse_and_validate() {
        assert_eq!(
            problems_of(
                r#"{ left = "status", right = "statecode", value_map = { Active = 0, "On hold" = "2", Closed = 1 }, unmapped = { right = "9", left = "Closed" } },
  { left = "onhold", right = "creditonhold", convert = { left = "bool", right = "int" } },
  { left = "note", right = "description", default = "n/a" },
  { left = "origin", constant = "crm" },"#
            ),
            vec![]
        );
    }

    #[test]
    fn a_value_map_that_does_not_invert_is_named() {
        let p = one(
            r#"{ left = "status", right = "statecode", value_map = { Active = "0", Open = "0" } },"#,
        );
        assert_eq!(p.location, "map \"customers\": field[1].value_map");
        assert!(
            p.message
                .contains("right value `0` is mapped from both `Active` and `Open`"),
            "{p:?}"
        );
        // One way, left to right, it need not invert.
        assert!(problems_of(
            r#"{ left = "status", right = "statecode", direction = "left_to_right", value_map = { Active = "0", Open = "0" } },"#
        )
        .is_empty());
    }

    #[test]
    fn an_unknown_conversion_type_is_named() {
        let p =
            one(r#"{ left = "a", right = "b", convert = { left = "text", right = "money" } },"#);
        assert_eq!(p.location, "map \"customers\": field[1].convert");
        assert!(
            p.message.contains("right type `money` is not one of"),
            "{p:?}"
        );
        let p = one(
            r#"{ left = "a", right = "b", convert = { left = "uuid", right = "date" }, direction = "left_to_right" },"#,
        );
        assert!(
            p.message.contains("no conversion from uuid to date"),
            "{p:?}"
        );
    }

    #[test]
    fn constants_name_their_target_only() {
        let p = one(r#"{ left = "a", right = "b", constant = "x" },"#);
        assert_eq!(p.location, "map \"customers\": field[1].constant");
        let p = one(r#"{ right = "b", constant = "x", direction = "both" },"#);
        assert_eq!(p.location, "map \"customers\": field[1].direction");
        let p = one(r#"{ right = "b" },"#);
        assert_eq!(p.location, "map \"customers\": field[1].left");
        assert!(p.message.contains("`left` is required"), "{p:?}");
        let p = one(r#"{ right = "b", constant = "x", default = "y" },"#);
        assert_eq!(p.location, "map \"customers\": field[1].constant");
    }

    #[test]
    fn key_fields_take_no_transform() {
        let text = r#"{ left = "x", right = "y" },"#;
        assert!(problems_of(text).is_empty());
        let p = problems_of("").len();
        assert_eq!(p, 0);
        let c = Config::parse(
            &DEMO_CONFIG.replace(
                "{ left = \"customeraccount\", right = \"accountnumber\" }",
                "{ left = \"customeraccount\", right = \"accountnumber\", convert = { left = \"text\", right = \"text\" } }",
            ),
        )
        .unwrap();
        let p = c.validate().unwrap_err();
        assert!(
            p.iter().any(|p| p
                .message
                .contains("key field `customeraccount` ↔ `accountnumber` cannot have a transform")),
            "{p:?}"
        );
    }

    #[test]
    fn transform_syntax_errors_are_parse_errors() {
        let text = DEMO_CONFIG.replace(
            "{ left = \"customeraccount\", right = \"accountnumber\" }",
            "{ left = \"customeraccount\", right = \"accountnumber\", unmapped = \"ignore\" }",
        );
        assert!(Config::parse(&text).is_err());
        let text = DEMO_CONFIG.replace(
            "{ left = \"customeraccount\", right = \"accountnumber\" }",
            "{ left = \"customeraccount\", right = \"accountnumber\", valuemap = {} }",
        );
        let e = Config::parse(&text).unwrap_err();
        assert!(e.contains("valuemap"), "{e}");
    }
}
