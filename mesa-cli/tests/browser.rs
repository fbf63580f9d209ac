//! Browser tests: `tests/browser/run.js` drives Debian's chromium with playwright-core
//! against the `mesa` binary: two pages chatting through `mesa serve --demo` (with
//! Redis and sync: a message missed while offline comes back), three pages on two
//! replicas of the demo sharing one Redis (a room's message reaches its members on
//! both replicas with its room, not a page in another room; who is online per room,
//! the room's presence, shows both members and follows a leave and a closed page),
//! `clients/js`'s `presence()` and join and leave events over two replicas (several
//! clients of one id count once), `clients/js`'s recovery (a page whose server is
//! killed gets the room messages and the sends to its id it missed, once and in order,
//! from the server that takes the address, with `recovered: true`), a page that survives
//! a server restart with its reconnect banner, the published `mesa-js-client`
//! 1.4.8 inside the browser, and the demo over `https://` and `wss://` with a
//! certificate of the tests' own CA (`tests/src/pki.rs`), which chromium trusts by
//! its public key's hash (`--ignore-certificate-errors-spki-list`).
//!
//! Screenshots of the last run are kept in `target/browser-screenshots/`. With
//! `MESA_UPDATE_DEMO_PNG=1` the chat test also refreshes `docs/demo.png`.
//!
//! Needs the `cli` feature, Node.js, `npm ci --prefix tests/browser` (scripts/test-all
//! runs it) and `/usr/bin/chromium` (`apt-get install chromium`; `CHROMIUM=path`
//! points elsewhere). Without chromium the tests fail, unless the skip was asked for
//! with `MESA_SKIP_BROWSER=1`: then each says on stderr which scenario it skipped.
#![cfg(unix)]

#[allow(unreachable_pub)]
#[path = "../../tests/src/pki.rs"]
mod pki;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

/// The longest one scenario may take, its browser's start included.
const BOUND: Duration = Duration::from_secs(150);

/// One chromium at a time: the machines are small.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_path_buf()
}

/// Whether the browser scenario `name` can run here; panics with what to do when
/// something is missing, or returns false after a notice when `MESA_SKIP_BROWSER=1`
/// asked for the skip.
fn browser_available(name: &str) -> bool {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned());
    if !Path::new(&chromium).exists() {
        let problem = format!(
            "browser tests need Debian's chromium at {chromium}: `apt-get install chromium` \
             (or set CHROMIUM to its path)"
        );
        if std::env::var("MESA_SKIP_BROWSER").as_deref() == Ok("1") {
            eprintln!("SKIPPED (MESA_SKIP_BROWSER=1): browser scenario `{name}`: {problem}");
            return false;
        }
        panic!("{problem}; or set MESA_SKIP_BROWSER=1 to skip the browser tests");
    }
    let modules = workspace().join("tests/browser/node_modules");
    for package in ["playwright-core", "mesa-js-client"] {
        assert!(
            modules.join(package).join("package.json").is_file(),
            "{} has no `{package}`: run `npm ci --prefix tests/browser` (scripts/test-all does)",
            modules.display()
        );
    }
    true
}

/// Run one scenario of `run.js` within [`BOUND`]; panic with its output if it fails.
fn scenario(name: &str) {
    scenario_with(name, &[]);
}

/// [`scenario`] with more arguments for `run.js`.
fn scenario_with(name: &str, args: &[&std::ffi::OsStr]) {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    if !browser_available(name) {
        return;
    }
    let root = workspace();
    let mut command = Command::new("node");
    command
        .arg(root.join("tests/browser/run.js"))
        .arg(name)
        .arg("--mesa")
        .arg(env!("CARGO_BIN_EXE_mesa"))
        .arg("--out")
        .arg(root.join("target/browser-screenshots"))
        .args(args)
        .current_dir(&root)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if name == "chat" && std::env::var_os("MESA_UPDATE_DEMO_PNG").is_some() {
        command.arg("--demo-png").arg("docs/demo.png");
    }
    let mut child = command.spawn().expect("`node` starts (install Node.js 20)");
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let out = thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let err = thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + BOUND;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(50));
    };
    let (stdout, stderr) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    let result = stdout.lines().last().unwrap_or_default();
    match status {
        Some(status) if status.success() && result.contains(r#""ok":true"#) => {
            eprintln!("{name}: {result}");
        }
        Some(status) => {
            panic!("browser scenario {name} failed ({status}):\n{result}\n--- stderr:\n{stderr}")
        }
        None => panic!("browser scenario {name} took longer than {BOUND:?}\n--- stderr:\n{stderr}"),
    }
}

#[test]
fn two_pages_chat_through_the_demo_and_missed_messages_come_back() {
    scenario("chat");
}

#[test]
fn pages_on_two_replicas_share_a_room_and_a_page_in_another_room_hears_nothing() {
    scenario("rooms");
}

#[test]
fn the_browser_client_tells_who_is_in_a_room_over_two_replicas() {
    scenario("presence");
}

/// `mesa serve --redis --rooms authenticated --recover-rooms 'chat:*' --recover-users`
/// killed with SIGKILL under a page subscribed to `chat:1`; room messages and sends to
/// the page's id are dispatched (`mesa dispatch --recover-users`) before another
/// server starts on the address. The page's client reconnects by itself, reports
/// its positions, and gets every message once, in order per stream, then
/// `recovered: true` for the room and its id; a server without rooms gets no position.
#[test]
fn the_browser_client_resumes_its_room_and_its_id_after_its_server_was_killed() {
    scenario("recovery");
}

#[test]
fn a_page_shows_the_reconnect_banner_and_recovers_after_a_server_restart() {
    scenario("reconnect");
}

#[test]
fn the_published_mesa_js_client_works_in_the_browser_against_our_server() {
    scenario("js-client");
}

#[test]
fn the_demo_works_over_https_and_wss() {
    let dir = pki::TempDir::new();
    let ca = pki::TestCa::new("mesa test CA");
    let (cert, key) = ca
        .server(&["localhost", "127.0.0.1"])
        .write(dir.path(), "server");
    scenario_with(
        "tls",
        &[
            "--tls-cert".as_ref(),
            cert.as_os_str(),
            "--tls-key".as_ref(),
            key.as_os_str(),
        ],
    );
}
