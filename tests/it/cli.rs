//! The real `keytally` binary, run as a child process in a temp folder.

use std::os::unix::fs::PermissionsExt;

use std::process::Command;

use keytally::testing::folder;
use rstest::rstest;
use tempfile::TempDir;

use crate::support::binary::{json_of, keytally, keytally_with_umask, path_arg, BIN};
use crate::{mode_of, sidecar, TestResult};

#[rstest]
fn migrate_creates_a_private_database_under_umask_000(folder: TempDir) -> TestResult {
    let path = folder.path().join("data").join("keytally.db");
    let created = keytally_with_umask("000", &["--db", path_arg(&path)?, "migrate"])?;
    assert!(created.status.success(), "{created:?}");
    let output = keytally_with_umask("000", &["--db", path_arg(&path)?, "--json", "status"])?;
    assert!(output.status.success(), "{output:?}");
    let status = json_of(&output)?;
    assert_eq!(status["journal_mode"], "wal");
    assert_eq!(status["synchronous"], "normal");
    assert_eq!(status["foreign_keys"], true);
    assert_eq!(status["application_id"], keytally::APPLICATION_ID);
    assert_eq!(status["pending_migrations"], serde_json::json!([]));
    let newest = keytally::known_versions()?
        .last()
        .cloned()
        .ok_or("no migrations")?;
    assert_eq!(status["schema_version"], newest);
    let files = status["files"].as_array().ok_or("files is not an array")?;
    assert!(files.iter().any(|f| f["name"] == "keytally.db"));
    for file in files {
        assert_eq!(file["mode"], "0600", "{file}");
    }
    // After the binary exits: the folder is 0700, the database 0600, and the
    // final checkpoint removed the sidecars.
    assert_eq!(mode_of(&folder.path().join("data"))?, 0o700);
    assert_eq!(mode_of(&path)?, 0o600);
    assert!(!sidecar(&path, "-wal").exists());
    assert!(!sidecar(&path, "-shm").exists());
    Ok(())
}

#[rstest]
fn status_text_names_the_settings(folder: TempDir) -> TestResult {
    let path = folder.path().join("keytally.db");
    assert!(keytally(&["--db", path_arg(&path)?, "migrate"])?
        .status
        .success());
    let output = keytally(&["--db", path_arg(&path)?, "status"])?;
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout)?;
    assert!(text.contains("journal_mode:       wal"), "{text}");
    assert!(text.contains("0600  keytally.db"), "{text}");
    Ok(())
}

#[rstest]
fn keytally_db_environment_variable_sets_the_path(folder: TempDir) -> TestResult {
    let path = folder.path().join("from-env.db");
    let created = Command::new(BIN)
        .arg("migrate")
        .env("KEYTALLY_DB", &path)
        .output()?;
    assert!(created.status.success(), "{created:?}");
    let output = Command::new(BIN)
        .args(["--json", "status"])
        .env("KEYTALLY_DB", &path)
        .output()?;
    assert!(output.status.success(), "{output:?}");
    assert_eq!(json_of(&output)?["path"], path_arg(&path)?);
    assert!(path.exists());
    Ok(())
}

#[rstest]
fn default_path_follows_xdg_data_home(folder: TempDir) -> TestResult {
    let created = Command::new(BIN)
        .arg("migrate")
        .env_remove("KEYTALLY_DB")
        .env("XDG_DATA_HOME", folder.path())
        .output()?;
    assert!(created.status.success(), "{created:?}");
    let output = Command::new(BIN)
        .args(["--json", "status"])
        .env_remove("KEYTALLY_DB")
        .env("XDG_DATA_HOME", folder.path())
        .output()?;
    assert!(output.status.success(), "{output:?}");
    let expected = folder.path().join("keytally").join("keytally.db");
    assert_eq!(json_of(&output)?["path"], path_arg(&expected)?);
    assert_eq!(mode_of(&folder.path().join("keytally"))?, 0o700);
    Ok(())
}

#[rstest]
fn migrate_lists_what_it_applied_then_nothing(folder: TempDir) -> TestResult {
    let path = folder.path().join("keytally.db");
    let first = keytally(&["--db", path_arg(&path)?, "--json", "migrate"])?;
    assert!(first.status.success(), "{first:?}");
    let applied = json_of(&first)?["applied"].clone();
    let applied = applied.as_array().ok_or("applied is not an array")?;
    assert_eq!(applied.len(), keytally::known_versions()?.len());
    assert!(applied[0]
        .as_str()
        .is_some_and(|name| name.ends_with("_create_keys")));
    let second = keytally(&["--db", path_arg(&path)?, "migrate"])?;
    assert!(second.status.success(), "{second:?}");
    assert_eq!(
        String::from_utf8(second.stdout)?,
        "schema is current; nothing to apply\n"
    );
    Ok(())
}

#[rstest]
fn wider_mode_is_tightened_with_a_warning(folder: TempDir) -> TestResult {
    let path = folder.path().join("keytally.db");
    assert!(keytally(&["--db", path_arg(&path)?, "migrate"])?
        .status
        .success());
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o664))?;
    let output = keytally(&["--db", path_arg(&path)?, "status"])?;
    assert!(output.status.success(), "{output:?}");
    let stderr = String::from_utf8(output.stderr)?;
    assert!(stderr.contains("WARN"), "{stderr}");
    assert!(stderr.contains(path_arg(&path)?), "{stderr}");
    assert!(stderr.contains("0664"), "{stderr}");
    assert_eq!(mode_of(&path)?, 0o600);
    Ok(())
}

