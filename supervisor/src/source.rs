//! The embedded source: a JSON-lines file (or stdin) read on its own thread.
//! It plays the catalogue's producer: each line is keyed by `data.sellerId`
//! and routed to a virtual partition (shard) with the backend's partitioner.
//! Offsets are line numbers counted from 0.

use crate::route::{seller_key, shard_for_key};
use proto::{EventBatch, Offset};
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::mpsc;

#[derive(Clone, Debug)]
pub enum Input {
    File(PathBuf),
    Stdin,
}

pub enum SourceMsg {
    Batch(EventBatch),
    /// Every line was read; `lines` is the total in the input.
    End {
        lines: u64,
    },
    /// Reading stopped on request; every line read was handed over, and
    /// every shard was told how far the stream was read.
    Stopped,
    Failed(std::io::Error),
    /// (A regular file) About this many events are left to read, estimated
    /// from its size and the bytes per line so far: lets the tree cut the
    /// last flush windows small, so that storage is not left writing a
    /// large one after the workers are done. `None` once the file has grown
    /// past the size it had when opened: its end is not known any more.
    Remaining {
        events: Option<u64>,
    },
    /// (Kafka) The group gave us these shards: restore them.
    Assigned(Vec<proto::Shard>),
    /// (Kafka) These shards are being taken away: make everything read for
    /// them durable, queue their commits, then answer on `done`.
    Revoked {
        shards: Vec<proto::Shard>,
        done: crate::kafka::RevokeDone,
    },
}

/// Events per batch sent to a worker.
const BATCH_EVENTS: usize = 1024;
/// A batch is sent once its payload reaches this many bytes (lines may be
/// up to `--max-event-bytes` each): its frame stays far below the limit.
const BATCH_BYTES: usize = 8 << 20;
/// Every this many lines, every shard is handed its batch and told how far
/// the stream was read: bounds what the source holds, and keeps the shards'
/// durable positions (the resume point) close together.
const ANNOUNCE_LINES: Offset = 4096;

/// The stream name under which positions are kept. A file is named by its
/// path and a fingerprint of its first 4 KiB, so appending resumes but a
/// different file at the same path starts over. Stdin is a new stream on
/// every run: it cannot be resumed.
pub fn stream_name(input: &Input) -> std::io::Result<String> {
    match input {
        // A pipe (`--input <(zcat …)`) cannot be read twice: hashing its
        // head here would lose those bytes for the source. Like stdin, it
        // is a stream of its own each run.
        Input::File(path) if !std::fs::metadata(path)?.is_file() => {
            Ok(format!("pipe:{}:{}", path.display(), unique_suffix()))
        }
        Input::File(path) => {
            let canonical = std::fs::canonicalize(path)?;
            let mut head = Vec::with_capacity(4096);
            std::fs::File::open(path)?
                .take(4096)
                .read_to_end(&mut head)?;
            Ok(format!(
                "file:{}@{:016x}",
                canonical.display(),
                fnv1a(&head)
            ))
        }
        Input::Stdin => Ok(format!("stdin:{}", unique_suffix())),
    }
}

/// Whether a re-run can resume the stream: only a regular file is named
/// by its content, stdin and pipes are new streams every run.
pub fn is_resumable(stream: &str) -> bool {
    stream.starts_with("file:")
}

fn unique_suffix() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}-{}", now.as_millis(), std::process::id())
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

pub struct FileSource {
    pub input: Input,
    pub stream: String,
    pub shards: u32,
    pub max_event_bytes: usize,
}

/// Events left in a file of `size` bytes after `lines` lines in `read`
/// bytes, at the bytes per line so far; `None` once the file has grown past
/// `size` (it is being appended to: its end is unknown).
fn events_left(size: u64, read: u64, lines: u64) -> Option<u64> {
    if read > size || read == 0 {
        return None;
    }
    let left = u128::from(size - read) * u128::from(lines) / u128::from(read);
    Some(u64::try_from(left).unwrap_or(u64::MAX))
}

