//! Prepares the etcd-client crate's own test suite for the integration tests, which run its
//! auth tests against a geolock node (`tests/integration/auth.rs`). The suite is read from the
//! crate's source as cargo downloaded it (the version `Cargo.lock` pins) and is not copied into
//! this repository: the build turns it into a module whose tests are plain `pub async fn`s
//! that take their endpoint at run time instead of etcd's `localhost:2379`.
//!
//! Building `lockctl` alone may run before cargo fetched the crate (it is a dev-dependency);
//! then the module is a `compile_error!` naming the missing file, which only the integration
//! tests include, and this script runs again on every build until the file is there.

use std::path::{Path, PathBuf};

const OUT_FILE: &str = "etcd_client_suite.rs";

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join(OUT_FILE);
    let lock = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.lock");
    println!("cargo:rerun-if-changed={}", lock.display());
    println!("cargo:rerun-if-changed=build.rs");
    let module = match suite_dir(&lock) {
        Ok(dir) => {
            for f in ["client.rs", "testing.rs"] {
                println!("cargo:rerun-if-changed={}", dir.join(f).display());
            }
            generate(&dir).unwrap_or_else(|e| format!("compile_error!({:?});", e))
        }
        Err((missing, why)) => {
            println!("cargo:rerun-if-changed={}", missing.display());
            format!("compile_error!({why:?});")
        }
    };
    std::fs::write(&out, module).expect("write the etcd-client suite module");
}

/// `tests/` of the etcd-client source cargo downloaded, or the path that was looked for and why.
fn suite_dir(lock: &Path) -> Result<PathBuf, (PathBuf, String)> {
    let text = std::fs::read_to_string(lock).map_err(|e| (lock.to_path_buf(), format!("{}: {e}", lock.display())))?;
    let version = text
        .split("[[package]]")
        .find(|p| p.contains("\nname = \"etcd-client\"\n"))
        .and_then(|p| p.lines().find_map(|l| l.strip_prefix("version = \"")?.strip_suffix('"')))
        .ok_or_else(|| (lock.to_path_buf(), "Cargo.lock pins no etcd-client".to_string()))?;
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .ok_or_else(|| (PathBuf::from("."), "neither CARGO_HOME nor HOME is set".to_string()))?;
    let src = home.join("registry/src");
    let wanted = format!("etcd-client-{version}");
    let found = std::fs::read_dir(&src)
        .into_iter()
        .flatten()
        .flatten()
        .map(|index| index.path().join(&wanted).join("tests"))
        .find(|dir| dir.join("client.rs").is_file());
    found.ok_or_else(|| {
        let dir = src.join(&wanted);
        (dir.clone(), format!("the etcd-client {version} source is not in {} yet: run `cargo fetch`", src.display()))
    })
}

/// Replace `from` with `to` in `text`, which must contain it.
fn patch(text: &mut String, from: &str, to: &str, file: &str) -> Result<(), String> {
    if !text.contains(from) {
        return Err(format!("etcd-client's tests/{file} no longer contains {from:?}: update src/lockctl/build.rs"));
    }
    *text = text.replace(from, to);
    Ok(())
}

fn generate(dir: &Path) -> Result<String, String> {
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).map_err(|e| format!("{}: {e}", dir.join(f).display()));
    let mut testing = read("testing.rs")?;
    patch(
        &mut testing,
        "pub const DEFAULT_TEST_ENDPOINT: &str = \"localhost:2379\";",
        "pub static ENDPOINT: std::sync::OnceLock<String> = std::sync::OnceLock::new();\n\
         pub fn default_test_endpoint() -> &'static str {\n    \
         ENDPOINT.get().expect(\"the endpoint is set before a test runs\")\n}",
        "testing.rs",
    )?;
    let mut client = read("client.rs")?;
    patch(&mut client, "mod testing;", &format!("pub mod testing {{\n{testing}\n}}"), "client.rs")?;
    patch(&mut client, "use crate::testing::", "use self::testing::", "client.rs")?;
    patch(&mut client, "Result, DEFAULT_TEST_ENDPOINT};", "Result, default_test_endpoint};", "client.rs")?;
    patch(&mut client, "DEFAULT_TEST_ENDPOINT", "default_test_endpoint()", "client.rs")?;
    patch(&mut client, "use serial_test::{parallel, serial};", "", "client.rs")?;
    patch(&mut client, "\nasync fn test_", "\npub async fn test_", "client.rs")?;
    // Attributes that made them tests of their own crate; here a geolock test calls them.
    let kept: Vec<&str> = client
        .lines()
        .filter(|l| {
            let l = l.trim();
            !(l == "#[tokio::test]" || l == "#[serial]" || l == "#[parallel]" || l.starts_with("#[ignore"))
        })
        .collect();
    Ok(kept.join("\n"))
}
