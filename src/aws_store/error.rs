//! The AWS store's errors, and which of them may pass on a retry.

use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use proto::Shard;

/// One variant per step that can fail; `retryable` is decided where the
/// error is made, from the AWS error code and HTTP status (DESIGN §11).
#[derive(Debug, thiserror::Error)]
pub enum AwsStoreError {
    #[error("AWS configuration: {0}")]
    Config(String),
    #[error("setting up {what}: {detail}")]
    Setup {
        what: String,
        detail: String,
        retryable: bool,
    },
    #[error("reading the checkpoint of shard {shard}: {detail}")]
    ReadCheckpoint {
        shard: Shard,
        detail: String,
        retryable: bool,
    },
    #[error("committing seq {seq} of shard {shard}: {detail}")]
    Commit {
        shard: Shard,
        seq: u64,
        detail: String,
        retryable: bool,
    },
    /// Another instance committed this shard: it owns it now. Never retried
    /// (the shard must be loaded again by whoever owns it).
    #[error("lost ownership of shard {shard}: its checkpoint moved past seq {seq}")]
    LostOwnership { shard: Shard, seq: u64 },
    #[error("state object {key}: {detail}")]
    StateObject {
        key: String,
        detail: String,
        retryable: bool,
    },
    #[error("writing metric items: {detail}")]
    MetricWrite { detail: String, retryable: bool },
    /// Entity items kept conflicting with concurrent writers.
    #[error("entity items still conflicting after {attempts} attempts")]
    Contention { attempts: u32 },
    #[error("reading metric items: {detail}")]
    Read { detail: String, retryable: bool },
    #[error("archiving to {key}: {detail}")]
    Archive {
        key: String,
        detail: String,
        retryable: bool,
    },
    #[error("encoding {what}: {detail}")]
    Encode { what: &'static str, detail: String },
    #[error("decoding stored {what}: {detail}")]
    Decode { what: &'static str, detail: String },
    /// A test hook stopped a write on purpose (see `AwsStore::fail_after_commit`).
    #[error("injected fault after the commit of shard {shard}")]
    Injected { shard: Shard },
}

impl AwsStoreError {
    pub fn is_retryable(&self) -> bool {
        match self {
            AwsStoreError::Setup { retryable, .. }
            | AwsStoreError::ReadCheckpoint { retryable, .. }
            | AwsStoreError::Commit { retryable, .. }
            | AwsStoreError::StateObject { retryable, .. }
            | AwsStoreError::MetricWrite { retryable, .. }
            | AwsStoreError::Read { retryable, .. }
            | AwsStoreError::Archive { retryable, .. } => *retryable,
            AwsStoreError::Contention { .. } | AwsStoreError::Injected { .. } => true,
            AwsStoreError::Config(_)
            | AwsStoreError::LostOwnership { .. }
            | AwsStoreError::Encode { .. }
            | AwsStoreError::Decode { .. } => false,
        }
    }
}

/// Error codes that mean "too fast" or "try again", for DynamoDB and S3.
const RETRYABLE_CODES: &[&str] = &[
    "ProvisionedThroughputExceededException",
    "ThrottlingException",
    "Throttling",
    "RequestLimitExceeded",
    "TransactionConflictException",
    "TransactionInProgressException",
    "InternalServerError",
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "RequestTimeoutException",
];

/// Error codes that mean the service throttled us (a subset of the above).
const THROTTLE_CODES: &[&str] = &[
    "ProvisionedThroughputExceededException",
    "ThrottlingException",
    "Throttling",
    "RequestLimitExceeded",
    "SlowDown",
];

/// Whether the service refused the call for going too fast.
pub fn sdk_throttled<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> bool {
    match err {
        SdkError::ServiceError(e) => {
            e.raw().status().as_u16() == 429
                || e.err().code().is_some_and(|c| THROTTLE_CODES.contains(&c))
        }
        _ => false,
    }
}

/// Whether a failed call may succeed when sent again: timeouts, connection
/// errors, unreadable responses, throttling, conflicts and 5xx do; anything
/// the service rejected on its merits (4xx) does not.
pub fn sdk_retryable<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> bool {
    match err {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        SdkError::ServiceError(e) => {
            let status = e.raw().status().as_u16();
            status >= 500
                || status == 429
                || e.err().code().is_some_and(|c| RETRYABLE_CODES.contains(&c))
        }
        _ => false,
    }
}

/// The error's code, when the service sent one.
pub fn sdk_code<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> Option<&str> {
    match err {
        SdkError::ServiceError(e) => e.err().code(),
        _ => None,
    }
}

/// The full error chain as text. SDK errors carry no credentials (requests
/// are signed; the signature is not part of the error).
pub fn sdk_detail<E: std::error::Error + 'static>(err: &SdkError<E, HttpResponse>) -> String {
    DisplayErrorContext(err).to_string()
}

/// (detail, retryable) of an SDK error, for the variants above. Every SDK
/// error the store sees passes here, so throttles are counted here.
pub fn describe<E: ProvideErrorMetadata + std::error::Error + 'static>(
    err: &SdkError<E, HttpResponse>,
) -> (String, bool) {
    if sdk_throttled(err) {
        super::retry::note_throttle();
    }
    (sdk_detail(err), sdk_retryable(err))
}

