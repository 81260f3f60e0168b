//! README's "Deploying a pair", followed step by step as a new user would, on two hosts.
//!
//! The hosts are network namespaces of this machine joined by a veth pair
//! ([`failback_tests::netns`]): `db1`, the old primary, and `db2`, the new primary, each with
//! its PostgreSQL server listening on its own address. A real failover happens first (db2 a
//! streaming standby of db1, promoted, both written to, db1 shut down). Then every command
//! block of the README marked `<!-- walkthrough:db1 -->` or `<!-- walkthrough:db2 -->` is read
//! out of README.md and run, in order, on that host, as PostgreSQL's user, with the guide's
//! paths and addresses mapped onto the test's (`/etc/failback`, the data directory, the
//! socket directory, 10.0.0.1/10.0.0.2). The few lines a test cannot run as written are
//! carried out for what they mean, each named here: what the guide runs as `postgres`
//! (`sudo -u postgres`) or writes with `sudo tee` is run as PostgreSQL's user, whose files the
//! guide's paths lead to here; `sudo install -d -o postgres …` makes a directory of that user;
//! `scp` copies between the hosts' files,
//! `systemctl enable --now failbackd` runs the packaged unit's `ExecStart` as systemd would
//! (waiting for its `READY=1` on a `NOTIFY_SOCKET`), `pg_ctlcluster … start` starts the host's
//! server, and installing the packages is left to `packages.rs`. Any other `sudo` line fails
//! the test, so the guide cannot grow a step this test silently skips.
//!
//! It ends where the guide ends: db1 a standby of db2, streaming over the link from db2's
//! address, with every table the same on both.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use failback_tests::netns::{self, Host, Link};
use failback_tests::{Cluster, PgMajor, StopMode, assert_same_data, programs, user};

const README: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md");
const UNIT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../packaging/failbackd.service"
);

/// A block of commands the README says to run on one host.
#[derive(Debug)]
struct Block {
    host: String,
    /// The README's line where the block's fence opens, for messages.
    line: usize,
    text: String,
}

/// Every block marked `<!-- walkthrough:HOST -->` (the next fenced block after the marker), its
/// indentation removed.
fn walkthrough_blocks(readme: &str) -> Vec<Block> {
    let lines: Vec<&str> = readme.lines().collect();
    let mut blocks = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let marker = lines[i].trim();
        i += 1;
        let Some(host) = marker
            .strip_prefix("<!-- walkthrough:")
            .and_then(|m| m.strip_suffix("-->"))
        else {
            continue;
        };
        while i < lines.len() && !lines[i].trim_start().starts_with("```") {
            i += 1;
        }
        assert!(
            i < lines.len(),
            "README: {marker} has no code block after it"
        );
        let indent = lines[i].len() - lines[i].trim_start().len();
        let line = i + 1;
        i += 1;
        let mut text = String::new();
        while i < lines.len() && lines[i].trim() != "```" {
            let l = lines[i];
            text.push_str(
                l.get(indent.min(l.len() - l.trim_start().len())..)
                    .unwrap_or(""),
            );
            text.push('\n');
            i += 1;
        }
        blocks.push(Block {
            host: host.trim().to_string(),
            line,
            text,
        });
    }
    blocks
}

/// A piece of a block: shell to run as it is, or a line the test carries out for what it means.
#[derive(Debug, PartialEq)]
enum Piece {
    Shell(String),
    Line(String),
}

/// Splits a block into shell and the lines that start with `scp`, `sudo` (here-documents and
/// `\` continuations kept whole).
fn pieces(text: &str) -> Vec<Piece> {
    let mut out = Vec::new();
    let mut shell = String::new();
    let mut heredoc: Option<String> = None;
    let mut logical = String::new();
    for raw in text.lines() {
        if let Some(end) = &heredoc {
            shell.push_str(raw);
            shell.push('\n');
            if raw.trim() == end {
                heredoc = None;
            }
            continue;
        }
        if let Some(cont) = raw.strip_suffix('\\') {
            logical.push_str(cont);
            logical.push(' ');
            continue;
        }
        logical.push_str(raw);
        let mut line = std::mem::take(&mut logical);
        // What the guide runs as postgres, or writes with `sudo tee`, the test runs as
        // PostgreSQL's user: the files it leads to are that user's here.
        if let Some(rest) = line.trim_start().strip_prefix("sudo -u postgres ") {
            line = rest.to_string();
        } else if let Some(rest) = line.trim_start().strip_prefix("sudo tee ") {
            line = format!("tee {rest}");
        }
        let first = line.split_whitespace().next().unwrap_or("");
        if first == "scp" || first == "sudo" {
            if !shell.trim().is_empty() {
                out.push(Piece::Shell(std::mem::take(&mut shell)));
            }
            out.push(Piece::Line(
                line.split_whitespace().collect::<Vec<_>>().join(" "),
            ));
            continue;
        }
        if let Some((_, tag)) = line.split_once("<<") {
            let tag = tag.trim().trim_matches(['\'', '"', '-']);
            heredoc = Some(tag.to_string());
        }
        shell.push_str(&line);
        shell.push('\n');
    }
    if !shell.trim().is_empty() {
        out.push(Piece::Shell(shell));
    }
    out
}

