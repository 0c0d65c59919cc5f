//! The gRPC message codec of every Flotte service, server and client alike:
//! prost's encoding, with smaller buffers per call than tonic's default.
//! `build.rs` names [`CompactBufferCodec`] as the codec of the generated
//! services and clients.
//!
//! Why: tonic allocates an encoding buffer for every call's outgoing
//! messages and a decoding buffer for its incoming ones, 8 KiB each by
//! default, for the life of the call. An agent's session is one call that
//! lives for days, so the server held 16 KiB of such buffers per connected
//! agent, written page by page as messages moved through them. Session
//! messages are a few hundred bytes; a larger message grows its call's
//! buffer as before (tonic reserves a whole message's length before
//! decoding it), so only the resting size changes. Measured (BENCHMARKS.md,
//! issue 17): 13 MiB less allocated with 1 000 agents, a reconnect storm's
//! peak 42–48 MiB lower with 10 000; the soak's slow RSS creep is not this.
//!
//! What must never live here: anything but the codec's settings; messages'
//! meaning belongs to the services.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// The resting size of a call's encoding buffer and of its decoding buffer.
pub const CALL_BUFFER_BYTES: usize = 1024;

/// How many bytes of ready messages a stream batches into one write before
/// it yields: tonic's default, kept (it bounds a burst, not a resting size).
pub const YIELD_THRESHOLD_BYTES: usize = 32 * 1024;

/// The buffer settings every Flotte call's encoder and decoder get.
pub fn call_buffer_settings() -> BufferSettings {
    BufferSettings::new(CALL_BUFFER_BYTES, YIELD_THRESHOLD_BYTES)
}

/// prost's codec with [`call_buffer_settings`]: `T` is the message encoded,
/// `U` the message decoded.
#[derive(Debug, Clone)]
pub struct CompactBufferCodec<T, U> {
    messages: PhantomData<(T, U)>,
}

impl<T, U> Default for CompactBufferCodec<T, U> {
    fn default() -> Self {
        Self {
            messages: PhantomData,
        }
    }
}

impl<T, U> Codec for CompactBufferCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(call_buffer_settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(call_buffer_settings())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::ImageChunk;
    use tonic::codec::{EncodeBody, Streaming};
    use tonic::Status;

    fn chunk(offset: u64, length: usize) -> ImageChunk {
        ImageChunk {
            offset,
            // Distinct bytes, so that a message cut or joined at the wrong
            // place cannot compare equal.
            data: (0..length).map(|index| (index % 251) as u8).collect(),
        }
    }

    /// Messages below, at and far above the resting buffer size go through
    /// one call's encoder and decoder unchanged and in order: a large one
    /// grows the buffers, and the small ones after it still fit.
    #[tokio::test]
    async fn messages_of_every_size_cross_one_call_unchanged() {
        let sent = vec![
            chunk(0, 10),
            chunk(1, CALL_BUFFER_BYTES),
            chunk(2, 100 * CALL_BUFFER_BYTES),
            chunk(3, 3),
            chunk(4, 2 * YIELD_THRESHOLD_BYTES),
            chunk(5, 0),
        ];
        let mut codec = CompactBufferCodec::<ImageChunk, ImageChunk>::default();
        let source = tokio_stream::iter(sent.clone().into_iter().map(Ok::<_, Status>));
        let body = EncodeBody::new_client(codec.encoder(), source, None, None);
        let mut received_stream = Streaming::new_request(codec.decoder(), body, None, None);
        let mut received = Vec::new();
        while let Some(message) = received_stream.message().await.unwrap() {
            received.push(message);
        }
        assert_eq!(received, sent);
    }

    /// Every generated service and client is built on this codec: a change
    /// of `build.rs` that dropped it would bring back tonic's 8 KiB buffers
    /// silently, since the code compiles either way.
    #[test]
    fn the_generated_services_and_clients_use_this_codec() {
        let generated = include_str!(concat!(env!("OUT_DIR"), "/flotte.v1.rs"));
        assert!(generated.contains("crate::codec::CompactBufferCodec::default()"));
        assert!(
            !generated.contains("ProstCodec"),
            "a call still uses tonic's default codec"
        );
    }
}
