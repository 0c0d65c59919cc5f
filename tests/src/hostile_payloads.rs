//! Image payloads that no honest `flottectl image build` produces: archives
//! with entries that escape the image root, device nodes, setuid bits, or
//! more bytes than an agent allows. End-to-end tests sign them with a trusted
//! release key (so that only the agent's unpacking stands between them and
//! the machine) and check that each is refused by name and that the running
//! image is untouched.
//!
//! Headers are written field by field because the `tar` builder itself
//! refuses `..` and absolute names, which is exactly what must be shipped.

use tar::{EntryType, Header};

/// One hostile payload: what it attacks, the archive (a plain tar), and a
/// fragment the agent's refusal must contain.
pub struct HostilePayload {
    pub case: &'static str,
    pub tar_bytes: Vec<u8>,
    pub expected_refusal: String,
}

struct RawArchive {
    builder: tar::Builder<Vec<u8>>,
}

impl RawArchive {
    /// Starts with one honest file, so that a refusal also proves the
    /// partial unpack is removed.
    fn new() -> Self {
        let archive = RawArchive {
            builder: tar::Builder::new(Vec::new()),
        };
        archive.entry(
            "README",
            EntryType::Regular,
            0o644,
            None,
            b"an honest file\n",
        )
    }

    fn entry(
        mut self,
        name: &str,
        entry_type: EntryType,
        mode: u32,
        link_name: Option<&str>,
        data: &[u8],
    ) -> Self {
        let mut header = Header::new_gnu();
        let name_field = &mut header.as_old_mut().name;
        assert!(name.len() < name_field.len(), "short names only: {name}");
        name_field[..name.len()].copy_from_slice(name.as_bytes());
        header.set_entry_type(entry_type);
        header.set_mode(mode);
        header.set_size(data.len() as u64);
        header.set_mtime(0);
        if let Some(link_name) = link_name {
            header
                .set_link_name_literal(link_name)
                .expect("link name fits the header");
        }
        header.set_cksum();
        self.builder
            .append(&header, data)
            .expect("appending to memory cannot fail");
        self
    }

    fn finish(self) -> Vec<u8> {
        self.builder
            .into_inner()
            .expect("finishing an archive in memory cannot fail")
    }
}

/// Every hostile payload the agent must refuse; `size_limit` is the agent's
/// `max_unpacked_bytes` (one payload goes over it).
pub fn hostile_payloads(size_limit: u64) -> Vec<HostilePayload> {
    let oversized = vec![0u8; usize::try_from(size_limit + 1).expect("limit fits in memory")];
    let cases: Vec<(&'static str, RawArchive, String)> = vec![
        (
            "parent directory entry",
            RawArchive::new().entry("../escaped.txt", EntryType::Regular, 0o644, None, b"x"),
            "`../escaped.txt` has an unsafe path".into(),
        ),
        (
            "absolute path",
            RawArchive::new().entry(
                "/tmp/flotte-absolute.txt",
                EntryType::Regular,
                0o644,
                None,
                b"x",
            ),
            "`/tmp/flotte-absolute.txt` has an unsafe path".into(),
        ),
        (
            "symlink escape",
            RawArchive::new().entry("etc", EntryType::Symlink, 0o777, Some("../../.."), b""),
            "`etc` is a symlink to `../../..`".into(),
        ),
        (
            "hard link escape",
            RawArchive::new().entry(
                "passwd",
                EntryType::Link,
                0o644,
                Some("../../../../etc/passwd"),
                b"",
            ),
            "`passwd` is a hard link to `../../../../etc/passwd`".into(),
        ),
        (
            "device node",
            RawArchive::new().entry("console", EntryType::Char, 0o600, None, b""),
            "`console` is a character device".into(),
        ),
        (
            "fifo",
            RawArchive::new().entry("pipe", EntryType::Fifo, 0o600, None, b""),
            "`pipe` is a FIFO".into(),
        ),
        (
            "setuid binary",
            RawArchive::new().entry("bin/su", EntryType::Regular, 0o4755, None, b"#!/bin/sh\n"),
            "`bin/su` has mode 4755 with setuid/setgid bits".into(),
        ),
        (
            "over the size limit",
            RawArchive::new().entry("big.bin", EntryType::Regular, 0o644, None, &oversized),
            format!("`big.bin` takes the image over its size limit of {size_limit} bytes"),
        ),
    ];
    cases
        .into_iter()
        .map(|(case, archive, expected_refusal)| HostilePayload {
            case,
            tar_bytes: archive.finish(),
            expected_refusal,
        })
        .collect()
}
