//! The link journal: one line per manifest committed to a repository (`upstream`, repository,
//! digest, whether a tag named it), appended beside the blobs and read only when the index has
//! to be rebuilt. The index is a cache of facts about the files; the files alone cannot say
//! which repository a manifest came from, and without that an image on disk could not be
//! served by digest with the upstream down after the index was lost. Everything else a
//! manifest implies (its media type, its children and their links) is read back from its
//! verified body, so only this one fact is journalled.
//!
//! Lines are appended without fsync: a crash loses at most the newest lines, whose manifests a
//! rebuild then leaves unlinked until the next pull fetches them. Duplicates (a manifest
//! committed again) are dropped when the journal is compacted at start-up.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::oci::Digest;

/// The journal's file under the store's root.
const FILE: &str = "links.journal";

/// Beyond this size the journal is rewritten without duplicates when the store opens.
const COMPACT_ABOVE: u64 = 32 << 20;

/// One journalled commit.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Entry {
    pub upstream: String,
    pub repository: String,
    pub tagged: bool,
}

pub struct Journal {
    path: PathBuf,
    file: Mutex<File>,
}

impl Journal {
    /// Opens (creating) the journal under `root`, compacting it first if it grew large.
    pub fn open(root: &Path) -> io::Result<Journal> {
        let path = root.join(FILE);
        if std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0) > COMPACT_ABOVE {
            compact(&path)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        Ok(Journal {
            path,
            file: Mutex::new(file),
        })
    }

    /// Appends that `digest` was committed to `repository` of `upstream`. Names holding a
    /// separator are not written (none can: repository names and upstream names are
    /// validated long before they get here).
    pub fn append(
        &self,
        upstream: &str,
        repository: &str,
        digest: &Digest,
        tagged: bool,
    ) -> io::Result<()> {
        let bad = |s: &str| s.is_empty() || s.contains(['\t', '\n']);
        if bad(upstream) || bad(repository) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a name with a tab or newline",
            ));
        }
        let line = format!("{upstream}\t{repository}\t{digest}\t{}\n", u8::from(tagged));
        // One write of one line on an O_APPEND file: lines never interleave.
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        file.write_all(line.as_bytes())
    }

    /// The journalled commits of each of `wanted`, without duplicates. Lines that do not
    /// parse (a torn last line after a crash) are skipped.
    pub fn read(&self, wanted: &HashSet<Digest>) -> io::Result<HashMap<Digest, Vec<Entry>>> {
        let mut out: HashMap<Digest, Vec<Entry>> = HashMap::new();
        for (digest, entry) in lines(&self.path)? {
            if wanted.contains(&digest) {
                let entries = out.entry(digest).or_default();
                if !entries.contains(&entry) {
                    entries.push(entry);
                }
            }
        }
        Ok(out)
    }
}

/// Every well-formed line of the journal at `path`.
fn lines(path: &Path) -> io::Result<impl Iterator<Item = (Digest, Entry)>> {
    let file = match File::open(path) {
        Ok(file) => Some(file),
        Err(err) if err.kind() == io::ErrorKind::NotFound => None,
        Err(err) => return Err(err),
    };
    Ok(file
        .into_iter()
        .flat_map(|file| BufReader::new(file).lines())
        .map_while(Result::ok)
        .filter_map(|line| parse(&line)))
}

fn parse(line: &str) -> Option<(Digest, Entry)> {
    let mut fields = line.split('\t');
    let (upstream, repository, digest, tagged) = (
        fields.next()?,
        fields.next()?,
        fields.next()?,
        fields.next()?,
    );
    if fields.next().is_some() || upstream.is_empty() || repository.is_empty() {
        return None;
    }
    let tagged = match tagged {
        "0" => false,
        "1" => true,
        _ => return None,
    };
    Some((
        digest.parse().ok()?,
        Entry {
            upstream: upstream.to_owned(),
            repository: repository.to_owned(),
            tagged,
        },
    ))
}

/// Rewrites the journal without duplicate lines (first occurrence kept), atomically.
fn compact(path: &Path) -> io::Result<()> {
    let tmp = path.with_extension("journal.tmp");
    let mut seen = HashSet::new();
    let mut out = io::BufWriter::new(File::create(&tmp)?);
    for (digest, entry) in lines(path)? {
        let line = format!(
            "{}\t{}\t{digest}\t{}\n",
            entry.upstream,
            entry.repository,
            u8::from(entry.tagged)
        );
        if seen.insert(line.clone()) {
            out.write_all(line.as_bytes())?;
        }
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appended_commits_are_read_back_once_each_and_torn_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (Digest::sha256_of(b"a"), Digest::sha256_of(b"b"));
        let journal = Journal::open(dir.path()).unwrap();
        journal.append("docker.io", "library/x", &a, true).unwrap();
        journal.append("docker.io", "library/x", &a, true).unwrap();
        journal.append("ghcr.io", "org/y", &a, false).unwrap();
        journal.append("docker.io", "library/x", &b, false).unwrap();
        assert!(journal.append("docker.io", "bad\trepo", &a, false).is_err());
        drop(journal);
        // A torn last line, as a crash mid-write leaves it.
        let mut file = OpenOptions::new()
            .append(true)
            .open(dir.path().join(FILE))
            .unwrap();
        file.write_all(b"docker.io\tlibrary/z\tsha256:12").unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        let read = journal.read(&HashSet::from([a.clone()])).unwrap();
        assert_eq!(read.len(), 1, "only what was asked for");
        assert_eq!(
            read[&a],
            vec![
                Entry {
                    upstream: "docker.io".into(),
                    repository: "library/x".into(),
                    tagged: true
                },
                Entry {
                    upstream: "ghcr.io".into(),
                    repository: "org/y".into(),
                    tagged: false
                },
            ]
        );
        compact(&dir.path().join(FILE)).unwrap();
        let text = std::fs::read_to_string(dir.path().join(FILE)).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
    }
}
