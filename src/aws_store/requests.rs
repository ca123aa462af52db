//! Counts the requests the AWS store sends, by service and operation
//! (`DynamoDB.BatchWriteItem`, `S3.PutObject`): what AWS bills. Every HTTP
//! attempt counts, retries included. The storage process reports the counts
//! with each write (`WriteReport::requests`), and the supervisor exposes
//! them as `analytics_storage_requests_total{operation}`.

use aws_sdk_dynamodb::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_dynamodb::error::BoxError;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use std::collections::BTreeMap;
use std::sync::Mutex;

/// Requests since the storage process last reported them (process-wide: a
/// storage process has one store).
static COUNTS: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());

/// An SDK interceptor, installed on both clients, that counts each request
/// just before it is sent.
#[derive(Debug)]
pub struct RequestCounter;

impl Intercept for RequestCounter {
    fn name(&self) -> &'static str {
        "RequestCounter"
    }

    fn read_before_transmit(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if let Some(m) = cfg.load::<Metadata>() {
            let operation = format!("{}.{}", m.service(), m.name());
            *lock().entry(operation).or_default() += 1;
        }
        Ok(())
    }
}

fn lock() -> std::sync::MutexGuard<'static, BTreeMap<String, u64>> {
    // A poisoned lock only means a panic mid-increment: the counts stand.
    COUNTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The counts since the previous call, by operation.
pub fn take() -> Vec<(String, u64)> {
    std::mem::take(&mut *lock()).into_iter().collect()
}
