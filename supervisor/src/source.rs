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
        Input::Stdin => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            Ok(format!("stdin:{}-{}", now.as_millis(), std::process::id()))
        }
    }
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

impl FileSource {
    /// Reads from line `from` on a thread, sending batches until the input
    /// ends, `stop` is set, or the receiver is dropped.
    pub fn start(
        self,
        from: Offset,
        tx: mpsc::Sender<SourceMsg>,
        stop: Arc<AtomicBool>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let reader: Box<dyn Read + Send> = match &self.input {
            Input::File(path) => Box::new(std::fs::File::open(path)?),
            Input::Stdin => Box::new(std::io::stdin()),
        };
        std::thread::Builder::new()
            .name("source".into())
            .spawn(move || {
                let msg = match self.read_all(reader, from, &tx, &stop) {
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
        from: Offset,
        tx: &mpsc::Sender<SourceMsg>,
        stop: &AtomicBool,
    ) -> std::io::Result<Option<u64>> {
        let mut reader = BufReader::with_capacity(1 << 20, reader);
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
