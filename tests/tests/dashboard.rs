//! End-to-end tests of `flottectl ui`, the web dashboard, in a real headless
//! Chromium driven through chromedriver (WebDriver), against a real server
//! and real agents: the fleet page follows an agent killed and a machine
//! quarantined without a reload, shows hostile text as text, refuses
//! requests without the secret and cross-origin POSTs; a rollout page shows
//! progress live, its buttons (confirmed in a dialog) work for an operator
//! and are absent for a viewer, whose forged request the API refuses.
//!
//! Chromium and chromedriver come from Debian (`chromium`,
//! `chromium-driver`); without them these tests fail, unless
//! `FLOTTE_TEST_SKIP_CHROMIUM=1` asks to skip them. Each test saves a
//! screenshot of the pages it checked under `target/<profile>/dashboard-screenshots/`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use fantoccini::{ClientBuilder, Locator};
use flotte_tests::sample_fleet::{
    free_port, push_sample_image, set_image_everywhere, start_sample_machine,
    trust_new_release_key, Behaviour,
};
use flotte_tests::{
    binaries_directory, binary, spawn_managed, test_runtime, wait_until, Agent, ManagedChild,
    Server, TempDir,
};

const SKIP_CHROMIUM_VARIABLE: &str = "FLOTTE_TEST_SKIP_CHROMIUM";

/// Text that runs script if a page ever inserts it as markup: it would
/// change the document's title.
const HOSTILE: &str =
    r#"<img src=x onerror="document.title='pwned'"><script>document.title='pwned'</script>"#;

fn on_path(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|directory| names.iter().map(move |name| directory.join(name)))
        .find(|candidate| candidate.is_file())
}

/// chromedriver and Chromium, or `None` when they are missing and
/// `FLOTTE_TEST_SKIP_CHROMIUM=1` asks to skip; panics when they are missing
/// otherwise (a test must never pass without its browser).
fn browser_programs() -> Option<(PathBuf, PathBuf)> {
    found_or_skipped(
        on_path(&["chromedriver"]),
        on_path(&["chromium", "chromium-browser", "google-chrome"]),
        std::env::var(SKIP_CHROMIUM_VARIABLE).ok().as_deref(),
    )
}

fn found_or_skipped(
    driver: Option<PathBuf>,
    chromium: Option<PathBuf>,
    skip_asked: Option<&str>,
) -> Option<(PathBuf, PathBuf)> {
    match (driver, chromium) {
        (Some(driver), Some(chromium)) => Some((driver, chromium)),
        (driver, chromium) => {
            let missing = format!(
                "chromedriver {}, chromium {}",
                if driver.is_some() { "found" } else { "missing" },
                if chromium.is_some() {
                    "found"
                } else {
                    "missing"
                }
            );
            assert!(
                skip_asked == Some("1"),
                "the dashboard tests need a real headless Chromium ({missing}): \
                 apt-get install chromium chromium-driver, or set {SKIP_CHROMIUM_VARIABLE}=1 to skip them explicitly"
            );
            println!("SKIPPED ({SKIP_CHROMIUM_VARIABLE}=1): {missing}");
            None
        }
    }
}

#[test]
fn a_missing_browser_fails_unless_skipping_is_asked_for_explicitly() {
    let program = || Some(PathBuf::from("/usr/bin/true"));
    for not_asked in [None, Some("0"), Some("yes")] {
        let outcome = std::panic::catch_unwind(|| found_or_skipped(program(), None, not_asked));
        assert!(
            outcome.is_err(),
            "a missing Chromium passed with {not_asked:?}"
        );
        let outcome = std::panic::catch_unwind(|| found_or_skipped(None, program(), not_asked));
        assert!(
            outcome.is_err(),
            "a missing chromedriver passed with {not_asked:?}"
        );
    }
    assert!(found_or_skipped(None, None, Some("1")).is_none());
    assert!(found_or_skipped(program(), program(), None).is_some());
}

