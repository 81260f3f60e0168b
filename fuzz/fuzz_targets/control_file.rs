//! Fuzzes `ControlFileData::parse` and `to_bytes`.
//!
//! Input: byte 0 chooses the mode; the rest is the file.
//!
//! - **Raw** (byte 0 even): the rest as `global/pg_control`, any size.
//! - **Forged** (byte 0 odd): the rest padded or cut to 8192 bytes, with `pg_control_version`,
//!   `catalog_version_no` and the CRC made right for the version `(byte 0 >> 1) % 6`, so the
//!   fuzzer explores the fields rather than the CRC.
//!
//! Checked besides "no panic": a file that parses writes back byte for byte unchanged; with
//! fields changed, what is written parses back to the changed values.

#![no_main]

use failback_common::control::{ControlFileLayout, control_file_crc};
use failback_common::{ControlFileData, DBState, Lsn, PgMajor};
use libfuzzer_sys::fuzz_target;

const SIZE: usize = 8192;

fuzz_target!(|data: &[u8]| {
    let [mode, rest @ ..] = data else {
        return;
    };
    let file = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        let major = PgMajor::ALL[usize::from(mode >> 1) % PgMajor::ALL.len()];
        let mut f = rest.to_vec();
        f.resize(SIZE, 0);
        f[8..12].copy_from_slice(&major.pg_control_version().to_le_bytes());
        f[12..16].copy_from_slice(&major.catalog_version_no().to_le_bytes());
        let at = ControlFileLayout::of(major).crc;
        let crc = control_file_crc(&f, major).expect("8192 bytes hold the CRC");
        f[at..at + 4].copy_from_slice(&crc.to_le_bytes());
        f
    };
    let Ok(c) = ControlFileData::parse(&file) else {
        return;
    };
    let _ = format!("{c:?} {} {}", c.state, c.timeline_for_rewind());
    assert_eq!(
        c.to_bytes().as_deref(),
        Ok(&file[..]),
        "an unchanged control file must write back as it was read"
    );

    let mut changed = c.clone();
    changed.state = DBState::InArchiveRecovery;
    changed.minRecoveryPoint = Lsn(c.checkPoint.0.wrapping_add(0x1234_5678));
    changed.minRecoveryPointTLI = c.checkPointCopy.ThisTimeLineID.wrapping_add(1);
    changed.checkPointCopy.nextOid = c.checkPointCopy.nextOid ^ 0x5555;
    let bytes = changed
        .to_bytes()
        .expect("a parsed file with changed fields writes");
    let back = ControlFileData::parse(&bytes).expect("what to_bytes writes parses");
    assert_eq!(back.state, DBState::InArchiveRecovery);
    assert_eq!(back.minRecoveryPoint, changed.minRecoveryPoint);
    assert_eq!(back.minRecoveryPointTLI, changed.minRecoveryPointTLI);
    assert_eq!(back.checkPointCopy.nextOid, changed.checkPointCopy.nextOid);
    assert_eq!(back.checkPoint, c.checkPoint);
    assert_eq!(back.system_identifier, c.system_identifier);
});
