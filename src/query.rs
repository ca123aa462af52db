//! `analytics query` and `analytics export` output: metric records read from
//! the configured store as JSON lines (the one record format of DESIGN §4) or as
//! readable aligned tables.

use crate::store::{History, civil_from_days};
use analytics_worker::records::MetricRecord;
use std::io::{self, Write};

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("no {kind} named {name:?}")]
    NotFound { kind: &'static str, name: String },
    #[error("writing the output: {0}")]
    Output(#[from] io::Error),
}

impl QueryError {
    /// The CLI exits 1 on this; the message was already printed in text mode.
    pub fn is_not_found(&self) -> bool {
        matches!(self, QueryError::NotFound { .. })
    }
}

/// Writes every record as a JSON line (export prints every current record,
/// sorted by key).
pub fn export(records: &[MetricRecord], out: &mut impl Write) -> io::Result<()> {
    for record in records {
        writeln!(out, "{}", record.to_json_line())?;
    }
    out.flush()
}

/// The low-stock list, of one seller or of all.
pub fn print_low_stock(
    records: &[MetricRecord],
    seller: Option<&str>,
    json: bool,
    out: &mut impl Write,
) -> Result<(), QueryError> {
    if json {
        for r in records {
            writeln!(out, "{}", r.to_json_line())?;
        }
    } else if records.is_empty() {
        match seller {
            Some(s) => writeln!(out, "no low-stock products for seller {s:?}")?,
            None => writeln!(out, "no low-stock products")?,
        }
    } else {
        let header = [
            "sellerId",
            "productId",
            "name",
            "category",
            "quantity",
            "price",
        ];
        let rows: Vec<Vec<String>> = records
            .iter()
            .filter_map(|r| match r {
                MetricRecord::LowStock(r) => Some(vec![
                    r.seller_id.clone(),
                    r.product_id.to_string(),
                    r.name.clone(),
                    r.category.clone(),
                    r.quantity.to_string(),
                    r.price.to_string(),
                ]),
                _ => None,
            })
            .collect();
        write_table(
            out,
            &header,
            &rows,
            &[false, false, false, false, true, true],
        )?;
    }
    out.flush()?;
    Ok(())
}

/// A seller's or category's current metrics and daily history (newest day
/// first); `kind` is `seller` or `category`.
pub fn print_entity(
    kind: &'static str,
    name: &str,
    found: Option<History>,
    json: bool,
    out: &mut impl Write,
) -> Result<(), QueryError> {
    let Some((current, mut days)) = found else {
        let error = QueryError::NotFound {
            kind,
            name: name.to_string(),
        };
        if !json {
            writeln!(out, "{error}")?;
            out.flush()?;
        }
        return Err(error);
    };
    days.reverse();
    if json {
        writeln!(out, "{}", current.to_json_line())?;
        for (day, record) in &days {
            // The record's own line, with the day in front.
            let line = record.to_json_line();
            let day = serde_json::Value::from(day.as_str());
            writeln!(
                out,
                "{{\"day\":{day},{}",
                line.strip_prefix('{').unwrap_or(&line)
            )?;
        }
        out.flush()?;
        return Ok(());
    }

    let fields = attributes(&current);
    writeln!(out, "{kind} {name}")?;
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in &fields {
        writeln!(out, "  {k:<width$}  {v}")?;
    }
    writeln!(out)?;
    if days.is_empty() {
        writeln!(out, "no daily history")?;
    } else {
        writeln!(out, "daily history (UTC, newest first)")?;
        let mut header = vec!["day"];
        header.extend(fields.iter().map(|(k, _)| *k));
        let rows: Vec<Vec<String>> = days
            .iter()
            .map(|(day, r)| {
                std::iter::once(day.clone())
                    .chain(attributes(r).into_iter().map(|(_, v)| v))
                    .collect()
            })
            .collect();
        let mut right = vec![false];
        right.extend(fields.iter().map(|(k, _)| *k != "lastEventAt"));
        write_table(out, &header, &rows, &right)?;
    }
    out.flush()?;
    Ok(())
}

/// The attributes of a seller or category record, as (name, text).
fn attributes(record: &MetricRecord) -> Vec<(&'static str, String)> {
    match record {
        MetricRecord::Seller(r) => vec![
            ("totalProducts", r.total_products.to_string()),
            ("activeProducts", r.active_products.to_string()),
            ("deletedProducts", r.deleted_products.to_string()),
            ("totalValue", r.total_value.to_string()),
            ("lowStockCount", r.low_stock_count.to_string()),
            ("lastEventAt", format_time(r.last_event_at)),
        ],
        MetricRecord::Category(r) => vec![
            ("totalProducts", r.total_products.to_string()),
            ("totalValue", r.total_value.to_string()),
            ("averagePrice", r.average_price.to_string()),
            ("lastEventAt", format_time(r.last_event_at)),
        ],
        MetricRecord::LowStock(_) => Vec::new(),
    }
}

/// `YYYY-MM-DD HH:MM:SS.mmmZ` for an epoch-millisecond time; `-` for none.
pub fn format_time(ms: i64) -> String {
    if ms < 0 {
        return "-".into();
    }
    let (y, m, d) = civil_from_days(ms.div_euclid(86_400_000));
    let in_day = ms.rem_euclid(86_400_000);
    let (h, min, s, milli) = (
        in_day / 3_600_000,
        in_day / 60_000 % 60,
        in_day / 1000 % 60,
        in_day % 1000,
    );
    format!("{y:04}-{m:02}-{d:02} {h:02}:{min:02}:{s:02}.{milli:03}Z")
}

/// An aligned table: a header row, then rows; `right[i]` right-aligns column i.
fn write_table(
    out: &mut impl Write,
    header: &[&str],
    rows: &[Vec<String>],
    right: &[bool],
) -> io::Result<()> {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|cell| printable(cell)).collect())
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| -> String {
        let mut text = String::from(" ");
        for (i, cell) in cells.enumerate() {
            let w = widths.get(i).copied().unwrap_or(0);
            let pad = " ".repeat(w.saturating_sub(cell.chars().count()));
            text.push(' ');
            if right.get(i).copied().unwrap_or(false) {
                text.push_str(&pad);
                text.push_str(cell);
            } else {
                text.push_str(cell);
                text.push_str(&pad);
            }
            text.push(' ');
        }
        text.trim_end().to_string()
    };
    writeln!(out, "{}", line(&mut header.iter().copied()))?;
    for row in &rows {
        writeln!(out, "{}", line(&mut row.iter().map(String::as_str)))?;
    }
    Ok(())
}

