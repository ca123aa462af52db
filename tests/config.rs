//! The configuration file (DESIGN §9, issue #4): `analytics config check`,
//! the example file, precedence (flags > env > file > defaults) and errors,
//! through the real binary.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

const ANALYTICS: &str = env!("CARGO_BIN_EXE_analytics");
const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/analytics.toml");

/// `analytics` with no ANALYTICS_* variable from the caller's environment.
fn analytics(args: &[&str]) -> Command {
    let mut c = Command::new(ANALYTICS);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("ANALYTICS_") {
            c.env_remove(name);
        }
    }
    c.args(args);
    c
}

fn output(mut c: impl std::borrow::BorrowMut<Command>) -> Output {
    c.borrow_mut().output().expect("analytics runs")
}

fn check(config: &Path) -> Output {
    output(analytics(&["config", "check"]).env("ANALYTICS_CONFIG", config))
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "{:?}: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `config check`'s settings: name -> (value, origin); unset ones absent.
fn settings(check_output: &str) -> BTreeMap<String, (String, String)> {
    check_output
        .lines()
        .take_while(|l| !l.starts_with('['))
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (setting, origin) = l.rsplit_once("  # ").expect("an origin comment");
            let (name, value) = setting.split_once(" = ").expect("name = value");
            (name.to_string(), (value.to_string(), origin.to_string()))
        })
        .collect()
}

/// Every setting `config check` knows of, set or unset.
fn setting_names(check_output: &str) -> Vec<String> {
    check_output
        .lines()
        .take_while(|l| !l.starts_with('['))
        .filter_map(|l| {
            let l = l.strip_prefix("# ").unwrap_or(l);
            let name = l.split([' ', '=']).next()?;
            (l.contains(" = ") || l.ends_with(" is unset")).then(|| name.to_string())
        })
        .collect()
}

#[test]
fn the_example_documents_every_setting_with_its_true_default() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("none.toml");
    std::fs::write(&missing, "").expect("write");
    let defaults = stdout(&check(&missing));
    let names = setting_names(&defaults);
    assert!(names.len() > 20, "too few settings: {names:?}");
    let example = std::fs::read_to_string(EXAMPLE).expect("the example");
    for name in &names {
        assert!(
            example.contains(&format!("\n# {name} = ")),
            "examples/analytics.toml does not document `{name}`"
        );
    }
    // The example is valid as it is, and configures nothing.
    let as_shipped = stdout(&check(Path::new(EXAMPLE)));
    assert_eq!(settings(&as_shipped), settings(&defaults));
    // Uncommented, every default it shows is the built-in one.
    let uncommented: String = example
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(setting)
                if names
                    .iter()
                    .any(|n| setting.starts_with(&format!("{n} = "))) =>
            {
                setting.to_string()
            }
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    let all_set = dir.path().join("all.toml");
    std::fs::write(&all_set, uncommented).expect("write");
    let from_file = settings(&stdout(&check(&all_set)));
    for (name, (value, origin)) in settings(&defaults) {
        assert_eq!(origin, "default");
        let (shown, shown_origin) = &from_file[&name];
        assert_eq!(shown_origin, "file", "{name}");
        assert_eq!(
            *shown, value,
            "examples/analytics.toml shows a default for `{name}` that is not the built-in one"
        );
    }
}

#[test]
fn the_environment_beats_the_file_which_beats_the_defaults() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("analytics.toml");
    std::fs::write(
        &file,
        "flush_interval_ms = 500\nworkers = 2\nkafka_topics = [\"a\", \"b\"]\nlog_level = \"debug\"\n",
    )
    .expect("write");
    let out = stdout(&check(&file));
    let s = settings(&out);
    assert_eq!(s["flush_interval_ms"], ("500".into(), "file".into()));
    assert_eq!(s["workers"], ("2".into(), "file".into()));
    assert_eq!(s["kafka_topics"], ("[\"a\", \"b\"]".into(), "file".into()));
    assert_eq!(s["log_level"], ("\"debug\"".into(), "file".into()));
    assert_eq!(s["ttl_days"], ("30".into(), "default".into()));
    let out = stdout(&output(
        analytics(&["--config", file.to_str().expect("utf-8"), "config", "check"])
            .env("ANALYTICS_WORKERS", "3"),
    ));
    let s = settings(&out);
    assert_eq!(s["workers"], ("3".into(), "env ANALYTICS_WORKERS".into()));
    assert_eq!(s["flush_interval_ms"], ("500".into(), "file".into()));
}