#[test]
fn pieces_split_shell_from_the_lines_carried_out() {
    let text = "a \\\n  b\ncat > f <<'EOF'\nsudo x\nEOF\nsudo systemctl start y\nscp f h:/d/\n\
                sudo -u postgres c \\\n  d\nsudo tee g <<'EOF'\nh\nEOF\n";
    assert_eq!(
        pieces(text),
        vec![
            Piece::Shell("a    b\ncat > f <<'EOF'\nsudo x\nEOF\n".into()),
            Piece::Line("sudo systemctl start y".into()),
            Piece::Line("scp f h:/d/".into()),
            Piece::Shell("c    d\ntee g <<'EOF'\nh\nEOF\n".into()),
        ]
    );
}

/// One of the two hosts: its namespace, its server and where the guide's paths lead on it.
struct Machine {
    host: Host,
    cluster: Cluster,
    /// What `/etc/failback` is on this host.
    etc: PathBuf,
    /// `failback` and `failbackd`, copied where PostgreSQL's user may run them.
    bin: PathBuf,
}

impl Machine {
    fn new(name: &str, host: Host, cluster: Cluster, bin: &Path) -> Machine {
        let etc = cluster.base_dir().join(format!("{name}-etc-failback"));
        user::create_dir(&etc);
        Machine {
            host,
            cluster,
            etc,
            bin: bin.to_path_buf(),
        }
    }

    /// The guide's text with this host's paths, socket and the hosts' addresses.
    fn map(&self, text: &str, link: &Link) -> String {
        let c = &self.cluster;
        let socket = format!("host={} port={}", c.socket_dir().display(), c.port());
        [
            (
                "/var/lib/postgresql/16/main",
                c.data_dir().display().to_string(),
            ),
            ("/var/lib/postgresql", c.base_dir().display().to_string()),
            ("host=/var/run/postgresql", socket),
            ("/etc/failback", self.etc.display().to_string()),
            ("/usr/bin/", format!("{}/", self.bin.display())),
            ("10.0.0.1", link.a.addr.to_string()),
            ("10.0.0.2", link.b.addr.to_string()),
        ]
        .iter()
        .fold(text.to_string(), |t, (from, to)| t.replace(from, to))
    }

    /// A command run as PostgreSQL's user, on this host, with the guide's programs on PATH.
    fn command(&self, program: &str) -> Command {
        let mut cmd = user::command(program);
        cmd.env(
            "PATH",
            format!("{}:/usr/local/bin:/usr/bin:/bin", self.bin.display()),
        );
        cmd.current_dir(self.cluster.base_dir());
        cmd
    }

    fn run_shell(&self, script: &str, what: &str) -> String {
        let mut cmd = self.command("/bin/sh");
        cmd.arg("-eu").arg("-c").arg(script);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = netns::spawn_in(&self.host.netns, &mut cmd)
            .unwrap_or_else(|e| panic!("{what}: could not start sh: {e}"));
        let out = child.wait_with_output().expect("wait for sh");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "{what} failed ({}):\n{script}\n--- output ---\n{text}",
            out.status
        );
        text
    }
}