impl FileSource {
    /// Reads from line `from` on a thread, sending batches until the input
    /// ends, `stop` is set, or the receiver is dropped.
    pub fn start(
        self,
        from: Offset,
        tx: mpsc::Sender<SourceMsg>,
        stop: Arc<AtomicBool>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let (reader, size): (Box<dyn Read + Send>, Option<u64>) = match &self.input {
            Input::File(path) => {
                let file = std::fs::File::open(path)?;
                // A pipe or a /proc file has no size to estimate from.
                let metadata = file.metadata()?;
                let size = metadata.is_file().then_some(metadata.len());
                (Box::new(file), size)
            }
            Input::Stdin => (Box::new(std::io::stdin()), None),
        };
        std::thread::Builder::new()
            .name("source".into())
            .spawn(move || {
                let msg = match self.read_all(reader, size, from, &tx, &stop) {
                    Ok(Some(lines)) if stop.load(Ordering::Relaxed) => {
                        let _ = lines;
                        SourceMsg::Stopped
                    }
                    Ok(Some(lines)) => SourceMsg::End { lines },
                    Ok(None) => return,
                    Err(e) => SourceMsg::Failed(e),
                };
                let _ = tx.blocking_send(msg);
            })
    }

    /// Lines read; `Ok(None)` when the receiver went away.
    fn read_all(
        &self,
        reader: Box<dyn Read + Send>,
        size: Option<u64>,
        from: Offset,
        tx: &mpsc::Sender<SourceMsg>,
        stop: &AtomicBool,
    ) -> std::io::Result<Option<u64>> {
        let mut reader = BufReader::with_capacity(
            1 << 20,
            Counted {
                inner: reader,
                bytes: 0,
            },
        );
        let stream: Box<str> = self.stream.as_str().into();
        let mut batches: Vec<EventBatch> = (0..self.shards)
            .map(|s| EventBatch::new(s, stream.clone()))
            .collect();
        let mut line = Vec::new();
        let mut offset: Offset = 0;
        let mut announced: Offset = Offset::MIN;
        loop {
            // About to block on the OS, or holding enough: hand over what we
            // have, and tell every shard how far the stream was read.
            let due = reader.buffer().is_empty() || offset - announced.max(from) >= ANNOUNCE_LINES;
            if due && offset > from && offset - 1 > announced {
                announced = offset - 1;
                if !send_all(&mut batches, announced, tx) {
                    return Ok(None);
                }
                let read = reader.get_ref().bytes - reader.buffer().len() as u64;
                if let Some(size) = size.filter(|_| read > 0) {
                    let events = events_left(size, read, offset as u64);
                    if tx.blocking_send(SourceMsg::Remaining { events }).is_err() {
                        return Ok(None);
                    }
                }
            }
            if stop.load(Ordering::Relaxed)
                || !read_line_capped(&mut reader, &mut line, self.max_event_bytes + 1)?
            {
                break;
            }
            if offset >= from {
                let shard = seller_key(&line).map_or(0, |k| shard_for_key(&k, self.shards));
                let batch = &mut batches[shard as usize];
                batch.push(offset, &line);
                let full = batch.len() >= BATCH_EVENTS || batch.payload.len() >= BATCH_BYTES;
                if full && !send(batch, tx) {
                    return Ok(None);
                }
            }
            offset += 1;
        }
        if offset > from && !send_all(&mut batches, offset - 1, tx) {
            return Ok(None);
        }
        Ok(Some(offset as u64))
    }
}

/// A reader that counts the bytes it hands out.
struct Counted<R> {
    inner: R,
    bytes: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
}

fn send(batch: &mut EventBatch, tx: &mpsc::Sender<SourceMsg>) -> bool {
    // The next batch of the shard is likely as large: room for it up front
    // spares the copies of a growing buffer.
    let next = EventBatch::with_capacity(
        batch.shard,
        batch.stream.clone(),
        batch.len(),
        batch.payload.len(),
    );
    let full = std::mem::replace(batch, next);
    tx.blocking_send(SourceMsg::Batch(full)).is_ok()
}

/// Sends every shard its batch, empty or not, marked as read up to `upto`.
fn send_all(batches: &mut [EventBatch], upto: Offset, tx: &mpsc::Sender<SourceMsg>) -> bool {
    batches.iter_mut().all(|b| {
        b.upto = upto;
        send(b, tx)
    })
}