/// A headless Chromium behind its own chromedriver, with a fresh profile.
struct Browser {
    runtime: tokio::runtime::Runtime,
    client: fantoccini::Client,
    _driver: ManagedChild,
    _profile: TempDir,
}

impl Browser {
    fn start((driver, chromium): &(PathBuf, PathBuf)) -> Self {
        let profile = TempDir::new("flotte-chromium").unwrap();
        let port = free_port().unwrap();
        let mut command = Command::new(driver);
        command.arg(format!("--port={port}"));
        let driver = spawn_managed(command, profile.path().join("chromedriver.log")).unwrap();
        assert!(
            wait_until(Duration::from_secs(20), || std::net::TcpStream::connect((
                "127.0.0.1",
                port
            ))
            .is_ok()),
            "chromedriver did not listen:\n{}",
            std::fs::read_to_string(&driver.log_path).unwrap_or_default()
        );
        let capabilities = serde_json::json!({
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                    "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.path().join("profile").display()),
                ],
            }
        });
        let runtime = test_runtime();
        let client = runtime
            .block_on(
                ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                    .capabilities(capabilities.as_object().cloned().unwrap())
                    .connect(&format!("http://127.0.0.1:{port}")),
            )
            .expect("a Chromium session through chromedriver");
        Browser {
            runtime,
            client,
            _driver: driver,
            _profile: profile,
        }
    }

    fn goto(&self, url: &str) {
        self.runtime.block_on(self.client.goto(url)).unwrap();
    }

    fn path(&self) -> String {
        self.runtime
            .block_on(self.client.current_url())
            .unwrap()
            .path()
            .to_owned()
    }

    /// Reads something of the element `css` (`None` if there is none),
    /// finding it again when a live update replaced it in between.
    fn read<Value>(
        &self,
        css: &str,
        reader: impl AsyncFn(
            fantoccini::elements::Element,
        ) -> Result<Value, fantoccini::error::CmdError>,
    ) -> Option<Value> {
        self.runtime.block_on(async {
            for _ in 0..5 {
                let element = self.client.find(Locator::Css(css)).await.ok()?;
                if let Ok(value) = reader(element).await {
                    return Some(value);
                }
            }
            None
        })
    }

    fn attribute(&self, css: &str, name: &str) -> Option<String> {
        self.read(css, async |element| element.attr(name).await)
            .flatten()
    }

    fn text(&self, css: &str) -> Option<String> {
        self.read(css, async |element| element.text().await)
    }

    fn count(&self, css: &str) -> usize {
        self.runtime
            .block_on(self.client.find_all(Locator::Css(css)))
            .unwrap()
            .len()
    }

    /// Clicks the element, finding it again if a live update replaced it
    /// between finding and clicking.
    fn click(&self, css: &str) {
        let clicked = wait_until(Duration::from_secs(10), || {
            self.runtime.block_on(async {
                match self.client.find(Locator::Css(css)).await {
                    Ok(element) => element.click().await.is_ok(),
                    Err(_) => false,
                }
            })
        });
        assert!(clicked, "cannot click {css}");
    }

    /// Clicks a button and accepts its confirmation; the dialog's text.
    fn click_and_confirm(&self, css: &str) -> String {
        self.click(css);
        self.answer_dialog(true)
    }

    /// The text of the open confirmation dialog, then accepts or dismisses it.
    fn answer_dialog(&self, accept: bool) -> String {
        self.runtime.block_on(async {
            let text = self.client.get_alert_text().await.unwrap();
            if accept {
                self.client.accept_alert().await.unwrap();
            } else {
                self.client.dismiss_alert().await.unwrap();
            }
            text
        })
    }

    fn script(&self, script: &str) -> serde_json::Value {
        self.runtime
            .block_on(self.client.execute(script, Vec::new()))
            .unwrap()
    }

    /// Marks the document; the mark survives live updates, not a reload.
    fn mark_document(&self) {
        self.script("window.flotteTestMark = 'still the same document';");
    }

    fn is_same_document(&self) -> bool {
        self.script("return window.flotteTestMark || null;") == "still the same document"
    }

    fn title(&self) -> String {
        self.runtime.block_on(self.client.title()).unwrap()
    }

    /// Saves what the browser shows, for people to look at after the test.
    fn screenshot(&self, name: &str) {
        let png = self.runtime.block_on(self.client.screenshot()).unwrap();
        let directory = binaries_directory().join("dashboard-screenshots");
        std::fs::create_dir_all(&directory).unwrap();
        std::fs::write(directory.join(format!("{name}.png")), png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let client = self.client.clone();
        let _ = self.runtime.block_on(client.close());
    }
}

