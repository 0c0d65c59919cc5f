//! `flottectl image keygen | build | push | list | show`: release keys,
//! signed image files, and the server's image store.

use std::io::Read;
use std::path::PathBuf;

use clap::Subcommand;
use flotte_common::image_build::{
    build_image, open_payload, read_image_file, BuildOptions, SealOptions,
};
use flotte_proto::v1::images_client::ImagesClient;
use flotte_proto::v1::{GetImageRequest, ImageInfo, ListImagesRequest, PushImageChunk};
use serde::Serialize;

use crate::cli::{read_file, rpc_error, Cli};
use crate::error::CtlError;
use crate::output::{format_time, print_fields, print_json, print_line, print_list, Output};
use crate::trust;

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Release public keys (ed25519) trusted to sign images.
    #[command(subcommand)]
    Trust(trust::TrustCommand),
    /// Make a release key pair: DIR/release.key (secret, 0600) and DIR/release.pub.
    Keygen {
        /// The directory to write release.key and release.pub into.
        #[arg(long)]
        out: PathBuf,
    },
    /// Pack and sign a directory as an image file.
    Build {
        /// The directory whose files become the image's tree.
        directory: PathBuf,
        /// The image's name (one name per application).
        #[arg(long)]
        name: String,
        /// The image's version, semver (e.g. 1.2.0): rollouts and
        /// `--rollback` compare them.
        #[arg(long)]
        version: String,
        /// Private release key (from `image keygen`).
        #[arg(long)]
        key: PathBuf,
        /// The image file to write, e.g. app-1.2.0.flotte.
        #[arg(long)]
        out: PathBuf,
        /// Service command, words separated by spaces; a relative program
        /// path is taken inside the image (e.g. "bin/app --port 8080").
        #[arg(long)]
        service: Option<String>,
        /// TOML file with `[[check]]` tables declared by the image.
        #[arg(long)]
        checks: Option<PathBuf>,
        /// A path inside the image the service may change (e.g. `var`),
        /// left out of integrity verification; repeat for more.
        #[arg(long = "mutable")]
        mutable: Vec<String>,
    },
    /// Upload an image file (its signature must verify on the server).
    Push {
        /// The image file `image build` wrote.
        file: PathBuf,
    },
    /// List pushed images.
    List {
        /// Only the images of this name (default: all).
        #[arg(long, default_value = "")]
        name: String,
    },
    /// Show one image: name@version.
    Show {
        /// The image, name@version.
        reference: String,
    },
}

/// Payload bytes per push message.
const PUSH_CHUNK_BYTES: usize = 256 * 1024;

#[derive(Debug, Serialize)]
struct ImageView {
    name: String,
    version: String,
    digest: String,
    size: u64,
    signing_key: String,
    created_at: String,
    pushed_at: String,
    pushed_by: String,
    machines: u32,
    manifest: serde_json::Value,
}

impl From<&ImageInfo> for ImageView {
    fn from(info: &ImageInfo) -> Self {
        let image = info.image.clone().unwrap_or_default();
        ImageView {
            name: image.name,
            version: image.version,
            digest: image.digest,
            size: info.size,
            signing_key: info.signing_key.clone(),
            created_at: format_time(info.created_at),
            pushed_at: format_time(info.pushed_at),
            pushed_by: info.pushed_by.clone(),
            machines: info.machines,
            manifest: serde_json::from_str(&info.manifest_json).unwrap_or(serde_json::Value::Null),
        }
    }
}

