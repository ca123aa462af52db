//! The proto wire on a real socketpair: round trips of every message enum
//! through `handshake` + `Sender`/`Receiver`, handshake refusals, and every
//! way a frame can be malformed, each answered by its typed `FrameError`.
//!
//! A counting global allocator records the largest single allocation made on
//! the test's own thread (the runtime is current-thread, so the receiver runs
//! there), which lets the tests show that a hostile length is rejected
//! *before* anything is allocated for it.

use proto::frame::{self, MIN_FRAME_BYTES};
use proto::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

// ---------------------------------------------------------------------------
// Allocation watch

struct PeakAlloc;

thread_local! {
    /// Largest single allocation (bytes) on this thread since the last reset.
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: the slot may be gone while a thread is being torn down.
    let _ = PEAK.try_with(|p| {
        if size > p.get() {
            p.set(size);
        }
    });
}

// SAFETY: every call is forwarded unchanged to the system allocator; the
// bookkeeping touches only a const-initialised thread-local `Cell`, which
// never allocates.
unsafe impl GlobalAlloc for PeakAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: PeakAlloc = PeakAlloc;

/// Runs `fut` and returns its output with the largest single allocation it
/// made on this thread.
async fn peak_alloc_of<F: Future>(fut: F) -> (F::Output, usize) {
    PEAK.with(|p| p.set(0));
    let out = fut.await;
    (out, PEAK.with(|p| p.get()))
}

/// A hostile frame may cost at most this much memory on the receiving side.
const ALLOC_BUDGET: usize = 2 << 20;

#[tokio::test]
async fn alloc_watch_sees_large_allocations() {
    // The watch itself must work, or the "before allocating" checks below
    // would pass vacuously.
    let (v, peak) = peak_alloc_of(async { vec![7u8; 8 << 20] }).await;
    assert_eq!(v.len(), 8 << 20);
    assert!(peak >= 8 << 20, "peak {peak}");
    let ((), peak) = peak_alloc_of(async {}).await;
    assert!(peak < ALLOC_BUDGET, "peak {peak}");
}

// ---------------------------------------------------------------------------
// Helpers

const PROMPT: Duration = Duration::from_secs(5);

fn expect_err<T>(r: Result<T, FrameError>) -> FrameError {
    match r {
        Ok(_) => panic!("expected a FrameError, got a value"),
        Err(e) => e,
    }
}

/// Writes `bytes` raw into one end of a socketpair, optionally closes that
/// end, and reads one message of `T` from the other end with a plain
/// `Receiver`. The result must arrive promptly.
async fn recv_raw<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    close: bool,
) -> (Result<T, FrameError>, usize) {
    let (mut tx, rx) = UnixStream::pair().unwrap();
    tx.write_all(bytes).await.unwrap();
    tx.flush().await.unwrap();
    // Keep the writer open unless asked: a reader that waited for the
    // declared payload instead of refusing it would then hang, and the
    // timeout below would catch it.
    let _keep = if close {
        drop(tx);
        None
    } else {
        Some(tx)
    };
    let mut rx = Receiver::<T, _>::new(rx);
    let (res, peak) = peak_alloc_of(async { tokio::time::timeout(PROMPT, rx.recv()).await }).await;
    (res.expect("receiver did not answer promptly"), peak)
}

/// A frame with the given declared length and payload.
fn frame_of(len: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = len.to_le_bytes().to_vec();
    f.extend_from_slice(payload);
    f
}

/// A correctly framed payload.
fn framed(payload: &[u8]) -> Vec<u8> {
    frame_of(payload.len() as u32, payload)
}

/// bincode's standard varint for a length above `u32::MAX`.
fn varint_u64(v: u64) -> Vec<u8> {
    let mut b = vec![253u8];
    b.extend_from_slice(&v.to_le_bytes());
    b
}

/// A tiny deterministic PRNG for garbage payloads (xorshift64*).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Opens a handshaken channel pair: `a` is `a_role` expecting `b_role`.
async fn connected<AOut, AIn>(
    a_role: Role,
    b_role: Role,
) -> (
    (Sender<AOut>, Receiver<AIn>, Hello),
    (Sender<AIn>, Receiver<AOut>, Hello),
)
where
    AOut: serde::Serialize + serde::de::DeserializeOwned,
    AIn: serde::Serialize + serde::de::DeserializeOwned,
{
    let (a, b) = UnixStream::pair().unwrap();
    let (ra, rb) = tokio::join!(
        handshake::<AOut, AIn>(a, a_role, b_role),
        handshake::<AIn, AOut>(b, b_role, a_role)
    );
    let (ra, rb) = (
        ra.unwrap_or_else(|e| panic!("a: {e}")),
        rb.unwrap_or_else(|e| panic!("b: {e}")),
    );
    assert_eq!(ra.2.role, b_role);
    assert_eq!(rb.2.role, a_role);
    assert_eq!(ra.2.magic, MAGIC);
    assert_eq!(ra.2.version, PROTOCOL_VERSION);
    (ra, rb)
}

