//! The rollback journal and the write-ahead log beside a database, read with
//! plain I/O before SQLite opens it: only what SQLite itself would play back
//! or replay counts (headers and records or frames whose checksums hold).

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The length of the database header at the start of page 1.
pub(crate) const HEADER_LEN: usize = 100;

const WAL_HEADER_LEN: u64 = 32;
const WAL_FRAME_HEADER_LEN: usize = 24;

/// The first 100 bytes of page 1 as SQLite reads it from a database's log
/// `wal`: the last copy of page 1 in a committed transaction, if the log
/// holds one.
pub(crate) fn logged_header(wal: &Path) -> Result<Option<Vec<u8>>> {
    let Some(mut log) = LogReader::open(wal)? else {
        return Ok(None);
    };
    let (mut uncommitted, mut committed) = (None, None);
    while let Some(frame) = log.next_frame()? {
        if frame.page_number == 1 {
            uncommitted = Some(log.page[..HEADER_LEN].to_vec());
        }
        if frame.commit && uncommitted.is_some() {
            committed = uncommitted.take();
        }
    }
    Ok(committed)
}

/// The magic number of a rollback journal's header.
const JOURNAL_MAGIC: [u8; 8] = [0xd9, 0xd5, 0x05, 0xf9, 0x20, 0xa1, 0x63, 0xd7];

/// The first 100 bytes of page 1 as a hot rollback journal `journal` holds
/// it (SQLite plays it back before reading anything), if it holds page 1 in
/// a record whose checksum is whole.
pub(crate) fn journaled_header(journal: &Path) -> Result<Option<Vec<u8>>> {
    let path = journal.to_path_buf();
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(&path, e)),
    };
    let mut reader = io::BufReader::new(file);
    let mut header = [0u8; 28];
    if !read_whole(&mut reader, &mut header, &path)? || header[..8] != JOURNAL_MAGIC {
        return Ok(None);
    }
    let records = be_u32(&header, 8);
    let nonce = be_u32(&header, 12);
    let sector_size = u64::from(be_u32(&header, 20));
    let page_size = u64::from(be_u32(&header, 24));
    if !(512..=65_536).contains(&page_size)
        || !page_size.is_power_of_two()
        || !(32..=65_536).contains(&sector_size)
    {
        return Ok(None);
    }
    // Records start at the next sector.
    io::copy(&mut (&mut reader).take(sector_size - 28), &mut io::sink())
        .map_err(|e| Error::io(&path, e))?;
    let mut page = vec![0u8; usize::try_from(page_size).unwrap_or(65_536)];
    let mut number = [0u8; 4];
    let mut checksum = [0u8; 4];
    // A record count of all ones means as many records as the file holds.
    let mut left = if records == u32::MAX {
        u64::MAX
    } else {
        u64::from(records)
    };
    while left > 0 {
        if !read_whole(&mut reader, &mut number, &path)?
            || !read_whole(&mut reader, &mut page, &path)?
            || !read_whole(&mut reader, &mut checksum, &path)?
        {
            return Ok(None);
        }
        // SQLite's record checksum: the nonce plus every 200th byte, from
        // the end of the page.
        let mut sum = nonce;
        let mut i = page.len() - 200;
        while i > 0 {
            sum = sum.wrapping_add(u32::from(page[i]));
            i = i.saturating_sub(200);
        }
        if sum != u32::from_be_bytes(checksum) {
            return Ok(None);
        }
        if u32::from_be_bytes(number) == 1 {
            return Ok(Some(page[..HEADER_LEN].to_vec()));
        }
        left -= 1;
    }
    Ok(None)
}

/// One frame of a write-ahead log.
pub(crate) struct Frame {
    pub(crate) page_number: u32,
    /// Whether the frame ends a transaction.
    pub(crate) commit: bool,
}

