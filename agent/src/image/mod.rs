//! Images on the agent: resumable download over the mTLS channel
//! (`fetch`), safe unpacking (`unpack`), the on-disk layout with its atomic
//! `current` symlink (`layout`), the durable swap journal (`journal`), the
//! service the image provides (`service`), the health gate (`gate`) and the
//! manager that drives a swap through all of them (`swap`).
//!
//! Invariant: nothing of the running image is touched before the new payload
//! is fully downloaded, its SHA-256 and signed manifest verified, and it is
//! unpacked and synced in its own directory; and the machine always ends on
//! a committed image, even if the agent is killed at any step.

pub mod disk;
pub mod fetch;
pub mod gate;
pub mod integrity;
pub mod journal;
pub mod layout;
pub mod service;
pub mod swap;
pub mod unpack;
