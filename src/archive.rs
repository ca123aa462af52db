//! The archive (DESIGN §6): gzip JSON lines under Hive-style date
//! partitions, with the same keys in S3 and in the archive directory of a
//! data directory (`<data_dir>/archive`).
//!
//! - `metrics/dt=YYYY-MM-DD/snapshot-<epochMillis>.jsonl.gz`: every metric
//!   record;
//! - `events/dt=YYYY-MM-DD/hour=HH/<topic>-<partition>-<firstOffset>-<lastOffset>.jsonl.gz`:
//!   the consumed events of one topic-partition that one write covered
//!   from one hour on, one line each, as the worker built the object
//!   (`analytics_worker::archive`, which describes the lines). The date is
//!   the first event's broker timestamp, so a retried upload of the same
//!   range lands on the same key.
//!
//! An event range is uploaded before the write that covers it commits. A
//! crash in between can leave an object whose range never committed; the
//! range retried after it starts at the same first offset (the first event
//! after the durable position, or the first of a later hour in that write)
//! and may end elsewhere. So the first upload of a topic-partition after a
//! (re)start, and its first of a later hour, removes any other object with
//! the same first offset: [`event_range_prefix`].

use crate::store::utc_day;
use analytics_worker::records::MetricRecord;
use flate2::Compression;
use flate2::write::GzEncoder;
use proto::ArchivedEvents;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

/// The archive directory of a data directory.
pub fn archive_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("archive")
}

/// The key of the metric snapshot taken at `now_ms`.
pub fn metric_snapshot_key(now_ms: i64) -> String {
    format!("metrics/dt={}/snapshot-{now_ms}.jsonl.gz", utc_day(now_ms))
}

/// Gzip of JSON lines, at the fast level: at the default level the metric
/// snapshot at the end of a run took a quarter of the storage process's
/// instructions, and JSON lines still shrink several times at level 1.
pub fn gzip_lines<W: Write>(
    out: W,
    lines: impl Iterator<Item = io::Result<Vec<u8>>>,
) -> io::Result<W> {
    let mut gz = GzEncoder::new(out, Compression::fast());
    for line in lines {
        gz.write_all(&line?)?;
        gz.write_all(b"\n")?;
    }
    gz.finish()
}

/// The metric records as gzip JSON lines.
pub fn encode_metric_snapshot(records: &[MetricRecord]) -> io::Result<Vec<u8>> {
    gzip_lines(
        Vec::new(),
        records.iter().map(|r| Ok(r.to_json_line().into_bytes())),
    )
}

/// Writes every record as one JSON line, gzipped, under
/// `metrics/dt=YYYY-MM-DD/snapshot-<epochMillis>.jsonl.gz`, and returns the
/// key. The file is written beside its final name and renamed into place, so
/// readers never see a partial snapshot and a retry overwrites itself.
pub fn write_metric_snapshot(
    archive_dir: &Path,
    records: &[MetricRecord],
    now_ms: i64,
) -> io::Result<String> {
    let key = metric_snapshot_key(now_ms);
    write_file(archive_dir, &key, |file| {
        gzip_lines(
            file,
            records.iter().map(|r| Ok(r.to_json_line().into_bytes())),
        )
    })?;
    Ok(key)
}

/// Writes `key` under the archive directory through `fill`, beside its final
/// name first and renamed into place, so readers never see a partial object
/// and a retry overwrites itself.
fn write_file(
    archive_dir: &Path,
    key: &str,
    fill: impl FnOnce(BufWriter<File>) -> io::Result<BufWriter<File>>,
) -> io::Result<()> {
    let path = archive_dir.join(key);
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(io::Error::other(format!(
            "archive key {key} has no directory"
        )));
    };
    fs::create_dir_all(dir)?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let file = fill(BufWriter::new(File::create(&tmp)?))?
            .into_inner()
            .map_err(io::IntoInnerError::into_error)?;
        file.sync_all()?;
        fs::rename(&tmp, &path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// The prefix shared by every object of ranges that start where `events`
/// starts: `events/dt=…/hour=…/<topic>-<partition>-<firstOffset>-`. `None`
/// for an empty range.
pub fn event_range_prefix(events: &ArchivedEvents) -> Option<String> {
    if events.events == 0 {
        return None;
    }
    // The same hour the worker cuts objects at.
    let hour = events.hour().rem_euclid(24);
    Some(format!(
        "events/dt={}/hour={hour:02}/{}-{}-{}-",
        utc_day(events.time_ms),
        events.stream,
        events.shard,
        events.first_offset
    ))
}

/// Whether `name` (a key, or a file name with the file part of `prefix`)
/// is `<prefix><lastOffset>.jsonl.gz`: an object of the ranges that
/// [`event_range_prefix`] gave `prefix`, not one of another topic whose
/// name starts like this one's (`t` and `t-1`: `t-1-12-` begins the
/// objects of topic `t`, partition 1, offset 12, and of topic `t-1`,
/// partition 12).
pub fn is_range_under(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix)
        .and_then(|rest| rest.strip_suffix(".jsonl.gz"))
        .is_some_and(|last| !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()))
}