#[rstest]
fn refused_file_fails_with_exit_1_and_a_message(folder: TempDir) -> TestResult {
    let path = folder.path().join("keytally.db");
    std::fs::write(&path, b"this is a text file, not a database\n")?;
    let output = keytally(&["--db", path_arg(&path)?, "status"])?;
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8(output.stderr)?;
    assert!(stderr.starts_with("keytally: "), "{stderr}");
    assert!(stderr.contains("is not an SQLite database"), "{stderr}");
    assert!(output.stdout.is_empty());
    assert_eq!(
        std::fs::read(&path)?,
        b"this is a text file, not a database\n"
    );
    let json = keytally(&["--db", path_arg(&path)?, "--json", "status"])?;
    assert_eq!(json.status.code(), Some(1));
    let error: serde_json::Value = serde_json::from_slice(&json.stderr)?;
    assert!(error["error"]
        .as_str()
        .is_some_and(|message| message.contains("not an SQLite database")));
    Ok(())
}

#[rstest]
fn usage_error_exits_2(folder: TempDir) -> TestResult {
    let output = keytally(&["--db", path_arg(&folder.path().join("k.db"))?, "frobnicate"])?;
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(!folder.path().join("k.db").exists());
    Ok(())
}

#[rstest]
fn two_processes_opening_a_fresh_database_both_succeed(folder: TempDir) -> TestResult {
    let path = folder.path().join("keytally.db");
    let children: Vec<_> = (0..4)
        .map(|_| {
            Command::new(BIN)
                .args(["--db", path_arg(&path)?, "--json", "migrate"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .map_err(Into::into)
        })
        .collect::<Result<_, Box<dyn std::error::Error>>>()?;
    let mut applied = 0;
    for child in children {
        let output = child.wait_with_output()?;
        assert!(output.status.success(), "{output:?}");
        applied += json_of(&output)?["applied"]
            .as_array()
            .ok_or("applied is not an array")?
            .len();
    }
    assert_eq!(applied, keytally::known_versions()?.len());
    Ok(())
}

/// The subcommands a `--help` lists under "Commands:" (without `help`).
fn subcommands_in(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|line| !line.starts_with("Commands:"))
        .skip(1)
        .take_while(|line| line.starts_with("  "))
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_subcommands_help_shows_an_example() -> TestResult {
    let top = keytally(&["--help"])?;
    assert!(top.status.success());
    let mut paths: Vec<Vec<String>> = vec![vec![]];
    let mut checked = 0;
    while let Some(path) = paths.pop() {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let output = keytally(&args)?;
        let help = String::from_utf8(output.stdout)?;
        assert!(output.status.success(), "{args:?}");
        let examples: Vec<&str> = help
            .lines()
            .skip_while(|line| *line != "Examples:")
            .skip(1)
            .take_while(|line| !line.is_empty())
            .collect();
        assert!(
            !examples.is_empty() && examples.iter().all(|line| line.contains("keytally ")),
            "`keytally {}` has no examples:\n{help}",
            args.join(" ")
        );
        checked += 1;
        for sub in subcommands_in(&help) {
            let mut next = path.clone();
            next.push(sub);
            paths.push(next);
        }
    }
    // The top level, its 11 commands, 7 under keys, 4 under events, 2 under
    // prices.
    assert_eq!(checked, 25);
    Ok(())
}

#[rstest]
#[case("bash", "complete -F _keytally")]
#[case("zsh", "#compdef keytally")]
#[case("fish", "complete -c keytally")]
fn completions_are_printed_for_each_shell(#[case] shell: &str, #[case] marker: &str) -> TestResult {
    let output = keytally(&["completions", shell])?;
    assert!(output.status.success(), "{output:?}");
    let script = String::from_utf8(output.stdout)?;
    assert!(script.contains(marker), "{script}");
    for word in ["events", "rotate", "db", "older-than"] {
        assert!(script.contains(word), "{shell}: no {word}");
    }
    Ok(())
}

#[rstest]
#[case(&["completions", "tcsh"], "bash, elvish, fish, powershell, zsh")]
#[case(&["keys", "create", "--label", "x", "--tier", "root"], "admin, client")]
#[case(&["events", "usage", "--since", "1d", "--by", "week"], "hour, day, model, key")]
fn a_closed_choice_out_of_its_values_is_a_usage_error_listing_them(
    folder: TempDir,
    #[case] args: &[&str],
    #[case] listed: &str,
) -> TestResult {
    let db = folder.path().join("keytally.db");
    let mut full = vec!["--db", path_arg(&db)?];
    full.extend_from_slice(args);
    let output = keytally(&full)?;
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8(output.stderr)?;
    assert!(
        stderr.contains(&format!("[possible values: {listed}]")),
        "{stderr}"
    );
    assert!(!db.exists(), "a usage error created the database");
    Ok(())
}