/// failbackd as systemd runs it from the packaged unit: `ExecStart`, in the host's namespace, as
/// the unit's user, with a `NOTIFY_SOCKET`; returns once it said `READY=1`.
fn start_unit(m: &Machine, link: &Link, notify_dir: &Path) -> Child {
    let unit = std::fs::read_to_string(UNIT).expect("packaging/failbackd.service");
    let exec = unit
        .lines()
        .find_map(|l| l.trim().strip_prefix("ExecStart="))
        .expect("the unit has an ExecStart line");
    assert!(
        unit.lines().any(|l| l.trim() == "Type=notify"),
        "the unit is Type=notify: systemctl start waits for failbackd's READY=1"
    );
    let exec = m.map(exec, link);
    let argv: Vec<&str> = exec.split_whitespace().collect();
    let sock_path = notify_dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind the notify socket");
    std::fs::set_permissions(&sock_path, std::fs::Permissions::from_mode(0o777)).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut cmd = m.command(argv[0]);
    cmd.args(&argv[1..])
        .env("NOTIFY_SOCKET", &sock_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(
            std::fs::File::create(m.cluster.base_dir().join("failbackd.log"))
                .expect("failbackd's log"),
        );
    let mut child = netns::spawn_in(&m.host.netns, &mut cmd).expect("start failbackd");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut said = String::new();
    let mut buf = [0u8; 4096];
    while !said.lines().any(|l| l == "READY=1") {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "failbackd exited ({status}) before it was ready; its log:\n{}",
                failbackd_log(m)
            );
        }
        assert!(
            Instant::now() < deadline,
            "failbackd did not say READY=1 within 60 s (said {said:?}); its log:\n{}",
            failbackd_log(m)
        );
        if let Ok(n) = sock.recv(&mut buf) {
            said.push_str(&String::from_utf8_lossy(&buf[..n]));
            said.push('\n');
        }
    }
    child
}

fn failbackd_log(m: &Machine) -> String {
    std::fs::read_to_string(m.cluster.base_dir().join("failbackd.log")).unwrap_or_default()
}

/// `scp FILE… HOST:DIR/`, from `from` to the host named.
fn scp(line: &str, from: &Machine, hosts: &BTreeMap<String, &Machine>, link: &Link) {
    let words: Vec<&str> = line.split_whitespace().skip(1).collect();
    let (dest, files) = words
        .split_last()
        .expect("scp names files and a destination");
    let (host, dir) = dest
        .split_once(':')
        .unwrap_or_else(|| panic!("{line}: the destination is HOST:DIR"));
    let to = hosts
        .get(host)
        .unwrap_or_else(|| panic!("{line}: no host {host} in the walkthrough"));
    let dir = PathBuf::from(to.map(dir, link));
    for f in files {
        let src = PathBuf::from(from.map(f, link));
        let dst = dir.join(src.file_name().unwrap());
        std::fs::copy(&src, &dst)
            .unwrap_or_else(|e| panic!("{line}: {} → {}: {e}", src.display(), dst.display()));
        user::give(&dst);
    }
}