/// A running `flottectl ui` and the URL it printed.
struct Dashboard {
    _process: ManagedChild,
    url: String,
    address: String,
    secret: String,
}

impl Dashboard {
    fn start(root: &Path, name: &str, profile: &Path, server: &Server) -> Self {
        let mut command = Command::new(binary("flottectl"));
        command
            .arg("--profile")
            .arg(profile)
            .args(["--server", &server.address, "ui", "--listen", "127.0.0.1:0"])
            .env_remove("FLOTTE_PROFILE")
            .env_remove("FLOTTE_SERVER");
        let log = root.join(format!("ui-{name}.log"));
        let process = spawn_managed(command, log.clone()).unwrap();
        let mut url = String::new();
        let printed = wait_until(Duration::from_secs(20), || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            match text.lines().find(|line| line.starts_with("http://")) {
                Some(line) => {
                    url = line.trim().to_owned();
                    true
                }
                None => false,
            }
        });
        assert!(
            printed,
            "flottectl ui printed no URL:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        let (base, secret) = url.split_once("/?secret=").expect("a URL with its secret");
        assert!(secret.len() >= 32, "a secret of at least 128 bits: {url}");
        Dashboard {
            _process: process,
            address: base.trim_start_matches("http://").to_owned(),
            secret: secret.to_owned(),
            url,
        }
    }

    fn page(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    /// One raw HTTP/1.1 request (not a browser): status and the whole
    /// response (head and body, bytes that are not UTF-8 replaced).
    fn request(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
        let mut stream = std::net::TcpStream::connect(&self.address).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: 0\r\n",
            self.address
        );
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).unwrap();
        let mut bytes = Vec::new();
        stream.read_to_end(&mut bytes).unwrap();
        let response = String::from_utf8_lossy(&bytes).into_owned();
        let status = flotte_tests::parse_status_line(&response).unwrap_or(0);
        (status, response)
    }

    fn cookie(&self) -> String {
        let port = self.address.rsplit(':').next().unwrap_or_default();
        format!("flotte_ui_{port}={}", self.secret)
    }

    fn own_origin(&self) -> String {
        format!("http://{}", self.address)
    }
}

/// The browser's programs, a temporary root and a server there whose agents
/// report every second; `None` when the browser is missing and the test
/// was asked to skip.
fn browser_and_server() -> Option<((PathBuf, PathBuf), TempDir, Server)> {
    let programs = browser_programs()?;
    let root = TempDir::new("flotte-dashboard").unwrap();
    let mut server =
        Server::init(root.path(), "server", &[]).with_run_args(&["--report-interval", "1s"]);
    server.start();
    Some((programs, root, server))
}

fn tile(hostname: &str) -> String {
    format!(".tile[data-hostname=\"{hostname}\"]")
}

/// Waits until the fleet page shows the machine's tile in `state`.
fn wait_for_tile(browser: &Browser, hostname: &str, state: &str) {
    let shown = wait_until(Duration::from_secs(30), || {
        browser.attribute(&tile(hostname), "data-state").as_deref() == Some(state)
    });
    assert!(
        shown,
        "{hostname} never shown {state}: {:?}",
        browser.text(".grid")
    );
}

