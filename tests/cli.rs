//! The binary's command line: configuration errors and the operator CLI
//! commands that need no running services.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_dualwrite");
const DEMO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/demo/dualwrite.toml");

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("DUALWRITE_CONFIG")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn demo_config_validates() {
    let (code, out, err) = run(&["--config", DEMO, "ctl", "validate"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("map customers: fno:public.customers_v3 (customeraccount) <-> dataverse:public.accounts (accountnumber)"), "{out}");
    assert!(
        out.contains("depends on customer_groups, currencies"),
        "{out}"
    );
}

#[test]
fn bad_config_fails_naming_file_map_and_field() {
    let dir = std::env::temp_dir().join(format!("dualwrite-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("broken.toml");
    let text = std::fs::read_to_string(DEMO).unwrap().replace(
        "{ left = \"customeraccount\", right = \"accountnumber\" },",
        "",
    );
    std::fs::write(&path, text).unwrap();
    for cmd in [&["router"][..], &["ctl", "validate"]] {
        let mut args = vec!["--config", path.to_str().unwrap()];
        args.extend_from_slice(cmd);
        let (code, _, err) = run(&args);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("broken.toml"), "{err}");
        assert!(err.contains("map \"customers\": left.key"), "{err}");
        assert!(err.contains("customeraccount"), "{err}");
    }
    let (code, _, err) = run(&[
        "--config",
        dir.join("missing.toml").to_str().unwrap(),
        "router",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("missing.toml"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unknown_side_is_a_clear_error() {
    let (code, _, err) = run(&["--config", DEMO, "capture", "--side", "crm"]);
    assert_ne!(code, 0);
    assert!(err.contains("no side named `crm`"), "{err}");
}

#[test]
fn compose_config_validates_with_its_secrets_from_the_environment() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/compose/dualwrite.toml");
    let out = Command::new(BIN)
        .args(["--config", path, "ctl", "validate"])
        .env("FNO_DB_PASSWORD", "x")
        .env("DATAVERSE_DB_PASSWORD", "y")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Without them, the error names the variable.
    let out = Command::new(BIN)
        .args(["--config", path, "ctl", "validate"])
        .env_remove("FNO_DB_PASSWORD")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("FNO_DB_PASSWORD"));
}

#[test]
fn an_unknown_kafka_property_from_the_environment_is_named() {
    let out = Command::new(BIN)
        .args(["--config", DEMO, "ctl", "validate"])
        .env("DUALWRITE_KAFKA_NO_SUCH_THING", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no.such.thing") && err.contains("DUALWRITE_KAFKA_NO_SUCH_THING"),
        "{err}"
    );
}
