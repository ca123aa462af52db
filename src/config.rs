//! The configuration file (DESIGN §9). Precedence: command-line flags >
//! `ANALYTICS_*` environment > the TOML file > built-in defaults.
//!
//! The file's settings are named like the flags (`--flush-interval-ms` is
//! `flush_interval_ms`) and become the *defaults* of those flags, so clap
//! keeps doing the precedence and every value goes through the same parser as
//! on the command line. Each value is parsed here first, so a bad one is an
//! error naming the file and the setting before anything starts. Kafka client
//! properties are a table of their own, `[kafka_properties]`, merged key by
//! key under `--kafka-property`.

use clap::Command;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Read when it exists, unless `--config` or `ANALYTICS_CONFIG` says
/// otherwise.
pub const DEFAULT_PATH: &str = "/etc/analytics/analytics.toml";
pub const ENV_CONFIG: &str = "ANALYTICS_CONFIG";
const FLAG: &str = "--config";
/// The table of librdkafka properties.
pub const KAFKA_PROPERTIES: &str = "kafka_properties";

/// The subcommands whose options a file may set (`produce` is a test tool
/// and the storage process gets every setting from `run`).
const CONFIGURED: &[&str] = &["run", "query", "export"];
/// Options that are not settings.
const NOT_SETTINGS: &[&str] = &["help", "version", "config", "json", KAFKA_PROPERTIES];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error(
        "{path}: unknown setting `{key}` (settings are named like the flags of `analytics run`, e.g. `flush_interval_ms`)"
    )]
    Unknown { path: PathBuf, key: String },
    #[error("{path}: setting `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

/// A loaded configuration file.
#[derive(Debug, Default)]
pub struct ConfigFile {
    pub path: Option<PathBuf>,
    /// Setting name to its value(s), as the flag would take them.
    settings: Vec<(String, Vec<String>)>,
    /// `[kafka_properties]`, by name.
    pub kafka_properties: Vec<(String, String)>,
}

/// Where the configuration comes from.
#[derive(Debug, PartialEq, Eq)]
pub enum Location {
    /// Named by `--config` or `ANALYTICS_CONFIG`: it must exist.
    Given(PathBuf),
    /// The default path: read if it exists.
    Default(PathBuf),
}

/// Finds `--config PATH` (or `--config=PATH`) among the arguments, else
/// `ANALYTICS_CONFIG`, else the default path. Done before clap parses, because
/// the file changes how clap parses.
pub fn locate(args: &[OsString], env: Option<OsString>) -> Location {
    let mut it = args.iter().skip(1);
    while let Some(arg) = it.next() {
        if arg == "--" {
            break;
        }
        if arg == FLAG
            && let Some(path) = it.next()
        {
            return Location::Given(PathBuf::from(path));
        }
        if let Some(path) = arg.to_str().and_then(|s| s.strip_prefix("--config=")) {
            return Location::Given(PathBuf::from(path));
        }
    }
    match env {
        Some(path) if !path.is_empty() => Location::Given(PathBuf::from(path)),
        _ => Location::Default(PathBuf::from(DEFAULT_PATH)),
    }
}

