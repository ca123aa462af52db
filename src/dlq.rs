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
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How long a publish may take before the write is failed (and retried).
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error("creating the dead-letter producer: {0}")]
    Create(KafkaError),
    #[error("queueing a dead letter for {topic}: {source}")]
    Enqueue { topic: String, source: KafkaError },
    #[error("{failed} dead letters were not acknowledged by the broker")]
    Undelivered { failed: u64 },
    #[error("flushing dead letters: {0}")]
    Flush(KafkaError),
}

impl DlqError {
    /// A broker that is down or slow may come back; a bad configuration will not.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, DlqError::Create(_))
    }
}

struct Deliveries {
    failed: AtomicU64,
}

impl ClientContext for Deliveries {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        if (level as i32) <= (RDKafkaLogLevel::Warning as i32) {
            tracing::warn!(facility = fac, "librdkafka (dlq): {message}");
        }
    }
}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            tracing::warn!(error = %e, "a dead letter was not delivered");
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

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
                failed: AtomicU64::new(0),
            })
            .map_err(DlqError::Create)?;
        Ok(KafkaDlq {
            producer,
            topic: topic.to_string(),
        })
    }

    /// Publishes the dead letters and waits until the broker holds all of them.
    pub fn publish(&self, letters: &[&DeadLetter]) -> Result<(), DlqError> {
        if letters.is_empty() {
            return Ok(());
        }
        self.producer.context().failed.store(0, Ordering::Relaxed);
        for dl in letters {
            let key = format!("{}/{}/{}", dl.stream, dl.shard, dl.offset);
            let partition = dl.shard.to_string();
            let offset = dl.offset.to_string();
            let headers = OwnedHeaders::new()
                .insert(header("reason", &dl.reason))
                .insert(header("detail", &dl.detail))
                .insert(header("source.topic", &dl.stream))
                .insert(header("source.partition", &partition))
                .insert(header("source.offset", &offset));
            let mut record = BaseRecord::to(&self.topic)
                .key(key.as_bytes())
                .payload(dl.raw.as_slice())
                .headers(headers);
            // A full local queue drains as we poll; anything else is an error.
            loop {
                match self.producer.send(record) {
                    Ok(()) => break,
                    Err((
                        KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                        r,
                    )) => {
                        record = r;
                        self.producer.poll(Duration::from_millis(50));
                    }
                    Err((source, _)) => {
                        return Err(DlqError::Enqueue {
                            topic: self.topic.clone(),
                            source,
                        });
                    }
                }
            }
        }
        self.producer
            .flush(DELIVERY_TIMEOUT)
            .map_err(DlqError::Flush)?;
        match self.producer.context().failed.load(Ordering::Relaxed) {
            0 => Ok(()),
            failed => Err(DlqError::Undelivered { failed }),
        }
    }
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
