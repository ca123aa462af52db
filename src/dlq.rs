//! The dead-letter topic (DESIGN §7): with a Kafka source, rejected events go
//! to `analytics-dlq` (configurable) with their original bytes, and the reason
//! and source coordinates in headers. The storage process publishes them and
//! waits for the broker's acknowledgement *before* it commits the write that
//! carries them, so a dead letter is never lost; a crash in between publishes
//! it again (at least once — the key `<topic>/<partition>/<offset>` tells
//! duplicates apart).

use proto::DeadLetter;
use rdkafka::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::KafkaError;
use rdkafka::message::{DeliveryResult, Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use std::sync::Mutex;
use std::time::Duration;

/// How long a publish may take before the write is failed (and retried).
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error("creating the dead-letter producer: {}", supervisor::kafka::shown(.0))]
    Create(KafkaError),
    #[error("queueing a dead letter for {topic}: {source}")]
    Enqueue { topic: String, source: KafkaError },
    #[error("{failed} dead letters were not acknowledged by the broker")]
    Undelivered { failed: u64 },
    #[error("flushing dead letters: {0}")]
    Flush(KafkaError),
    #[error("{topic} refuses a dead letter even with only {kept} bytes of its event")]
    TooLarge { topic: String, kept: usize },
}

impl DlqError {
    /// A broker that is down or slow may come back; a bad configuration will not.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, DlqError::Create(_))
    }
}

/// Delivery failures of the current publish, by letter (its index).
struct Deliveries {
    failed: Mutex<Vec<(usize, KafkaError)>>,
}

impl ClientContext for Deliveries {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        if (level as i32) <= (RDKafkaLogLevel::Warning as i32) {
            tracing::warn!(facility = fac, "librdkafka (dlq): {message}");
        }
    }
}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, letter: usize) {
        if let Err((e, _)) = result {
            tracing::warn!(error = %e, "a dead letter was not delivered");
            self.failed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((letter, e.clone()));
        }
    }
}

/// How much of a dead letter's event is kept when the producer or the
/// broker refuses the whole message as too large (librdkafka's default
/// `message.max.bytes` is 1,000,000, below the default `--max-event-bytes`
/// of 1 MiB, and a too-large event may be larger still): the first bytes,
/// in these cuts tried in turn, with `raw.truncated` and `raw.bytes`
/// headers. The source coordinates still point at the whole event.
const RAW_CUTS: [usize; 3] = [512 << 10, 64 << 10, 4 << 10];

pub struct KafkaDlq {
    producer: BaseProducer<Deliveries>,
    topic: String,
}

impl KafkaDlq {
    pub fn new(
        brokers: &str,
        topic: &str,
        properties: &[(String, String)],
    ) -> Result<KafkaDlq, DlqError> {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", brokers)
            // No duplicates from the producer's own retries.
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .set_log_level(RDKafkaLogLevel::Warning);
        // Consumer-only properties would make the producer refuse to start.
        for (k, v) in properties.iter().filter(|(k, _)| !is_consumer_only(k)) {
            cfg.set(k, v);
        }
        let producer = cfg
            .create_with_context(Deliveries {
                failed: Mutex::new(Vec::new()),
            })
            .map_err(DlqError::Create)?;
        Ok(KafkaDlq {
            producer,
            topic: topic.to_string(),
        })
    }

