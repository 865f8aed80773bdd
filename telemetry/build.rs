//! Records the git revision the binary is built from (`hyserve_build_info`), or
//! nothing outside a git checkout (a container build without `.git`).

fn main() {
    println!("cargo:rerun-if-changed=../.git/HEAD");
    println!("cargo:rerun-if-changed=../.git/refs/heads");
    if let Ok(out) = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        && out.status.success()
    {
        let rev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !rev.is_empty() {
            println!("cargo:rustc-env=HYSERVE_GIT_REVISION={rev}");
        }
    }
}
