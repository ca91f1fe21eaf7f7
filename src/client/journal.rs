//! The failover controller's journal: the runbook's [`Record`]s, one JSON line each, appended and
//! synced to disk before [`Journal::append`] returns, so that nothing the executor does after a
//! record can be done without the record having survived (the runbook's durability rule).
//!
//! A controller killed while writing leaves at most a partial last line, which was never
//! synced and so never acted on: opening the journal drops it (and says so). Any other line that
//! does not read is corruption, and opening refuses it rather than resume from a guess.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::failover::Record;

/// The journal's line format version; a line of another version is refused.
pub const JOURNAL_VERSION: u32 = 1;

/// Lines above this many bytes are refused: a record is a few hundred bytes (a `Failed` record's
/// reason is the longest).
pub const JOURNAL_LINE_BYTES_MAX: usize = 64 * 1024;

#[derive(serde::Serialize, serde::Deserialize)]
struct Line {
    v: u32,
    record: Record,
}

/// Why the journal cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("journal {path} line {line}: {detail}; the journal is damaged, and the controller will not guess where it stood")]
    Corrupt { path: PathBuf, line: usize, detail: String },
}

/// An open journal.
pub struct Journal {
    path: PathBuf,
    file: File,
}

impl Journal {
    /// Open (creating) the journal at `path`: its records, and the number of bytes of a torn
    /// last line that were dropped (0 when none).
    pub fn open(path: &Path) -> Result<(Journal, Vec<Record>, u64), JournalError> {
        let io = |source| JournalError::Io { path: path.to_path_buf(), source };
        let mut file = OpenOptions::new().read(true).append(true).create(true).open(path).map_err(io)?;
        let (records, good, torn) = parse(path, BufReader::new(&file))?;
        if torn > 0 {
            file.set_len(good).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        file.seek(SeekFrom::End(0)).map_err(io)?;
        // A journal just created is found again after a power loss only once its directory
        // entry is synced; a record synced in a file that vanished would be acted on and lost.
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        Ok((Journal { path: path.to_path_buf(), file }, records, torn))
    }

    /// The records of the journal at `path`, read without opening it for writing (a torn last
    /// line is left out, and left there).
    pub fn read(path: &Path) -> Result<Vec<Record>, JournalError> {
        let file = File::open(path).map_err(|source| JournalError::Io { path: path.to_path_buf(), source })?;
        Ok(parse(path, BufReader::new(file))?.0)
    }

    /// Append `record` and sync it to disk.
    pub fn append(&mut self, record: &Record) -> Result<(), JournalError> {
        let io = |source| JournalError::Io { path: self.path.clone(), source };
        let mut line = serde_json::to_vec(&Line { v: JOURNAL_VERSION, record: record.clone() })
            .expect("journal records encode as JSON");
        line.push(b'\n');
        if line.len() > JOURNAL_LINE_BYTES_MAX {
            let detail = format!("{} bytes, above journal_line_bytes_max {JOURNAL_LINE_BYTES_MAX}", line.len());
            return Err(io(std::io::Error::new(std::io::ErrorKind::InvalidInput, detail)));
        }
        self.file.write_all(&line).map_err(io)?;
        self.file.sync_data().map_err(io)
    }
}

/// The records in `reader`, the bytes of whole lines, and the bytes of a torn last line.
fn parse(path: &Path, mut reader: impl BufRead) -> Result<(Vec<Record>, u64, u64), JournalError> {
    let io = |source| JournalError::Io { path: path.to_path_buf(), source };
    let (mut records, mut good, mut buf, mut number) = (Vec::new(), 0u64, Vec::new(), 0);
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf).map_err(io)?;
        if n == 0 {
            return Ok((records, good, 0));
        }
        number += 1;
        if buf.last() != Some(&b'\n') {
            // The last line, cut short: its write never returned.
            return Ok((records, good, n as u64));
        }
        let corrupt = |detail: String| JournalError::Corrupt { path: path.to_path_buf(), line: number, detail };
        if n > JOURNAL_LINE_BYTES_MAX {
            return Err(corrupt(format!("{n} bytes, above journal_line_bytes_max {JOURNAL_LINE_BYTES_MAX}")));
        }
        let line: Line = serde_json::from_slice(&buf).map_err(|e| corrupt(e.to_string()))?;
        if line.v != JOURNAL_VERSION {
            return Err(corrupt(format!("format version {}, this build reads {JOURNAL_VERSION}", line.v)));
        }
        records.push(line.record);
        good += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failover::Step;

    fn records() -> Vec<Record> {
        vec![
            Record::Detected { at_ms: 1_000, vantages: vec!["arbiter".into(), "standby".into()] },
            Record::Decided { epoch: 1, at_ms: 1_000, lease_lapses_at_ms: 2_500 },
            Record::Started { step: Step::Fence, at_ms: 1_000 },
            Record::Failed { step: Step::Fence, at_ms: 1_100, reason: "hook \"fw\" exited 1\nstderr: …".into() },
        ]
    }

    #[test]
    fn records_read_back_as_written_and_a_torn_last_line_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let (mut j, read, torn) = Journal::open(&path).unwrap();
        assert_eq!((read, torn), (vec![], 0));
        for r in records() {
            j.append(&r).unwrap();
        }
        drop(j);
        let whole = std::fs::read(&path).unwrap();
        assert_eq!(Journal::open(&path).unwrap().1, records());
        // A kill in the middle of the next append leaves part of a line.
        let mut cut = whole.clone();
        cut.extend_from_slice(br#"{"v":1,"record":{"Finished":{"st"#);
        std::fs::write(&path, &cut).unwrap();
        assert_eq!(Journal::read(&path).unwrap(), records(), "reading leaves the torn line");
        assert_eq!(std::fs::read(&path).unwrap(), cut);
        let (mut j, read, torn) = Journal::open(&path).unwrap();
        assert_eq!((read, torn), (records(), 32));
        assert_eq!(std::fs::read(&path).unwrap(), whole, "the torn line is gone from the file");
        j.append(&Record::Finished { step: Step::Fence, at_ms: 1_200 }).unwrap();
        assert_eq!(Journal::open(&path).unwrap().1.len(), 5);
    }

    #[test]
    fn a_damaged_line_before_the_last_or_another_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        std::fs::write(&path, "{\"v\":1,\"record\":{\"Recovered\":{\"at_ms\":5}}}\nnot json\n{\"v\":1}\n").unwrap();
        let e = Journal::open(&path).err().unwrap();
        assert!(matches!(e, JournalError::Corrupt { line: 2, .. }), "{e}");
        std::fs::write(&path, "{\"v\":2,\"record\":{\"Recovered\":{\"at_ms\":5}}}\n").unwrap();
        let e = Journal::open(&path).err().unwrap().to_string();
        assert!(e.contains("line 1: format version 2, this build reads 1"), "{e}");
    }
}
