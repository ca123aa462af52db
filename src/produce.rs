//! `analytics produce`: publishes a JSON-lines file of event values to Kafka
//! the way the catalogue backend does (DESIGN §2): the topic by `eventType`,
//! key `sellerId`, partition `abs(javaStringHash(sellerId)) % partitions`.
//! For loading a local broker in tests, benchmarks and demos. A line without
//! a readable seller or event type still goes out (to the created topic, by
//! its line number), so malformed input reaches the service as it would in
//! production.

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use std::io::BufRead;
use std::time::Duration;
use supervisor::route::{seller_key, shard_for_key};

#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    #[error("creating the Kafka client: {0}")]
    Client(KafkaError),
    #[error("creating topic {topic}: {source}")]
    CreateTopic { topic: String, source: KafkaError },
    #[error("publishing line {line}: {source}")]
    Send { line: u64, source: KafkaError },
    #[error("waiting for the broker to acknowledge: {0}")]
    Flush(KafkaError),
    #[error("reading the input: {0}")]
    Read(std::io::Error),
    #[error("expected three topics (created, updated, deleted), got {0}")]
    Topics(usize),
}

pub struct Target<'a> {
    pub brokers: &'a str,
    /// created, updated, deleted
    pub topics: &'a [String],
    pub partitions: u32,
    /// Records per produce batch. tansu 0.6.0 serves no fetch that starts
    /// inside a record batch (measured: a consumer assigned at offset 1, 50
    /// or 137 of one 200-record batch got nothing in 5 s, at 0 all 200), so a
    /// consumer resuming mid-batch would skip to the next batch. One record
    /// per batch keeps every offset a batch start.
    pub batch_records: u32,
}

/// Creates the topics with `partitions` partitions; existing ones are kept.
pub fn create_topics(
    brokers: &str,
    topics: &[String],
    partitions: u32,
) -> Result<(), ProduceError> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .map_err(ProduceError::Client)?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions as i32, TopicReplication::Fixed(1)))
        .collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ProduceError::Read)?;
    let results = runtime
        .block_on(admin.create_topics(&new, &AdminOptions::new()))
        .map_err(ProduceError::Client)?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(ProduceError::CreateTopic {
                    topic,
                    source: KafkaError::AdminOp(code),
                });
            }
        }
    }
    Ok(())
}

/// Publishes every line and waits for the broker; returns the lines sent.
pub fn produce(target: &Target<'_>, input: impl BufRead) -> Result<u64, ProduceError> {
    let [created, updated, deleted] = target.topics else {
        return Err(ProduceError::Topics(target.topics.len()));
    };
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", target.brokers)
        .set("linger.ms", "5")
        .set(
            "batch.num.messages",
            target.batch_records.max(1).to_string(),
        )
        .set("queue.buffering.max.messages", "1000000")
        // Whatever the broker takes, up to the largest `--max-event-bytes`:
        // librdkafka's default (1,000,000) is below the default event limit.
        .set("message.max.bytes", ((16 << 20) + (64 << 10)).to_string())
        .create()
        .map_err(ProduceError::Client)?;
    let mut sent = 0u64;
    for line in input.lines() {
        let line = line.map_err(ProduceError::Read)?;
        let key = seller_key(line.as_bytes()).map(|k| k.into_owned());
        let partition = match &key {
            Some(k) => shard_for_key(k, target.partitions),
            None => (sent % u64::from(target.partitions)) as u32,
        };
        let topic = match event_type(&line) {
            Some("ProductUpdated") => updated,
            Some("ProductDeleted") => deleted,
            _ => created,
        };
        let mut record = BaseRecord::to(topic)
            .payload(line.as_bytes())
            .partition(partition as i32);
        if let Some(k) = &key {
            record = record.key(k.as_bytes());
        }
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    producer.poll(Duration::from_millis(10));
                }
                Err((source, _)) => {
                    return Err(ProduceError::Send {
                        line: sent + 1,
                        source,
                    });
                }
            }
        }
        sent += 1;
    }
    producer
        .flush(Duration::from_secs(600))
        .map_err(ProduceError::Flush)?;
    Ok(sent)
}

/// `eventType` of a line, without parsing the whole value.
fn event_type(line: &str) -> Option<&str> {
    #[derive(serde::Deserialize)]
    struct Head<'a> {
        #[serde(rename = "eventType", borrow)]
        event_type: Option<&'a str>,
    }
    serde_json::from_str::<Head<'_>>(line).ok()?.event_type
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_event_type_picks_the_topic() {
        assert_eq!(
            event_type(r#"{"eventType":"ProductDeleted","data":{"x":[1,2]}}"#),
            Some("ProductDeleted")
        );
        assert_eq!(event_type(r#"{"data":{}}"#), None);
        assert_eq!(event_type("not json"), None);
    }
}