fn print_images(output: Output, images: &[ImageInfo]) -> Result<(), CtlError> {
    let views: Vec<ImageView> = images.iter().map(ImageView::from).collect();
    print_list(
        output,
        &views,
        &["IMAGE", "DIGEST", "BYTES", "MACHINES", "PUSHED", "BY"],
        |view| {
            vec![
                format!("{}@{}", view.name, view.version),
                view.digest[..view.digest.len().min(16)].to_owned(),
                view.size.to_string(),
                view.machines.to_string(),
                view.pushed_at.clone(),
                view.pushed_by.clone(),
            ]
        },
    )
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ChecksFile {
    #[serde(default, rename = "check")]
    checks: Vec<flotte_proto::checks::CheckDefinition>,
}

pub async fn run(cli: &Cli, command: &ImageCommand) -> Result<(), CtlError> {
    match command {
        ImageCommand::Trust(command) => trust::run(cli, command).await,
        ImageCommand::Keygen { out } => {
            let (private_pem, public) = flotte_proto::release_keys::generate_signing_key()
                .map_err(|error| CtlError::Usage(error.to_string()))?;
            let io = |error: std::io::Error| CtlError::Usage(format!("{}: {error}", out.display()));
            flotte_proto::files::create_private_dir(out).map_err(io)?;
            let key_path = out.join("release.key");
            if key_path.exists() {
                return Err(CtlError::Usage(format!(
                    "{} exists: refusing to overwrite a key",
                    key_path.display()
                )));
            }
            flotte_proto::files::write_private(&key_path, private_pem.as_bytes()).map_err(io)?;
            let public_path = out.join("release.pub");
            flotte_proto::files::write_atomically(
                &public_path,
                format!("{} flotte-release\n", public.openssh_line()).as_bytes(),
            )
            .map_err(io)?;
            print_line!("private key: {} (keep it secret)", key_path.display());
            print_line!(
                "public key:  {} (trust it with `flottectl image trust add`)",
                public_path.display()
            );
            print_line!("key id:      {}", public.id());
            Ok(())
        }
        ImageCommand::Build {
            directory,
            name,
            version,
            key,
            out,
            service,
            checks,
            mutable,
        } => {
            let checks = match checks {
                Some(path) => {
                    toml::from_str::<ChecksFile>(&read_file(path)?)
                        .map_err(|error| CtlError::Usage(format!("{}: {error}", path.display())))?
                        .checks
                }
                None => Vec::new(),
            };
            let options = BuildOptions {
                directory: directory.clone(),
                seal: SealOptions {
                    name: name.clone(),
                    version: version.clone(),
                    key_pem: read_file(key)?,
                    service: service
                        .as_ref()
                        .map(|command| command.split_whitespace().map(str::to_owned).collect()),
                    checks,
                    mutable_paths: mutable.clone(),
                },
            };
            let manifest =
                build_image(&options, out).map_err(|error| CtlError::Usage(error.to_string()))?;
            if cli.output() == Output::Json {
                return print_json(&manifest);
            }
            print_line!(
                "built {} ({} payload bytes, sha256 {}) -> {}",
                manifest.reference(),
                manifest.payload_size,
                manifest.payload_sha256,
                out.display()
            );
            Ok(())
        }
        ImageCommand::Push { file } => {
            let image =
                read_image_file(file).map_err(|error| CtlError::Usage(error.to_string()))?;
            let mut payload =
                open_payload(file, &image).map_err(|error| CtlError::Usage(error.to_string()))?;
            let (channel, diagnostics) = cli.connect().await?;
            let rpc = rpc_error(&diagnostics);
            let (sender, receiver) = tokio::sync::mpsc::channel(4);
            let manifest_json = image.manifest_json.clone();
            let signature = image.signature.clone();
            // Read the file on a blocking thread and feed the stream.
            let reader = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                let mut first = Some((manifest_json, signature));
                loop {
                    let mut buffer = vec![0u8; PUSH_CHUNK_BYTES];
                    let read = payload.read(&mut buffer)?;
                    buffer.truncate(read);
                    let (manifest_json, signature) = first.take().unwrap_or_default();
                    if read == 0 && manifest_json.is_empty() {
                        return Ok(());
                    }
                    let chunk = PushImageChunk {
                        manifest_json,
                        signature,
                        payload: buffer,
                    };
                    if sender.blocking_send(chunk).is_err() || read == 0 {
                        return Ok(());
                    }
                }
            });
            let info = ImagesClient::new(channel)
                .push_image(tokio_stream::wrappers::ReceiverStream::new(receiver))
                .await
                .map_err(&rpc)?
                .into_inner();
            if let Ok(Err(error)) = reader.await {
                return Err(CtlError::Usage(format!("{}: {error}", file.display())));
            }
            print_images(cli.output(), &[info])
        }
        ImageCommand::List { name } => {
            let (channel, diagnostics) = cli.connect().await?;
            let rpc = rpc_error(&diagnostics);
            let images = ImagesClient::new(channel)
                .list_images(ListImagesRequest { name: name.clone() })
                .await
                .map_err(&rpc)?
                .into_inner()
                .images;
            print_images(cli.output(), &images)
        }
        ImageCommand::Show { reference } => {
            let (channel, diagnostics) = cli.connect().await?;
            let rpc = rpc_error(&diagnostics);
            let info = ImagesClient::new(channel)
                .get_image(GetImageRequest {
                    reference: reference.clone(),
                })
                .await
                .map_err(&rpc)?
                .into_inner();
            let view = ImageView::from(&info);
            if cli.output() == Output::Json {
                return print_json(&view);
            }
            print_fields(
                12,
                &[
                    ("image", format!("{}@{}", view.name, view.version)),
                    ("digest", format!("sha256:{}", view.digest)),
                    ("size", format!("{} bytes", view.size)),
                    ("signed by", view.signing_key.clone()),
                    ("created", view.created_at.clone()),
                    (
                        "pushed",
                        format!("{} by {}", view.pushed_at, view.pushed_by),
                    ),
                    ("machines", view.machines.to_string()),
                ],
            );
            print_line!("manifest:");
            print_json(&view.manifest)
        }
    }
}
