//! `failbackd --version` names the commit it was built from (see packaging/build-info).
fn main() {
    failback_build_info::emit_commit();
}
