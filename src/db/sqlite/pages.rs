//! The database's identity, read from b-tree pages with plain I/O before
//! SQLite opens the file: just enough of SQLite's file format to find the
//! `sequences` table in the schema and its `identity` row, in the database
//! file and in a log's copy of that page.
//!
//! The identity is a random number a migration draws for each database (and
//! a backup draws anew). It sits in the row of `sequences` beside the event
//! and key-change counters, so every transaction that records an event or
//! changes a key writes its page to the log. Nothing here trusts the bytes:
//! a page that does not parse as expected yields no identity, never an
//! error, and the check that uses it then has no verdict.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

/// The name of the identity's row in `sequences`.
const IDENTITY: &[u8] = b"identity";

/// The table that holds it.
const SEQUENCES: &[u8] = b"sequences";

/// At most this many schema pages are walked (the schema is a handful).
const SCHEMA_PAGES: usize = 1_000;

/// A database file's pages: `page_size` bytes each, the last `reserved` of
/// which SQLite leaves unused.
pub(crate) struct PageFile<'a> {
    pub(crate) file: &'a mut File,
    pub(crate) page_size: usize,
    pub(crate) reserved: usize,
}

impl PageFile<'_> {
    fn read(&mut self, number: u32) -> Option<Vec<u8>> {
        let offset = u64::from(number.checked_sub(1)?).checked_mul(self.page_size as u64)?;
        self.file.seek(SeekFrom::Start(offset)).ok()?;
        let mut page = vec![0u8; self.page_size];
        self.file.read_exact(&mut page).ok()?;
        Some(page)
    }

    /// The identity this file holds, if its schema has `sequences` with an
    /// identity row on a single page.
    pub(crate) fn identity(&mut self) -> Option<i64> {
        let root = self.sequences_root()?;
        let page = self.read(root)?;
        identity_in(&page, self.usable())
    }

    fn usable(&self) -> usize {
        self.page_size.saturating_sub(self.reserved)
    }

    /// The root page of `sequences`, found in the schema table (a table
    /// b-tree rooted at page 1).
    fn sequences_root(&mut self) -> Option<u32> {
        let usable = self.usable();
        let mut pending = vec![1u32];
        let mut walked = 0;
        while let Some(number) = pending.pop() {
            walked += 1;
            if walked > SCHEMA_PAGES {
                return None;
            }
            let page = self.read(number)?;
            let header = if number == 1 { 100 } else { 0 };
            let (kind, cells) = cells(&page, header, usable)?;
            match kind {
                INTERIOR_TABLE => {
                    for at in cells {
                        pending.push(u32_at(&page, at)?);
                    }
                    pending.push(u32_at(&page, header + 8)?);
                }
                LEAF_TABLE => {
                    for at in cells {
                        let (length, used) = varint(&page, at)?;
                        let (_rowid, used_too) = varint(&page, at + used)?;
                        let payload =
                            local_payload(&page, at + used + used_too, length, usable, true)?;
                        // type, name, tbl_name, rootpage, sql
                        let columns = record(payload);
                        if let [Value::Text(b"table"), Value::Text(SEQUENCES), _, Value::Integer(root), ..] =
                            columns.as_slice()
                        {
                            return u32::try_from(*root).ok();
                        }
                    }
                }
                _ => return None,
            }
        }
        None
    }
}

/// The identity held by `page` if it is a copy of the page of `sequences`
/// (an index b-tree leaf, as for every table `WITHOUT ROWID`): rows of a
/// name and a number only, among them the event and key-change counters and
/// an identity of at least 2^32, which a database's identity always is. No
/// other page of a keytally database looks like that (the index of model
/// names holds names and numbers too, but its numbers are row ids), so a
/// page is recognised whichever page number another database gave it.
pub(crate) fn identity_in(page: &[u8], usable: usize) -> Option<i64> {
    let (kind, cells) = cells(page, 0, usable)?;
    if kind != LEAF_INDEX {
        return None;
    }
    let (mut identity, mut counters) = (None, 0);
    for at in cells {
        let (length, used) = varint(page, at)?;
        let payload = local_payload(page, at + used, length, usable, false)?;
        match record(payload).as_slice() {
            [Value::Text(IDENTITY), Value::Integer(value)] if *value >= IDENTITY_AT_LEAST => {
                identity = Some(*value);
            }
            [Value::Text(COUNTERS_EVENTS | COUNTERS_KEY_CHANGES), Value::Integer(_)] => {
                counters += 1;
            }
            [Value::Text(_), Value::Integer(_)] => {}
            _ => return None,
        }
    }
    if counters == 2 {
        identity
    } else {
        None
    }
}

/// The least identity a database is given (the migration and a backup draw
/// it at random between this and 2^62).
const IDENTITY_AT_LEAST: i64 = 1 << 32;

/// The counters kept beside the identity.
const COUNTERS_EVENTS: &[u8] = b"events";
const COUNTERS_KEY_CHANGES: &[u8] = b"key_changes";

const INTERIOR_INDEX: u8 = 0x02;
const INTERIOR_TABLE: u8 = 0x05;
const LEAF_INDEX: u8 = 0x0a;
const LEAF_TABLE: u8 = 0x0d;

