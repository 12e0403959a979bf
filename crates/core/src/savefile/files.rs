//! The file on disk: replaced atomically, read with a size limit, set aside when bad,
//! marked while it is being loaded.

use super::*;

/// Replaces `dir/name` with `bytes` so that a crash at any moment leaves either the old
/// file or the new one whole: a temporary file, fsync, rename, fsync of the directory.
pub fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, dir.join(name))?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Reads `path`: `Ok(None)` when there is no file. A file larger than `MAX_FILE_BYTES`
/// is an error, not read.
pub fn read(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match fs::metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
        Ok(m) if m.len() > MAX_FILE_BYTES => {
            return Err(io::Error::other(format!("it is {} bytes, larger than any file pg_netstat writes", m.len())))
        }
        Ok(_) => {}
    }
    fs::read(path).map(Some)
}

/// Files set aside that are kept: the newest; older ones are removed, so a file that
/// keeps going bad cannot fill the disk (nor every base backup).
const KEEP_SET_ASIDE: usize = 3;

/// Moves a file that could not be loaded out of the way, keeping it for a look:
/// `pg_netstat.stat` becomes `pg_netstat.stat.bad-<unix seconds>`; of those, the newest
/// `KEEP_SET_ASIDE` are kept.
pub fn set_aside(path: &Path, now_s: i64) -> io::Result<PathBuf> {
    let mut to = path.as_os_str().to_owned();
    to.push(format!(".bad-{now_s}"));
    let to = PathBuf::from(to);
    fs::rename(path, &to)?;
    if let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) {
        let prefix = format!("{name}.bad-");
        let mut aside: Vec<(i64, PathBuf)> = fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let when = e.file_name().to_str()?.strip_prefix(&prefix)?.parse().ok()?;
                Some((when, e.path()))
            })
            .collect();
        aside.sort();
        for (_, old) in aside.iter().rev().skip(KEEP_SET_ASIDE) {
            let _ = fs::remove_file(old);
        }
    }
    Ok(to)
}

/// The mark a load leaves beside the file while it runs (`<file>.loading`): a load that
/// never finished (the process killed, out of memory, a crash) leaves it behind, and the
/// next start sets the file aside instead of loading it again (issue 29: a file that
/// kills its loader would otherwise do so at every crash restart).
pub fn loading_mark(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".loading");
    PathBuf::from(p)
}

/// Whether a load of `path` began and never ended.
pub fn load_unfinished(path: &Path) -> bool {
    loading_mark(path).exists()
}

/// Marks a load of `path` as begun. (No fsync: the mark is for a process that dies, and
/// the machine crashing during a load does not make the next load fail.)
pub fn begin_load(path: &Path) -> io::Result<()> {
    File::create(loading_mark(path)).map(drop)
}

/// Marks the load of `path` as over, however it ended.
pub fn end_load(path: &Path) -> io::Result<()> {
    match fs::remove_file(loading_mark(path)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