/// Sends every message from `tx` while `rx` receives them (concurrently, so
/// frames larger than the socket buffer work), then checks they arrived equal
/// and in order, and that closing the sender ends the stream cleanly.
async fn round_trip<T>(mut tx: Sender<T>, mut rx: Receiver<T>, msgs: Vec<T>)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let n = msgs.len();
    let send = async {
        for m in &msgs {
            tx.send(m).await.unwrap();
        }
        drop(tx);
    };
    let recv = async {
        let mut got = Vec::with_capacity(n);
        for _ in 0..n {
            got.push(rx.recv().await.unwrap());
        }
        let end = expect_err(rx.recv().await);
        assert!(
            matches!(end, FrameError::Closed),
            "after the last message: {end}"
        );
        got
    };
    let ((), got) =
        tokio::time::timeout(Duration::from_secs(60), async { tokio::join!(send, recv) })
            .await
            .expect("round trip stalled");
    assert_eq!(got, msgs);
}

fn product(seller: &str, category: &str, price_cents: i64, quantity: i64) -> ProductState {
    let v = Version(1_696_176_060_000 * 4);
    ProductState {
        seller: Field {
            value: Some(seller.into()),
            version: v,
        },
        category: Field {
            value: Some(category.into()),
            version: v,
        },
        name: Field {
            value: Some("Wireless Mouse".into()),
            version: v,
        },
        price_cents: Field {
            value: Some(price_cents),
            version: v,
        },
        quantity: Field {
            value: Some(quantity),
            version: Version(v.0 + 1),
        },
        deleted: Field::default(),
        low_stock_since: (quantity < 10).then_some(1_696_176_060_000),
    }
}

fn products() -> Vec<(ProductId, ProductState)> {
    vec![
        (ProductId::Num(12345), product("seller-1", "Books", 2999, 3)),
        (
            ProductId::Text("sku-ab12cd".into()),
            product("seller-2", "Games", 100, 150),
        ),
    ]
}

fn shard_changes(shard: Shard) -> ShardChanges {
    let products = products();
    ShardChanges {
        shard,
        positions: vec![Position {
            stream: "product.updated/3".into(),
            offset: 41,
        }],
        products: EncodedProducts::encode(&products).unwrap(),
        low_stock: vec![
            LowStockChange::Put(LowStockItem::of(&products[0].0, &products[0].1).unwrap()),
            LowStockChange::Delete {
                seller_id: "seller-9".into(),
                product_id: products[1].0.clone(),
            },
        ],
        entities: vec![
            (
                EntityKey::Seller("seller-1".into()),
                EntityTotals {
                    products: 2,
                    active: 1,
                    deleted: 1,
                    value_cents: 12_000,
                    price_sum_cents: 1500,
                    low_stock: 1,
                    last_event_at: 1_696_176_060_000,
                },
            ),
            (
                EntityKey::Category("Books".into()),
                EntityTotals {
                    last_event_at: -1,
                    ..EntityTotals::default()
                },
            ),
        ],
        dead_letters: vec![DeadLetter {
            stream: "product.created/0".into(),
            shard,
            offset: 7,
            reason: "invalid_json".into(),
            detail: "expected value at line 1 column 1".into(),
            raw: b"{not json".to_vec(),
        }],
        archive: vec![ArchivedEvents {
            stream: "product.created/0".into(),
            shard,
            first_offset: 5,
            last_offset: 7,
            time_ms: 1_696_176_060_000,
            events: 3,
            gzip: vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff],
        }],
        moved_in: 3,
        changed_at: vec![1_696_176_060_000, 1_696_176_061_000],
    }
}

/// An event batch as the Kafka source builds it, with timestamps.
fn timed_event_batch(events: usize) -> EventBatch {
    let plain = event_batch(events);
    let mut b = EventBatch::new(plain.shard, plain.stream.clone());
    for (i, (offset, bytes)) in plain.iter().enumerate() {
        b.push_at(offset, 1_696_176_060_000 + i as i64, bytes);
    }
    b
}

fn event_batch(events: usize) -> EventBatch {
    let mut b = EventBatch::new(2, "product.updated/2".into());
    for i in 0..events {
        let v = format!(
            r#"{{"eventId":"seller-{i}-{i}-ProductUpdated-1","eventType":"ProductUpdated","timestamp":{},"data":{{"productId":{i}}}}}"#,
            1_696_176_060_000i64 + i as i64
        );
        b.push(100 + i as i64, v.as_bytes());
    }
    b
}

#[test]
fn an_exact_frame_is_the_usual_frame_in_a_buffer_of_its_size() {
    // The batch the Kafka source hands over: timestamps make its metadata
    // larger than an estimate from the payload alone.
    let msg = ToWorker::Events(timed_event_batch(1024));
    let exact = frame::encode_exact(&msg).expect("encodes");
    let mut usual = Vec::new();
    frame::encode_into(&msg, &mut usual).expect("encodes");
    assert_eq!(exact, usual);
    assert_eq!(exact.capacity(), exact.len(), "no spare room, no growth");
    let decoded: ToWorker = frame::decode(&exact[4..]).expect("decodes");
    assert_eq!(decoded, msg);
}

