//! The archive (DESIGN §6): gzip JSON lines under Hive-style date
//! partitions, with the same keys in S3 and in the archive directory of a
//! data directory (`<data_dir>/archive`).
//!
//! - `metrics/dt=YYYY-MM-DD/snapshot-<epochMillis>.jsonl.gz`: every metric
//!   record;
//! - `events/dt=YYYY-MM-DD/hour=HH/<topic>-<partition>-<firstOffset>-<lastOffset>.jsonl.gz`:
//!   the consumed events of one topic-partition that one write covered, one
//!   line each: `{"topic","partition","offset","timestamp","value"}` with
//!   the event as it was received (`value` when it is one line of valid
//!   JSON, else `raw`, a string, or `rawHex` when it is not UTF-8). The
//!   date is the first event's broker timestamp, so a retried upload of the
//!   same range lands on the same key.
//!
//! An event range is uploaded before the write that covers it commits. A
//! crash in between can leave an object whose range never committed; the
//! range retried after it starts at the same first offset (the first event
//! after the durable position) and may end elsewhere. So the first upload
//! of a topic-partition after a (re)start removes any other object with the
//! same first offset: [`event_range_prefix`].

use crate::store::utc_day;
use analytics_worker::records::MetricRecord;
use flate2::Compression;
use flate2::write::GzEncoder;
use proto::{EventBatch, NO_TIMESTAMP};
use serde::Serialize;
use serde_json::value::RawValue;
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

/// One topic-partition's events of one write, in offset order, kept as
/// the chunks they arrived in: joining them would copy every event once
/// more, and the encoder can read them one after the other.
#[derive(Clone, Debug)]
pub struct EventRange {
    chunks: Vec<EventBatch>,
}

impl From<EventBatch> for EventRange {
    fn from(chunk: EventBatch) -> EventRange {
        EventRange {
            chunks: vec![chunk],
        }
    }
}

impl EventRange {
    /// Appends the next chunk of the same topic-partition.
    pub fn push(&mut self, chunk: EventBatch) {
        debug_assert!(self.continues_with(&chunk));
        self.chunks.push(chunk);
    }

    /// Whether `chunk` belongs to this range's topic-partition.
    pub fn continues_with(&self, chunk: &EventBatch) -> bool {
        self.chunks[0].shard == chunk.shard && self.chunks[0].stream == chunk.stream
    }

    pub fn stream(&self) -> &str {
        &self.chunks[0].stream
    }

    pub fn shard(&self) -> proto::Shard {
        self.chunks[0].shard
    }

    pub fn len(&self) -> usize {
        self.chunks.iter().map(EventBatch::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.iter().all(EventBatch::is_empty)
    }

    fn first_offset(&self) -> Option<i64> {
        self.chunks.iter().find_map(|c| c.offsets.first().copied())
    }

    fn last_offset(&self) -> Option<i64> {
        self.chunks
            .iter()
            .rev()
            .find_map(|c| c.offsets.last().copied())
    }

    /// The first event's timestamp, the date of the range's key (the epoch
    /// when the broker gave none).
    fn time(&self) -> i64 {
        self.chunks
            .iter()
            .find(|c| !c.is_empty())
            .map_or(0, |c| c.timestamp(0).max(0))
    }
}

/// The prefix shared by every object of ranges that start where `events`
/// starts: `events/dt=…/hour=…/<topic>-<partition>-<firstOffset>-`. `None`
/// for an empty range.
pub fn event_range_prefix(events: &EventRange) -> Option<String> {
    let first = events.first_offset()?;
    let ms = events.time();
    let hour = ms.div_euclid(3_600_000).rem_euclid(24);
    Some(format!(
        "events/dt={}/hour={hour:02}/{}-{}-{first}-",
        utc_day(ms),
        events.stream(),
        events.shard()
    ))
}

/// The key of the object holding one topic-partition's range of events.
pub fn event_range_key(events: &EventRange) -> Option<String> {
    let last = events.last_offset()?;
    Some(format!("{}{last}.jsonl.gz", event_range_prefix(events)?))
}

/// One archived event (see the module doc).
#[derive(Serialize)]
struct ArchivedEvent<'a> {
    topic: &'a str,
    partition: proto::Shard,
    offset: i64,
    timestamp: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    raw: Option<&'a str>,
    #[serde(rename = "rawHex", skip_serializing_if = "Option::is_none")]
    raw_hex: Option<String>,
}