impl ConfigFile {
    /// Reads the file at `location` (nothing when the default path is
    /// absent) and checks every setting against `cmd`'s options.
    pub fn load(location: &Location, cmd: &Command) -> Result<ConfigFile, ConfigError> {
        let path = match location {
            Location::Default(path) if !path.exists() => return Ok(ConfigFile::default()),
            Location::Default(path) | Location::Given(path) => path,
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        Self::parse(path, &text, cmd)
    }

    pub fn parse(path: &Path, text: &str, cmd: &Command) -> Result<ConfigFile, ConfigError> {
        let table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::Syntax {
                    path: path.to_path_buf(),
                    message: e.to_string().trim_end().to_string(),
                })?;
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key: key.to_string(),
            message,
        };
        let mut file = ConfigFile {
            path: Some(path.to_path_buf()),
            ..ConfigFile::default()
        };
        for (key, value) in table {
            if key == KAFKA_PROPERTIES {
                let toml::Value::Table(properties) = value else {
                    return Err(invalid(
                        &key,
                        "expected a table of librdkafka properties".into(),
                    ));
                };
                for (name, value) in properties {
                    let value = scalar(&value).ok_or_else(|| {
                        invalid(
                            &format!("{KAFKA_PROPERTIES}.{name}"),
                            "expected a string".into(),
                        )
                    })?;
                    file.kafka_properties.push((name, value));
                }
                continue;
            }
            let values =
                match &value {
                    toml::Value::Array(items) => items
                        .iter()
                        .map(scalar)
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| invalid(&key, "expected a list of plain values".into()))?,
                    other => vec![scalar(other).ok_or_else(|| {
                        invalid(&key, "expected a string, number or boolean".into())
                    })?],
                };
            let args = settable(cmd, &key);
            if args.is_empty() {
                return Err(ConfigError::Unknown {
                    path: path.to_path_buf(),
                    key,
                });
            }
            for arg in args {
                if values.len() > 1 && arg.get_value_delimiter().is_none() {
                    return Err(invalid(&key, "expected one value, not a list".into()));
                }
                for v in &values {
                    check_value(arg, v).map_err(|e| invalid(&key, clap_message(&e)))?;
                }
            }
            file.settings.push((key, values));
        }
        Ok(file)
    }

    /// `cmd` with the file's settings as the defaults of their options.
    pub fn apply(&self, mut cmd: Command) -> Command {
        for (key, values) in &self.settings {
            let id = key.as_str();
            let defaults: Vec<clap::builder::OsStr> =
                values.iter().map(|v| v.clone().into()).collect();
            if cmd.get_arguments().any(|a| a.get_id() == id) {
                cmd = cmd.mut_arg(id, |a| a.default_values(defaults.clone()));
            }
            for name in CONFIGURED {
                if cmd.find_subcommand(name).is_none() {
                    continue;
                }
                cmd = cmd.mut_subcommand(*name, |sub| {
                    if sub.get_arguments().any(|a| a.get_id() == id) {
                        sub.mut_arg(id, |a| a.default_values(defaults.clone()))
                    } else {
                        sub
                    }
                });
            }
        }
        cmd
    }

    /// Whether the file sets `key`.
    pub fn sets(&self, key: &str) -> bool {
        self.settings.iter().any(|(k, _)| k == key)
    }
}

