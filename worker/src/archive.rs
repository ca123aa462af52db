//! The raw event archive's objects (DESIGN §6), built as the events are
//! folded. An object holds the consumed events of one topic-partition that
//! one write covers, from one hour on (an event of a later hour starts the
//! next object, see [`RangeWriter::takes`]), one JSON line each:
//! `{"topic","partition","offset","timestamp","value"}` with the event as it
//! was received (`value` when it is one line of valid JSON, else `raw`, a
//! string, or `rawHex` when it is not UTF-8), gzipped. Storage names it
//! (`events/dt=…/hour=…/<topic>-<partition>-<first>-<last>.jsonl.gz`, see
//! the root crate's `archive` module) and stores it before the write that
//! carries it commits.
//!
//! The worker builds them because it holds the events and has parsed them
//! already: an event it applied is known to be JSON, so only rejected ones
//! are checked here. (Built in the storage process, every event crossed the
//! supervisor's socket twice and was parsed a second time.)

use flate2::Compression;
use flate2::write::GzEncoder;
use proto::{ArchivedEvents, NO_TIMESTAMP, Offset, Shard, archive_hour};
use serde::Serialize;
use serde_json::value::RawValue;
use std::io::{self, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::thread::{self, JoinHandle};

/// Lines are handed to the compressor in blocks of about this size.
const BLOCK_BYTES: usize = 64 << 10;

/// Blocks waiting for a range's compressor thread at most: when it falls
/// behind, the fold waits rather than holding the range uncompressed.
const QUEUED_BLOCKS: usize = 8;

/// One topic-partition's events since the last take, compressed as they
/// come.
pub struct RangeWriter {
    range: ArchivedEvents,
    /// `{"topic":…,"partition":…,"offset":`, the start of every line.
    prefix: Vec<u8>,
    block: Vec<u8>,
    /// Started at the first full block: a range smaller than a block (most
    /// ranges of a small flush) is compressed at the end, on the caller's
    /// thread.
    gz: Option<GzipThread>,
    /// Compressing failed (into memory: not expected); [`Self::finish`]
    /// reports it.
    error: Option<io::Error>,
}

/// A gzip stream at the fast level: JSON lines still shrink several times,
/// at a fraction of the default level's instructions.
fn encoder() -> GzEncoder<Vec<u8>> {
    GzEncoder::new(Vec::new(), Compression::fast())
}

/// A thread compressing one range's blocks in order. gzip costs about as
/// much as the fold, and a worker is one thread: this way the fold goes on
/// meanwhile, on a core the worker would otherwise leave to others.
struct GzipThread {
    blocks: SyncSender<Vec<u8>>,
    done: JoinHandle<io::Result<Vec<u8>>>,
    /// Compressed so far, and uncompressed bytes still queued: what
    /// [`RangeWriter::bytes`] counts.
    compressed: Arc<AtomicUsize>,
    queued: Arc<AtomicUsize>,
}

impl GzipThread {
    fn spawn() -> io::Result<GzipThread> {
        let (blocks, received) = mpsc::sync_channel::<Vec<u8>>(QUEUED_BLOCKS);
        let compressed = Arc::new(AtomicUsize::new(0));
        let queued = Arc::new(AtomicUsize::new(0));
        let (so_far, waiting) = (compressed.clone(), queued.clone());
        let done = thread::Builder::new()
            .name("archive-gzip".into())
            .spawn(move || {
                let mut gz = encoder();
                // Ends when the writer finishes (or is dropped).
                for block in received {
                    gz.write_all(&block)?;
                    so_far.store(gz.get_ref().len(), Ordering::Relaxed);
                    waiting.fetch_sub(block.len(), Ordering::Relaxed);
                }
                gz.finish()
            })?;
        Ok(GzipThread {
            blocks,
            done,
            compressed,
            queued,
        })
    }

    /// Queues `block`; waits while [`QUEUED_BLOCKS`] are queued already.
    fn send(&self, block: Vec<u8>) -> io::Result<()> {
        self.queued.fetch_add(block.len(), Ordering::Relaxed);
        self.blocks.send(block).map_err(|_| stopped())
    }

    fn bytes(&self) -> usize {
        self.compressed.load(Ordering::Relaxed) + self.queued.load(Ordering::Relaxed)
    }

    /// The gzip stream, once `last` and every block before it are in.
    fn finish(self, last: Vec<u8>) -> io::Result<Vec<u8>> {
        let sent = self.send(last);
        drop(self.blocks);
        let gzip = self
            .done
            .join()
            .map_err(|_| io::Error::other("the archive's gzip thread panicked"))?;
        // A failed send means the thread stopped on an error: that one.
        let gzip = gzip?;
        sent?;
        Ok(gzip)
    }
}

fn stopped() -> io::Error {
    io::Error::other("the archive's gzip thread stopped")
}

impl RangeWriter {
    pub fn new(stream: &str, shard: Shard) -> RangeWriter {
        RangeWriter {
            range: ArchivedEvents {
                stream: stream.into(),
                shard,
                ..ArchivedEvents::default()
            },
            prefix: line_prefix(stream, shard),
            block: new_block(),
            gz: None,
            error: None,
        }
    }

    /// Adds the event at `offset`. `applied`: the fold applied it, so it
    /// is valid JSON (and UTF-8) and is not checked again. A failure is
    /// kept for [`Self::finish`].
    pub fn push(&mut self, offset: Offset, timestamp: i64, bytes: &[u8], applied: bool) {
        if self.error.is_some() {
            return;
        }
        if let Err(e) = self.try_push(offset, timestamp, bytes, applied) {
            self.error = Some(e);
        }
    }

    fn try_push(
        &mut self,
        offset: Offset,
        timestamp: i64,
        bytes: &[u8],
        applied: bool,
    ) -> io::Result<()> {
        if self.range.events == 0 {
            self.range.first_offset = offset;
            self.range.time_ms = timestamp.max(0);
        }
        self.range.last_offset = offset;
        self.range.events += 1;
        let timestamp = Some(timestamp).filter(|&t| t != NO_TIMESTAMP);
        let event = Event {
            stream: &self.range.stream,
            shard: self.range.shard,
            offset,
            timestamp,
            bytes,
            applied,
        };
        archived_line(&mut self.block, &self.prefix, &event)?;
        if self.block.len() >= BLOCK_BYTES {
            let full = std::mem::replace(&mut self.block, new_block());
            let gz = match &mut self.gz {
                Some(gz) => gz,
                None => self.gz.insert(GzipThread::spawn()?),
            };
            gz.send(full)?;
        }
        Ok(())
    }

    pub fn stream(&self) -> &str {
        &self.range.stream
    }

    /// Whether an event at `timestamp` belongs in this object: not when
    /// its hour is later than the first event's (it starts the next
    /// object). A late event, or one without a timestamp, stays.
    pub fn takes(&self, timestamp: i64) -> bool {
        self.range.events == 0
            || timestamp == NO_TIMESTAMP
            || archive_hour(timestamp) <= self.range.hour()
    }

    /// About what the object takes so far (compressed, plus the lines not
    /// yet compressed): what a frame's limit counts.
    pub fn bytes(&self) -> usize {
        self.gz.as_ref().map_or(0, GzipThread::bytes) + self.block.len()
    }

    /// The finished object, or the first failure.
    pub fn finish(self) -> io::Result<ArchivedEvents> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let mut range = self.range;
        range.gzip = match self.gz {
            Some(gz) => gz.finish(self.block)?,
            None => {
                let mut gz = encoder();
                gz.write_all(&self.block)?;
                gz.finish()?
            }
        };
        Ok(range)
    }
}

