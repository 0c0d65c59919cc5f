//! Telling a full disk apart from every other I/O failure of a swap.
//!
//! A full disk is not the image's fault and not permanent: the swap waits
//! and tries again (keeping the running image and a consistent journal),
//! and says which disk is full and how full, so that an operator reading
//! `machines show` knows what to free. Nothing here writes anything.

use std::path::Path;

/// `ENOSPC` (no space) and `EDQUOT` (quota exceeded): both mean "free some
/// space and this will work".
fn is_full_disk_error(error: &std::io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(code) if code == nix::libc::ENOSPC || code == nix::libc::EDQUOT
    )
}

/// Whether `error`, or any error it was caused by, is a full disk.
pub fn is_disk_full(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(current) = cause {
        if current
            .downcast_ref::<std::io::Error>()
            .is_some_and(is_full_disk_error)
        {
            return true;
        }
        cause = current.source();
    }
    false
}

/// `12.0 KiB`, `3.5 MiB`: binary units, one decimal.
fn bytes_text(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// "the disk holding DIR is full (12.0 KiB free of 8.0 MiB) while STEP;
/// retrying until space is freed": what the swap status says.
pub fn describe_full_disk(directory: &Path, step: &str) -> String {
    let usage = nix::sys::statvfs::statvfs(directory)
        .map(|stats| {
            let fragment = stats.fragment_size();
            format!(
                " ({} free of {})",
                bytes_text(stats.blocks_available().saturating_mul(fragment)),
                bytes_text(stats.blocks().saturating_mul(fragment))
            )
        })
        .unwrap_or_default();
    format!(
        "the disk holding {} is full{usage} while {step}; the running image is untouched, retrying until space is freed",
        directory.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("wrapped: {source}")]
    struct Wrapped {
        source: std::io::Error,
    }

    #[test]
    fn a_full_disk_is_found_anywhere_in_the_chain_and_nothing_else_is() {
        let full = || std::io::Error::from_raw_os_error(nix::libc::ENOSPC);
        let cases: [(&str, Box<dyn std::error::Error>, bool); 5] = [
            ("ENOSPC itself", Box::new(full()), true),
            (
                "EDQUOT",
                Box::new(std::io::Error::from_raw_os_error(nix::libc::EDQUOT)),
                true,
            ),
            (
                "ENOSPC as a source",
                Box::new(Wrapped { source: full() }),
                true,
            ),
            (
                "permission denied",
                Box::new(std::io::Error::from_raw_os_error(nix::libc::EACCES)),
                false,
            ),
            (
                "a message that merely says so",
                Box::new(std::io::Error::other("No space left on device")),
                false,
            ),
        ];
        for (name, error, expected) in cases {
            assert_eq!(is_disk_full(error.as_ref()), expected, "{name}");
        }
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        for (bytes, expected) in [
            (0, "0 B"),
            (1023, "1023 B"),
            (1024, "1.0 KiB"),
            (12 * 1024 + 512, "12.5 KiB"),
            (8 * 1024 * 1024, "8.0 MiB"),
            (3 * 1024 * 1024 * 1024, "3.0 GiB"),
        ] {
            assert_eq!(bytes_text(bytes), expected);
        }
    }

    #[test]
    fn the_description_names_the_directory_the_step_and_the_space() {
        let text = describe_full_disk(Path::new("/"), "unpacking");
        assert!(text.starts_with("the disk holding / is full ("), "{text}");
        assert!(text.contains(" free of "), "{text}");
        assert!(text.contains("while unpacking"), "{text}");
    }
}
