//! The ceiling for `scripts/bench-kafka`: a bare librdkafka consumer, with
//! the service's fetch settings, assigned every partition of the topics from
//! the start, doing nothing with the messages but count their bytes.
//!
//!   bare_consumer BROKERS TOPIC[,TOPIC…] EXPECTED_MESSAGES
//!
//! Prints `bare consumer: N messages in S s: R messages/s, C CPU-s`, timed
//! from the first message to the last (connecting is not part of it; its
//! CPU seconds are, a few milliseconds).

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::time::{Duration, Instant};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, brokers, topics, expected] = args.as_slice() else {
        return Err("usage: bare_consumer BROKERS TOPIC[,TOPIC…] EXPECTED_MESSAGES".into());
    };
    let expected: u64 = expected.parse()?;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "bare-consumer-bench")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "5")
        .create()?;
    let mut assignment = TopicPartitionList::new();
    for topic in topics.split(',') {
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        for t in metadata.topics() {
            for p in t.partitions() {
                assignment.add_partition_offset(t.name(), p.id(), Offset::Beginning)?;
            }
        }
    }
    consumer.assign(&assignment)?;
    let (mut count, mut bytes) = (0u64, 0usize);
    let mut first: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    while count < expected {
        if Instant::now() > deadline {
            return Err(format!("only {count} of {expected} messages in 600 s").into());
        }
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            let message = message?;
            first.get_or_insert_with(Instant::now);
            bytes += message.payload().map_or(0, <[u8]>::len);
            count += 1;
        }
    }
    let secs = first.map_or(0.0, |t| t.elapsed().as_secs_f64());
    println!(
        "bare consumer: {count} messages ({bytes} bytes) in {secs:.2} s: {:.0} messages/s, {} CPU-s",
        count as f64 / secs,
        cpu_seconds().unwrap_or(f64::NAN)
    );
    Ok(())
}

/// CPU seconds (user + system) this process used, from /proc/self/stat, so
/// the bench can set the service's CPU per event beside the ceiling's.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces): utime and
    // stime are fields 14 and 15, in clock ticks (100 per second on Linux).
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) / 100.0)
}