/// The outcome of a conditional write: `Ok(true)` when it was made,
/// `Ok(false)` when its condition did not hold (`condition_failed` tells
/// that service error), any other failure as `failed(detail, retryable)`
/// words it.
pub fn conditional<O, E: ProvideErrorMetadata + std::error::Error + 'static>(
    result: Result<O, SdkError<E, HttpResponse>>,
    condition_failed: impl Fn(&E) -> bool,
    failed: impl FnOnce(String, bool) -> AwsStoreError,
) -> Result<bool, AwsStoreError> {
    match result {
        Ok(_) => Ok(true),
        Err(e) if e.as_service_error().is_some_and(condition_failed) => Ok(false),
        Err(e) => {
            let (detail, retryable) = describe(&e);
            Err(failed(detail, retryable))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ownership_and_data_errors_are_final_service_trouble_is_not() {
        assert!(!AwsStoreError::LostOwnership { shard: 1, seq: 2 }.is_retryable());
        assert!(
            !AwsStoreError::Decode {
                what: "x",
                detail: "y".into()
            }
            .is_retryable()
        );
        assert!(AwsStoreError::Contention { attempts: 3 }.is_retryable());
        assert!(
            AwsStoreError::MetricWrite {
                detail: "throttled".into(),
                retryable: true
            }
            .is_retryable()
        );
    }

    #[test]
    fn service_errors_are_classified_by_code_and_status() {
        use aws_sdk_dynamodb::error::ErrorMetadata;
        use aws_sdk_s3::primitives::SdkBody;
        let make = |code: &str, status: u16| -> SdkError<ErrorMetadata, HttpResponse> {
            let meta = ErrorMetadata::builder().code(code).build();
            let raw = HttpResponse::new(status.try_into().unwrap(), SdkBody::empty());
            SdkError::service_error(meta, raw)
        };
        assert!(sdk_retryable(&make("ThrottlingException", 400)));
        assert!(sdk_retryable(&make(
            "ProvisionedThroughputExceededException",
            400
        )));
        assert!(sdk_retryable(&make("RequestLimitExceeded", 400)));
        assert!(sdk_retryable(&make("Whatever", 503)));
        assert!(!sdk_retryable(&make("ValidationException", 400)));
        assert!(!sdk_retryable(&make(
            "ConditionalCheckFailedException",
            400
        )));
        assert!(sdk_throttled(&make("ThrottlingException", 400)));
        assert!(sdk_throttled(&make("SlowDown", 503)));
        assert!(sdk_throttled(&make("Whatever", 429)));
        assert!(!sdk_throttled(&make("Whatever", 503)));
        assert!(!sdk_throttled(&make("ValidationException", 400)));
        assert_eq!(
            sdk_code(&make("ThrottlingException", 400)),
            Some("ThrottlingException")
        );
    }
}