    /// Publishes the dead letters and waits until the broker holds all of
    /// them. A letter refused as too large is published again with its
    /// event cut ([`RAW_CUTS`]): one oversized event must not stop its
    /// partition for good.
    pub fn publish(&self, letters: &[&DeadLetter]) -> Result<(), DlqError> {
        if letters.is_empty() {
            return Ok(());
        }
        // Reports of an earlier publish that failed midway must not count
        // here: wait for them, then forget them.
        self.producer
            .flush(DELIVERY_TIMEOUT)
            .map_err(DlqError::Flush)?;
        self.producer
            .context()
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        // How many cuts each letter's event has had so far.
        let mut cuts = vec![0usize; letters.len()];
        let mut todo: Vec<usize> = (0..letters.len()).collect();
        while !todo.is_empty() {
            let mut too_large: Vec<usize> = Vec::new();
            for &i in &todo {
                if !self.send(i, letters[i], cuts[i])? {
                    too_large.push(i);
                }
            }
            self.producer
                .flush(DELIVERY_TIMEOUT)
                .map_err(DlqError::Flush)?;
            let failed = std::mem::take(
                &mut *self
                    .producer
                    .context()
                    .failed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()),
            );
            let mut other = 0;
            for (i, e) in failed {
                if is_too_large(&e) {
                    too_large.push(i);
                } else {
                    other += 1;
                }
            }
            if other > 0 {
                return Err(DlqError::Undelivered { failed: other });
            }
            for &i in &too_large {
                cuts[i] += 1;
                let Some(&kept) = RAW_CUTS.get(cuts[i] - 1) else {
                    return Err(DlqError::TooLarge {
                        topic: self.topic.clone(),
                        kept: RAW_CUTS[RAW_CUTS.len() - 1],
                    });
                };
                tracing::warn!(
                    source.topic = %letters[i].stream,
                    source.partition = letters[i].shard,
                    source.offset = letters[i].offset,
                    bytes = letters[i].raw.len(),
                    kept,
                    "a dead letter was refused as too large; publishing the first bytes of its event"
                );
            }
            todo = too_large;
        }
        Ok(())
    }

    /// Queues letter `i` with its event cut `cuts` times; false when the
    /// producer refuses it as too large.
    fn send(&self, i: usize, dl: &DeadLetter, cuts: usize) -> Result<bool, DlqError> {
        let key = format!("{}/{}/{}", dl.stream, dl.shard, dl.offset);
        let partition = dl.shard.to_string();
        let offset = dl.offset.to_string();
        let total = dl.raw.len().to_string();
        let kept = match cuts {
            0 => dl.raw.len(),
            n => dl.raw.len().min(RAW_CUTS[n - 1]),
        };
        let mut headers = OwnedHeaders::new()
            .insert(header("reason", &dl.reason))
            .insert(header("detail", &dl.detail))
            .insert(header("source.topic", &dl.stream))
            .insert(header("source.partition", &partition))
            .insert(header("source.offset", &offset));
        if kept < dl.raw.len() {
            headers = headers
                .insert(header("raw.truncated", "true"))
                .insert(header("raw.bytes", &total));
        }
        let mut record = BaseRecord::with_opaque_to(&self.topic, i)
            .key(key.as_bytes())
            .payload(&dl.raw[..kept])
            .headers(headers);
        // A full local queue drains as we poll.
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(true),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    self.producer.poll(Duration::from_millis(50));
                }
                Err((e, _)) if is_too_large(&e) => return Ok(false),
                Err((source, _)) => {
                    return Err(DlqError::Enqueue {
                        topic: self.topic.clone(),
                        source,
                    });
                }
            }
        }
    }
}

fn is_too_large(e: &KafkaError) -> bool {
    matches!(
        e,
        KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge)
    )
}

fn header<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a str> {
    Header {
        key,
        value: Some(value),
    }
}

/// Properties a producer rejects (a shared `--kafka-property` list is meant
/// for the consumer first).
fn is_consumer_only(key: &str) -> bool {
    key.starts_with("fetch.")
        || key.starts_with("auto.")
        || key.starts_with("enable.auto")
        || key.starts_with("enable.partition.eof")
        || key.starts_with("group.")
        || key.starts_with("session.")
        || key.starts_with("heartbeat.")
        || key.starts_with("max.poll")
        || key.starts_with("partition.assignment")
        || key.starts_with("isolation.")
        || key.starts_with("queued.")
        || key.starts_with("check.crcs")
}