// ---------------------------------------------------------------------------
// Round trips

#[tokio::test]
async fn to_worker_round_trip() {
    let ((tx, _sup_rx, hello), (_w_tx, rx, _)) =
        connected::<ToWorker, FromWorker>(Role::Supervisor, Role::Worker).await;
    assert_eq!(hello.pid, std::process::id());

    let batch = event_batch(5);
    // The batch itself must hold several distinct events.
    let events: Vec<_> = batch.iter().collect();
    assert_eq!(events.len(), 5);
    assert_eq!(events[4].0, 104);
    assert!(events[3].1.starts_with(br#"{"eventId":"seller-3-3"#));

    let msgs = vec![
        ToWorker::Configure(WorkerConfig {
            low_stock_threshold: 10,
            max_event_bytes: 1 << 20,
            answer_part_bytes: 16 << 20,
            archive_events: true,
        }),
        ToWorker::Restore(ShardState {
            shard: 2,
            positions: vec![Position {
                stream: "events.jsonl".into(),
                offset: -1,
            }],
            products: products(),
            entity_times: vec![(EntityKey::Category("Books".into()), 5)],
            last: false,
        }),
        ToWorker::Restore(ShardState {
            shard: 2,
            last: true,
            ..ShardState::default()
        }),
        ToWorker::Events(batch),
        ToWorker::Events(EventBatch::new(3, "empty".into())),
        ToWorker::Flush { id: u64::MAX },
    ];
    round_trip(tx, rx, msgs).await;
}

#[tokio::test]
async fn to_worker_large_batch_round_trip() {
    // ~6 MiB: larger than the socket buffer, so the frame arrives in many
    // reads, and larger than the receiver's 4 MiB keep-buffer threshold.
    let ((tx, _, _), (_, rx, _)) =
        connected::<ToWorker, FromWorker>(Role::Supervisor, Role::Worker).await;
    let mut batch = event_batch(0);
    let big = vec![b'x'; 6 << 10];
    for i in 0..1000 {
        batch.push(i, &big);
    }
    let msgs = vec![
        ToWorker::Events(batch),
        ToWorker::Flush { id: 1 },
        ToWorker::Events(event_batch(3)),
    ];
    round_trip(tx, rx, msgs).await;
}

#[tokio::test]
async fn from_worker_round_trip() {
    let ((_, rx, _), (tx, _, _)) =
        connected::<ToWorker, FromWorker>(Role::Supervisor, Role::Worker).await;
    let msgs = vec![
        FromWorker::Changes {
            id: 0,
            shards: vec![],
            more: false,
        },
        FromWorker::Changes {
            id: 7,
            shards: vec![shard_changes(0), shard_changes(3), ShardChanges::default()],
            more: true,
        },
    ];
    round_trip(tx, rx, msgs).await;
}

#[tokio::test]
async fn to_storage_round_trip() {
    let ((tx, _, _), (_, rx, _)) =
        connected::<ToStorage, FromStorage>(Role::Supervisor, Role::Storage).await;
    let msgs = vec![
        ToStorage::Load { id: 1, shard: 3 },
        ToStorage::Write {
            id: 2,
            changes: vec![shard_changes(1), shard_changes(2)],
        },
        ToStorage::Write {
            id: 3,
            changes: vec![],
        },
        ToStorage::Snapshot { id: 4 },
    ];
    round_trip(tx, rx, msgs).await;
}

#[tokio::test]
async fn from_storage_round_trip() {
    let ((_, rx, _), (tx, _, _)) =
        connected::<ToStorage, FromStorage>(Role::Supervisor, Role::Storage).await;
    let msgs = vec![
        FromStorage::Loaded {
            id: 1,
            state: ShardState {
                shard: 3,
                positions: vec![Position {
                    stream: "product.created/3".into(),
                    offset: 99,
                }],
                products: products(),
                entity_times: vec![(EntityKey::Seller("seller-1".into()), 1_696_176_060_000)],
                last: true,
            },
        },
        FromStorage::Written {
            id: 2,
            report: WriteReport {
                dead_letters: 3,
                retries: 2,
                throttles: 1,
                requests: vec![("DynamoDB.BatchWriteItem".into(), 4)],
            },
        },
        FromStorage::Snapshotted {
            id: 3,
            key: "metrics/2023/10/01/snapshot-0001.jsonl.gz".into(),
        },
        FromStorage::Failed {
            id: 4,
            error: "ProvisionedThroughputExceeded — retry".into(),
            retryable: true,
        },
        FromStorage::Failed {
            id: 5,
            error: String::new(),
            retryable: false,
        },
    ];
    round_trip(tx, rx, msgs).await;
}

// ---------------------------------------------------------------------------
// Handshake refusals

/// Runs a real handshake on one end while the other end sends `theirs` as
/// its hello; returns the handshake's error.
async fn handshake_against(theirs: Hello) -> FrameError {
    let (a, b) = UnixStream::pair().unwrap();
    let mut peer = Sender::<Hello, _>::new(b);
    peer.send(&theirs).await.unwrap();
    let res = tokio::time::timeout(
        PROMPT,
        handshake::<ToWorker, FromWorker>(a, Role::Supervisor, Role::Worker),
    )
    .await
    .expect("handshake did not answer promptly");
    drop(peer);
    expect_err(res)
}

#[tokio::test]
async fn handshake_rejects_bad_magic() {
    let mut hello = Hello::new(Role::Worker);
    hello.magic = *b"HTTP/1.1";
    let e = handshake_against(hello).await;
    assert!(matches!(e, FrameError::BadMagic), "{e}");
    assert!(!e.is_peer_gone());
}

#[tokio::test]
async fn handshake_rejects_bad_magic_even_with_bad_version() {
    // The magic is checked first: a stranger is a stranger, whatever version
    // it claims.
    let hello = Hello {
        magic: [0; 8],
        version: 0,
        role: Role::Storage,
        pid: 1,
    };
    let e = handshake_against(hello).await;
    assert!(matches!(e, FrameError::BadMagic), "{e}");
}

#[tokio::test]
async fn handshake_rejects_other_version() {
    let mut hello = Hello::new(Role::Worker);
    hello.version = PROTOCOL_VERSION + 1;
    let e = handshake_against(hello).await;
    assert!(
        matches!(e, FrameError::VersionMismatch { ours, theirs } if ours == PROTOCOL_VERSION && theirs == PROTOCOL_VERSION + 1),
        "{e}"
    );
}

#[tokio::test]
async fn handshake_rejects_wrong_role() {
    let e = handshake_against(Hello::new(Role::Storage)).await;
    assert!(
        matches!(
            e,
            FrameError::UnexpectedRole {
                expected: Role::Worker,
                got: Role::Storage
            }
        ),
        "{e}"
    );
}

#[tokio::test]
async fn handshake_wrong_role_both_sides_real() {
    // A supervisor that expects a worker meets a storage process that
    // expects a supervisor: only the supervisor side refuses.
    let (a, b) = UnixStream::pair().unwrap();
    let (ra, rb) = tokio::join!(
        handshake::<ToWorker, FromWorker>(a, Role::Supervisor, Role::Worker),
        handshake::<FromStorage, ToStorage>(b, Role::Storage, Role::Supervisor),
    );
    let e = expect_err(ra);
    assert!(
        matches!(
            e,
            FrameError::UnexpectedRole {
                expected: Role::Worker,
                got: Role::Storage
            }
        ),
        "{e}"
    );
    assert!(rb.is_ok());
}

#[tokio::test]
async fn handshake_peer_closes_before_hello() {
    let (a, b) = UnixStream::pair().unwrap();
    drop(b);
    let res = tokio::time::timeout(
        PROMPT,
        handshake::<ToWorker, FromWorker>(a, Role::Supervisor, Role::Worker),
    )
    .await
    .expect("handshake did not answer promptly");
    let e = expect_err(res);
    // Our hello cannot be written (EPIPE) or their hello never comes.
    assert!(matches!(e, FrameError::Io(_) | FrameError::Closed), "{e}");
}

#[tokio::test]
async fn handshake_rejects_non_hello_frame() {
    // A peer that speaks frames but not a hello (one byte: too short).
    let (a, mut b) = UnixStream::pair().unwrap();
    b.write_all(&framed(&[0])).await.unwrap();
    let res = tokio::time::timeout(
        PROMPT,
        handshake::<ToWorker, FromWorker>(a, Role::Supervisor, Role::Worker),
    )
    .await
    .expect("handshake did not answer promptly");
    let e = expect_err(res);
    assert!(matches!(e, FrameError::Decode(_)), "{e}");
}

// ---------------------------------------------------------------------------
// End of stream

#[tokio::test]
async fn clean_eof_is_closed() {
    let (res, _) = recv_raw::<ToWorker>(&[], true).await;
    let e = expect_err(res);
    assert!(matches!(e, FrameError::Closed), "{e}");
    assert!(e.is_peer_gone());
}

#[tokio::test]
async fn clean_eof_after_a_whole_frame_is_closed() {
    let mut f = Vec::new();
    frame::encode_into(&ToWorker::Flush { id: 9 }, &mut f).unwrap();
    let (tx, rx) = UnixStream::pair().unwrap();
    let (_, mut w) = tx.into_split();
    w.write_all(&f).await.unwrap();
    drop(w);
    let mut rx = Receiver::<ToWorker, _>::new(rx);
    assert_eq!(rx.recv().await.unwrap(), ToWorker::Flush { id: 9 });
    let e = expect_err(rx.recv().await);
    assert!(matches!(e, FrameError::Closed), "{e}");
}

#[tokio::test]
async fn eof_inside_length_is_truncated() {
    for got in 1..4usize {
        let (res, _) = recv_raw::<ToWorker>(&100u32.to_le_bytes()[..got], true).await;
        let e = expect_err(res);
        assert!(
            matches!(e, FrameError::Truncated { got: g, expected: 4 } if g == got),
            "{got} length bytes: {e}"
        );
        assert!(e.is_peer_gone());
    }
}

#[tokio::test]
async fn eof_inside_payload_is_truncated() {
    let (res, _) = recv_raw::<ToWorker>(&frame_of(100, &[3u8; 10]), true).await;
    let e = expect_err(res);
    assert!(
        matches!(
            e,
            FrameError::Truncated {
                got: 10,
                expected: 100
            }
        ),
        "{e}"
    );
    assert!(e.is_peer_gone());
}

#[tokio::test]
async fn eof_inside_second_frame_is_truncated() {
    let mut f = Vec::new();
    frame::encode_into(
        &FromStorage::Written {
            id: 1,
            report: WriteReport::default(),
        },
        &mut f,
    )
    .unwrap();
    let mut bytes = f.clone();
    bytes.extend_from_slice(&f[..f.len() - 1]);
    let (tx, rx) = UnixStream::pair().unwrap();
    let (_, mut w) = tx.into_split();
    w.write_all(&bytes).await.unwrap();
    drop(w);
    let mut rx = Receiver::<FromStorage, _>::new(rx);
    assert_eq!(
        rx.recv().await.unwrap(),
        FromStorage::Written {
            id: 1,
            report: WriteReport::default()
        }
    );
    let e = expect_err(rx.recv().await);
    let want = f.len() - 4;
    assert!(
        matches!(e, FrameError::Truncated { got, expected } if expected == want && got == want - 1),
        "{e}"
    );
}

// ---------------------------------------------------------------------------
// Declared lengths

#[tokio::test]
async fn oversized_length_is_refused_before_allocating() {
    for len in [
        u32::MAX,
        MAX_FRAME_BYTES + 1,
        MAX_FRAME_BYTES.saturating_mul(2),
    ] {
        // Only the header is written and the writer stays open: a reader that
        // tried to fill the declared payload would wait forever.
        let (res, peak) = recv_raw::<ToWorker>(&len.to_le_bytes(), false).await;
        let e = expect_err(res);
        assert!(
            matches!(e, FrameError::TooLarge { len: l, max: MAX_FRAME_BYTES } if l == len),
            "declared {len}: {e}"
        );
        assert!(!e.is_peer_gone());
        assert!(
            peak < ALLOC_BUDGET,
            "declared {len}: allocated {peak} bytes before refusing"
        );
    }
}

#[tokio::test]
async fn maximum_length_is_accepted_by_check() {
    // The boundary itself is legal; only the frame codec's check is probed
    // here (reading it would allocate the full maximum).
    assert_eq!(
        frame::check_len(MAX_FRAME_BYTES).unwrap(),
        MAX_FRAME_BYTES as usize
    );
    assert_eq!(
        frame::check_len(MIN_FRAME_BYTES).unwrap(),
        MIN_FRAME_BYTES as usize
    );
    assert!(matches!(
        frame::check_len(MAX_FRAME_BYTES + 1),
        Err(FrameError::TooLarge { .. })
    ));
    assert!(matches!(
        frame::check_len(0),
        Err(FrameError::Undersized { len: 0 })
    ));
}

#[tokio::test]
async fn zero_length_is_undersized() {
    // Writer stays open, and more bytes follow: the refusal must not depend
    // on what comes next.
    let (res, _) = recv_raw::<ToWorker>(&frame_of(0, &[1, 2, 3]), false).await;
    let e = expect_err(res);
    assert!(matches!(e, FrameError::Undersized { len: 0 }), "{e}");
    assert!(!e.is_peer_gone());
}

// ---------------------------------------------------------------------------
// Garbage payloads

#[tokio::test]
async fn trailing_bytes_are_refused() {
    let mut f = Vec::new();
    frame::encode_into(&ToWorker::Flush { id: 5 }, &mut f).unwrap();
    let mut payload = f[4..].to_vec();
    payload.extend_from_slice(&[0, 0, 0]);
    let (res, _) = recv_raw::<ToWorker>(&framed(&payload), false).await;
    let e = expect_err(res);
    assert!(matches!(e, FrameError::TrailingBytes(3)), "{e}");
}

#[tokio::test]
async fn unknown_variant_is_a_decode_error() {
    // ToWorker has four variants; tag 9 is none of them.
    let (res, _) = recv_raw::<ToWorker>(&framed(&[9, 0]), false).await;
    let e = expect_err(res);
    assert!(matches!(e, FrameError::Decode(_)), "{e}");
}

#[tokio::test]
async fn random_payloads_never_panic() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut refused = 0;
    for i in 0..300 {
        let len = 1 + (rng.next() % 200) as usize;
        let mut payload = rng.bytes(len);
        // Make half of them start with a valid tag so decoding goes deeper.
        if i % 2 == 0 {
            payload[0] = (i / 2 % 4) as u8;
        }
        let (a, b) = UnixStream::pair().unwrap();
        let (_, mut w) = a.into_split();
        w.write_all(&framed(&payload)).await.unwrap();
        let mut rx = Receiver::<ToWorker, _>::new(b);
        let (res, peak) = peak_alloc_of(rx.recv()).await;
        assert!(peak < ALLOC_BUDGET, "payload {i}: allocated {peak} bytes");
        match res {
            Err(FrameError::Decode(_) | FrameError::TrailingBytes(_)) => refused += 1,
            // Random bytes can, rarely, be a valid message.
            Ok(_) => {}
            Err(e) => panic!("payload {i}: unexpected error {e}"),
        }
    }
    assert!(
        refused > 250,
        "only {refused} of 300 random payloads were refused"
    );
}

#[tokio::test]
async fn random_payloads_for_every_message_type() {
    let mut rng = Rng(42);
    for i in 0..200 {
        let n = 1 + (rng.next() % 64) as usize;
        let payload = rng.bytes(n);
        let f = framed(&payload);
        let check = |e: FrameError| {
            assert!(
                matches!(e, FrameError::Decode(_) | FrameError::TrailingBytes(_)),
                "{i}: {e}"
            )
        };
        if let Err(e) = recv_raw::<FromWorker>(&f, false).await.0 {
            check(e)
        }
        if let Err(e) = recv_raw::<ToStorage>(&f, false).await.0 {
            check(e)
        }
        if let Err(e) = recv_raw::<FromStorage>(&f, false).await.0 {
            check(e)
        }
        if let Err(e) = recv_raw::<Hello>(&f, false).await.0 {
            check(e)
        }
    }
}

/// The payload (no length prefix) of a real encoding of `msg`.
fn payload_of<T: serde::Serialize>(msg: &T) -> Vec<u8> {
    let mut f = Vec::new();
    frame::encode_into(msg, &mut f).unwrap();
    f.split_off(4)
}

/// A `ToWorker::Events` payload whose last field, the (empty) `payload`
/// byte vector, instead claims `claim` elements. Derived from a real
/// encoding, so it stays right when fields are added before `payload`.
fn events_claiming_payload(claim: u64) -> Vec<u8> {
    let mut p = payload_of(&ToWorker::Events(EventBatch::new(0, "".into())));
    assert_eq!(p.pop(), Some(0), "EventBatch no longer ends with `payload`");
    p.extend(varint_u64(claim));
    p
}

/// A `ToWorker::Events` payload cut where `stream` begins, whose length
/// claims `claim` bytes; also returns what followed the stream originally.
fn events_claiming_stream(claim: u64) -> (Vec<u8>, Vec<u8>) {
    let p = payload_of(&ToWorker::Events(EventBatch::new(0, "@@@@".into())));
    let at = p
        .windows(5)
        .position(|w| w == b"\x04@@@@")
        .expect("stream bytes");
    let mut out = p[..at].to_vec();
    out.extend(varint_u64(claim));
    (out, p[at + 5..].to_vec())
}

#[tokio::test]
async fn claim_helpers_build_what_they_say() {
    // The premise of the tests below: the patched length is the one the
    // decoder reads for that field.
    let mut p = events_claiming_payload(3);
    p.extend_from_slice(&[7, 8, 9]);
    let ToWorker::Events(b) = frame::decode::<ToWorker>(&p).unwrap() else {
        panic!("not Events")
    };
    assert_eq!(b.payload, vec![7, 8, 9]);

    let (mut p, rest) = events_claiming_stream(2);
    p.extend_from_slice(b"ab");
    p.extend_from_slice(&rest);
    let ToWorker::Events(b) = frame::decode::<ToWorker>(&p).unwrap() else {
        panic!("not Events")
    };
    assert_eq!(&*b.stream, "ab");
}

#[tokio::test]
async fn huge_vec_claim_in_small_frame_is_bounded() {
    // `payload` claims 2^40 elements inside a frame of a few bytes. serde's
    // Vec visitor pre-allocates cautiously and the decode runs out of bytes.
    for claim in [1u64 << 40, u64::from(MAX_FRAME_BYTES) - 1, u64::MAX] {
        let payload = events_claiming_payload(claim);
        let (res, peak) = recv_raw::<ToWorker>(&framed(&payload), false).await;
        let e = expect_err(res);
        assert!(matches!(e, FrameError::Decode(_)), "claim {claim}: {e}");
        assert!(
            peak < ALLOC_BUDGET,
            "claim {claim}: allocated {peak} bytes for a {}-byte frame",
            payload.len()
        );
    }
}

#[tokio::test]
async fn huge_string_claim_hits_the_bincode_limit() {
    // `stream` claims a 2^40-byte string. bincode allocates strings up
    // front, so only its limit stands between this small frame and a
    // terabyte allocation; just above the frame maximum is refused the same way.
    for claim in [1u64 << 40, u64::from(MAX_FRAME_BYTES) + 1] {
        let (payload, _) = events_claiming_stream(claim);
        let (res, peak) = recv_raw::<ToWorker>(&framed(&payload), false).await;
        let e = expect_err(res);
        assert!(
            matches!(
                e,
                FrameError::Decode(bincode::error::DecodeError::LimitExceeded)
            ),
            "claim {claim}: {e}"
        );
        assert!(peak < ALLOC_BUDGET, "claim {claim}: allocated {peak} bytes");
    }
}

#[tokio::test]
async fn string_claim_under_the_limit_costs_at_most_the_limit() {
    // The bound, not a wish: a string claim just under the bincode limit is
    // allocated before bincode finds the frame holds only a few bytes. What a
    // hostile small frame can cost is therefore MAX_FRAME_BYTES, never more.
    let (payload, _) = events_claiming_stream(u64::from(MAX_FRAME_BYTES) - 64);
    let (res, peak) = recv_raw::<ToWorker>(&framed(&payload), false).await;
    let e = expect_err(res);
    assert!(matches!(e, FrameError::Decode(_)), "{e}");
    assert!(peak <= MAX_FRAME_BYTES as usize, "allocated {peak} bytes");
}

#[tokio::test]
async fn huge_nested_claims_are_bounded() {
    // FromWorker::Changes whose `shards` claims u64::MAX / 2 ShardChanges:
    // the element size times the claim overflows the limit or the visitor
    // pre-allocates cautiously; either way nothing big is made.
    let mut payload = payload_of(&FromWorker::Changes {
        id: 0,
        shards: vec![],
        more: false,
    });
    // `more` (false) is last, after the empty `shards`.
    assert_eq!(payload.pop(), Some(0));
    assert_eq!(payload.pop(), Some(0));
    payload.extend(varint_u64(u64::MAX / 2));
    payload.push(0);
    let (res, peak) = recv_raw::<FromWorker>(&framed(&payload), false).await;
    let e = expect_err(res);
    assert!(matches!(e, FrameError::Decode(_)), "{e}");
    assert!(peak < ALLOC_BUDGET, "allocated {peak} bytes");
}

#[tokio::test]
async fn receiver_stays_usable_after_a_refused_payload() {
    // A decode error leaves the stream at a frame boundary; the channel is
    // replaced in production, but the codec itself is not desynchronised.
    let mut good = Vec::new();
    frame::encode_into(&ToWorker::Flush { id: 77 }, &mut good).unwrap();
    let mut bytes = framed(&[9, 9, 9]);
    bytes.extend_from_slice(&good);
    let (tx, rx) = UnixStream::pair().unwrap();
    let (_, mut w) = tx.into_split();
    w.write_all(&bytes).await.unwrap();
    let mut rx = Receiver::<ToWorker, _>::new(rx);
    assert!(matches!(rx.recv().await, Err(FrameError::Decode(_))));
    assert_eq!(rx.recv().await.unwrap(), ToWorker::Flush { id: 77 });
}

// ---------------------------------------------------------------------------
// EventBatch::iter

#[test]
fn event_batch_iter_consistent() {
    let mut b = EventBatch::new(0, "s".into());
    b.push(10, b"aa");
    b.push(11, b"");
    b.push(12, b"ccc");
    let got: Vec<_> = b.iter().collect();
    assert_eq!(
        got,
        vec![(10, &b"aa"[..]), (11, &b""[..]), (12, &b"ccc"[..])]
    );
    assert_eq!(b.len(), 3);
    assert_eq!(b.last_offset(), Some(12));
}

#[test]
fn event_batch_iter_stops_at_inconsistent_ends() {
    let base = || {
        let mut b = EventBatch::new(0, "s".into());
        b.push(1, b"one");
        b.push(2, b"two");
        b.push(3, b"three");
        b
    };

    // An end beyond the payload.
    let mut b = base();
    b.ends[1] = 1000;
    assert_eq!(b.iter().collect::<Vec<_>>(), vec![(1, &b"one"[..])]);

    // Ends that go backwards.
    let mut b = base();
    b.ends[2] = 2;
    assert_eq!(
        b.iter().collect::<Vec<_>>(),
        vec![(1, &b"one"[..]), (2, &b"two"[..])]
    );

    // The first end already past the payload.
    let mut b = base();
    b.ends[0] = u32::MAX;
    assert_eq!(b.iter().count(), 0);

    // Fewer ends than offsets, and more ends than offsets.
    let mut b = base();
    b.ends.pop();
    assert_eq!(b.iter().count(), 2);
    let mut b = base();
    b.offsets.pop();
    assert_eq!(b.iter().map(|(o, _)| o).collect::<Vec<_>>(), vec![1, 2]);

    // A payload truncated under its ends.
    let mut b = base();
    b.payload.truncate(4);
    assert_eq!(b.iter().count(), 1);

    // An empty payload with ends.
    let mut b = base();
    b.payload.clear();
    assert_eq!(b.iter().count(), 0);
}

#[tokio::test]
async fn inconsistent_batch_survives_the_wire_and_iterates_safely() {
    // The wire carries whatever a peer sends; the receiver's iteration must
    // still not panic.
    let ((tx, _, _), (_, mut rx, _)) =
        connected::<ToWorker, FromWorker>(Role::Supervisor, Role::Worker).await;
    let mut tx = tx;
    let mut b = event_batch(3);
    b.ends = vec![5, 2, u32::MAX];
    tx.send(&ToWorker::Events(b.clone())).await.unwrap();
    let got = rx.recv().await.unwrap();
    assert_eq!(got, ToWorker::Events(b));
    let ToWorker::Events(b) = got else {
        unreachable!()
    };
    assert_eq!(b.iter().count(), 1);
}

// ---------------------------------------------------------------------------
// Cancellation: `recv` in a `select!` whose other branch wins

/// Delivers `frame` in two parts split at `at`; between them a `select!` lets
/// a timer win over `recv`, dropping the `recv` future mid-frame. The next
/// `recv` must still produce the whole message.
async fn recv_across_cancellation(msg: ToWorker, at: impl Fn(usize) -> usize) {
    let mut f = Vec::new();
    frame::encode_into(&msg, &mut f).unwrap();
    let at = at(f.len());
    let (a, b) = UnixStream::pair().unwrap();
    let (_, mut w) = a.into_split();
    let mut rx = Receiver::<ToWorker, _>::new(b);
    w.write_all(&f[..at]).await.unwrap();
    for _ in 0..3 {
        tokio::select! {
            biased;
            r = rx.recv() => panic!("half a frame ({at} of {} bytes) cannot be a message: {r:?}", f.len()),
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    // The writer is bounded by the same timeout: a receiver that lost its
    // place stops reading, and the rest of a large frame would never fit.
    let rest = async { w.write_all(&f[at..]).await.unwrap() };
    let (got, ()) = tokio::time::timeout(PROMPT, async { tokio::join!(rx.recv(), rest) })
        .await
        .expect("receiver lost its place in the stream");
    assert_eq!(got.unwrap(), msg);
    // And the stream stays in step for the next frame.
    let again = async { w.write_all(&f).await.unwrap() };
    let (got, ()) = tokio::time::timeout(PROMPT, async { tokio::join!(rx.recv(), again) })
        .await
        .expect("second frame stalled");
    assert_eq!(got.unwrap(), msg);
}

#[tokio::test]
async fn recv_cancelled_inside_payload_resumes() {
    recv_across_cancellation(ToWorker::Events(event_batch(20)), |n| n / 2).await;
}

#[tokio::test]
async fn recv_cancelled_inside_length_resumes() {
    recv_across_cancellation(ToWorker::Flush { id: 3 }, |_| 2).await;
}

#[tokio::test]
async fn recv_cancelled_inside_large_payload_resumes() {
    // Larger than the socket buffer: the rest is written while recv reads.
    let mut b = event_batch(0);
    let big = vec![b'y'; 64 << 10];
    for i in 0..40 {
        b.push(i, &big);
    }
    recv_across_cancellation(ToWorker::Events(b), |_| 30_000).await;
}

#[test]
fn encoded_products_are_a_vec_of_states_and_borrowed_strings_encode_alike() {
    let owned = products();
    let encoded = EncodedProducts::encode(&owned).unwrap();
    assert_eq!(encoded.count, 2);
    assert_eq!(encoded.decode().unwrap(), owned);
    // The worker encodes borrowed strings: the same bytes.
    let borrowed: Vec<(ProductId, ProductStateOf<&str>)> = owned
        .iter()
        .map(|(id, s)| {
            fn f(f: &Field<Box<str>>) -> Field<&str> {
                Field {
                    value: f.value.as_deref(),
                    version: f.version,
                }
            }
            (
                id.clone(),
                ProductStateOf {
                    seller: f(&s.seller),
                    category: f(&s.category),
                    name: f(&s.name),
                    price_cents: s.price_cents.clone(),
                    quantity: s.quantity.clone(),
                    deleted: s.deleted.clone(),
                    low_stock_since: s.low_stock_since,
                },
            )
        })
        .collect();
    assert_eq!(EncodedProducts::encode(&borrowed).unwrap(), encoded);
    assert!(EncodedProducts::default().decode().unwrap().is_empty());
    assert!(encoded.check().is_ok());
    assert!(EncodedProducts::default().check().is_ok());
    // Garbage, a wrong count and trailing bytes are typed errors.
    let bad = EncodedProducts {
        count: 1,
        bytes: vec![0xff; 3],
    };
    assert!(bad.decode().is_err());
    assert!(matches!(bad.check(), Err(FrameError::Decode(_))));
    let miscounted = EncodedProducts {
        count: 3,
        ..encoded.clone()
    };
    assert!(matches!(
        miscounted.check(),
        Err(FrameError::CountMismatch {
            declared: 3,
            found: 2
        })
    ));
    let mut trailing = encoded.clone();
    trailing.bytes.push(0);
    assert!(matches!(
        trailing.check(),
        Err(FrameError::TrailingBytes(1))
    ));
    // A state whose string is not UTF-8 is refused too.
    let mut not_utf8 = encoded.clone();
    let at = not_utf8
        .bytes
        .windows(8)
        .position(|w| w == b"seller-1")
        .expect("the seller's bytes");
    not_utf8.bytes[at] = 0xff;
    assert!(not_utf8.check().is_err());
}