/// The key of the object holding one topic-partition's range of events.
pub fn event_range_key(events: &ArchivedEvents) -> Option<String> {
    Some(format!(
        "{}{}.jsonl.gz",
        event_range_prefix(events)?,
        events.last_offset
    ))
}

/// Writes one range of events to the archive directory and returns its
/// key. With `clean`, other objects of ranges with the same first offset
/// (left by a write that never committed) are removed first.
pub fn write_event_range(
    archive_dir: &Path,
    events: &ArchivedEvents,
    clean: bool,
) -> io::Result<String> {
    let (Some(key), Some(prefix)) = (event_range_key(events), event_range_prefix(events)) else {
        return Err(io::Error::other("an empty event range has no key"));
    };
    if clean {
        let (dir, name_prefix) = prefix.rsplit_once('/').unwrap_or(("", &prefix));
        let own = key.rsplit_once('/').map_or(key.as_str(), |(_, n)| n);
        match fs::read_dir(archive_dir.join(dir)) {
            Ok(entries) => {
                for entry in entries {
                    let entry = entry?;
                    let name = entry.file_name();
                    let name = name.to_string_lossy();
                    let stale_object = is_range_under(&name, name_prefix) && name != own;
                    // A crash between writing a range and renaming it into
                    // place leaves its temporary file (see `write_file`).
                    let stale_temporary = name
                        .strip_prefix('.')
                        .and_then(|n| n.strip_suffix(".tmp"))
                        .is_some_and(|n| is_range_under(n, name_prefix));
                    if stale_object || stale_temporary {
                        tracing::info!(stale = %name, key, "removing an archived event range that never committed");
                        fs::remove_file(entry.path())?;
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    write_file(archive_dir, &key, |mut file| {
        file.write_all(&events.gzip)?;
        Ok(file)
    })?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use analytics_worker::records::{CategoryRecord, Money};
    use flate2::read::GzDecoder;
    use std::io::Read;

    #[test]
    fn snapshot_is_gzip_json_lines_under_its_date_partition() {
        let dir = tempfile::tempdir().unwrap();
        let records: Vec<MetricRecord> = ["Books", "Games"]
            .iter()
            .enumerate()
            .map(|(i, c)| {
                MetricRecord::Category(CategoryRecord {
                    category: c.to_string(),
                    total_products: i as u64,
                    total_value: Money(12000),
                    average_price: Money(1500),
                    last_event_at: 7,
                })
            })
            .collect();
        let now = 1_696_176_060_000;
        let key = write_metric_snapshot(dir.path(), &records, now).unwrap();
        assert_eq!(key, "metrics/dt=2023-10-01/snapshot-1696176060000.jsonl.gz");

        let mut text = String::new();
        GzDecoder::new(File::open(dir.path().join(&key)).unwrap())
            .read_to_string(&mut text)
            .unwrap();
        let expected: String = records.iter().map(|r| r.to_json_line() + "\n").collect();
        assert_eq!(text, expected);
        let parsed: Vec<MetricRecord> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(parsed, records);

        // Only the snapshot is left in the partition (no temporary file).
        let names: Vec<_> = fs::read_dir(dir.path().join("metrics/dt=2023-10-01"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["snapshot-1696176060000.jsonl.gz"]);

        // Writing the same snapshot again overwrites it.
        assert_eq!(
            write_metric_snapshot(dir.path(), &records[..1], now).unwrap(),
            key
        );
        let mut text = String::new();
        GzDecoder::new(File::open(dir.path().join(&key)).unwrap())
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text.lines().count(), 1);
    }

    /// A range as a worker builds it: `{"n":<offset>}` at 2023-10-01T16:01:00Z
    /// plus a minute per offset.
    fn range(
        topic: &str,
        partition: u32,
        offsets: std::ops::RangeInclusive<i64>,
    ) -> ArchivedEvents {
        let mut w = analytics_worker::archive::RangeWriter::new(topic, partition);
        for o in offsets {
            let event = format!("{{\"n\":{o}}}");
            w.push(o, 1_696_176_060_000 + o * 60_000, event.as_bytes(), true);
        }
        w.finish().unwrap()
    }

    fn lines_of(path: &Path) -> Vec<serde_json::Value> {
        let mut text = String::new();
        GzDecoder::new(File::open(path).unwrap())
            .read_to_string(&mut text)
            .unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn an_event_range_is_keyed_by_topic_partition_offsets_and_first_time() {
        let r = range("product.created", 3, 7..=9);
        assert_eq!(
            event_range_key(&r).unwrap(),
            "events/dt=2023-10-01/hour=16/product.created-3-7-9.jsonl.gz"
        );
        assert_eq!(
            event_range_prefix(&r).unwrap(),
            "events/dt=2023-10-01/hour=16/product.created-3-7-"
        );
        assert_eq!(event_range_key(&ArchivedEvents::default()), None);
        // No broker timestamp: dated at the epoch, still deterministic.
        let mut untimed = analytics_worker::archive::RangeWriter::new("t", 0);
        untimed.push(5, proto::NO_TIMESTAMP, b"{}", true);
        assert_eq!(
            event_range_key(&untimed.finish().unwrap()).unwrap(),
            "events/dt=1970-01-01/hour=00/t-0-5-5.jsonl.gz"
        );
    }

    /// Writes one range, as storage does.
    fn write(dir: &Path, range: &ArchivedEvents, clean: bool) -> String {
        write_event_range(dir, range, clean).unwrap()
    }

    #[test]
    fn a_range_is_stored_as_the_worker_built_it() {
        let dir = tempfile::tempdir().unwrap();
        let r = range("t", 2, 5..=14);
        let key = write(dir.path(), &r, false);
        assert_eq!(fs::read(dir.path().join(&key)).unwrap(), r.gzip);
        let lines = lines_of(&dir.path().join(&key));
        assert_eq!(lines.len(), 10);
        assert_eq!(lines[0]["value"]["n"], 5);
        assert_eq!(lines[9]["offset"], 14);
    }

    #[test]
    fn clean_removes_only_ranges_with_the_same_first_offset() {
        let dir = tempfile::tempdir().unwrap();
        // A write that never committed archived 7..=12; another partition and
        // the range after it are legitimate.
        let stale = write(dir.path(), &range("t", 0, 7..=12), false);
        let other_partition = write(dir.path(), &range("t", 1, 7..=9), false);
        let next = write(dir.path(), &range("t", 0, 70..=71), false);
        // Another topic whose objects begin like these (`t-0` partition 7).
        let lookalike = write(dir.path(), &range("t-0", 7, 15..=16), false);
        // A write killed before its rename left its temporary file.
        let hour = dir.path().join("events/dt=2023-10-01/hour=16");
        let temporary = hour.join(".t-0-7-15.jsonl.gz.tmp");
        fs::write(&temporary, b"partial").unwrap();
        // Not cleaning leaves them; cleaning on the retried range removes them.
        let retried = write(dir.path(), &range("t", 0, 7..=9), true);
        assert!(!dir.path().join(&stale).exists(), "{stale}");
        assert!(!temporary.exists(), "{}", temporary.display());
        for key in [&other_partition, &next, &retried, &lookalike] {
            assert!(dir.path().join(key).is_file(), "{key}");
        }
        assert_eq!(lines_of(&dir.path().join(&retried)).len(), 3);
        // A retry of the same range overwrites itself, also when cleaning.
        assert_eq!(write(dir.path(), &range("t", 0, 7..=9), true), retried);
        let names: Vec<_> = fs::read_dir(dir.path().join("events/dt=2023-10-01/hour=16"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
    }
}
