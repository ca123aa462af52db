//! The configured store: the embedded default (redb plus a local archive
//! directory, DESIGN §8) or DynamoDB and S3 (DESIGN §6). Both have the same
//! item model; this enum lets the storage process, `query` and `export` use
//! whichever is configured without knowing which.

use crate::archive::{write_event_range, write_metric_snapshot};
use crate::aws_store::{AwsConfig, AwsStore, AwsStoreError};
use crate::store::{EmbeddedStore, History, StoreError, WriteStats};
use analytics_worker::records::MetricRecord;
use proto::{ShardChanges, ShardState};
use std::path::PathBuf;

pub enum Backend {
    Embedded {
        store: EmbeddedStore,
        archive_dir: PathBuf,
    },
    Aws(Box<AwsStore>),
}

/// Which store a command uses, before it is opened.
#[derive(Clone, Debug)]
pub enum BackendConfig {
    Embedded { data_dir: PathBuf },
    Aws(AwsConfig),
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Embedded(#[from] StoreError),
    #[error(transparent)]
    Aws(#[from] AwsStoreError),
    #[error("writing the metric snapshot: {0}")]
    Snapshot(std::io::Error),
    #[error("archiving events: {0}")]
    ArchiveEvents(std::io::Error),
}

impl BackendError {
    /// Whether trying again later may succeed (an outage, a busy lock).
    pub fn is_retryable(&self) -> bool {
        match self {
            BackendError::Embedded(e) => e.is_retryable(),
            BackendError::Aws(e) => e.is_retryable(),
            BackendError::Snapshot(_) | BackendError::ArchiveEvents(_) => true,
        }
    }
}

impl Backend {
    pub fn is_aws(&self) -> bool {
        matches!(self, Backend::Aws(_))
    }

    pub async fn load_shard(
        &self,
        shard: proto::Shard,
        max_products_per_chunk: usize,
    ) -> Result<Vec<ShardState>, BackendError> {
        Ok(match self {
            Backend::Embedded { store, .. } => store.load_shard(shard, max_products_per_chunk)?,
            Backend::Aws(store) => store.load_shard(shard, max_products_per_chunk).await?,
        })
    }

    /// Applies shard changes exactly once. The embedded store also records
    /// their dead letters in its file; the AWS store leaves them to the
    /// caller (the dead-letter topic).
    pub async fn write(
        &mut self,
        changes: &[ShardChanges],
        now_ms: i64,
    ) -> Result<WriteStats, BackendError> {
        Ok(match self {
            Backend::Embedded { store, .. } => store.write(changes, now_ms)?,
            Backend::Aws(store) => store.write(changes, now_ms).await?,
        })
    }

    /// Every current record, sorted by key (DESIGN §4's export).
    pub async fn current_records(&self, now_ms: i64) -> Result<Vec<MetricRecord>, BackendError> {
        Ok(match self {
            Backend::Embedded { store, .. } => store.current_records(now_ms)?,
            Backend::Aws(store) => store.current_records(now_ms).await?,
        })
    }

    pub async fn seller(&self, id: &str, now_ms: i64) -> Result<Option<History>, BackendError> {
        Ok(match self {
            Backend::Embedded { store, .. } => store.seller(id, now_ms)?,
            Backend::Aws(store) => store.seller(id, now_ms).await?,
        })
    }

    pub async fn category(&self, name: &str, now_ms: i64) -> Result<Option<History>, BackendError> {
        Ok(match self {
            Backend::Embedded { store, .. } => store.category(name, now_ms)?,
            Backend::Aws(store) => store.category(name, now_ms).await?,
        })
    }

    pub async fn low_stock(&self, seller: Option<&str>) -> Result<Vec<MetricRecord>, BackendError> {
        Ok(match self {
            Backend::Embedded { store, .. } => store.low_stock(seller)?,
            Backend::Aws(store) => store.low_stock(seller).await?,
        })
    }

    /// Archives every current record as a metric snapshot; returns its key.
    pub async fn snapshot(&self, now_ms: i64) -> Result<String, BackendError> {
        let records = self.current_records(now_ms).await?;
        Ok(match self {
            Backend::Embedded { archive_dir, .. } => {
                write_metric_snapshot(archive_dir, &records, now_ms)
                    .map_err(BackendError::Snapshot)?
            }
            Backend::Aws(store) => store.write_metric_snapshot(&records, now_ms).await?,
        })
    }

    /// Archives one topic-partition's range of consumed events; returns its
    /// key. `clean`: first remove objects of ranges with the same first
    /// offset (see `crate::archive`).
    pub async fn archive_events(
        &self,
        events: &proto::ArchivedEvents,
        clean: bool,
    ) -> Result<String, BackendError> {
        Ok(match self {
            Backend::Embedded { archive_dir, .. } => write_event_range(archive_dir, events, clean)
                .map_err(BackendError::ArchiveEvents)?,
            Backend::Aws(store) => store.put_event_range(events, clean).await?,
        })
    }

    /// How long items live after their last write.
    pub fn ttl_secs(&self) -> i64 {
        match self {
            Backend::Embedded { store, .. } => store.ttl_secs(),
            Backend::Aws(store) => store.ttl_secs(),
        }
    }

    /// Sets the TTL of every current item to now + ttl; returns how many.
    pub async fn refresh_ttl(&mut self, now_ms: i64) -> Result<u64, BackendError> {
        Ok(match self {
            Backend::Embedded { store, .. } => store.refresh_ttl(now_ms)?,
            Backend::Aws(store) => store.refresh_ttl(now_ms).await?,
        })
    }
}
