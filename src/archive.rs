//! The archive directory: the S3 key layout of DESIGN §6 on a local disk
//! (`<data_dir>/archive`), gzip JSON lines under Hive-style date partitions.

use crate::store::utc_day;
use analytics_worker::records::MetricRecord;
use flate2::Compression;
use flate2::write::GzEncoder;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

/// The archive directory of a data directory.
pub fn archive_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("archive")
}

/// The key of the metric snapshot taken at `now_ms`.
pub fn metric_snapshot_key(now_ms: i64) -> String {
    format!("metrics/dt={}/snapshot-{now_ms}.jsonl.gz", utc_day(now_ms))
}

/// Writes every record as one JSON line, gzipped, under
/// `metrics/dt=YYYY-MM-DD/snapshot-<epochMillis>.jsonl.gz`, and returns the
/// key. The file is written beside its final name and renamed into place, so
/// readers never see a partial snapshot and a retry overwrites itself.
pub fn write_metric_snapshot(
    archive_dir: &Path,
    records: &[MetricRecord],
    now_ms: i64,
) -> io::Result<String> {
    let key = metric_snapshot_key(now_ms);
    let path = archive_dir.join(&key);
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::other("snapshot key has no directory"))?;
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".snapshot-{now_ms}.jsonl.gz.tmp"));
    let result = (|| {
        // Fast compression: at the default level the snapshot at the end of
        // a run took a quarter of the storage process's instructions (JSON
        // lines still shrink several times at level 1).
        let mut gz = GzEncoder::new(BufWriter::new(File::create(&tmp)?), Compression::fast());
        for record in records {
            gz.write_all(record.to_json_line().as_bytes())?;
            gz.write_all(b"\n")?;
        }
        let file = gz
            .finish()?
            .into_inner()
            .map_err(io::IntoInnerError::into_error)?;
        file.sync_all()?;
        fs::rename(&tmp, &path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map(|()| key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use analytics_worker::records::{CategoryRecord, Money};
    use flate2::read::GzDecoder;
    use std::io::Read;

    #[test]
    fn snapshot_is_gzip_json_lines_under_its_date_partition() {
        let dir = tempfile::tempdir().unwrap();
        let records: Vec<MetricRecord> = ["Books", "Games"]
            .iter()
            .enumerate()
            .map(|(i, c)| {
                MetricRecord::Category(CategoryRecord {
                    category: c.to_string(),
                    total_products: i as u64,
                    total_value: Money(12000),
                    average_price: Money(1500),
                    last_event_at: 7,
                })
            })
            .collect();
        let now = 1_696_176_060_000;
        let key = write_metric_snapshot(dir.path(), &records, now).unwrap();
        assert_eq!(key, "metrics/dt=2023-10-01/snapshot-1696176060000.jsonl.gz");

        let mut text = String::new();
        GzDecoder::new(File::open(dir.path().join(&key)).unwrap())
            .read_to_string(&mut text)
            .unwrap();
        let expected: String = records.iter().map(|r| r.to_json_line() + "\n").collect();
        assert_eq!(text, expected);
        let parsed: Vec<MetricRecord> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(parsed, records);

        // Only the snapshot is left in the partition (no temporary file).
        let names: Vec<_> = fs::read_dir(dir.path().join("metrics/dt=2023-10-01"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["snapshot-1696176060000.jsonl.gz"]);

        // Writing the same snapshot again overwrites it.
        assert_eq!(
            write_metric_snapshot(dir.path(), &records[..1], now).unwrap(),
            key
        );
        let mut text = String::new();
        GzDecoder::new(File::open(dir.path().join(&key)).unwrap())
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text.lines().count(), 1);
    }
}
