//! Rebuilds the crate when a migration folder is added or changed, so that
//! `embed_migrations!` always embeds the current set.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
