//! The metadata file, `flotilla-wal.meta`: which format the directory is in, which cluster and
//! member it belongs to, and the bootstrap configuration it was created with. Written once,
//! atomically (temporary file, fsync, rename, directory fsync), as the last step of creating a
//! data directory.
//!
//! ```text
//!   0    8   magic "FLOTWAL1"
//!   8    4   format version
//!   12   4   crc32c of bytes 0..12 (so a damaged version reads as damage, not as "newer")
//!   16   8   cluster id
//!   24   8   node id
//!   32   n   bootstrap membership (core codec)
//!   32+n 4   crc32c of bytes 16..32+n
//! ```

use std::path::{Path, PathBuf};

use bytes::{BufMut, Bytes};
use flotilla_raft::codec::{self, Reader};
use flotilla_raft::{Membership, NodeId};

use crate::error::{IoContext, WalError};
use crate::fs::Fs;

pub(crate) const FILE_NAME: &str = "flotilla-wal.meta";
const TMP_FILE_NAME: &str = "flotilla-wal.meta.tmp";
const MAGIC: &[u8; 8] = b"FLOTWAL1";
/// The on-disk format this build writes and reads. Bump it on any incompatible change.
pub const FORMAT_VERSION: u32 = 1;
const FILE_BYTES_MAX: u64 = 1 << 20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Metadata {
    pub cluster_id: u64,
    pub node_id: NodeId,
    pub bootstrap_membership: Membership,
}

fn encode(meta: &Metadata) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.put_u32_le(FORMAT_VERSION);
    let header_crc = crc32c::crc32c(&out);
    out.put_u32_le(header_crc);
    out.put_u64_le(meta.cluster_id);
    out.put_u64_le(meta.node_id);
    codec::encode_membership(&mut out, &meta.bootstrap_membership);
    let body_crc = crc32c::crc32c(&out[16..]);
    out.put_u32_le(body_crc);
    out
}

fn decode(buf: &[u8], path: &Path) -> Result<Metadata, WalError> {
    let corrupt = |offset: usize, reason: String| WalError::corrupt(path, offset as u64, reason);
    if buf.len() < 16 + 16 + 4 {
        return Err(corrupt(0, format!("too short ({} bytes)", buf.len())));
    }
    if &buf[0..8] != MAGIC {
        return Err(corrupt(
            0,
            "not a flotilla write-ahead log metadata file".into(),
        ));
    }
    let header_crc = u32::from_le_bytes(buf[12..16].try_into().expect("4 bytes"));
    if crc32c::crc32c(&buf[0..12]) != header_crc {
        return Err(corrupt(0, "header checksum mismatch".into()));
    }
    let version = u32::from_le_bytes(buf[8..12].try_into().expect("4 bytes"));
    if version > FORMAT_VERSION {
        return Err(WalError::NewerFormat {
            path: path.to_path_buf(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let body_end = buf.len() - 4;
    let body_crc = u32::from_le_bytes(buf[body_end..].try_into().expect("4 bytes"));
    if crc32c::crc32c(&buf[16..body_end]) != body_crc {
        return Err(corrupt(16, "checksum mismatch".into()));
    }
    let mut r = Reader::new(Bytes::copy_from_slice(&buf[16..body_end]));
    let decoded = (|| {
        let cluster_id = r.u64("cluster id")?;
        let node_id = r.u64("node id")?;
        let bootstrap_membership = codec::decode_membership(&mut r)?;
        Ok(Metadata {
            cluster_id,
            node_id,
            bootstrap_membership,
        })
    })();
    let offset = 16 + r.offset();
    decoded
        .and_then(|meta| r.finish("metadata").map(|()| meta))
        .map_err(|err: codec::DecodeError| corrupt(offset, err.to_string()))
}

/// Reads the metadata file, if the directory has one.
pub(crate) fn read(fs: &dyn Fs, dir: &Path) -> Result<Option<Metadata>, WalError> {
    let path = dir.join(FILE_NAME);
    if !fs.exists(&path).ctx("look for", &path)? {
        return Ok(None);
    }
    let file = fs.open(&path).ctx("open", &path)?;
    let len = file.len().ctx("stat", &path)?;
    if len > FILE_BYTES_MAX {
        return Err(WalError::corrupt(
            &path,
            0,
            format!("{len} bytes is too large"),
        ));
    }
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, 0).ctx("read", &path)?;
    decode(&buf, &path).map(Some)
}

/// Writes the metadata file atomically and durably.
pub(crate) fn write(fs: &dyn Fs, dir: &Path, meta: &Metadata, sync: bool) -> Result<(), WalError> {
    let tmp: PathBuf = dir.join(TMP_FILE_NAME);
    let path = dir.join(FILE_NAME);
    if fs.exists(&tmp).ctx("look for", &tmp)? {
        fs.remove_file(&tmp).ctx("remove", &tmp)?;
    }
    let file = fs.create_new(&tmp).ctx("create", &tmp)?;
    file.write_all_at(&encode(meta), 0).ctx("write", &tmp)?;
    if sync {
        file.sync_data().ctx("fsync", &tmp)?;
    }
    fs.rename(&tmp, &path).ctx("rename", &tmp)?;
    if sync {
        fs.sync_dir(dir).ctx("fsync directory", dir)?;
    }
    Ok(())
}

/// True for the metadata file's temporary name, which start-up removes.
pub(crate) fn is_tmp_file(name: &str) -> bool {
    name == TMP_FILE_NAME
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SimFs;

    #[test]
    fn round_trip_and_damage_is_corruption_not_a_newer_version() {
        let meta = Metadata {
            cluster_id: 0xc1,
            node_id: 2,
            bootstrap_membership: Membership::with_voters([1, 2, 3]),
        };
        let buf = encode(&meta);
        let path = Path::new("/x/flotilla-wal.meta");
        assert_eq!(decode(&buf, path).unwrap(), meta);
        for bit in 0..buf.len() * 8 {
            let mut damaged = buf.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            let err = decode(&damaged, path).unwrap_err();
            assert!(err.is_corruption(), "bit {bit}: {err}");
        }
    }

    #[test]
    fn a_newer_version_is_refused_by_name() {
        let meta = Metadata {
            cluster_id: 1,
            node_id: 1,
            bootstrap_membership: Membership::default(),
        };
        let mut buf = encode(&meta);
        buf[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        let crc = crc32c::crc32c(&buf[0..12]);
        buf[12..16].copy_from_slice(&crc.to_le_bytes());
        let err = decode(&buf, Path::new("/x/m")).unwrap_err();
        assert!(
            matches!(err, WalError::NewerFormat { found: 2, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("newer"), "{err}");
    }

    #[test]
    fn write_then_read() {
        let fs = SimFs::new(1);
        let dir = PathBuf::from("/sim/meta");
        fs.create_dir_all(&dir).unwrap();
        assert_eq!(read(&fs, &dir).unwrap(), None);
        let meta = Metadata {
            cluster_id: 5,
            node_id: 6,
            bootstrap_membership: Membership::with_voters([6]),
        };
        write(&fs, &dir, &meta, true).unwrap();
        fs.crash();
        assert_eq!(read(&fs, &dir).unwrap(), Some(meta));
    }
}
