//! `hyserve cluster-certs`: a cluster CA and one certificate per member, for the mutual
//! TLS between the coordinator and the workers. Every member certificate carries the
//! cluster name every client checks (members are authenticated by the CA, not by host
//! names) and may act as server and client.

use std::path::{Path, PathBuf};

use anyhow::Context;
use hyserve_worker::remote::CLUSTER_TLS_NAME;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Directory to write `ca.pem`, `ca.key` and `<name>.pem`/`<name>.key` into.
    #[arg(long)]
    out: PathBuf,
    /// Member names, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "coordinator,worker-0,worker-1,worker-2"
    )]
    names: Vec<String>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    anyhow::ensure!(!a.names.is_empty(), "--names is empty");
    for n in &a.names {
        anyhow::ensure!(
            !n.is_empty()
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "member name {n:?}: use letters, digits, '-' and '_'"
        );
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "hyserve cluster CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    let ca_pem_key = ca_key.serialize_pem();
    let issuer = CertifiedIssuer::self_signed(ca, ca_key)?;
    write(&a.out.join("ca.pem"), &issuer.pem())?;
    write_secret(&a.out.join("ca.key"), &ca_pem_key)?;
    for name in &a.names {
        let mut p = CertificateParams::new(vec![
            CLUSTER_TLS_NAME.to_string(),
            name.clone(),
            "localhost".to_string(),
        ])?;
        p.distinguished_name.push(DnType::CommonName, name.as_str());
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &issuer)?;
        write(&a.out.join(format!("{name}.pem")), &cert.pem())?;
        write_secret(&a.out.join(format!("{name}.key")), &key.serialize_pem())?;
    }
    eprintln!(
        "wrote the cluster CA and {} member certificates to {}; keep ca.key offline",
        a.names.len(),
        a.out.display()
    );
    Ok(())
}

fn write(p: &Path, s: &str) -> anyhow::Result<()> {
    std::fs::write(p, s).with_context(|| format!("writing {}", p.display()))
}

/// Writes a private key readable by its owner only.
fn write_secret(p: &Path, s: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    let mut f = o
        .open(p)
        .with_context(|| format!("writing {}", p.display()))?;
    f.write_all(s.as_bytes())
        .with_context(|| format!("writing {}", p.display()))
}