#[test]
fn run_takes_its_settings_from_the_file_and_its_flags_over_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = support::generate(dir.path(), 3_000, 0);
    let data = dir.path().join("from-file");
    let file = dir.path().join("analytics.toml");
    std::fs::write(
        &file,
        format!(
            "data_dir = {:?}\nworkers = 1\nlow_stock_threshold = 1000000\n",
            data.to_str().expect("utf-8")
        ),
    )
    .expect("write");
    let config = file.to_str().expect("utf-8");
    let run = output(analytics(&[
        "--config",
        config,
        "run",
        "--input",
        input.to_str().expect("utf-8"),
    ]));
    stdout(&run);
    assert!(
        data.join(analytics::store::DB_FILE).exists(),
        "the file's data_dir was not used"
    );
    // `export` reads the file's data_dir; the records carry the file's
    // low-stock threshold, which changes them.
    let exported = stdout(&output(analytics(&["--config", config, "export"])));
    let fold = |threshold: &str| {
        support::stdout_of(
            Command::new(support::WORKER)
                .args(["fold", "--low-stock-threshold", threshold])
                .arg(&input),
            "analytics-worker fold",
        )
    };
    let want = fold("1000000");
    assert_ne!(want, fold("10"), "the threshold makes no difference");
    support::assert_same_records(&exported, &want, "a run configured by a file");
    // A flag wins over the file.
    let elsewhere = dir.path().join("from-flag");
    let run = output(analytics(&[
        "--config",
        config,
        "run",
        "--data-dir",
        elsewhere.to_str().expect("utf-8"),
        "--input",
        input.to_str().expect("utf-8"),
    ]));
    stdout(&run);
    assert!(elsewhere.join(analytics::store::DB_FILE).exists());
}

#[test]
fn a_bad_setting_is_an_error_naming_it_before_anything_starts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let file = dir.path().join("analytics.toml");
    let cases = [
        (
            "flush_interval_ms = \"soon\"\n",
            "setting `flush_interval_ms`",
        ),
        ("workers = 0\n", "setting `workers`"),
        // Current items would expire before their daily refresh.
        ("ttl_days = 0\n", "setting `ttl_days`"),
        ("store = \"s3\"\n", "setting `store`"),
        ("metrics_addr = \"localhost\"\n", "setting `metrics_addr`"),
        (
            "flush_intervall_ms = 5\n",
            "unknown setting `flush_intervall_ms`",
        ),
        ("json = true\n", "unknown setting `json`"),
        ("workers = \n", "line 1"),
        (
            "[kafka_properties]\n\"client.id\" = [1]\n",
            "setting `kafka_properties.client.id`",
        ),
    ];
    for (text, named) in cases {
        std::fs::write(&file, text).expect("write");
        for args in [
            vec!["run", "--input", "/dev/null"],
            vec!["config", "check"],
            vec!["export"],
        ] {
            let o = output(
                analytics(&args)
                    .env("ANALYTICS_CONFIG", &file)
                    .env("ANALYTICS_DATA_DIR", &data),
            );
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(2), "{text:?} {args:?}: {err}");
            assert!(
                err.contains(&format!("{}: ", file.display())) && err.contains(named),
                "{text:?} {args:?}: {err}"
            );
            assert!(!data.exists(), "{text:?} {args:?}: something started");
        }
    }
    // A named file must exist; the default one may be absent.
    let o = output(analytics(&[
        "--config",
        "/nonexistent/analytics.toml",
        "config",
        "check",
    ]));
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/analytics.toml"));
    // Settings that contradict each other: named, exit 1, nothing started.
    std::fs::write(&file, "store = \"aws\"\n").expect("write");
    let o = check(&file);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("store = aws") && err.contains("kafka_brokers"),
        "{err}"
    );
}

/// clap names only the flag of a bad value; the operator set a variable.
/// And a variable that is no setting is a warning, as an unknown setting in
/// the file is an error: a typo in `analytics.env` must not pass unseen.
#[test]
fn a_bad_or_unknown_environment_variable_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    for args in [vec!["run", "--input", "/dev/null"], vec!["config", "check"]] {
        let o = output(
            analytics(&args)
                .env("ANALYTICS_WORKERS", "x")
                .env("ANALYTICS_DATA_DIR", &data),
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("environment variable ANALYTICS_WORKERS: \"x\" is not a valid --workers"),
            "{args:?}: {err}"
        );
        assert!(!data.exists(), "{args:?}: something started");
    }
    let o = output(analytics(&["config", "check"]).env("ANALYTICS_WORKRS", "3"));
    stdout(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("not settings") && err.contains("ANALYTICS_WORKRS"),
        "{err}"
    );
}