/// A shard's archive objects since the last take: the one being written of
/// each stream, and the finished ones of earlier hours. (Finished at once,
/// so that a backlog spanning many hours keeps one gzip thread per stream,
/// not one per hour.)
#[derive(Default)]
pub struct ShardArchive {
    writing: Vec<RangeWriter>,
    finished: Vec<ArchivedEvents>,
    finished_bytes: usize,
    /// The first failure to finish an object; [`Self::take`] reports it.
    error: Option<io::Error>,
}

impl ShardArchive {
    /// The slot of the object an event of `stream` at `timestamp` goes to:
    /// the stream's current one, or a new one when there is none or the
    /// event is of a later hour (the current one is then finished).
    pub fn slot(&mut self, stream: &str, shard: Shard, timestamp: i64) -> usize {
        match self.writing.iter().position(|w| w.stream() == stream) {
            Some(i) if self.writing[i].takes(timestamp) => i,
            Some(i) => {
                let done = std::mem::replace(&mut self.writing[i], RangeWriter::new(stream, shard));
                match done.finish() {
                    Ok(range) => {
                        self.finished_bytes += range.gzip.len();
                        self.finished.push(range);
                    }
                    Err(e) => {
                        self.error.get_or_insert(e);
                    }
                }
                i
            }
            None => {
                self.writing.push(RangeWriter::new(stream, shard));
                self.writing.len() - 1
            }
        }
    }