#[test]
fn the_fleet_page_follows_the_fleet_live_escapes_hostile_text_and_guards_its_door() {
    let Some((programs, root, server)) = browser_and_server() else {
        return;
    };
    // The agents' check passes and prints markup: an agent's text to show.
    let script = root.path().join("says-html.sh");
    std::fs::write(&script, format!("cat <<'END'\n{HOSTILE}\nEND\n")).unwrap();
    let mut agents: Vec<Agent> = [("web-1", "dc1"), ("web-2", "dc2")]
        .iter()
        .map(|(name, zone)| {
            let token = server.token("role=web", zone, &[]);
            Agent::new(root.path(), name, &server.address, &token).with_config(&format!(
                "[[check]]\nname = \"says-html\"\nkind = \"exec\"\ncommand = \"/bin/sh\"\n\
                 args = [{:?}]\ninterval = \"500ms\"\ntimeout = \"500ms\"\ncritical = false\n",
                script.display().to_string()
            ))
        })
        .collect();
    for agent in &mut agents {
        agent.start();
    }
    assert!(
        wait_until(Duration::from_secs(30), || server.connected_count() == 2),
        "agents did not connect"
    );
    let dashboard = Dashboard::start(root.path(), "admin", &server.admin_profile(), &server);
    let browser = Browser::start(&programs);

    // The printed URL sets the cookie and lands on the fleet page without
    // the secret in the address bar.
    browser.goto(&dashboard.url);
    assert_eq!(browser.path(), "/");
    assert_eq!(browser.title(), "Fleet · Flotte");
    wait_for_tile(&browser, "web-1", "operational");
    wait_for_tile(&browser, "web-2", "operational");
    assert!(
        wait_until(Duration::from_secs(10), || browser
            .text("#live-status")
            .as_deref()
            == Some("live")),
        "the event stream never opened"
    );
    browser.mark_document();

    // An agent killed: its tile turns unreachable, without a reload.
    agents[1].kill();
    wait_for_tile(&browser, "web-2", "unreachable");
    assert_eq!(
        browser.text("[data-count=\"dc2/unreachable\"]").as_deref(),
        Some("1")
    );
    assert!(browser.is_same_document(), "the page was reloaded");

    // A machine quarantined with a hostile reason: shown quarantined live,
    // its reason as text (no element made of it, no script run).
    server.ctl_ok(&["machines", "quarantine", "web-1", "--reason", HOSTILE]);
    wait_for_tile(&browser, "web-1", "quarantined");
    assert!(browser.is_same_document(), "the page was reloaded");
    assert_eq!(
        browser.attribute(&tile("web-1"), "title").as_deref(),
        Some(format!("quarantined by admin: {HOSTILE}").as_str())
    );
    assert_eq!(browser.count("#fleet img, #fleet script"), 0);
    assert_eq!(browser.title(), "Fleet · Flotte");
    browser.screenshot("fleet");

    // The machine page shows the agent's check output and the reason as text.
    browser.click(&tile("web-1"));
    assert!(
        wait_until(Duration::from_secs(10), || browser.title()
            == "Machine web-1 · Flotte"),
        "title: {}",
        browser.title()
    );
    let shown_output = wait_until(Duration::from_secs(10), || {
        browser.text("td pre").as_deref() == Some(HOSTILE)
    });
    assert!(shown_output, "check output: {:?}", browser.text("td pre"));
    assert!(browser
        .text("#quarantine")
        .is_some_and(|text| text.ends_with(HOSTILE)));
    assert_eq!(browser.count("main img, main script"), 0);
    browser.screenshot("machine");

    // The quarantined machine's forensic bundle downloads as a tar file.
    let cookie = dashboard.cookie();
    let mut download = (0, String::new());
    let downloaded = wait_until(Duration::from_secs(30), || {
        download = dashboard.request("GET", "/machines/web-1/forensics", &[("Cookie", &cookie)]);
        download.0 == 200
    });
    assert!(downloaded, "forensics: {download:?}");
    assert!(
        download
            .1
            .contains("content-disposition: attachment; filename=\"forensics-"),
        "{}",
        &download.1[..download.1.len().min(600)]
    );
    assert!(download.1.contains("ustar"), "not a tar file");

    // The selector filters the fleet (typed in the page's form).
    browser.goto(&dashboard.page("/"));
    browser.script("document.querySelector('input[name=selector]').value = 'zone=dc2';");
    browser.click("form.filter button");
    assert!(
        wait_until(Duration::from_secs(10), || browser.count(".tile") == 1),
        "filtered fleet: {:?}",
        browser.text(".grid")
    );
    assert_eq!(browser.count(&tile("web-2")), 1);
    assert_eq!(
        browser.attribute("#fleet", "data-live").as_deref(),
        Some("/events/fleet?selector=zone%3Ddc2")
    );

    // A page of another origin, in the same browser, posting to the
    // dashboard: refused, and nothing changes.
    let foreign_page = format!(
        "data:text/html,<form method=post action=\"{}\"><button id=go>go</button></form>",
        dashboard.page("/machines/web-1/release")
    );
    browser.goto(&foreign_page);
    browser.click("#go");
    assert!(
        wait_until(Duration::from_secs(10), || browser.count("#error") == 1),
        "the foreign POST got: {:?}",
        browser.text("body")
    );
    let shown = server.ctl_json(&["machines", "show", "web-1"]);
    assert!(!shown["quarantine"].is_null(), "{shown:#}");

    // Without the secret: refused; with a wrong one: refused.
    let (status, body) = dashboard.request("GET", "/", &[]);
    assert_eq!(status, 401, "{body}");
    assert!(!body.contains("web-1"), "{body}");
    let (status, _) = dashboard.request("GET", "/?secret=0000", &[]);
    assert_eq!(status, 403);
    let (status, _) = dashboard.request(
        "GET",
        "/events/fleet",
        &[("Cookie", &dashboard.cookie().replace('=', "=0"))],
    );
    assert_eq!(status, 403);

    // A POST with the secret but from another origin is refused and changes
    // nothing; the same POST from the dashboard's own origin works.
    let (status, body) = dashboard.request(
        "POST",
        "/machines/web-1/release",
        &[("Cookie", &cookie), ("Origin", "http://evil.example")],
    );
    assert_eq!(status, 403, "{body}");
    let (status, body) = dashboard.request(
        "POST",
        "/machines/web-1/release",
        &[("Cookie", &cookie), ("Sec-Fetch-Site", "cross-site")],
    );
    assert_eq!(status, 403, "{body}");
    let shown = server.ctl_json(&["machines", "show", "web-1"]);
    assert!(!shown["quarantine"].is_null(), "{shown:#}");
    let own_origin = dashboard.own_origin();
    let (status, body) = dashboard.request(
        "POST",
        "/machines/web-1/release",
        &[("Cookie", &cookie), ("Origin", &own_origin)],
    );
    assert_eq!(status, 303, "{body}");
    let shown = server.ctl_json(&["machines", "show", "web-1"]);
    assert!(shown["quarantine"].is_null(), "{shown:#}");
    // …and the release is audited under the operator's own name.
    let audit = server.ctl_ok(&["audit", "list", "--actor", "admin"]);
    assert!(audit.contains("machine.release"), "{audit}");
}