/// Reads one line without its newline, keeping at most `cap` bytes of it (a
/// longer line is still consumed whole). False at end of input.
pub fn read_line_capped(
    reader: &mut impl BufRead,
    line: &mut Vec<u8>,
    cap: usize,
) -> std::io::Result<bool> {
    line.clear();
    let mut seen_any = false;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            break;
        }
        seen_any = true;
        let (chunk, used, done) = match memchr::memchr(b'\n', buf) {
            Some(i) => (&buf[..i], i + 1, true),
            None => (buf, buf.len(), false),
        };
        let room = cap.saturating_sub(line.len());
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        reader.consume(used);
        if done {
            break;
        }
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(seen_any)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lines_are_capped_but_consumed() {
        let data = format!("short\n{}\nlast\r\nno-newline", "x".repeat(100));
        let mut r = BufReader::with_capacity(16, data.as_bytes());
        let mut line = Vec::new();
        let mut lines = Vec::new();
        while read_line_capped(&mut r, &mut line, 10).unwrap() {
            lines.push(String::from_utf8(line.clone()).unwrap());
        }
        assert_eq!(lines, vec!["short", "xxxxxxxxxx", "last", "no-newline"]);
    }

    /// The estimate of what is left follows the file down to nothing, and
    /// only a regular file (a known size) makes one.
    #[test]
    fn a_file_source_estimates_the_events_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let lines = 20_000u64;
        let text: String = (0..lines)
            .map(|i| {
                format!(
                    "{{\"data\":{{\"sellerId\":\"s{}\"}},\"n\":{i:06}}}\n",
                    i % 7
                )
            })
            .collect();
        std::fs::write(&path, text).unwrap();
        let source = FileSource {
            input: Input::File(path),
            stream: "file:test".into(),
            shards: 4,
            max_event_bytes: 1 << 20,
        };
        let (tx, mut rx) = mpsc::channel(1 << 16);
        let stop = Arc::new(AtomicBool::new(false));
        source.start(0, tx, stop).unwrap().join().unwrap();
        let mut left = Vec::new();
        while let Ok(msg) = rx.try_recv() {
            match msg {
                SourceMsg::Remaining { events } => left.push(events.expect("a known end")),
                SourceMsg::End { lines: n } => assert_eq!(n, lines),
                _ => {}
            }
        }
        assert!(
            left.len() >= 4,
            "one estimate per {ANNOUNCE_LINES} lines: {left:?}"
        );
        assert!(left.windows(2).all(|w| w[0] >= w[1]), "{left:?}");
        let first = lines - ANNOUNCE_LINES as u64;
        // Lines of one length: bytes left over bytes per line is exact.
        assert_eq!(left[0], first);
        assert_eq!(left.last(), Some(&0));
    }

    #[test]
    fn the_estimate_is_unknown_once_the_file_grew() {
        assert_eq!(events_left(1000, 100, 10), Some(90));
        assert_eq!(events_left(1000, 1000, 100), Some(0));
        assert_eq!(events_left(1000, 1001, 100), None);
        assert_eq!(events_left(1000, 0, 0), None);
        assert_eq!(events_left(u64::MAX, 1, u64::MAX), Some(u64::MAX));
    }

    /// A pipe is not read to name it: its first bytes would be lost.
    #[test]
    fn a_pipe_is_named_without_reading_it() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("events.fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        // Opening a FIFO to read would block without a writer: naming it
        // returns at once, so nothing opened it.
        let name = stream_name(&Input::File(fifo)).unwrap();
        assert!(name.starts_with("pipe:") && !is_resumable(&name), "{name}");
        assert!(!is_resumable(&stream_name(&Input::Stdin).unwrap()));
    }

    #[test]
    fn stream_names_follow_content() {
        let dir = std::env::temp_dir().join(format!("analytics-src-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.jsonl");
        std::fs::write(&p, "one\n").unwrap();
        let first = stream_name(&Input::File(p.clone())).unwrap();
        std::fs::write(&p, "two\n").unwrap();
        let second = stream_name(&Input::File(p.clone())).unwrap();
        assert_ne!(first, second);
        assert!(first.starts_with("file:"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