#[test]
fn secret_kafka_properties_are_never_printed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("analytics.toml");
    std::fs::write(
        &file,
        "[kafka_properties]\n\"sasl.username\" = \"svc\"\n\"sasl.password\" = \"hunter2-in-file\"\n\"ssl.key.password\" = \"k3y\"\n",
    )
    .expect("write");
    let o = check(&file);
    let out = stdout(&o);
    let all = format!("{out}{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        !all.contains("hunter2-in-file") && !all.contains("k3y"),
        "{all}"
    );
    assert!(
        out.contains("\"sasl.password\" = \"<redacted>\"  # file"),
        "{out}"
    );
    assert!(out.contains("\"sasl.username\" = \"svc\"  # file"), "{out}");
    // What `config check` prints is a file that configures the same.
    let printed = dir.path().join("printed.toml");
    std::fs::write(&printed, &out).expect("write");
    let values = |out: &str| -> BTreeMap<String, String> {
        settings(out)
            .into_iter()
            .map(|(k, (v, _))| (k, v))
            .collect()
    };
    assert_eq!(values(&stdout(&check(&printed))), values(&out));

    // With brokers set, `config check` builds the client configuration,
    // and this build refuses ssl.key.password (no TLS): the error names the
    // property, never its value; `run` fails the same way.
    let data = dir.path().join("data");
    std::fs::write(
        &file,
        "kafka_brokers = \"127.0.0.1:1\"\n[kafka_properties]\n\"ssl.key.password\" = \"k3y-in-file\"\n",
    )
    .expect("write");
    let o = check(&file);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("ssl.key.password") && !err.contains("k3y-in-file"),
        "{err}"
    );
    let o = output(
        analytics(&["run", "--data-dir"])
            .arg(&data)
            .env("ANALYTICS_CONFIG", &file),
    );
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(o.status.code(), Some(2), "{all}");
    assert!(
        !data.exists(),
        "run made its data directory before checking"
    );
    assert!(
        all.contains("ssl.key.password") && !all.contains("k3y-in-file"),
        "{all}"
    );
}

#[test]
fn a_file_broken_while_the_service_runs_does_not_reach_a_restarted_child() {
    use std::io::Write;
    use std::process::Stdio;
    let dir = tempfile::tempdir().expect("tempdir");
    let input = support::generate(dir.path(), 6_000, 0);
    let data = dir.path().join("data");
    let file = dir.path().join("analytics.toml");
    std::fs::write(
        &file,
        format!(
            "data_dir = {:?}\nworkers = 1\nflush_interval_ms = 20\n",
            data.to_str().expect("utf-8")
        ),
    )
    .expect("write");
    let mut run = analytics(&["run"])
        .env("ANALYTICS_CONFIG", &file)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn run");
    let text = std::fs::read_to_string(&input).expect("read input");
    let lines: Vec<&str> = text.lines().collect();
    let mut stdin = run.stdin.take().expect("piped stdin");
    for l in &lines[..3_000] {
        writeln!(stdin, "{l}").expect("write to run");
    }
    stdin.flush().expect("flush");
    let storage = support::wait_for_children(run.id(), " storage ", 1);
    std::fs::write(&file, "workers = \"broken\"\n").expect("break the file");
    support::signal(storage[0], nix::sys::signal::Signal::SIGKILL);
    for l in &lines[3_000..] {
        writeln!(stdin, "{l}").expect("write to run");
    }
    drop(stdin);
    let out = support::finish(run);
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains("worker/storage restarts: 1"), "{summary}");
    support::assert_same_records(
        &support::export(&data),
        &support::fold(&input),
        "after the restart",
    );
}

#[test]
fn a_named_input_wins_over_kafka_brokers_from_the_environment() {
    // The shell of someone who followed the README's Kafka section exports
    // ANALYTICS_KAFKA_BROKERS; `run --input FILE` must still read the file
    // (nothing listens on port 9: a Kafka run would never finish).
    let dir = tempfile::tempdir().expect("tempdir");
    let input = support::generate(dir.path(), 2_000, 0);
    let data = dir.path().join("data");
    let mut run = analytics(&[
        "run",
        "--workers",
        "1",
        "--data-dir",
        data.to_str().expect("utf-8"),
        "--input",
        input.to_str().expect("utf-8"),
    ]);
    run.env("ANALYTICS_KAFKA_BROKERS", "127.0.0.1:9")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let out = support::finish(run.spawn().expect("spawn run"));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Kafka brokers setting is ignored"),
        "no warning that the brokers were ignored"
    );
    support::assert_same_records(
        &support::export(&data),
        &support::fold(&input),
        "--input with brokers set",
    );
}
