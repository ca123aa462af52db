//! The Debian package (issue #4): `scripts/package-deb` builds a .deb from
//! the test build's binaries; the test reads its control fields, extracts it
//! and runs the service from the extracted tree.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

const ANALYTICS: &str = env!("CARGO_BIN_EXE_analytics");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn dpkg_deb(args: &[&str], deb: &Path) -> String {
    run(
        Command::new("dpkg-deb").args(args).arg(deb),
        &format!("dpkg-deb {args:?}"),
    )
}

fn build_package(out: &Path) -> PathBuf {
    let bin_dir = Path::new(ANALYTICS).parent().expect("a bin dir");
    let printed = run(
        Command::new(format!("{ROOT}/scripts/package-deb"))
            .arg("--bin-dir")
            .arg(bin_dir)
            .arg("--out")
            .arg(out)
            .arg("--uncompressed"),
        "scripts/package-deb",
    );
    let deb = PathBuf::from(printed.trim());
    assert!(deb.is_file(), "no package at {printed:?}");
    assert_eq!(
        deb.file_name().and_then(|n| n.to_str()),
        Some(
            format!(
                "analytics_{}_{}.deb",
                env!("CARGO_PKG_VERSION"),
                run(
                    Command::new("dpkg").arg("--print-architecture"),
                    "dpkg --print-architecture"
                )
                .trim()
            )
            .as_str()
        )
    );
    deb
}

#[test]
fn the_deb_installs_binaries_unit_config_and_man_pages_that_work() {
    let dir = tempfile::tempdir().expect("tempdir");
    let deb = build_package(&dir.path().join("out"));

    let field = |name: &str| {
        dpkg_deb(&["-f"], &deb)
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")).map(str::to_string))
    };
    assert_eq!(field("Package").as_deref(), Some("analytics"));
    assert_eq!(field("Version").as_deref(), Some(env!("CARGO_PKG_VERSION")));
    let depends = field("Depends").expect("Depends");
    assert!(depends.split(", ").any(|d| d == "libc6"), "{depends}");

    let contents = dpkg_deb(&["--contents"], &deb);
    for path in [
        "./usr/bin/analytics",
        "./usr/bin/analytics-worker",
        "./usr/lib/systemd/system/analytics.service",
        "./etc/analytics/analytics.toml",
        "./usr/share/man/man1/analytics.1.gz",
        "./usr/share/man/man1/analytics-run.1.gz",
        "./usr/share/man/man1/analytics-config-check.1.gz",
        "./usr/share/doc/analytics/copyright",
    ] {
        assert!(
            contents.lines().any(|l| l.ends_with(&format!(" {path}"))),
            "{path} missing from the package:\n{contents}"
        );
    }
    let control = dir.path().join("control");
    run(
        Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control),
        "dpkg-deb -e",
    );
    let conffiles = std::fs::read_to_string(control.join("conffiles")).expect("conffiles");
    assert_eq!(conffiles.trim(), "/etc/analytics/analytics.toml");

    let root = dir.path().join("root");
    run(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root),
        "dpkg-deb -x",
    );
    let same = |installed: &str, source: &str| {
        assert_eq!(
            std::fs::read(root.join(installed)).expect(installed),
            std::fs::read(Path::new(ROOT).join(source)).expect(source),
            "{installed} is not {source}"
        );
    };
    same(
        "usr/lib/systemd/system/analytics.service",
        "systemd/analytics.service",
    );
    same("etc/analytics/analytics.toml", "examples/analytics.toml");
    // Shipped without debug info, as Debian does (the test build has some).
    for binary in ["usr/bin/analytics", "usr/bin/analytics-worker"] {
        let sections = run(
            Command::new("readelf")
                .args(["-S", "-W"])
                .arg(root.join(binary)),
            "readelf -S",
        );
        // (`.debug_gdb_scripts`, 34 bytes loaded at run time, stays.)
        for section in [" .debug_info ", " .debug_line "] {
            assert!(!sections.contains(section), "{binary} keeps{section}");
        }
    }

    // The man page of `run` is --help's: every flag is in it.
    let mut page = String::new();
    flate2::read::GzDecoder::new(
        std::fs::File::open(root.join("usr/share/man/man1/analytics-run.1.gz")).expect("page"),
    )
    .read_to_string(&mut page)
    .expect("a gzip man page");
    assert!(page.contains(".TH analytics-run 1"), "not a man page");
    let help = run(
        Command::new(ANALYTICS).args(["run", "--help"]),
        "run --help",
    );
    let flags: Vec<&str> = help
        .split_whitespace()
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.trim_end_matches([',', '.', ':']))
        .collect();
    assert!(flags.len() > 20, "{flags:?}");
    for flag in flags {
        let roff = flag.replace('-', "\\-");
        assert!(page.contains(&roff), "{flag} is not in analytics-run.1");
    }

    // The installed tree works: config check on the shipped file, and a run
    // that finds its worker next to it.
    let bin = root.join("usr/bin/analytics");
    let config = root.join("etc/analytics/analytics.toml");
    run(
        Command::new(&bin)
            .arg("--config")
            .arg(&config)
            .args(["config", "check"]),
        "installed analytics config check",
    );
    let data = dir.path().join("data");
    let out = run(
        Command::new(&bin)
            .arg("--config")
            .arg(&config)
            .env_remove("ANALYTICS_WORKER_BIN")
            .args(["run", "--workers", "1", "--input"])
            .arg(Path::new(ROOT).join("examples/events.jsonl"))
            .arg("--data-dir")
            .arg(&data),
        "installed analytics run",
    );
    assert!(out.contains("rejected: "), "{out}");
    let exported = run(
        Command::new(&bin)
            .arg("export")
            .arg("--data-dir")
            .arg(&data),
        "installed analytics export",
    );
    let folded = run(
        Command::new(root.join("usr/bin/analytics-worker"))
            .arg("fold")
            .arg(Path::new(ROOT).join("examples/events.jsonl")),
        "installed analytics-worker fold",
    );
    assert!(!folded.is_empty());
    assert_eq!(exported, folded);
}
