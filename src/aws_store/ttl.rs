//! Keeping live entities' current items from expiring (DESIGN §6): their
//! `TTL` is set again before it runs out, apart from the store's writes.
//!
//! One `UpdateItem` per due item, so a refresh of many entities takes a
//! while: it runs in a task of its own (the storage process goes on serving
//! requests meanwhile), with several updates in flight, and only on items
//! past half their lifetime, so that a restart of the storage process does
//! not redo the items refreshed or written lately.

use super::error::conditional;
use super::item::{self, Item};
use super::retry::{Backoff, retry};
use super::{AwsStoreError, read_error, read_pages};
use crate::store::{CURRENT, ttl_refresh_due};
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::AttributeValue;
use tokio::task::JoinSet;

/// `UpdateItem`s of one refresh in flight at once.
const IN_FLIGHT: usize = 16;

/// A handle on the metrics table that refreshes `TTL`s; it shares the
/// store's DynamoDB client ([`super::AwsStore::ttl_refresher`]).
#[derive(Clone)]
pub struct TtlRefresher {
    pub(super) ddb: aws_sdk_dynamodb::Client,
    pub(super) table: String,
    pub(super) backoff: Backoff,
    pub(super) ttl_secs: i64,
}

impl TtlRefresher {
    /// Sets `TTL` = now + ttl on every current item whose `TTL` is less than
    /// half the lifetime away (not written or refreshed for that long). An
    /// update of `TTL` alone, conditioned on the item existing, so a
    /// concurrent write of its values is never undone; expired daily items
    /// are left to DynamoDB's TTL. Returns the items refreshed.
    pub async fn refresh(&self, now_ms: i64) -> Result<u64, AwsStoreError> {
        let now = now_ms.div_euclid(1000);
        let ttl = now.saturating_add(self.ttl_secs);
        let due = ttl_refresh_due(now, self.ttl_secs);
        let mut refreshed = 0;
        let mut updates = JoinSet::new();
        for it in self.due_items(due).await? {
            let (Some(pk), Some(sk)) = (item::s(&it, "PK"), item::s(&it, "SK")) else {
                continue;
            };
            if updates.len() >= IN_FLIGHT {
                refreshed += finished(updates.join_next().await)?;
            }
            let (this, key) = (self.clone(), item::key(pk, sk));
            updates.spawn(async move { this.refresh_item(key, ttl).await });
        }
        while !updates.is_empty() {
            refreshed += finished(updates.join_next().await)?;
        }
        tracing::debug!(refreshed, "refreshed item TTLs");
        Ok(refreshed)
    }

    /// The keys of the current items whose `TTL` is before `due`.
    async fn due_items(&self, due: i64) -> Result<Vec<Item>, AwsStoreError> {
        read_pages(&self.backoff, "scan", |start| async move {
            let page = self
                .ddb
                .scan()
                .table_name(&self.table)
                .filter_expression("SK = :current AND #ttl < :due")
                .projection_expression("PK, SK")
                .expression_attribute_names("#ttl", "TTL")
                .expression_attribute_values(":current", AttributeValue::S(CURRENT.into()))
                .expression_attribute_values(":due", item::n(due))
                .consistent_read(true)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(read_error)?;
            Ok((page.items().to_vec(), page.last_evaluated_key().cloned()))
        })
        .await
    }

    /// Whether the item was there to refresh.
    async fn refresh_item(&self, key: Item, ttl: i64) -> Result<bool, AwsStoreError> {
        retry(
            &self.backoff,
            "refresh_ttl",
            AwsStoreError::is_retryable,
            || async {
                let result = self
                    .ddb
                    .update_item()
                    .table_name(&self.table)
                    .set_key(Some(key.clone()))
                    .update_expression("SET #ttl = :ttl")
                    .condition_expression("attribute_exists(PK)")
                    .expression_attribute_names("#ttl", "TTL")
                    .expression_attribute_values(":ttl", item::n(ttl))
                    .send()
                    .await;
                conditional(
                    result,
                    UpdateItemError::is_conditional_check_failed_exception,
                    |detail, retryable| AwsStoreError::MetricWrite { detail, retryable },
                )
            },
        )
        .await
    }
}

/// 1 for an item refreshed; a task that panicked is an error.
fn finished(
    joined: Option<Result<Result<bool, AwsStoreError>, tokio::task::JoinError>>,
) -> Result<u64, AwsStoreError> {
    match joined {
        None => Ok(0),
        Some(Ok(updated)) => Ok(u64::from(updated?)),
        Some(Err(e)) => Err(AwsStoreError::MetricWrite {
            detail: format!("a TTL refresh task failed: {e}"),
            retryable: true,
        }),
    }
}