impl<'a> ArchivedEvent<'a> {
    /// An event of `events` with neither value nor raw text yet.
    fn of(events: &'a EventBatch, offset: i64, timestamp: Option<i64>) -> ArchivedEvent<'a> {
        ArchivedEvent {
            topic: &events.stream,
            partition: events.shard,
            offset,
            timestamp,
            value: None,
            raw: None,
            raw_hex: None,
        }
    }
}

/// The start of every line of a range, `{"topic":…,"partition":…,"offset":`,
/// built once per range: written field by field below, it gives the same
/// bytes as serializing [`ArchivedEvent`], at a fraction of the cost (the
/// archive turns every consumed event into a line).
fn line_prefix(events: &EventBatch) -> io::Result<Vec<u8>> {
    let mut prefix = b"{\"topic\":".to_vec();
    serde_json::to_writer(&mut prefix, &*events.stream).map_err(io::Error::other)?;
    prefix.extend_from_slice(b",\"partition\":");
    prefix.extend_from_slice(itoa::Buffer::new().format(events.shard).as_bytes());
    prefix.extend_from_slice(b",\"offset\":");
    Ok(prefix)
}

/// Appends event `i` of `events` as one JSON line to `line`; `prefix` is
/// the range's [`line_prefix`].
fn archived_line(
    line: &mut Vec<u8>,
    prefix: &[u8],
    events: &EventBatch,
    i: usize,
    offset: i64,
    bytes: &[u8],
) -> io::Result<()> {
    let timestamp = Some(events.timestamp(i)).filter(|&t| t != NO_TIMESTAMP);
    // Embedded as JSON only when that keeps the line one line.
    let one_line = memchr::memchr2(b'\n', b'\r', bytes).is_none();
    let text = std::str::from_utf8(bytes);
    let value = match text {
        Ok(text) if one_line => serde_json::from_str::<&RawValue>(text).ok(),
        _ => None,
    };
    if let Some(value) = value {
        let mut numbers = itoa::Buffer::new();
        line.extend_from_slice(prefix);
        line.extend_from_slice(numbers.format(offset).as_bytes());
        line.extend_from_slice(b",\"timestamp\":");
        match timestamp {
            Some(t) => line.extend_from_slice(numbers.format(t).as_bytes()),
            None => line.extend_from_slice(b"null"),
        }
        line.extend_from_slice(b",\"value\":");
        line.extend_from_slice(value.get().as_bytes());
        line.extend_from_slice(b"}\n");
        return Ok(());
    }
    // Not JSON, or not on one line: rare, so serialized the plain way.
    let mut event = ArchivedEvent::of(events, offset, timestamp);
    match text {
        Ok(text) => event.raw = Some(text),
        Err(_) => event.raw_hex = Some(bytes.iter().map(|b| format!("{b:02x}")).collect()),
    }
    serde_json::to_writer(&mut *line, &event).map_err(io::Error::other)?;
    line.push(b'\n');
    Ok(())
}

/// Every event of a range as gzip JSON lines, into `out`. Lines are built
/// in one reused buffer and handed to the compressor in blocks.
fn gzip_events<W: Write>(out: W, range: &EventRange) -> io::Result<W> {
    let mut gz = GzEncoder::new(out, Compression::fast());
    let mut block = Vec::with_capacity(1 << 16);
    let prefix = line_prefix(&range.chunks[0])?;
    for events in &range.chunks {
        for (i, (offset, bytes)) in events.iter().enumerate() {
            archived_line(&mut block, &prefix, events, i, offset, bytes)?;
            if block.len() >= 1 << 16 {
                gz.write_all(&block)?;
                block.clear();
            }
        }
    }
    gz.write_all(&block)?;
    gz.finish()
}

/// A range of events as gzip JSON lines, one line per event.
pub fn encode_event_range(range: &EventRange) -> io::Result<Vec<u8>> {
    gzip_events(Vec::new(), range)
}

/// [`encode_event_range`] of each range, in order, on up to one thread per
/// core. Compressing the events is most of the storage process's work on
/// the Kafka path (a write carries one range per topic-partition), and
/// on one thread storage was what the whole pipeline waited for.
pub fn encode_event_ranges(ranges: &[EventRange]) -> io::Result<Vec<Vec<u8>>> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(ranges.len());
    if threads <= 1 {
        return ranges.iter().map(encode_event_range).collect();
    }
    let next = AtomicUsize::new(0);
    let mut bodies: Vec<(usize, io::Result<Vec<u8>>)> = std::thread::scope(|scope| {
        let encoders: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(range) = ranges.get(i) else {
                            return done;
                        };
                        done.push((i, encode_event_range(range)));
                    }
                })
            })
            .collect();
        encoders
            .into_iter()
            .flat_map(|e| e.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    bodies.sort_unstable_by_key(|(i, _)| *i);
    bodies.into_iter().map(|(_, body)| body).collect()
}