    /// Whether the object in `slot` takes an event at `timestamp`.
    pub fn takes(&self, slot: usize, timestamp: i64) -> bool {
        self.writing[slot].takes(timestamp)
    }

    /// Adds an event to the object in `slot` (see [`RangeWriter::push`]).
    pub fn push(
        &mut self,
        slot: usize,
        offset: Offset,
        timestamp: i64,
        bytes: &[u8],
        applied: bool,
    ) {
        self.writing[slot].push(offset, timestamp, bytes, applied);
    }

    /// About what the objects take so far (see [`RangeWriter::bytes`]).
    pub fn bytes(&self) -> usize {
        self.finished_bytes + self.writing.iter().map(RangeWriter::bytes).sum::<usize>()
    }

    /// Every object, finished, each stream's in offset order; or the first
    /// failure.
    pub fn take(&mut self) -> io::Result<Vec<ArchivedEvents>> {
        let mut objects = std::mem::take(&mut self.finished);
        self.finished_bytes = 0;
        let writing = std::mem::take(&mut self.writing);
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        for w in writing {
            objects.push(w.finish()?);
        }
        Ok(objects)
    }
}

fn new_block() -> Vec<u8> {
    Vec::with_capacity(BLOCK_BYTES + (4 << 10))
}

/// One event and where it came from.
struct Event<'a> {
    stream: &'a str,
    shard: Shard,
    offset: Offset,
    timestamp: Option<i64>,
    bytes: &'a [u8],
    applied: bool,
}

/// One archived event as serde writes it: the slow path, for events that
/// are not one line of JSON.
#[derive(Serialize)]
struct ArchivedLine<'a> {
    topic: &'a str,
    partition: Shard,
    offset: Offset,
    timestamp: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    raw: Option<&'a str>,
    #[serde(rename = "rawHex", skip_serializing_if = "Option::is_none")]
    raw_hex: Option<String>,
}