/// A cell as it may reach a terminal: names and ids come from the events,
/// so control characters (a newline, an escape sequence) are shown escaped
/// rather than breaking the table or driving the operator's terminal.
fn printable(cell: &str) -> String {
    if !cell.chars().any(char::is_control) {
        return cell.to_string();
    }
    cell.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().collect()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_in_cells_are_shown_escaped() {
        let mut out = Vec::new();
        let rows = vec![vec!["a\nb\u{1b}[31mred".to_string(), "x".to_string()]];
        write_table(&mut out, &["name", "id"], &rows, &[false, false]).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(text.contains("a\\nb\\u{1b}[31mred"), "{text}");
        assert!(!text.contains('\u{1b}'));
    }

    use crate::store::{EmbeddedStore, StoreOptions};

    const T0: i64 = 1_696_176_060_000;

    fn store() -> (tempfile::TempDir, EmbeddedStore) {
        let dir = tempfile::tempdir().unwrap();
        let mut store = EmbeddedStore::open(dir.path(), StoreOptions::default()).unwrap();
        store
            .write(&crate::store::tests::worked_check_changes(), T0)
            .unwrap();
        (dir, store)
    }

    fn run(
        f: impl FnOnce(&mut Vec<u8>) -> Result<(), QueryError>,
    ) -> (String, Result<(), QueryError>) {
        let mut out = Vec::new();
        let result = f(&mut out);
        (String::from_utf8(out).unwrap(), result)
    }

    #[test]
    fn export_writes_every_current_record_as_json_lines() {
        let (_dir, store) = store();
        let mut out = Vec::new();
        let records = store.current_records(T0).unwrap();
        assert_eq!(records.len(), 4);
        export(&records, &mut out).unwrap();
        let expected: String = records.iter().map(|r| r.to_json_line() + "\n").collect();
        assert_eq!(String::from_utf8(out).unwrap(), expected);
        assert!(expected.starts_with(r#"{"type":"category","category":"Books""#));
    }

    #[test]
    fn seller_table_and_json() {
        let (_dir, store) = store();
        let (text, result) =
            run(|out| print_entity("seller", "s1", store.seller("s1", T0).unwrap(), false, out));
        result.unwrap();
        assert!(text.starts_with("seller s1\n"), "{text}");
        assert!(text.contains("  totalValue       120.00\n"), "{text}");
        assert!(
            text.contains("  lastEventAt      2023-10-01 16:01:03.000Z\n"),
            "{text}"
        );
        assert!(text.contains("daily history"), "{text}");
        let day_row = text.lines().last().unwrap();
        assert!(day_row.starts_with("  2023-10-01"), "{day_row}");
        assert!(day_row.contains(" 120.00 "), "{day_row}");

        let (text, result) =
            run(|out| print_entity("seller", "s1", store.seller("s1", T0).unwrap(), true, out));
        result.unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["type"], "seller");
        assert_eq!(lines[0]["totalValue"], "120.00");
        assert_eq!(lines[1]["day"], "2023-10-01");
        assert_eq!(lines[1]["activeProducts"], 1);
    }

    #[test]
    fn category_history_is_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = EmbeddedStore::open(dir.path(), StoreOptions::default()).unwrap();
        for (offset, active, at) in [(1, 1, T0), (2, 3, T0 + 86_400_000)] {
            let changes = proto::ShardChanges {
                shard: 0,
                positions: vec![proto::Position {
                    stream: "e".into(),
                    offset,
                }],
                entities: vec![(
                    proto::EntityKey::Category("Books".into()),
                    proto::EntityTotals {
                        products: active,
                        active,
                        last_event_at: at,
                        ..Default::default()
                    },
                )],
                ..Default::default()
            };
            store.write(&[changes], T0).unwrap();
        }
        let (text, result) = run(|out| {
            print_entity(
                "category",
                "Books",
                store.category("Books", T0).unwrap(),
                true,
                out,
            )
        });
        result.unwrap();
        let days: Vec<String> = text
            .lines()
            .skip(1)
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["day"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(days, ["2023-10-02", "2023-10-01"]);
    }

    #[test]
    fn unknown_entities_are_a_typed_not_found() {
        let (_dir, store) = store();
        let (text, result) =
            run(|out| print_entity("seller", "s9", store.seller("s9", T0).unwrap(), false, out));
        assert_eq!(text, "no seller named \"s9\"\n");
        assert!(result.unwrap_err().is_not_found());
        let (text, result) = run(|out| {
            print_entity(
                "category",
                "Toys",
                store.category("Toys", T0).unwrap(),
                true,
                out,
            )
        });
        assert_eq!(text, "");
        assert!(matches!(
            result,
            Err(QueryError::NotFound {
                kind: "category",
                ..
            })
        ));
    }

    #[test]
    fn low_stock_table() {
        let (_dir, store) = store();
        let (text, result) =
            run(|out| print_low_stock(&store.low_stock(None).unwrap(), None, false, out));
        result.unwrap();
        assert_eq!(
            text,
            concat!(
                "  sellerId  productId  name           category  quantity  price\n",
                "  s1        1          name-s1-Games  Games            8  15.00\n"
            )
        );
        let (text, result) = run(|out| {
            print_low_stock(
                &store.low_stock(Some("s2")).unwrap(),
                Some("s2"),
                false,
                out,
            )
        });
        result.unwrap();
        assert_eq!(text, "no low-stock products for seller \"s2\"\n");
        let (text, result) = run(|out| {
            print_low_stock(&store.low_stock(Some("s1")).unwrap(), Some("s1"), true, out)
        });
        result.unwrap();
        assert_eq!(
            text,
            "{\"type\":\"lowStock\",\"sellerId\":\"s1\",\"productId\":1,\"name\":\"name-s1-Games\",\"category\":\"Games\",\"quantity\":8,\"price\":\"15.00\"}\n"
        );
    }

    #[test]
    fn times_format_in_utc() {
        assert_eq!(format_time(T0 + 42), "2023-10-01 16:01:00.042Z");
        assert_eq!(format_time(-1), "-");
    }
}
