//! `flotte.v1` is a compatibility promise to integrations. This test keeps
//! a snapshot of the compiled API (`proto/api-snapshot.txt`: one line per
//! RPC, message field and enum value, with numbers and types) and fails when
//! anything in it is gone or changed — a removed or renumbered field, a
//! changed type or label, a removed RPC or service, a changed request or
//! response type or streaming. Additions are compatible and pass. A
//! deliberate break (or recording additions) is made with
//! `FLOTTE_UPDATE_API_SNAPSHOT=1 cargo test -p flotte-proto api_snapshot`,
//! and shows in review as a diff of the snapshot.

use std::collections::BTreeSet;

use prost::Message;
use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorSet};

const SNAPSHOT_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/api-snapshot.txt");

fn enum_lines(prefix: &str, enumeration: &EnumDescriptorProto, lines: &mut BTreeSet<String>) {
    let name = format!("{prefix}.{}", enumeration.name());
    for value in &enumeration.value {
        lines.insert(format!("enum {name} {} = {}", value.name(), value.number()));
    }
}

fn message_lines(prefix: &str, message: &DescriptorProto, lines: &mut BTreeSet<String>) {
    let name = format!("{prefix}.{}", message.name());
    for field in &message.field {
        let oneof = field
            .oneof_index
            .and_then(|index| usize::try_from(index).ok())
            .and_then(|index| message.oneof_decl.get(index))
            .map(|oneof| format!(" oneof {}", oneof.name()))
            .unwrap_or_default();
        lines.insert(format!(
            "message {name} {} = {} {:?} {:?} {}{oneof}",
            field.name(),
            field.number(),
            field.label(),
            field.r#type(),
            field.type_name(),
        ));
    }
    for nested in &message.nested_type {
        message_lines(&name, nested, lines);
    }
    for enumeration in &message.enum_type {
        enum_lines(&name, enumeration, lines);
    }
}

/// One line per RPC, field and enum value of every `flotte.v1` file.
fn api_lines(descriptor_set: &[u8]) -> BTreeSet<String> {
    let set = FileDescriptorSet::decode(descriptor_set).expect("the compiled descriptor set");
    let mut lines = BTreeSet::new();
    for file in set.file.iter().filter(|file| file.package() == "flotte.v1") {
        let package = format!(".{}", file.package());
        for service in &file.service {
            for method in &service.method {
                lines.insert(format!(
                    "rpc /{}.{}/{} {}{} -> {}{}",
                    file.package(),
                    service.name(),
                    method.name(),
                    if method.client_streaming() {
                        "stream "
                    } else {
                        ""
                    },
                    method.input_type(),
                    if method.server_streaming() {
                        "stream "
                    } else {
                        ""
                    },
                    method.output_type(),
                ));
            }
        }
        for message in &file.message_type {
            message_lines(&package, message, &mut lines);
        }
        for enumeration in &file.enum_type {
            enum_lines(&package, enumeration, &mut lines);
        }
    }
    lines
}

/// What the snapshot promises that `current` no longer has.
fn broken_promises(snapshot: &str, current: &BTreeSet<String>) -> Vec<String> {
    snapshot
        .lines()
        .filter(|line| !line.is_empty() && !current.contains(*line))
        .map(str::to_owned)
        .collect()
}

#[test]
fn api_snapshot_is_kept_by_the_compiled_api() {
    let current = api_lines(crate::FILE_DESCRIPTOR_SET);
    if std::env::var_os("FLOTTE_UPDATE_API_SNAPSHOT").is_some() {
        let text: String = current.iter().map(|line| format!("{line}\n")).collect();
        std::fs::write(SNAPSHOT_PATH, text).expect("write the API snapshot");
        return;
    }
    let snapshot = std::fs::read_to_string(SNAPSHOT_PATH).expect("proto/api-snapshot.txt");
    let broken = broken_promises(&snapshot, &current);
    assert!(
        broken.is_empty(),
        "flotte.v1 no longer has what integrations were promised:\n  {}\n\
         Add instead of changing (new fields, new RPCs). If the break is deliberate, \
         run FLOTTE_UPDATE_API_SNAPSHOT=1 cargo test -p flotte-proto api_snapshot",
        broken.join("\n  ")
    );
}

#[test]
fn a_removed_field_a_renumbered_one_and_a_removed_rpc_are_each_caught() {
    let snapshot: String = api_lines(crate::FILE_DESCRIPTOR_SET)
        .iter()
        .map(|line| format!("{line}\n"))
        .collect();
    let mut set = FileDescriptorSet::decode(crate::FILE_DESCRIPTOR_SET).unwrap();
    let file = set
        .file
        .iter_mut()
        .find(|file| file.package() == "flotte.v1" && !file.service.is_empty())
        .unwrap();
    let removed_rpc = file.service[0].method.remove(0);
    let message = file
        .message_type
        .iter_mut()
        .find(|message| message.field.len() >= 2)
        .unwrap();
    let removed_field = message.field.remove(0);
    message.field[0].number = Some(message.field[0].number() + 1000);
    let changed = api_lines(&set.encode_to_vec());
    let broken = broken_promises(&snapshot, &changed);
    assert_eq!(broken.len(), 3, "{broken:#?}");
    assert!(broken
        .iter()
        .any(|line| line.contains(&format!("/{}", removed_rpc.name()))));
    assert!(broken
        .iter()
        .any(|line| line.contains(&format!(" {} = ", removed_field.name()))));
    // An addition alone breaks nothing.
    let mut added = FileDescriptorSet::decode(crate::FILE_DESCRIPTOR_SET).unwrap();
    let message = &mut added.file[0].message_type[0];
    let mut new_field = message.field[0].clone();
    new_field.name = Some("added_later".into());
    new_field.number = Some(999);
    message.field.push(new_field);
    assert!(broken_promises(&snapshot, &api_lines(&added.encode_to_vec())).is_empty());
}