#[test]
fn readme_deployment_ends_with_a_rewound_standby() {
    if let Some(why) = netns::unavailable() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the deployment walkthrough: {why}"
        );
        eprintln!("skipped: {why}");
        return;
    }
    let readme = std::fs::read_to_string(README).expect("README.md");
    let blocks = walkthrough_blocks(&readme);
    assert!(
        blocks.iter().any(|b| b.host == "db1") && blocks.iter().any(|b| b.host == "db2"),
        "README has walkthrough blocks for db1 and db2: {blocks:?}"
    );

    // A failover: db2 streams from db1, is promoted, and both are written to.
    let mut db1 = Cluster::start_new(PgMajor::V15, "db1");
    db1.execute(
        "CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL);
         INSERT INTO accounts SELECT g, 0 FROM generate_series(1, 20000) g;",
    );
    let mut db2 = db1.create_standby("db2");
    db2.wait_for_catchup(&db1);
    db2.promote();
    db1.execute("UPDATE accounts SET balance = balance - 1 WHERE id % 7 = 0");
    db2.execute(
        "UPDATE accounts SET balance = balance + 5 WHERE id % 3 = 0;
         CREATE TABLE after_failover AS SELECT g AS id FROM generate_series(1, 5000) g;",
    );
    db1.stop(StopMode::Fast);

    // Each server onto its own host; db2 admits db1's standby over the link, as it admitted
    // db2's from the other side before the failover.
    let link = Link::new("fbw").unwrap_or_else(|e| panic!("{e}"));
    db2.stop(StopMode::Fast);
    let hba = db2.data_dir().join("pg_hba.conf");
    let mut text = std::fs::read_to_string(&hba).unwrap();
    text.push_str("host all all 10.231.0.0/16 trust\nhost replication all 10.231.0.0/16 trust\n");
    std::fs::write(&hba, text).unwrap();
    db2.set_netns(Some(&link.b));
    db2.start();
    db1.set_netns(Some(&link.a));

    let bin = tempfile::Builder::new()
        .prefix("fbw-bin-")
        .tempdir()
        .unwrap();
    for (name, path) in [
        ("failback", programs::failback()),
        ("failbackd", programs::failbackd()),
    ] {
        std::fs::copy(path, bin.path().join(name)).unwrap();
    }
    std::fs::set_permissions(bin.path(), std::fs::Permissions::from_mode(0o755)).unwrap();

    let mut machines = [
        Machine::new("db1", link.a.clone(), db1, bin.path()),
        Machine::new("db2", link.b.clone(), db2, bin.path()),
    ];
    let mut failbackd: Option<Child> = None;
    let mut skipped = Vec::new();
    for block in &blocks {
        let i = match block.host.as_str() {
            "db1" => 0,
            "db2" => 1,
            other => panic!(
                "README line {}: no host {other} in the walkthrough",
                block.line
            ),
        };
        for piece in pieces(&block.text) {
            let what = format!("README line {} on {}", block.line, block.host);
            match piece {
                Piece::Shell(script) => {
                    let script = machines[i].map(&script, &link);
                    machines[i].run_shell(&script, &what);
                }
                Piece::Line(line) if line.starts_with("scp ") => {
                    let hosts: BTreeMap<String, &Machine> = [
                        ("db1".to_string(), &machines[0]),
                        ("db2".to_string(), &machines[1]),
                    ]
                    .into();
                    scp(&line, &machines[i], &hosts, &link);
                }
                Piece::Line(line) if line == "sudo systemctl enable --now failbackd" => {
                    assert!(failbackd.is_none(), "{what}: failbackd started twice");
                    let notify = tempfile::tempdir().unwrap();
                    std::fs::set_permissions(notify.path(), std::fs::Permissions::from_mode(0o755))
                        .unwrap();
                    failbackd = Some(start_unit(&machines[i], &link, notify.path()));
                }
                Piece::Line(line)
                    if line.starts_with("sudo pg_ctlcluster ") && line.ends_with(" start") =>
                {
                    machines[i].cluster.start();
                }
                Piece::Line(line) if line.starts_with("sudo install -d ") => {
                    // `install -d -o postgres -g postgres -m MODE DIR`: DIR, PostgreSQL's user's.
                    let words: Vec<&str> = line.split_whitespace().collect();
                    let mode = words
                        .windows(2)
                        .find(|w| w[0] == "-m")
                        .map(|w| u32::from_str_radix(w[1], 8).expect("an octal -m"))
                        .expect("install -d with -m");
                    assert!(
                        line.contains("-o postgres -g postgres"),
                        "{what}: {line}: made for postgres"
                    );
                    let dir = PathBuf::from(machines[i].map(words[words.len() - 1], &link));
                    user::create_dir(&dir);
                    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
                }
                Piece::Line(line) if line.starts_with("sudo apt install ") => skipped.push(line),
                Piece::Line(line) => panic!("{what}: the walkthrough cannot run {line:?}"),
            }
        }
    }
    let mut failbackd = failbackd.expect("the guide starts failbackd on db2");
    let [db1, db2] = &mut machines;
    assert!(
        db1.cluster.is_running(),
        "the guide ends with db1 started; its blocks: {blocks:?}"
    );

    // db1 is db2's standby, streaming over the link, and has every row db2 has.
    db1.cluster.wait_for_catchup(&db2.cluster);
    assert_eq!(db1.cluster.query_one("SELECT pg_is_in_recovery()"), "t");
    assert_eq!(
        db1.cluster
            .query_one("SELECT sender_host FROM pg_stat_wal_receiver WHERE status = 'streaming'"),
        link.b.addr.to_string(),
        "db1 streams from db2's address over the link"
    );
    assert_same_data(&db2.cluster, &db1.cluster);
    let report = std::fs::read_to_string(db1.cluster.base_dir().join("rewind.json"))
        .expect("the guide's --report");
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(
        (
            report["rewind_needed"].as_bool(),
            report["resumed"].as_bool()
        ),
        (Some(true), Some(false)),
        "the report of one rewind: {report}"
    );
    assert!(
        report["bytes_to_fetch"].as_u64().is_some_and(|b| b > 0),
        "the rewind fetched something over the link: {report}"
    );

    // systemctl stop: SIGTERM, and failbackd ends cleanly.
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(failbackd.id() as i32, libc::SIGTERM) };
    let status = failbackd.wait().unwrap();
    assert!(
        status.success(),
        "failbackd stopped by SIGTERM exits 0 ({status}); its log:\n{}",
        failbackd_log(db2)
    );
    eprintln!("not run here (see packages.rs): {skipped:?}");
}
