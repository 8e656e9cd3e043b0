//! The file-system seam: every byte the WAL reads or writes goes through [`Fs`] and [`FsFile`].
//!
//! Two implementations exist: [`RealFs`] over `std::fs`, and [`crate::SimFs`], a deterministic
//! in-memory file system that loses unsynced data at a simulated crash, tears and reorders
//! writes, flips bits and fails operations on demand. The trait is deliberately small: only
//! what a log needs, with positional I/O so that readers and the writer never share a cursor.

use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// An open file. Positional reads and writes take `&self`, so one handle can serve concurrent
/// readers while the writer appends.
pub trait FsFile: Send + Sync + Debug {
    /// Fills `buf` from `offset`, or fails with `UnexpectedEof` if the file is shorter.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `data` at `offset`, extending the file if needed.
    fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()>;
    /// Makes the file's data (and its size) durable: `fdatasync`.
    fn sync_data(&self) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Truncates or extends (with zeros) the file to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Extends the file to `len` bytes of zeros with blocks reserved for them
    /// (`fallocate`), so that writing there later cannot fail for lack of space and changes
    /// no block map the next `fdatasync` would have to flush in a separate journal commit.
    fn allocate(&self, len: u64) -> io::Result<()>;
}

/// A directory-level file system. Paths are absolute or relative to the process's directory,
/// exactly as with `std::fs`.
pub trait Fs: Send + Sync + Debug {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Creates a new file for reading and writing; fails if it exists.
    fn create_new(&self, path: &Path) -> io::Result<Arc<dyn FsFile>>;
    /// Opens an existing file for reading and writing.
    fn open(&self, path: &Path) -> io::Result<Arc<dyn FsFile>>;
    /// Atomically replaces `to` with `from`. Durable only after [`Fs::sync_dir`].
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file. Open handles keep working. Durable only after [`Fs::sync_dir`].
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// The names of the files in `dir`, sorted.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Makes the directory's entries (creations, renames, removals) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    fn exists(&self, path: &Path) -> io::Result<bool>;
}

/// The real file system.
#[derive(Clone, Copy, Debug, Default)]
pub struct RealFs;

#[derive(Debug)]
struct RealFile {
    file: File,
}

/// Zeros are written in pieces of this size where fallocate is not supported.
const ZERO_CHUNK_BYTES: usize = 1 << 20;

impl FsFile for RealFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        let current = self.len()?;
        if len <= current {
            return Ok(());
        }
        let flags = rustix::fs::FallocateFlags::empty();
        match rustix::fs::fallocate(&self.file, flags, current, len - current) {
            Ok(()) => Ok(()),
            // File systems without fallocate: write the zeros.
            Err(rustix::io::Errno::OPNOTSUPP) => self.write_zeros(current, len),
            Err(errno) => Err(errno.into()),
        }
    }
}

impl RealFile {
    fn write_zeros(&self, from: u64, to: u64) -> io::Result<()> {
        let zeros = vec![0u8; ZERO_CHUNK_BYTES];
        let mut offset = from;
        while offset < to {
            let piece = (to - offset).min(ZERO_CHUNK_BYTES as u64) as usize;
            self.file.write_all_at(&zeros[..piece], offset)?;
            offset += piece as u64;
        }
        Ok(())
    }
}

impl Fs for RealFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }

    fn create_new(&self, path: &Path) -> io::Result<Arc<dyn FsFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        Ok(Arc::new(RealFile { file }))
    }

    fn open(&self, path: &Path) -> io::Result<Arc<dyn FsFile>> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(Arc::new(RealFile { file }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                names.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        path.try_exists()
    }
}