/// The kind of the b-tree page whose header starts at `header`, and the
/// offsets of its cells (each within the usable part of the page).
fn cells(page: &[u8], header: usize, usable: usize) -> Option<(u8, Vec<usize>)> {
    let kind = *page.get(header)?;
    let pointers = match kind {
        INTERIOR_INDEX | INTERIOR_TABLE => header + 12,
        LEAF_INDEX | LEAF_TABLE => header + 8,
        _ => return None,
    };
    let count = usize::from(u16_at(page, header + 3)?);
    let mut offsets = Vec::with_capacity(count);
    for i in 0..count {
        let at = usize::from(u16_at(page, pointers + 2 * i)?);
        if at < pointers || at >= usable.min(page.len()) {
            return None;
        }
        offsets.push(at);
    }
    Some((kind, offsets))
}

/// The part of a cell's payload of `length` bytes stored on the page itself
/// (the rest is on overflow pages, which are not read), starting at `at`.
fn local_payload(
    page: &[u8],
    at: usize,
    length: u64,
    usable: usize,
    table_leaf: bool,
) -> Option<&[u8]> {
    // SQLite's rule (fileformat2.html, "B-tree Pages"): at most `most`
    // bytes stay local; beyond that, `least` plus what fits.
    let u = u64::try_from(usable).ok()?;
    if u < 480 {
        return None;
    }
    let most = if table_leaf {
        u - 35
    } else {
        (u - 12) * 64 / 255 - 23
    };
    let local = if length <= most {
        length
    } else {
        let least = (u - 12) * 32 / 255 - 23;
        let fitted = least + (length - least) % (u - 4);
        if fitted <= most {
            fitted
        } else {
            least
        }
    };
    page.get(at..at.checked_add(usize::try_from(local).ok()?)?)
}

/// A column of a record, as far as this module needs to tell them apart.
#[derive(Debug)]
enum Value<'a> {
    Integer(i64),
    Text(&'a [u8]),
    Other,
}

/// The leading columns of the record `payload` that it holds whole.
fn record(payload: &[u8]) -> Vec<Value<'_>> {
    let mut columns = Vec::new();
    let Some((header_length, mut at)) = varint(payload, 0) else {
        return columns;
    };
    let Ok(header_length) = usize::try_from(header_length) else {
        return columns;
    };
    let mut body = header_length;
    while at < header_length {
        let Some((serial_type, used)) = varint(payload, at) else {
            break;
        };
        at += used;
        let length = match serial_type {
            0 | 8 | 9 => 0,
            1..=4 => serial_type as usize,
            5 => 6,
            6 | 7 => 8,
            n if n >= 12 => usize::try_from((n - 12) / 2).unwrap_or(usize::MAX),
            _ => break,
        };
        let Some(bytes) = body
            .checked_add(length)
            .and_then(|end| payload.get(body..end))
        else {
            break;
        };
        body += length;
        columns.push(match serial_type {
            1..=6 => Value::Integer(signed(bytes)),
            8 => Value::Integer(0),
            9 => Value::Integer(1),
            n if n >= 13 && n % 2 == 1 => Value::Text(bytes),
            _ => Value::Other,
        });
    }
    columns
}

/// A big-endian two's-complement integer of 1 to 8 bytes.
fn signed(bytes: &[u8]) -> i64 {
    let fill = if bytes.first().is_some_and(|byte| byte & 0x80 != 0) {
        0xff
    } else {
        0
    };
    let mut whole = [fill; 8];
    whole[8 - bytes.len()..].copy_from_slice(bytes);
    i64::from_be_bytes(whole)
}

/// SQLite's variable-length integer at `at`, and how many bytes it takes.
fn varint(bytes: &[u8], at: usize) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for i in 0..9 {
        let byte = *bytes.get(at.checked_add(i)?)?;
        if i == 8 {
            return Some(((value << 8) | u64::from(byte), 9));
        }
        value = (value << 7) | u64::from(byte & 0x7f);
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*bytes.get(at)?, *bytes.get(at + 1)?]))
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    let bytes = bytes.get(at..at + 4)?;
    Some(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_read_as_sqlite_writes_them() {
        assert_eq!(varint(&[0x05], 0), Some((5, 1)));
        assert_eq!(varint(&[0x81, 0x00], 0), Some((128, 2)));
        assert_eq!(varint(&[0xff; 9], 0), Some((u64::MAX, 9)));
        assert_eq!(varint(&[0x81], 0), None);
    }

    #[test]
    fn integers_keep_their_sign() {
        assert_eq!(signed(&[0xff]), -1);
        assert_eq!(signed(&[0x01, 0x00]), 256);
        assert_eq!(signed(&[0x80, 0, 0, 0, 0, 0]), -(1 << 47));
    }

    #[test]
    fn a_record_cut_short_yields_only_its_whole_columns() {
        // header: 3 bytes, text of 8, an 8-byte integer; the body is cut.
        let mut payload = vec![3, 13 + 2 * 8, 6];
        payload.extend_from_slice(b"identity");
        payload.extend_from_slice(&[0, 0, 0]);
        let columns = record(&payload);
        assert!(
            matches!(columns.as_slice(), [Value::Text(b"identity")]),
            "{columns:?}"
        );
    }

    #[test]
    fn garbage_pages_hold_no_identity() {
        let mut page = vec![0u8; 4096];
        assert_eq!(identity_in(&page, 4096), None);
        for (i, byte) in page.iter_mut().enumerate() {
            *byte = (i as u8).wrapping_mul(151).wrapping_add(7);
        }
        page[0] = LEAF_INDEX;
        assert_eq!(identity_in(&page, 4096), None);
    }
}