/// A qualification stage behind an approval gate, then production.
const GATED_PLAN: &str = r#"
stage = [
  { name = "qualification", selector = "env=qa", bake = "1s", approval = true },
  { name = "production", selector = "env=prod", batch = 1, bake = "1s" },
]
policy = { max_failures = 1, machine_deadline = "90s", on_failure = "rollback" }
"#;

#[test]
fn a_rollout_page_shows_progress_live_and_its_buttons_work_for_an_operator_only() {
    let Some((programs, root, server)) = browser_and_server() else {
        return;
    };
    let keys = trust_new_release_key(&server, root.path());
    push_sample_image(&server, root.path(), &keys, "1.0.0", Behaviour::Healthy);
    push_sample_image(&server, root.path(), &keys, "2.0.0", Behaviour::Healthy);
    let machines = vec![
        start_sample_machine(&server, root.path(), &keys, "qa-1", "dc1", "env=qa"),
        start_sample_machine(&server, root.path(), &keys, "web-1", "dc2", "env=prod"),
    ];
    assert!(
        wait_until(Duration::from_secs(60), || server.connected_count() == 2),
        "agents did not connect"
    );
    set_image_everywhere(&server, &machines, "1.0.0");
    let operator = server.create_operator(root.path(), "olivia", "operator");
    let viewer = server.create_operator(root.path(), "victor", "viewer");
    let as_operator = Dashboard::start(root.path(), "olivia", &operator, &server);
    let as_viewer = Dashboard::start(root.path(), "victor", &viewer, &server);

    let plan = root.path().join("plan.toml");
    std::fs::write(&plan, GATED_PLAN).unwrap();
    let plan = plan.to_str().unwrap();
    let created = server.ctl_json(&["rollout", "create", "--image", "app@2.0.0", "--plan", plan]);
    let id = created["id"].as_str().unwrap().to_owned();
    let rollout_state = || server.ctl_json(&["rollout", "show", &id])["state"].clone();
    let wait_for_state = |expected: &str| {
        let reached = wait_until(Duration::from_secs(10), || rollout_state() == expected);
        assert!(reached, "rollout not {expected}: {}", rollout_state());
    };

    let browser = Browser::start(&programs);
    browser.goto(&as_operator.url);
    assert_eq!(
        browser.text("#operator").as_deref(),
        Some("olivia · operator")
    );
    browser.goto(&as_operator.page(&format!("/rollouts/{id}")));
    browser.mark_document();
    // The qualification stage fills and the gate is reached, live.
    let at_the_gate = wait_until(Duration::from_secs(90), || {
        browser
            .text("#waiting-for")
            .is_some_and(|text| text.contains("approval of stage qualification"))
    });
    assert!(at_the_gate, "rollout page: {:?}", browser.text("#rollout"));
    assert_eq!(
        browser
            .attribute("[data-stage=\"qualification\"] progress", "value")
            .as_deref(),
        Some("1")
    );
    assert!(browser.is_same_document(), "the page was reloaded");
    browser.screenshot("rollout-at-the-gate");

    // Pause, confirmed in a dialog naming its effect; then resume.
    let confirmation = browser.click_and_confirm("#action-pause");
    assert!(
        confirmation.contains("no new machine is sent"),
        "{confirmation}"
    );
    wait_for_state("paused");
    browser.click_and_confirm("#action-resume");
    wait_for_state("running");

    // A dismissed confirmation sends nothing.
    assert!(wait_until(Duration::from_secs(10), || browser
        .count("#action-abort")
        == 1));
    browser.click("#action-abort");
    let confirmation = browser.answer_dialog(false);
    assert!(confirmation.contains("for good"), "{confirmation}");
    assert_eq!(rollout_state(), "running");

    // The viewer sees the rollout but no button, and a forged request in
    // its name is refused by the API, naming the role it needs.
    // (In the same browser: each dashboard's cookie is its own.)
    browser.goto(&as_viewer.url);
    browser.goto(&as_viewer.page(&format!("/rollouts/{id}")));
    assert_eq!(browser.text("#rollout-state").as_deref(), Some("running"));
    assert_eq!(browser.count("form.action, button"), 0);
    browser.goto(&as_viewer.page("/rollouts"));
    assert_eq!(browser.count("#action-stop-all"), 0);
    browser.screenshot("rollout-as-viewer");
    let cookie = as_viewer.cookie();
    let own_origin = as_viewer.own_origin();
    let (status, body) = as_viewer.request(
        "POST",
        &format!("/rollouts/{id}/approve"),
        &[("Cookie", &cookie), ("Origin", &own_origin)],
    );
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("operator"), "{body}");
    assert_eq!(rollout_state(), "running");

    // Stop all, from the operator's list of rollouts, pauses it; resumed
    // from its page.
    browser.goto(&as_operator.page("/rollouts"));
    let confirmation = browser.click_and_confirm("#action-stop-all");
    assert!(
        confirmation.contains("pause every pending or running rollout"),
        "{confirmation}"
    );
    wait_for_state("paused");
    browser.goto(&as_operator.page(&format!("/rollouts/{id}")));
    browser.click_and_confirm("#action-resume");
    wait_for_state("running");

    // Approve, clicked by the operator: the gate opens and the rollout
    // succeeds, followed live on the page the action returned to.
    browser.goto(&as_operator.page(&format!("/rollouts/{id}")));
    assert_eq!(
        browser.text("#operator").as_deref(),
        Some("olivia · operator")
    );
    browser.click_and_confirm("#action-approve");
    assert!(
        wait_until(Duration::from_secs(10), || browser.path()
            == format!("/rollouts/{id}")
            && browser.count("#action-approve") == 0),
        "the approve button stayed"
    );
    browser.mark_document();
    let succeeded = wait_until(Duration::from_secs(120), || {
        browser.text("#rollout-state").as_deref() == Some("succeeded")
    });
    assert!(succeeded, "rollout page: {:?}", browser.text("#rollout"));
    assert!(browser.is_same_document(), "the page was reloaded");
    assert_eq!(rollout_state(), "succeeded");
    assert_eq!(
        browser
            .attribute("[data-stage=\"production\"] progress", "value")
            .as_deref(),
        Some("1")
    );
    assert_eq!(
        browser
            .attribute("[data-wave=\"2\"] progress", "value")
            .as_deref(),
        Some("1")
    );
    browser.screenshot("rollout-succeeded");
    // Every click was audited under the operator's name.
    let audit = server.ctl_ok(&["audit", "list", "--actor", "olivia"]);
    for action in [
        "rollout.pause",
        "rollout.resume",
        "rollout.stop-all",
        "rollout.approve",
    ] {
        assert!(audit.contains(action), "{action} not audited: {audit}");
    }
    assert!(!audit.contains("rollout.abort"), "{audit}");
}

