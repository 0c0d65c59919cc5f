//! `flotte-sample-service`: the small HTTP service packaged into the sample
//! images of the demo and the tests. `GET /` answers its version, `GET
//! /health` answers 200 — or 500 when started with `--unhealthy`, which is how
//! the broken sample image fails its health check (or only after
//! `--unhealthy-after SECONDS`, a bad release that passes its swap).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::ExitCode;

fn main() -> ExitCode {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    let value_of = |flag: &str| {
        arguments
            .iter()
            .position(|argument| argument == flag)
            .and_then(|index| arguments.get(index + 1))
            .cloned()
    };
    // `--port-file FILE` (relative to the working directory, which is the
    // image) lets one image serve on a different port on each machine of a
    // test fleet sharing one host.
    let port = value_of("--port").or_else(|| {
        value_of("--port-file")
            .and_then(|file| std::fs::read_to_string(file).ok())
            .map(|text| text.trim().to_owned())
    });
    let Some(port) = port else {
        eprintln!("usage: flotte-sample-service (--port PORT | --port-file FILE) [--version TEXT] [--unhealthy]");
        return ExitCode::from(2);
    };
    let version = value_of("--version").unwrap_or_else(|| "unknown".into());
    let healthy = !arguments.iter().any(|argument| argument == "--unhealthy");
    // `--unhealthy-after SECONDS`: healthy at first (so the swap commits),
    // then failing — a bad release that only shows in production.
    let started = std::time::Instant::now();
    let unhealthy_after = value_of("--unhealthy-after")
        .and_then(|seconds| seconds.parse::<f64>().ok())
        .map(std::time::Duration::from_secs_f64);
    let listener = match TcpListener::bind(format!("127.0.0.1:{port}")) {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("flotte-sample-service: cannot listen on port {port}: {error}");
            return ExitCode::FAILURE;
        }
    };
    println!("sample service {version} listening on port {port} (healthy: {healthy})");
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        // Read the whole request head: answering before it is read would
        // make the kernel reset the connection on close.
        let mut request = Vec::new();
        let mut chunk = [0u8; 1024];
        while !request.windows(4).any(|window| window == b"\r\n\r\n") && request.len() < 16 * 1024 {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(read) => request.extend_from_slice(&chunk[..read]),
            }
        }
        let text = String::from_utf8_lossy(&request);
        let path = text.split_whitespace().nth(1).unwrap_or("/");
        let (status, body) = match path {
            "/health"
                if healthy && unhealthy_after.is_none_or(|after| started.elapsed() < after) =>
            {
                ("200 OK", "ok\n".to_owned())
            }
            "/health" => (
                "500 Internal Server Error",
                "unhealthy on purpose\n".to_owned(),
            ),
            _ => ("200 OK", format!("{version}\n")),
        };
        let _ = write!(
            stream,
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }
    ExitCode::SUCCESS
}