impl<'a> ArchivedLine<'a> {
    /// `event`'s line with neither value nor raw text yet.
    fn of(event: &Event<'a>) -> ArchivedLine<'a> {
        ArchivedLine {
            topic: event.stream,
            partition: event.shard,
            offset: event.offset,
            timestamp: event.timestamp,
            value: None,
            raw: None,
            raw_hex: None,
        }
    }
}

/// The start of every line of a topic-partition,
/// `{"topic":…,"partition":…,"offset":`: written field by field below, it
/// gives the same bytes as serializing [`ArchivedLine`], at a fraction of
/// the cost (every consumed event becomes a line).
fn line_prefix(stream: &str, shard: Shard) -> Vec<u8> {
    let mut prefix = b"{\"topic\":".to_vec();
    // A string always serializes.
    let _ = serde_json::to_writer(&mut prefix, stream);
    prefix.extend_from_slice(b",\"partition\":");
    prefix.extend_from_slice(itoa::Buffer::new().format(shard).as_bytes());
    prefix.extend_from_slice(b",\"offset\":");
    prefix
}

/// Appends `event` as one JSON line to `line`; `prefix` is its
/// topic-partition's [`line_prefix`].
fn archived_line(line: &mut Vec<u8>, prefix: &[u8], event: &Event<'_>) -> io::Result<()> {
    let bytes = event.bytes;
    // Embedded as JSON only when that keeps the line one line. (A line
    // break in valid JSON can only be whitespace between tokens.)
    let one_line = memchr::memchr2(b'\n', b'\r', bytes).is_none();
    let value = if !one_line {
        None
    } else if event.applied {
        // What serde_json's RawValue keeps: the value without the
        // whitespace around it.
        Some(bytes.trim_ascii())
    } else {
        std::str::from_utf8(bytes)
            .ok()
            .and_then(|text| serde_json::from_str::<&RawValue>(text).ok())
            .map(|v| v.get().as_bytes())
    };
    if let Some(value) = value {
        let mut numbers = itoa::Buffer::new();
        line.extend_from_slice(prefix);
        line.extend_from_slice(numbers.format(event.offset).as_bytes());
        line.extend_from_slice(b",\"timestamp\":");
        match event.timestamp {
            Some(t) => line.extend_from_slice(numbers.format(t).as_bytes()),
            None => line.extend_from_slice(b"null"),
        }
        line.extend_from_slice(b",\"value\":");
        line.extend_from_slice(value);
        line.extend_from_slice(b"}\n");
        return Ok(());
    }
    // Not JSON, or not on one line: rare, so serialized the plain way.
    let mut archived = ArchivedLine::of(event);
    match std::str::from_utf8(bytes) {
        Ok(text) => archived.raw = Some(text),
        Err(_) => archived.raw_hex = Some(bytes.iter().map(|b| format!("{b:02x}")).collect()),
    }
    serde_json::to_writer(&mut *line, &archived).map_err(io::Error::other)?;
    line.push(b'\n');
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::read::GzDecoder;
    use std::io::Read;

    fn text_of(range: &ArchivedEvents) -> String {
        let mut text = String::new();
        GzDecoder::new(&range.gzip[..])
            .read_to_string(&mut text)
            .expect("gzip of UTF-8");
        text
    }

    fn lines_of(range: &ArchivedEvents) -> Vec<serde_json::Value> {
        text_of(range)
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    }

    /// Whether serde_json takes `bytes` as one JSON value.
    fn is_json(bytes: &[u8]) -> bool {
        std::str::from_utf8(bytes).is_ok_and(|t| serde_json::from_str::<&RawValue>(t).is_ok())
    }

    #[test]
    fn every_event_is_archived_as_received() {
        let mut w = RangeWriter::new("product.updated", 1);
        let events: [&[u8]; 6] = [
            br#"{"eventType":"ProductUpdated","data":{"price":29.990}}"#,
            b"{not json",
            b"\xff\x00binary",
            b"{\n  \"pretty\": true\n}",
            b"",
            b"  {\"padded\":1}\t",
        ];
        for (i, e) in events.iter().enumerate() {
            let timestamp = if i == 2 {
                NO_TIMESTAMP
            } else {
                1_696_176_060_000
            };
            w.push(10 + i as i64, timestamp, e, is_json(e));
        }
        let range = w.finish().unwrap();
        assert_eq!(
            (range.first_offset, range.last_offset, range.events),
            (10, 15, 6)
        );
        assert_eq!(range.time_ms, 1_696_176_060_000);
        let lines = lines_of(&range);
        assert_eq!(lines.len(), 6);
        assert_eq!(lines[0]["topic"], "product.updated");
        assert_eq!(lines[0]["partition"], 1);
        assert_eq!(lines[0]["offset"], 10);
        assert_eq!(lines[0]["timestamp"], 1_696_176_060_000i64);
        // The embedded value keeps the original text (29.990), byte for byte.
        let text = text_of(&range);
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
        assert!(
            text.lines()
                .nth(5)
                .unwrap()
                .ends_with(r#""value":{"padded":1}}"#)
        );
    }

    #[test]
    fn a_range_without_source_timestamps_is_dated_at_the_epoch() {
        let mut w = RangeWriter::new("t", 0);
        w.push(5, NO_TIMESTAMP, b"{}", true);
        let range = w.finish().unwrap();
        assert_eq!((range.time_ms, range.first_offset), (0, 5));
    }

    #[test]
    fn many_events_span_blocks_and_come_back_in_order() {
        let mut w = RangeWriter::new("t", 3);
        let event = format!(r#"{{"pad":"{}"}}"#, "x".repeat(900));
        for o in 0..1000 {
            w.push(o, 1_696_176_060_000 + o, event.as_bytes(), true);
        }
        assert!(w.bytes() > 0);
        let range = w.finish().unwrap();
        let offsets: Vec<i64> = lines_of(&range)
            .iter()
            .map(|l| l["offset"].as_i64().unwrap())
            .collect();
        assert_eq!(offsets, (0..1000).collect::<Vec<_>>());
        assert!(range.gzip.len() < 1000 * event.len() / 10, "compressed");
    }

    #[test]
    fn a_shard_finishes_each_hour_as_the_next_begins() {
        const HOUR: i64 = 3_600_000;
        let t0 = 1_696_176_000_000 - 1_696_176_000_000 % HOUR;
        let event = format!(r#"{{"pad":"{}"}}"#, "x".repeat(900));
        let mut archive = ShardArchive::default();
        // 300 events an hour, ~280 KiB: each hour's object has a gzip thread.
        for o in 0..900 {
            let at = t0 + (o / 300) * HOUR + o;
            let slot = archive.slot("t", 2, at);
            archive.push(slot, o, at, event.as_bytes(), true);
            if o == 600 {
                assert_eq!(archive.writing.len(), 1, "one object written at a time");
                assert_eq!(archive.finished.len(), 2);
            }
        }
        assert!(archive.bytes() > 0);
        let objects = archive.take().unwrap();
        assert_eq!(archive.bytes(), 0);
        let ranges: Vec<_> = objects
            .iter()
            .map(|r| (r.hour() - t0 / HOUR, r.first_offset, r.last_offset))
            .collect();
        assert_eq!(ranges, [(0, 0, 299), (1, 300, 599), (2, 600, 899)]);
        for r in &objects {
            let offsets: Vec<i64> = lines_of(r)
                .iter()
                .map(|l| l["offset"].as_i64().unwrap())
                .collect();
            assert_eq!(
                offsets,
                (r.first_offset..=r.last_offset).collect::<Vec<_>>()
            );
        }
        // A writer dropped unfinished (a restore drops what was not taken)
        // lets its thread end; nothing waits on it.
        let mut dropped = RangeWriter::new("t", 2);
        for o in 0..300 {
            dropped.push(o, t0, event.as_bytes(), true);
        }
        assert!(dropped.gz.is_some());
        drop(dropped);
    }

    /// A line as serde writes a whole [`ArchivedLine`] after checking the
    /// event: what the hand-built fast path must equal.
    fn serde_line(event: &Event<'_>) -> Vec<u8> {
        let bytes = event.bytes;
        let mut archived = ArchivedLine::of(event);
        let one_line = !bytes.iter().any(|&b| b == b'\n' || b == b'\r');
        match std::str::from_utf8(bytes) {
            Ok(text) => match serde_json::from_str::<&RawValue>(text) {
                Ok(value) if one_line => archived.value = Some(value),
                _ => archived.raw = Some(text),
            },
            Err(_) => archived.raw_hex = Some(bytes.iter().map(|b| format!("{b:02x}")).collect()),
        }
        let mut line = serde_json::to_vec(&archived).unwrap();
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
            timestamp in prop_oneof![Just(None), any::<i64>().prop_map(Some)],
            value in prop_oneof![
                // JSON, some of it padded or spread over lines.
                "[ \t\n]?\\{\"[a-z\"]{0,4}\":(-?[0-9]{1,4}(\\.[0-9]{1,3})?|\"[a-zé\\\\]{0,5}\"|null|\\[1, 2\\])\\}[ \t\r]?",
                // Text that is mostly not JSON.
                "[ -~\n\r]{0,24}",
            ].prop_map(String::into_bytes),
            binary in proptest::collection::vec(any::<u8>(), 0..16),
        ) {
            let prefix = line_prefix(&topic, shard);
            for bytes in [&value[..], &binary[..]] {
                // Whatever the fold applied is JSON; anything may be rejected.
                let mut cases = vec![false];
                if is_json(bytes) {
                    cases.push(true);
                }
                for applied in cases {
                    let event = Event { stream: &topic, shard, offset, timestamp, bytes, applied };
                    let mut line = Vec::new();
                    archived_line(&mut line, &prefix, &event).unwrap();
                    let expected = serde_line(&event);
                    prop_assert_eq!(
                        String::from_utf8_lossy(&line),
                        String::from_utf8_lossy(&expected)
                    );
                }
            }
        }
    }
}
