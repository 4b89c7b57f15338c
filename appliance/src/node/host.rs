//! Facts about the box itself for the status page: free space on the data partition, memory,
//! and this process's resident size. Read on each `/status` request (a `statvfs` and two small
//! `/proc` files: microseconds). Each fact is `None` when it cannot be read, never an error.

use std::path::Path;

use serde::Serialize;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HostFacts {
    /// Bytes an unprivileged writer can still use on the data directory's file system.
    pub disk_free_bytes: Option<u64>,
    pub disk_total_bytes: Option<u64>,
    /// `MemTotal` and `MemAvailable` of `/proc/meminfo`.
    pub mem_total_bytes: Option<u64>,
    pub mem_available_bytes: Option<u64>,
    /// `VmRSS` of this process.
    pub rss_bytes: Option<u64>,
}

/// Reads the facts; `data_dir` need not exist yet (its nearest existing ancestor is measured:
/// the partition it will be created on).
pub fn read(data_dir: &Path) -> HostFacts {
    let (disk_free_bytes, disk_total_bytes) = disk(data_dir).unwrap_or((None, None));
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    HostFacts {
        disk_free_bytes,
        disk_total_bytes,
        mem_total_bytes: kib_field(&meminfo, "MemTotal"),
        mem_available_bytes: kib_field(&meminfo, "MemAvailable"),
        rss_bytes: kib_field(&status, "VmRSS"),
    }
}

fn disk(data_dir: &Path) -> Option<(Option<u64>, Option<u64>)> {
    let existing = data_dir.ancestors().find(|p| p.exists())?;
    let existing = if existing.as_os_str().is_empty() {
        Path::new(".")
    } else {
        existing
    };
    let st = rustix::fs::statvfs(existing).ok()?;
    let unit = st.f_frsize;
    Some((st.f_bavail.checked_mul(unit), st.f_blocks.checked_mul(unit)))
}

/// The value of a `Key:   123 kB` line of a `/proc` file, in bytes.
pub fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        let mut words = rest.split_whitespace();
        let n: u64 = words.next()?.parse().ok()?;
        match words.next() {
            Some("kB") => n.checked_mul(1024),
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kib_fields() {
        let meminfo = "MemTotal:        3884432 kB\nMemFree:          123 kB\n\
                       MemAvailable:    2000000 kB\nHugePages_Total:       0\n";
        assert_eq!(kib_field(meminfo, "MemTotal"), Some(3_884_432 * 1024));
        assert_eq!(kib_field(meminfo, "MemAvailable"), Some(2_000_000 * 1024));
        assert_eq!(kib_field(meminfo, "Mem"), None, "whole keys only");
        assert_eq!(
            kib_field(meminfo, "HugePages_Total"),
            None,
            "no unit, no bytes"
        );
        assert_eq!(kib_field("", "MemTotal"), None);
        assert_eq!(kib_field("MemTotal: lots kB", "MemTotal"), None);
    }

    #[test]
    fn reads_this_machine() {
        let dir = tempfile::tempdir().unwrap();
        let f = read(&dir.path().join("not/yet/created"));
        let (free, total) = (f.disk_free_bytes.unwrap(), f.disk_total_bytes.unwrap());
        assert!(total > 0 && free <= total, "{f:?}");
        let (avail, mem) = (f.mem_available_bytes.unwrap(), f.mem_total_bytes.unwrap());
        assert!(mem > 0 && avail <= mem, "{f:?}");
        assert!(f.rss_bytes.unwrap() > 1024 * 1024, "{f:?}");
    }
}