/// Alice's key, granted by Flotte, and a key planted by hand: test data
/// made once with `ssh-keygen -t ed25519`, with their fingerprints.
const ALICE_KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINXaWxh/Ft9CrG3bTJelEJMlrH5/PGgNN3CZH4rN3AI6 alice@dashboard";
const PLANTED_KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINnt4OT2zoNfrcvE3UU9Af3Zfn3kIpz9ZQyP0ao+RH35 planted-by-hand";
const PLANTED_FINGERPRINT: &str = "SHA256:A8tIR+EBpSPvisvUtS39TqnwwizIfwu6MNhvxC5WOUo";
/// The Unix login the grant names (created with useradd, as root).
const LOGIN: &str = "flotte-dash";

/// Root and useradd, needed to make the login whose keys the agent reads;
/// missing, the test fails unless FLOTTE_TEST_SKIP_SSHD=1 (as the access
/// tests, which need the same).
fn login_home() -> Option<PathBuf> {
    let missing = if !nix::unistd::geteuid().is_root() {
        Some("not running as root (needed for useradd)".to_owned())
    } else if Command::new("id")
        .arg(LOGIN)
        .status()
        .is_ok_and(|status| status.success())
    {
        None
    } else {
        let made = Command::new("useradd")
            .args(["--create-home", "--shell", "/bin/sh", "-p", "*", LOGIN])
            .status();
        (!made.is_ok_and(|status| status.success())).then(|| format!("useradd {LOGIN} failed"))
    };
    match missing {
        None => Some(PathBuf::from(format!("/home/{LOGIN}"))),
        Some(reason) => {
            let skip = std::env::var(flotte_tests::SKIP_SSHD_VARIABLE).ok();
            assert!(flotte_tests::skip_for_missing_sshd(
                &reason,
                skip.as_deref()
            ));
            None
        }
    }
}