/// Reads the frames SQLite would replay from a database's `-wal`: after a
/// header whose checksum holds, the frames up to the first whose salts or
/// cumulative checksum do not (left from an earlier log, or half written).
pub(crate) struct LogReader {
    pub(crate) path: PathBuf,
    reader: io::BufReader<File>,
    pub(crate) page_size: u64,
    salts: (u32, u32),
    sums: (u32, u32),
    big_endian: bool,
    /// The page of the last frame read.
    pub(crate) page: Vec<u8>,
}

impl LogReader {
    /// The log `wal`, or `None` if there is none SQLite would read.
    pub(crate) fn open(wal: &Path) -> Result<Option<LogReader>> {
        let path = wal.to_path_buf();
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&path, e)),
        };
        let mut reader = io::BufReader::new(file);
        let mut header = [0u8; WAL_HEADER_LEN as usize];
        if !read_whole(&mut reader, &mut header, &path)? {
            return Ok(None);
        }
        let magic = be_u32(&header, 0);
        if magic != 0x377f_0682 && magic != 0x377f_0683 {
            // SQLite ignores a log without a valid header.
            return Ok(None);
        }
        let big_endian = magic & 1 == 1;
        let sums = wal_checksum(&header[..24], (0, 0), big_endian);
        if sums != (be_u32(&header, 24), be_u32(&header, 28)) {
            return Ok(None);
        }
        let page_size = u64::from(be_u32(&header, 8));
        if !(512..=65_536).contains(&page_size) || !page_size.is_power_of_two() {
            return Ok(None);
        }
        Ok(Some(LogReader {
            path,
            reader,
            page_size,
            salts: (be_u32(&header, 16), be_u32(&header, 20)),
            sums,
            big_endian,
            page: vec![0u8; usize::try_from(page_size).unwrap_or(65_536)],
        }))
    }

    /// The next frame SQLite would replay, its page in `self.page`.
    pub(crate) fn next_frame(&mut self) -> Result<Option<Frame>> {
        let mut frame_header = [0u8; WAL_FRAME_HEADER_LEN];
        if !read_whole(&mut self.reader, &mut frame_header, &self.path)?
            || !read_whole(&mut self.reader, &mut self.page, &self.path)?
        {
            return Ok(None);
        }
        if (be_u32(&frame_header, 8), be_u32(&frame_header, 12)) != self.salts {
            return Ok(None);
        }
        let sums = wal_checksum(&frame_header[..8], self.sums, self.big_endian);
        let sums = wal_checksum(&self.page, sums, self.big_endian);
        if sums != (be_u32(&frame_header, 16), be_u32(&frame_header, 20)) {
            return Ok(None);
        }
        self.sums = sums;
        Ok(Some(Frame {
            page_number: be_u32(&frame_header, 0),
            commit: be_u32(&frame_header, 4) != 0,
        }))
    }
}

pub(crate) fn be_u32(bytes: &[u8], offset: usize) -> u32 {
    u32::from_be_bytes([
        bytes[offset],
        bytes[offset + 1],
        bytes[offset + 2],
        bytes[offset + 3],
    ])
}

/// Fills `buffer`; `false` at the end of the file (a short read counts as
/// the end, as it does for SQLite).
pub(crate) fn read_whole(reader: &mut impl Read, buffer: &mut [u8], path: &Path) -> Result<bool> {
    match reader.read_exact(buffer) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// SQLite's write-ahead-log checksum over `data` (a multiple of 8 bytes),
/// continuing from `sums`; the words are big-endian when the log's magic
/// number says so, little-endian otherwise.
pub(crate) fn wal_checksum(data: &[u8], sums: (u32, u32), big_endian: bool) -> (u32, u32) {
    let (mut s0, mut s1) = sums;
    for chunk in data.chunks_exact(8) {
        let word = |i: usize| {
            let bytes = [chunk[i], chunk[i + 1], chunk[i + 2], chunk[i + 3]];
            if big_endian {
                u32::from_be_bytes(bytes)
            } else {
                u32::from_le_bytes(bytes)
            }
        };
        s0 = s0.wrapping_add(word(0)).wrapping_add(s1);
        s1 = s1.wrapping_add(word(4)).wrapping_add(s0);
    }
    (s0, s1)
}
