//! `failback-gen-docs OUT_DIR`: the man pages and shell completions of `failback` and
//! `failbackd`, generated from the clap definitions the binaries parse
//! (`failback_client::cli::Cli`, `failback_server::cli::Args`), so that a flag added to the
//! code is in the packages' documentation without anyone writing it twice.
//!
//! A packaging tool (packaging/build-debs runs it), never shipped. It writes:
//!
//! ```text
//! OUT_DIR/man/man1/failback.1, failback-<subcommand>.1 (each subcommand, nested ones too)
//! OUT_DIR/man/man8/failbackd.8
//! OUT_DIR/completions/bash/{failback,failbackd}
//! OUT_DIR/completions/zsh/{_failback,_failbackd}
//! OUT_DIR/completions/fish/{failback.fish,failbackd.fish}
//! ```

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::CommandFactory;
use clap_complete::Shell;

fn main() -> Result<()> {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next(), args.next()) else {
        bail!(
            "usage: failback-gen-docs OUT_DIR (writes man/ and completions/ under OUT_DIR; \
             see packaging/build-debs)"
        );
    };
    let out = PathBuf::from(out);
    write_docs(&out).with_context(|| format!("could not write the docs under {}", out.display()))
}

fn write_docs(out: &Path) -> Result<()> {
    let client = failback_client::cli::Cli::command();
    let server = failback_server::cli::Args::command();

    let man1 = mkdir(&out.join("man/man1"))?;
    clap_mangen::generate_to(client.clone(), &man1)
        .with_context(|| format!("could not write failback's man pages to {}", man1.display()))?;
    append(
        &man1.join("failback.1"),
        ".SH \"SEE ALSO\"\nfailbackd(8), pg_rewind(1)\n",
    )?;

    let man8 = mkdir(&out.join("man/man8"))?;
    let page = man8.join("failbackd.8");
    let mut roff = Vec::new();
    clap_mangen::Man::new(server.clone())
        .section("8")
        .render(&mut roff)?;
    roff.extend_from_slice(FAILBACKD_EXTRA.as_bytes());
    fs::write(&page, roff).with_context(|| format!("could not write {}", page.display()))?;

    for (shell, dir) in [
        (Shell::Bash, "bash"),
        (Shell::Zsh, "zsh"),
        (Shell::Fish, "fish"),
    ] {
        let dir = mkdir(&out.join("completions").join(dir))?;
        for mut cmd in [client.clone(), server.clone()] {
            let name = cmd.get_name().to_owned();
            clap_complete::generate_to(shell, &mut cmd, &name, &dir).with_context(|| {
                format!(
                    "could not write {name}'s {shell} completion to {}",
                    dir.display()
                )
            })?;
        }
    }
    // clap_complete names bash's file `<name>.bash`; bash-completion loads
    // /usr/share/bash-completion/completions/<command>, named as the command.
    for name in ["failback", "failbackd"] {
        let dir = out.join("completions/bash");
        fs::rename(dir.join(format!("{name}.bash")), dir.join(name))
            .with_context(|| format!("could not rename {name}.bash in {}", dir.display()))?;
    }
    Ok(())
}

/// What the page made from failbackd's flags cannot say: its config file, its unit, and how
/// it stops.
const FAILBACKD_EXTRA: &str = r#".SH FILES
.TP
\fI/etc/failback/failbackd.toml\fR
The settings of the packaged service (\fB\-\-config\fR): the same names as the flags, with
underscores (\fBpgdata\fR, \fBlisten\fR, \fBtls_cert\fR, ...; \fBwal_summaries = false\fR
for \fB\-\-no\-wal\-summaries\fR). A flag given on the command line wins over the file; a key
the file does not know is refused.
.TP
\fI/lib/systemd/system/failbackd.service\fR
Runs \fBfailbackd \-\-config /etc/failback/failbackd.toml\fR as the \fBpostgres\fR user,
reading the data directory only. The package neither enables nor starts it: configure
the file above, then \fBsystemctl enable \-\-now failbackd\fR.
.SH SIGNALS
On SIGTERM (\fBsystemctl stop\fR) failbackd stops accepting connections and lets the
replies in flight finish before it exits.
.SH "SEE ALSO"
failback(1), postgres(1)
"#;

fn mkdir(dir: &Path) -> Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("could not create {}", dir.display()))?;
    Ok(dir.to_path_buf())
}

fn append(file: &Path, roff: &str) -> Result<()> {
    fs::OpenOptions::new()
        .append(true)
        .open(file)
        .and_then(|mut f| f.write_all(roff.as_bytes()))
        .with_context(|| format!("could not add to {}", file.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_every_page_and_completion() {
        let dir = tempfile::tempdir().unwrap();
        write_docs(dir.path()).unwrap();
        for f in [
            "man/man1/failback.1",
            "man/man1/failback-rewind.1",
            "man/man1/failback-inspect-wal.1",
            "man/man8/failbackd.8",
            "completions/bash/failback",
            "completions/bash/failbackd",
            "completions/zsh/_failback",
            "completions/fish/failbackd.fish",
        ] {
            let text = fs::read_to_string(dir.path().join(f)).unwrap();
            assert!(!text.is_empty(), "{f} is empty");
        }
        let rewind = fs::read_to_string(dir.path().join("man/man1/failback-rewind.1")).unwrap();
        assert!(rewind.contains("target\\-pgdata"), "{rewind}");
        let bash = fs::read_to_string(dir.path().join("completions/bash/failback")).unwrap();
        assert!(bash.contains("--source-server"), "{bash}");
    }
}