#[test]
fn the_access_dr_and_audit_pages_show_grants_drift_zone_loss_and_the_chain() {
    let Some(home) = login_home() else {
        return;
    };
    let Some((programs, root, server)) = browser_and_server() else {
        return;
    };
    let managed = root.path().join("managed");
    let token = server.token("role=web", "dc1", &[]);
    let mut agent =
        Agent::new(root.path(), "web-1", &server.address, &token).with_config(&format!(
            "[access]\nauthorized_keys_dir = {:?}\n",
            managed.display().to_string()
        ));
    agent.start_and_wait_for_session(&server);
    let alice_key = root.path().join("alice.pub");
    std::fs::write(&alice_key, format!("{ALICE_KEY}\n")).unwrap();
    server.ctl_ok(&[
        "user",
        "add",
        "alice",
        "--ssh-key",
        alice_key.to_str().unwrap(),
    ]);
    server.ctl_ok(&[
        "access",
        "grant",
        "alice",
        "--selector",
        "role=web",
        "--login",
        LOGIN,
    ]);
    // A key planted by hand in the login's own authorized_keys.
    std::fs::create_dir_all(home.join(".ssh")).unwrap();
    std::fs::write(
        home.join(".ssh/authorized_keys"),
        format!("{PLANTED_KEY}\n"),
    )
    .unwrap();

    let dashboard = Dashboard::start(root.path(), "admin", &server.admin_profile(), &server);
    let browser = Browser::start(&programs);
    browser.goto(&dashboard.url);
    let drift_shown = wait_until(Duration::from_secs(60), || {
        browser.goto(&dashboard.page("/access"));
        browser
            .text("#drift")
            .is_some_and(|text| text.contains(PLANTED_FINGERPRINT))
    });
    assert!(drift_shown, "access page: {:?}", browser.text("main"));
    let reach = browser.text("#reach").unwrap_or_default();
    assert!(
        reach.contains("alice") && reach.contains("web-1") && reach.contains(LOGIN),
        "{reach}"
    );
    assert!(
        browser
            .text("#propagation")
            .is_some_and(|text| text.contains("1 applied")),
        "{:?}",
        browser.text("#propagation")
    );
    browser.screenshot("access");

    // Losing dc1 takes the only web machine: the group goes down.
    browser.goto(&dashboard.page("/dr"));
    browser.click("input[name=\"zones\"][value=\"dc1\"]");
    browser.click("form.filter button");
    assert!(
        wait_until(Duration::from_secs(10), || browser.path() == "/dr"
            && browser.count("#impact") == 1),
        "no impact table: {:?}",
        browser.text("main")
    );
    let impact = browser.text("#impact").unwrap_or_default();
    assert!(
        impact.contains("web") && impact.contains("down"),
        "{impact}"
    );
    browser.screenshot("disaster-recovery");

    // The audit page verifies the chain and filters by actor and action.
    browser.goto(&dashboard.page("/audit?actor=admin&action=access."));
    assert_eq!(
        browser.attribute("#verdict", "class").as_deref(),
        Some("intact")
    );
    let entries = browser.text("#audit tbody").unwrap_or_default();
    assert!(entries.contains("access.grant"), "{entries}");
    assert!(!entries.contains("user.add"), "{entries}");
    browser.screenshot("audit");
    let _ = std::fs::remove_file(home.join(".ssh/authorized_keys"));
}