/// Writes one range of events, already encoded as `body`
/// ([`encode_event_range`]), to the archive directory and returns its key.
/// With `clean`, other objects of ranges with the same first offset (left
/// by a write that never committed) are removed first.
pub fn write_event_range(
    archive_dir: &Path,
    events: &EventRange,
    body: &[u8],
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
                    let stale_object =
                        name.starts_with(name_prefix) && name.ends_with(".jsonl.gz") && name != own;
                    // A crash between writing a range and renaming it into
                    // place leaves its temporary file (see `write_file`).
                    let stale_temporary = name.strip_prefix('.').is_some_and(|n| {
                        n.starts_with(name_prefix) && n.ends_with(".jsonl.gz.tmp")
                    });
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
        file.write_all(body)?;
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

    fn batch(topic: &str, partition: u32, offsets: std::ops::RangeInclusive<i64>) -> EventBatch {
        let mut b = EventBatch::new(partition, topic.into());
        for o in offsets {
            // 2023-10-01T16:01:00Z plus a minute per offset.
            b.push_at(
                o,
                1_696_176_060_000 + o * 60_000,
                format!("{{\"n\":{o}}}").as_bytes(),
            );
        }
        b
    }

    fn range(topic: &str, partition: u32, offsets: std::ops::RangeInclusive<i64>) -> EventRange {
        EventRange::from(batch(topic, partition, offsets))
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
        assert_eq!(
            event_range_key(&EventBatch::new(0, "t".into()).into()),
            None
        );
        // No broker timestamp: dated at the epoch, still deterministic.
        let mut untimed = EventBatch::new(0, "t".into());
        untimed.push_at(5, NO_TIMESTAMP, b"{}");
        assert_eq!(
            event_range_key(&untimed.into()).unwrap(),
            "events/dt=1970-01-01/hour=00/t-0-5-5.jsonl.gz"
        );
    }

    /// Encodes and writes one range, as storage does.
    fn write(dir: &Path, range: &EventRange, clean: bool) -> String {
        let body = encode_event_range(range).unwrap();
        write_event_range(dir, range, &body, clean).unwrap()
    }

    #[test]
    fn ranges_encoded_on_several_threads_come_back_in_order() {
        // More ranges than cores, of different sizes.
        let ranges: Vec<EventRange> = (0..9)
            .map(|p| range("t", p, 1..=(1 + 40 * p as i64)))
            .collect();
        let one_by_one: Vec<Vec<u8>> = ranges
            .iter()
            .map(|r| encode_event_range(r).unwrap())
            .collect();
        assert_eq!(encode_event_ranges(&ranges).unwrap(), one_by_one);
        assert!(encode_event_ranges(&[]).unwrap().is_empty());
    }

    /// A line as serde writes a whole [`ArchivedEvent`], the way lines were
    /// built before the hand-built fast path: what that path must equal.
    fn serde_line(events: &EventBatch, i: usize, offset: i64, bytes: &[u8]) -> Vec<u8> {
        let timestamp = Some(events.timestamp(i)).filter(|&t| t != NO_TIMESTAMP);
        let mut event = ArchivedEvent::of(events, offset, timestamp);
        let one_line = !bytes.iter().any(|&b| b == b'\n' || b == b'\r');
        match std::str::from_utf8(bytes) {
            Ok(text) => match serde_json::from_str::<&RawValue>(text) {
                Ok(value) if one_line => event.value = Some(value),
                _ => event.raw = Some(text),
            },
            Err(_) => event.raw_hex = Some(bytes.iter().map(|b| format!("{b:02x}")).collect()),
        }
        let mut line = serde_json::to_vec(&event).unwrap();
        line.push(b'\n');
        line
    }

    use proptest::prelude::*;

    proptest! {
        #[test]
        fn lines_are_byte_for_byte_what_serde_writes(
            topic in "[a-z.\"\\\\\u{1}é]{0,12}",
            shard: u32,
            offset: i64,
            timestamp in prop_oneof![Just(NO_TIMESTAMP), any::<i64>()],
            value in prop_oneof![
                // JSON, some of it padded or spread over lines.
                "[ \n]?\\{\"[a-z\"]{0,4}\":(-?[0-9]{1,4}(\\.[0-9]{1,3})?|\"[a-zé\\\\]{0,5}\"|null|\\[1, 2\\])\\}[ \r]?",
                // Text that is mostly not JSON.
                "[ -~\n\r]{0,24}",
            ].prop_map(String::into_bytes),
            binary in proptest::collection::vec(any::<u8>(), 0..16),
        ) {
            let mut events = EventBatch::new(shard, topic.into());
            events.push_at(offset, timestamp, &value);
            events.push_at(offset.wrapping_add(1), timestamp, &binary);
            let prefix = line_prefix(&events).unwrap();
            for (i, (o, bytes)) in events.iter().enumerate() {
                let mut line = Vec::new();
                archived_line(&mut line, &prefix, &events, i, o, bytes).unwrap();
                let expected = serde_line(&events, i, o, bytes);
                prop_assert_eq!(
                    String::from_utf8_lossy(&line),
                    String::from_utf8_lossy(&expected)
                );
            }
        }
    }

    #[test]
    fn every_event_is_archived_as_received() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = EventBatch::new(1, "product.updated".into());
        let events: [&[u8]; 5] = [
            br#"{"eventType":"ProductUpdated","data":{"price":29.990}}"#,
            b"{not json",
            b"\xff\x00binary",
            b"{\n  \"pretty\": true\n}",
            b"",
        ];
        for (i, e) in events.iter().enumerate() {
            r.push_at(
                10 + i as i64,
                if i == 2 {
                    NO_TIMESTAMP
                } else {
                    1_696_176_060_000
                },
                e,
            );
        }
        let r = EventRange::from(r);
        let key = write(dir.path(), &r, false);
        let lines = lines_of(&dir.path().join(&key));
        assert_eq!(lines.len(), 5);
        assert_eq!(lines[0]["topic"], "product.updated");
        assert_eq!(lines[0]["partition"], 1);
        assert_eq!(lines[0]["offset"], 10);
        assert_eq!(lines[0]["timestamp"], 1_696_176_060_000i64);
        assert_eq!(lines[0]["value"]["data"]["price"].to_string(), "29.99");
        // The embedded value keeps the original text (29.990), byte for byte.
        let mut text = String::new();
        GzDecoder::new(File::open(dir.path().join(&key)).unwrap())
            .read_to_string(&mut text)
            .unwrap();
        assert!(
            text.lines()
                .next()
                .unwrap()
                .ends_with(r#""value":{"eventType":"ProductUpdated","data":{"price":29.990}}}"#)
        );
        assert_eq!(lines[1]["raw"], "{not json");
        assert_eq!(lines[2]["rawHex"], "ff0062696e617279");
        assert!(lines[2]["timestamp"].is_null());
        assert_eq!(lines[3]["raw"], "{\n  \"pretty\": true\n}");
        assert_eq!(lines[4]["raw"], "");
        // The same range in memory, as S3 gets it.
        let mut from_memory = String::new();
        GzDecoder::new(&encode_event_range(&r).unwrap()[..])
            .read_to_string(&mut from_memory)
            .unwrap();
        assert_eq!(from_memory, text);
    }

    #[test]
    fn a_range_in_chunks_is_the_same_object_as_in_one() {
        let whole = range("t", 2, 5..=14);
        // Empty chunks (first or later) change nothing.
        let mut chunked = EventRange::from(EventBatch::new(2, "t".into()));
        chunked.push(batch("t", 2, 5..=7));
        chunked.push(EventBatch::new(2, "t".into()));
        chunked.push(batch("t", 2, 8..=8));
        chunked.push(batch("t", 2, 9..=14));
        assert_eq!(chunked.len(), 10);
        assert_eq!(event_range_key(&chunked), event_range_key(&whole));
        assert_eq!(event_range_prefix(&chunked), event_range_prefix(&whole));
        assert_eq!(
            encode_event_range(&chunked).unwrap(),
            encode_event_range(&whole).unwrap()
        );
    }

    #[test]
    fn clean_removes_only_ranges_with_the_same_first_offset() {
        let dir = tempfile::tempdir().unwrap();
        // A write that never committed archived 7..=12; another partition and
        // the range after it are legitimate.
        let stale = write(dir.path(), &range("t", 0, 7..=12), false);
        let other_partition = write(dir.path(), &range("t", 1, 7..=9), false);
        let next = write(dir.path(), &range("t", 0, 70..=71), false);
        // A write killed before its rename left its temporary file.
        let hour = dir.path().join("events/dt=2023-10-01/hour=16");
        let temporary = hour.join(".t-0-7-15.jsonl.gz.tmp");
        fs::write(&temporary, b"partial").unwrap();
        // Not cleaning leaves them; cleaning on the retried range removes them.
        let retried = write(dir.path(), &range("t", 0, 7..=9), true);
        assert!(!dir.path().join(&stale).exists(), "{stale}");
        assert!(!temporary.exists(), "{}", temporary.display());
        for key in [&other_partition, &next, &retried] {
            assert!(dir.path().join(key).is_file(), "{key}");
        }
        assert_eq!(lines_of(&dir.path().join(&retried)).len(), 3);
        // A retry of the same range overwrites itself, also when cleaning.
        assert_eq!(write(dir.path(), &range("t", 0, 7..=9), true), retried);
        let names: Vec<_> = fs::read_dir(dir.path().join("events/dt=2023-10-01/hour=16"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }
}
