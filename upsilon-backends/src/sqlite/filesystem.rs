//! Refusing network filesystems: there SQLite's locks, and the shared memory
//! its WAL index lives in, do not hold between hosts, so two hosts could
//! both take the lease.

use std::path::Path;

use upsilon::backend::BackendError;

use super::Result;

/// The filesystems, by `statfs` magic number (Linux), on which processes of
/// more than one host can open the same file.
const NETWORK: &[(u32, &str)] = &[
    (0x0000_6969, "NFS"),
    (0x0000_517B, "SMB"),
    (0xFF53_4D42, "CIFS"),
    (0xFE53_4D42, "SMB2/SMB3"),
    (
        0x6573_5546,
        "FUSE (sshfs, s3fs, gcsfuse, GlusterFS, virtiofs, ...)",
    ),
    (0x0102_1997, "9p"),
    (0x00C3_6400, "CephFS"),
    (0x5346_414F, "AFS"),
    (0x6B41_4653, "AFS (kAFS)"),
    (0x7375_7245, "Coda"),
    (0x0000_564C, "NCP"),
    (0x0116_1970, "GFS2"),
    (0x7461_636F, "OCFS2"),
    (0x0BD0_0BD0, "Lustre"),
    (0x4750_4653, "GPFS (Spectrum Scale)"),
    (0x1983_0326, "BeeGFS"),
    (0x2003_0528, "OrangeFS (PVFS2)"),
    (0x786F_4256, "VirtualBox shared folder"),
];

/// The name of the network filesystem `magic` (a `statfs` `f_type`, cut to
/// its 32 bits: a 32-bit kernel reports the high ones as negative numbers)
/// stands for, if it is one.
pub(super) fn network_filesystem(magic: u32) -> Option<&'static str> {
    NETWORK
        .iter()
        .find(|(m, _)| *m == magic)
        .map(|(_, name)| *name)
}

/// Refuses a database at `path` on a network filesystem, unless `allow`
/// (then it warns). Where the filesystem cannot be told, the open goes on
/// and says why it fails, if it does.
pub(super) fn check(path: &Path, allow: bool) -> Result<()> {
    match filesystem_of(path) {
        Some(magic) => decide(path, magic, allow),
        None => Ok(()),
    }
}

fn decide(path: &Path, magic: u32, allow: bool) -> Result<()> {
    let Some(name) = network_filesystem(magic) else {
        return Ok(());
    };
    if allow {
        tracing::warn!(
            "the SQLite database {} is on a network filesystem ({name}); it is opened only \
             because allow_network_filesystem is set. If a process on another host ever opens \
             it, two processes can hold the lease at once: run every process on one host, or \
             use PostgreSQL",
            path.display()
        );
        return Ok(());
    }
    Err(BackendError::other(format!(
        "the SQLite database {} is on a network filesystem ({name}, statfs type {magic:#x}), \
         where SQLite's locking does not hold between hosts, so two of them could hold the \
         lease at once. Put the file on a local disk, or use PostgreSQL (`postgres://...`) \
         for a lease shared between hosts; if only this host ever opens the file, set \
         `SqliteOptions::allow_network_filesystem`",
        path.display()
    )))
}

/// The `statfs` type of the filesystem that holds `path`: of the file if it
/// exists (following links, as SQLite does), else of its directory, where
/// SQLite will create it, its WAL and its shared-memory index.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn filesystem_of(path: &Path) -> Option<u32> {
    let target = if path.exists() {
        path
    } else {
        path.parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
    };
    // f_type is a word-sized signed integer; the magic numbers are 32 bits.
    nix::sys::statfs::statfs(target)
        .ok()
        .map(|s| s.filesystem_type().0 as u32)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn filesystem_of(_: &Path) -> Option<u32> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_network_filesystems_are_named() {
        for (magic, name) in [
            (0x6969, "NFS"),
            (0x517B, "SMB"),
            (0xFF53_4D42, "CIFS"),
            (0xFE53_4D42, "SMB2/SMB3"),
            (0x6573_5546, "FUSE"),
            (0x0102_1997, "9p"),
            (0x00C3_6400, "CephFS"),
        ] {
            let found = network_filesystem(magic);
            assert!(
                found.is_some_and(|f| f.starts_with(name)),
                "{magic:#x}: {found:?}"
            );
        }
        // As a 32-bit kernel reports CIFS: a negative word, cut to 32 bits.
        assert_eq!(
            network_filesystem(0xFF53_4D42_u32 as i32 as i64 as u32),
            Some("CIFS")
        );
    }

    #[test]
    fn local_filesystems_are_not_network_ones() {
        // ext2/3/4, XFS, Btrfs, tmpfs, overlayfs, ZFS, F2FS.
        for magic in [
            0xEF53,
            0x5846_5342,
            0x9123_683E,
            0x0102_1994,
            0x794C_7630,
            0x2FC1_2FC1,
            0xF2F5_2010,
        ] {
            assert_eq!(network_filesystem(magic), None, "{magic:#x}");
        }
    }

    #[test]
    fn a_network_filesystem_is_refused_with_what_to_use_instead() {
        let path = Path::new("/mnt/share/upsilon.db");
        let err = decide(path, 0x6969, false).unwrap_err().to_string();
        for part in [
            "/mnt/share/upsilon.db",
            "network filesystem (NFS, statfs type 0x6969)",
            "does not hold between hosts",
            "use PostgreSQL",
            "allow_network_filesystem",
        ] {
            assert!(err.contains(part), "{part:?} in {err}");
        }
        decide(path, 0x6969, true).expect("allowed by the option");
        decide(path, 0xEF53, false).expect("ext4 is local");
    }

    #[test]
    fn a_file_not_yet_created_is_judged_by_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let made = filesystem_of(dir.path());
        assert!(made.is_some(), "statfs of {}", dir.path().display());
        assert_eq!(filesystem_of(&dir.path().join("new.db")), made);
    }
}