/// The effective settings of subcommand `sub` as parsed into `m`, as a TOML
/// file (which, given back as `--config`, configures the same), each line
/// saying where its value came from; secret Kafka properties redacted.
pub fn render_effective(
    sub: &Command,
    m: &clap::ArgMatches,
    file: &ConfigFile,
    flag_properties: &[(String, String)],
) -> String {
    use clap::parser::ValueSource;
    let mut out = String::new();
    for arg in sub.get_arguments() {
        let id = arg.get_id().as_str();
        if NOT_SETTINGS.contains(&id) || arg.get_long().is_none() || arg.is_hide_set() {
            continue;
        }
        let values: Vec<String> = m
            .get_raw(id)
            .map(|raw| raw.map(|v| v.to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        let origin = match m.value_source(id) {
            Some(ValueSource::CommandLine) => "flag".to_string(),
            Some(ValueSource::EnvVariable) => match arg.get_env() {
                Some(name) => format!("env {}", name.to_string_lossy()),
                None => "env".to_string(),
            },
            Some(ValueSource::DefaultValue) if file.sets(id) => "file".to_string(),
            _ => "default".to_string(),
        };
        let line = match values.as_slice() {
            [] => {
                out.push_str(&format!("# {id} is unset\n"));
                continue;
            }
            [one] if arg.get_value_delimiter().is_none() => format!("{id} = {}", toml_value(one)),
            many => {
                let items: Vec<String> = many.iter().map(|v| toml_value(v)).collect();
                format!("{id} = [{}]", items.join(", "))
            }
        };
        out.push_str(&format!("{line}  # {origin}\n"));
    }
    out.push_str(&format!("\n[{KAFKA_PROPERTIES}]\n"));
    for (name, value, origin) in merge_properties(&file.kafka_properties, flag_properties) {
        let shown = if is_secret_property(&name) {
            REDACTED
        } else {
            &value
        };
        out.push_str(&format!(
            "{} = {}  # {origin}\n",
            toml_value_string(&name),
            toml_value_string(shown)
        ));
    }
    out
}

/// The Kafka properties of the file, then those of `--kafka-property`; a
/// flag replaces the file's property of the same name. Each with its origin.
pub fn merge_properties(
    file: &[(String, String)],
    flags: &[(String, String)],
) -> Vec<(String, String, &'static str)> {
    let mut merged: Vec<(String, String, &'static str)> = Vec::new();
    let sources = file
        .iter()
        .map(|p| (p, "file"))
        .chain(flags.iter().map(|p| (p, "flag")));
    for ((name, value), origin) in sources {
        merged.retain(|(n, _, _)| n != name);
        merged.push((name.clone(), value.clone(), origin));
    }
    merged
}

/// A raw option value as TOML: numbers and booleans bare, the rest quoted.
fn toml_value(raw: &str) -> String {
    if raw.parse::<i64>().is_ok() || raw == "true" || raw == "false" {
        raw.to_string()
    } else {
        toml_value_string(raw)
    }
}

fn toml_value_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// Parses `value` as the option `arg` would on the command line (in the
/// `--flag=value` form, so that a value starting with `-` stays a value).
fn check_value(arg: &clap::Arg, value: &str) -> Result<(), clap::Error> {
    let given = format!("--{}={value}", arg.get_long().unwrap_or_default());
    Command::new("analytics")
        .arg(arg.clone())
        .try_get_matches_from(["analytics", given.as_str()])
        .map(|_| ())
}

/// The options a file setting named `key` stands for: the global ones, and
/// those of the configured subcommands.
fn settable<'a>(cmd: &'a Command, key: &str) -> Vec<&'a clap::Arg> {
    if NOT_SETTINGS.contains(&key) {
        return Vec::new();
    }
    let is_option = |a: &clap::Arg| a.get_id() == key && a.get_long().is_some();
    let mut found: Vec<_> = cmd.get_arguments().filter(|a| is_option(a)).collect();
    for sub in cmd
        .get_subcommands()
        .filter(|s| CONFIGURED.contains(&s.get_name()))
    {
        found.extend(sub.get_arguments().filter(|a| is_option(a)));
    }
    found
}

fn scalar(value: &toml::Value) -> Option<String> {
    match value {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The first line of a clap error, without its `error: ` prefix.
fn clap_message(e: &clap::Error) -> String {
    let text = e.to_string();
    let line = text.lines().next().unwrap_or_default();
    line.strip_prefix("error: ").unwrap_or(line).to_string()
}

/// Whether a librdkafka property holds a secret (passwords, keys, tokens,
/// SASL/OAuth configuration): its value is never printed.
pub fn is_secret_property(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    [
        "password",
        "secret",
        "token",
        "jaas",
        "oauthbearer.config",
        "ssl.key",
        "ssl_key",
    ]
    .iter()
    .any(|s| name.contains(s))
}

/// The printed stand-in for a secret.
pub const REDACTED: &str = "<redacted>";

/// `ANALYTICS_*` variables that are not settings: the service's plumbing
/// between its own processes, and the project's scripts and tests.
const NOT_ENV_SETTINGS: [&str; 3] = [
    "ANALYTICS_WORKER_BIN",
    "ANALYTICS_DLQ_BROKERS",
    "ANALYTICS_DLQ_KAFKA_PROPERTIES",
];
const NOT_ENV_SETTING_PREFIXES: [&str; 2] = ["ANALYTICS_TEST_", "ANALYTICS_STACK_"];

/// The `ANALYTICS_*` names among `vars` that no option of `cmd` (or of its
/// subcommands) reads: a typo in `analytics.env` would otherwise be
/// ignored without a word, as an unknown setting in the file is not.
pub fn unknown_env_settings(
    cmd: &Command,
    vars: impl IntoIterator<Item = OsString>,
) -> Vec<String> {
    fn known(cmd: &Command, into: &mut Vec<OsString>) {
        into.extend(
            cmd.get_arguments()
                .filter_map(|a| a.get_env())
                .map(|e| e.to_owned()),
        );
        for sub in cmd.get_subcommands() {
            known(sub, into);
        }
    }
    let mut names = Vec::new();
    known(cmd, &mut names);
    let mut unknown: Vec<String> = vars
        .into_iter()
        .filter_map(|v| v.into_string().ok())
        .filter(|v| v.starts_with("ANALYTICS_"))
        .filter(|v| !NOT_ENV_SETTINGS.contains(&v.as_str()))
        .filter(|v| !NOT_ENV_SETTING_PREFIXES.iter().any(|p| v.starts_with(p)))
        .filter(|v| !names.iter().any(|n| n == v.as_str()))
        .collect();
    unknown.sort();
    unknown.dedup();
    unknown
}

/// A bad value that came from an `ANALYTICS_*` variable, said with the
/// variable's name: clap names only the flag (`invalid value 'x' for
/// '--workers <WORKERS>'`), which the operator never typed. `None` when
/// the error is not about a value, or the flag was on the command line.
/// `is_set` says whether a variable is set (the environment, in `main`).
pub fn env_value_error(
    err: &clap::Error,
    cmd: &Command,
    argv: &[OsString],
    is_set: impl Fn(&str) -> bool,
) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    fn env_of(cmd: &Command, long: &str) -> Option<String> {
        cmd.get_arguments()
            .find(|a| a.get_long() == Some(long))
            .and_then(|a| a.get_env())
            .and_then(|e| e.to_str())
            .map(str::to_string)
            .or_else(|| cmd.get_subcommands().find_map(|sub| env_of(sub, long)))
    }
    if !matches!(
        err.kind(),
        ErrorKind::InvalidValue | ErrorKind::ValueValidation
    ) {
        return None;
    }
    let Some(ContextValue::String(arg)) = err.get(ContextKind::InvalidArg) else {
        return None;
    };
    let long = arg.strip_prefix("--")?.split([' ', '=']).next()?;
    let flag = format!("--{long}");
    let typed = argv.iter().filter_map(|a| a.to_str()).any(|a| {
        a == flag
            || a.strip_prefix(flag.as_str())
                .is_some_and(|rest| rest.starts_with('='))
    });
    let env = env_of(cmd, long)?;
    if typed || !is_set(&env) {
        return None;
    }
    let value = match err.get(ContextKind::InvalidValue) {
        Some(ContextValue::String(v)) => v.clone(),
        _ => String::new(),
    };
    let why = match (
        std::error::Error::source(err),
        err.get(ContextKind::ValidValue),
    ) {
        (Some(source), _) => format!(": {source}"),
        (None, Some(ContextValue::Strings(valid))) => format!(" (one of: {})", valid.join(", ")),
        _ => String::new(),
    };
    Some(format!(
        "environment variable {env}: {value:?} is not a valid --{long}{why}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction};

    fn cmd() -> Command {
        Command::new("analytics")
            .arg(Arg::new("log_level").long("log-level").global(true))
            .subcommand(
                Command::new("run")
                    .arg(
                        Arg::new("workers")
                            .long("workers")
                            .value_parser(clap::value_parser!(u32)),
                    )
                    .arg(
                        Arg::new("kafka_topics")
                            .long("kafka-topics")
                            .value_delimiter(',')
                            .action(ArgAction::Append)
                            .default_value("a,b"),
                    )
                    .arg(Arg::new("input").long("input"))
                    .arg(Arg::new("json").long("json").action(ArgAction::SetTrue)),
            )
            .subcommand(Command::new("storage").arg(Arg::new("secret_only").long("secret-only")))
    }

    fn with_env() -> Command {
        Command::new("analytics").subcommand(
            Command::new("run").arg(
                Arg::new("workers")
                    .long("workers")
                    .env("ANALYTICS_WORKERS")
                    .value_parser(clap::value_parser!(u32)),
            ),
        )
    }

    #[test]
    fn a_bad_value_from_the_environment_names_the_variable() {
        let argv = |args: &[&str]| -> Vec<OsString> { args.iter().map(OsString::from).collect() };
        // As clap sees ANALYTICS_WORKERS=x: the same error as `--workers x`.
        let err = with_env()
            .try_get_matches_from(["analytics", "run", "--workers", "x"])
            .expect_err("x is no number");
        assert_eq!(
            env_value_error(&err, &with_env(), &argv(&["analytics", "run"]), |v| v
                == "ANALYTICS_WORKERS")
            .as_deref(),
            Some(
                "environment variable ANALYTICS_WORKERS: \"x\" is not a valid --workers: invalid digit found in string"
            )
        );
        // Typed on the command line: clap's own message says it well.
        for typed in [
            ["analytics", "run", "--workers", "x"],
            ["analytics", "run", "--workers=x", ""],
        ] {
            assert_eq!(
                env_value_error(&err, &with_env(), &argv(&typed), |_| true),
                None
            );
        }
        assert_eq!(
            env_value_error(&err, &with_env(), &argv(&["analytics", "run"]), |_| false),
            None
        );
    }

    #[test]
    fn unknown_analytics_variables_are_found() {
        let vars = [
            "ANALYTICS_WORKRS",
            "ANALYTICS_WORKERS",
            "ANALYTICS_TEST_X",
            "ANALYTICS_STACK_DIR",
            "ANALYTICS_WORKER_BIN",
            "PATH",
            "ANALYTICS_WORKRS",
        ];
        assert_eq!(
            unknown_env_settings(&with_env(), vars.map(OsString::from)),
            vec!["ANALYTICS_WORKRS".to_string()]
        );
    }

    fn parse(text: &str) -> Result<ConfigFile, ConfigError> {
        ConfigFile::parse(Path::new("/etc/a.toml"), text, &cmd())
    }

    #[test]
    fn settings_become_defaults_that_env_and_flags_still_beat() {
        let file = parse("workers = 3\nkafka_topics = [\"x\", \"y\"]\nlog_level = \"debug\"\n")
            .expect("valid");
        let m = file.apply(cmd()).get_matches_from(["analytics", "run"]);
        let run = m.subcommand_matches("run").expect("run");
        assert_eq!(run.get_one::<u32>("workers"), Some(&3));
        let topics: Vec<&String> = run.get_many("kafka_topics").expect("topics").collect();
        assert_eq!(topics, ["x", "y"]);
        assert_eq!(
            run.get_one::<String>("log_level").map(String::as_str),
            Some("debug")
        );
        let m = file
            .apply(cmd())
            .get_matches_from(["analytics", "run", "--workers", "5"]);
        let run = m.subcommand_matches("run").expect("run");
        assert_eq!(run.get_one::<u32>("workers"), Some(&5));
    }

    #[test]
    fn a_bad_value_names_the_file_and_the_setting() {
        let e = parse("workers = \"many\"\n").expect_err("invalid");
        let text = e.to_string();
        assert!(
            text.starts_with("/etc/a.toml: setting `workers`: "),
            "{text}"
        );
        assert!(text.contains("many"), "{text}");
        let e = parse("workers = [1, 2]\n").expect_err("a list");
        assert!(e.to_string().contains("expected one value"), "{e}");
        let e = parse("workers = { a = 1 }\n").expect_err("a table");
        assert!(
            matches!(e, ConfigError::Invalid { ref key, .. } if key == "workers"),
            "{e}"
        );
    }

    #[test]
    fn unknown_internal_and_non_settings_are_rejected() {
        for key in ["wrokers", "json", "secret_only", "help", "config"] {
            let e = parse(&format!("{key} = \"1\"\n")).expect_err(key);
            assert!(
                matches!(e, ConfigError::Unknown { key: ref k, .. } if k == key),
                "{e}"
            );
        }
    }

    #[test]
    fn syntax_errors_say_where() {
        let e = parse("workers = \n").expect_err("syntax");
        let text = e.to_string();
        assert!(text.starts_with("/etc/a.toml: "), "{text}");
        assert!(text.contains("line 1"), "{text}");
    }

    #[test]
    fn kafka_properties_are_a_table_of_strings() {
        let file =
            parse("[kafka_properties]\n\"sasl.password\" = \"p\"\n\"fetch.wait.max.ms\" = 10\n")
                .expect("valid");
        assert_eq!(
            file.kafka_properties,
            [
                ("fetch.wait.max.ms".to_string(), "10".to_string()),
                ("sasl.password".to_string(), "p".to_string())
            ]
        );
        assert!(parse("kafka_properties = 1\n").is_err());
        assert!(parse("[kafka_properties]\na = [1]\n").is_err());
    }

    #[test]
    fn the_config_path_comes_from_the_flag_then_the_environment_then_the_default() {
        let args = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            locate(
                &args(&["analytics", "--config", "/a.toml", "run"]),
                Some("/b".into())
            ),
            Location::Given("/a.toml".into())
        );
        assert_eq!(
            locate(
                &args(&["analytics", "config", "check", "--config=/a.toml"]),
                None
            ),
            Location::Given("/a.toml".into())
        );
        assert_eq!(
            locate(&args(&["analytics", "run"]), Some("/b".into())),
            Location::Given("/b".into())
        );
        assert_eq!(
            locate(&args(&["analytics", "run", "--", "--config", "x"]), None),
            Location::Default(DEFAULT_PATH.into())
        );
    }

    #[test]
    fn secret_properties_are_recognised() {
        for name in [
            "sasl.password",
            "ssl.key.password",
            "ssl.key.pem",
            "sasl.oauthbearer.client.secret",
            "SASL.JAAS.CONFIG",
        ] {
            assert!(is_secret_property(name), "{name}");
        }
        for name in [
            "bootstrap.servers",
            "security.protocol",
            "sasl.username",
            "sasl.mechanism",
        ] {
            assert!(!is_secret_property(name), "{name}");
        }
    }
}
